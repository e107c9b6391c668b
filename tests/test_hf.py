"""From and to Hugging Face (harness/hf.py): --init-from a Llama checkpoint, export as LlamaForCausalLM.

Offline: every checkpoint is a tiny Llama built here with transformers (random weights, save_pretrained)
and a byte-level BPE trained with harness.data.train_bpe.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from harness import hf
from harness.cli import main
from harness.commands.export import load_trained
from harness.core import registry
from harness.core.errors import CheckpointError, ConfigError, HarnessError
from harness.data import DataConfig, Tokenizer, load_documents, train_bpe
from harness.job import Job, TrainConfig, make_model
from harness.train import train_job

KINDS = {
    "untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa": dict(num_key_value_heads=2, tie_word_embeddings=False),
}
SMALL_TRAIN = ["--set", "train.seq_len=32", "--set", "train.batch_size=2", "--set", "train.eval_tokens=256",
               "--set", "train.eval_batch_size=4", "--set", "train.checkpoint_every=100", "--no-progress"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A ~40 KB text file of real English (a slice of the embedded corpus)."""
    train, _ = load_documents(DataConfig())
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(train[::200][:12])[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(text_file):
    return train_bpe([text_file.read_text(encoding="utf-8")], 300)


def _llama(folder, tokenizer, kind, shard=False):
    """A random tiny Llama of ``kind`` saved in ``folder`` with the test tokenizer; returns the HF model."""
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, rms_norm_eps=1e-6, max_position_embeddings=256, initializer_range=0.1,
                      rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **KINDS[kind])
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "50GB")
    tokenizer.save(folder)
    return model


@pytest.fixture(scope="module", params=list(KINDS))
def llama(request, tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, _llama(folder, tokenizer, request.param, shard=request.param == "gqa")


def _load(method, spec, **overrides):
    plugin = registry.get(method)
    model = plugin.build(hf.model_config(plugin, str(spec), overrides))
    return model, hf.load_into(model, str(spec))


@pytest.mark.parametrize("ponder_init", [False, True])
def test_init_from_gives_transformers_logits(llama, ponder_init):
    kind, folder, reference = llama
    if kind == "gqa":
        assert (folder / "model.safetensors.index.json").exists()  # sharded
    model, report = _load("vanilla", folder, ponder_init=ponder_init)
    assert model.config.ponder_init is ponder_init and model.config.n_kv_heads == KINDS[kind]["num_key_value_heads"]
    assert report["kept_own_init"] == [] and report["loaded"] == len(model.state_dict())
    ids = torch.randint(0, reference.config.vocab_size, (2, 19))
    with torch.no_grad():
        ours, theirs = model.decoder(ids), reference(input_ids=ids).logits
    assert theirs.abs().max() > 0.1  # a test with logits near 0 would prove little
    assert (ours - theirs).abs().max().item() < 1e-4


def test_every_method_keeps_its_own_parameters(llama):
    _, folder, _ = llama
    for name in registry.plugins():
        try:
            model, report = _load(name, folder)
        except ConfigError as exc:  # a method whose config rules out this tiny shape says so by field
            assert "=" in str(exc), exc
            continue
        own = [k for k in model.state_dict() if not k.startswith("decoder.")]
        assert report["kept_own_init"] == own, name
        assert report["loaded"] == len(model.state_dict()) - len(own), name


def test_cli_continued_pretraining_into_ponderlm3_then_export_round_trips(tmp_path, text_file, tokenizer, capsys):
    folder = tmp_path / "llama"
    _llama(folder, tokenizer, "gqa")
    plugin = registry.get("ponderlm3")
    flops_per_step = plugin.build(hf.model_config(plugin, str(folder), {})).train_flops_per_token(32) * 32 * 2
    out = tmp_path / "run"
    args = ["train", "--method", "ponderlm3", "--init-from", str(folder), "--budget", str(3 * flops_per_step),
            "--out", str(out), "--set", f"data.source={text_file}", "--set", "data.val_fraction=0.3", *SMALL_TRAIN]
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    job = json.loads((out / "job.json").read_text())
    assert job["init_from"] == str(folder.resolve())
    assert job["data"]["tokenizer"] == str((folder / "tokenizer.json").resolve())
    assert result["train_steps"] == 3 and result["config"]["ponder_init"] is False
    assert result["init_from"]["path"] == str(folder.resolve())
    assert result["init_from"]["kept_own_init"] == ["router.weight", "router.bias"]
    assert Tokenizer.load(out / "tokenizer.json").sha == tokenizer.sha  # the data was tokenised with it
    assert main(args) == 0  # the same command again: the job (init_from included) is recognised as finished
    assert main(["eval", str(out), "--no-progress"]) == 0  # re-evaluation rebuilds the checkpoint's shape
    assert json.loads((out / "result.json").read_text())["val_loss"] == pytest.approx(result["val_loss"], rel=1e-5)

    # export: backbone + the router, a README saying transformers alone cannot run it; --init-from loads it back
    exported = tmp_path / "exported"
    assert main(["export", str(out), str(exported)]) == 0
    assert "transformers alone cannot run it" in (exported / "README.md").read_text()
    assert "router.weight" in load_file(str(exported / "model.safetensors"))
    _, trained, _, _ = load_trained(out)
    back, report = _load("ponderlm3", exported)
    assert report["kept_own_init"] == [] and back.config == trained.config  # method fields restored too
    for key, value in trained.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_export_vanilla_job_is_a_llama_for_transformers(tmp_path, text_file, capsys):
    job = Job(method="vanilla", budget=1.0, size="pico", model={"ponder_init": True},
              data=DataConfig(source=str(text_file), vocab_size=300, val_fraction=0.3),
              train=TrainConfig(seq_len=32, batch_size=2, eval_tokens=256, eval_batch_size=4))
    job.budget = 3 * make_model(job, 300).train_flops_per_token(32) * 32 * 2
    train_job(job, tmp_path / "run", progress=False)  # ponder_init on: the scale is folded on export
    out = tmp_path / "llama"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    assert not (out / "README.md").exists()
    _, model, _, _ = load_trained(tmp_path / "run")
    assert model.config.ponder_init

    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ours_tok = Tokenizer.load(tmp_path / "run" / "tokenizer.json")
    text = "And the Lord said unto Moses, the king"
    ids = ours_tok.encode(text)
    assert hf_tok(text)["input_ids"] == ids and hf_tok.eos_token_id == ours_tok.eos_id
    prompt = torch.tensor([ids])
    with torch.no_grad():
        assert (hf_model(input_ids=prompt).logits - model.decoder(prompt)).abs().max().item() < 1e-4
        generated = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                      do_sample=False)[0, prompt.shape[1]:].tolist()
        cache = model.new_cache(1)  # the harness's own cached decoding, greedy
        logits, greedy = model.decode(prompt, cache).logits[:, -1], []
        for _ in range(6):
            token = int(logits.argmax(-1))
            greedy.append(token)
            logits = model.decode(torch.tensor([[token]]), cache).logits[:, -1]
    assert generated and generated == greedy[:len(generated)]  # generate stops early only at EOS

    # and back: --init-from the export gives the same function (ponder_init off: embeddings unscaled)
    back, _ = _load("vanilla", out)
    with torch.no_grad():
        assert (back.decoder(prompt) - model.decoder(prompt)).abs().max().item() < 1e-4


@pytest.mark.parametrize("ponder_init", [False, True])
def test_export_then_init_from_round_trips_weights(llama, tmp_path, tokenizer, ponder_init):
    _, folder, _ = llama
    model, _ = _load("vanilla", folder, ponder_init=ponder_init)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not just the checkpoint's own numbers
    hf.export(model, "vanilla", folder / "tokenizer.json", tmp_path / "out")
    back, report = _load("vanilla", tmp_path / "out", ponder_init=ponder_init)
    assert report["kept_own_init"] == []
    for key, value in model.state_dict().items():
        if ponder_init and key == "decoder.embed_tokens.weight":  # scaled and unscaled again: rounding only
            torch.testing.assert_close(back.state_dict()[key], value, rtol=1e-6, atol=0)
        else:
            assert torch.equal(back.state_dict()[key], value), key


def test_export_then_init_from_keeps_a_methods_parametrisation(llama, tmp_path):
    """Pause's own vocabulary row is scaled at use by the method's embedding scale, which export does not fold:
    loading the export back into pause restores ponder_init and embed_scale_rule, so the function is equal."""
    _, folder, _ = llama
    model, _ = _load("pause", folder, ponder_init=True)
    assert model.config.embed_scale != 1.0
    hf.export(model, "pause", folder / "tokenizer.json", tmp_path / "out")
    back, report = _load("pause", tmp_path / "out")
    assert report["kept_own_init"] == [] and back.config.embed_scale == model.config.embed_scale
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(back.parallel_logits(ids), model.parallel_logits(ids), rtol=1e-5, atol=1e-5)


def _one_line_error(capsys, args):
    capsys.readouterr()  # drop what building the checkpoint printed
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def test_non_llama_and_missing_weight_are_one_line_errors(tmp_path, tokenizer, text_file, capsys):
    folder = tmp_path / "llama"
    _llama(folder, tokenizer, "untied")
    common = ["--method", "vanilla", "--budget", "1e9", "--set", f"data.source={text_file}",
              "--set", "data.val_fraction=0.3", *SMALL_TRAIN]

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(folder, gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    line = _one_line_error(capsys, ["train", "--init-from", str(gpt2), "--out", str(tmp_path / "a"), *common])
    assert "model_type='gpt2'" in line

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    line = _one_line_error(capsys, ["train", "--init-from", str(broken), "--out", str(tmp_path / "b"), *common])
    assert "model.layers.1.mlp.up_proj.weight" in line and "missing" in line

    line = _one_line_error(capsys, ["train", "--init-from", str(folder), "--set", "d_model=64",
                                    "--out", str(tmp_path / "c"), *common])
    assert "d_model" in line and "hidden_size" in line

    with pytest.raises(ConfigError, match="rope_parameters"):
        hf.backbone_shape({**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}, "x")
    with pytest.raises(CheckpointError, match="no such folder"):
        hf.resolve(str(tmp_path / "nowhere"))


def test_hub_name_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HarnessError) as err:
        hf.resolve("hf:nobody-here/no-such-model")
    assert "\n" not in str(err.value) and "hub" in str(err.value)


def test_job_ids_without_init_from_are_unchanged():
    job = Job(method="vanilla", budget=1e12)
    assert "init_from" not in job.to_dict()
    assert Job.from_dict(job.to_dict()) == job
    with_init = Job(method="vanilla", budget=1e12, init_from="hf:x/y")
    assert with_init.to_dict()["init_from"] == "hf:x/y" and with_init.job_id() != job.job_id()
    assert Job.from_dict(with_init.to_dict()) == with_init
