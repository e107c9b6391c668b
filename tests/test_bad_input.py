"""Bad input, round 2: each defect of the issue reproduced; now one clear line and a non-zero exit (or the
right behaviour), and no finished result lost or overwritten."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from harness import checkpoint
from harness.cli import main
from harness.data import DataConfig
from harness.job import Job, TrainConfig
from harness.results import ResultsStore
from harness.train import flops_warning, train_job

SMALL = dict(seq_len=32, batch_size=4, checkpoint_every=5, log_every=1, eval_tokens=2048)
BUDGET = 6e9  # >= 25 steps of vanilla/pico


def _job(data, budget=BUDGET):
    return Job(method="vanilla", budget=budget, size="pico", data=DataConfig(source=data, vocab_size=512),
               train=TrainConfig(**SMALL))


def _train_args(data, out, budget=BUDGET, *extra):
    sets = [f"data.source={data}", "data.vocab_size=512", *(f"train.{k}={v}" for k, v in SMALL.items())]
    return ["train", "--method", "vanilla", "--size", "pico", "--budget", str(budget), "--out", str(out),
            "--no-progress", *(a for s in sets for a in ("--set", s)), *extra]


def _one_line_error(capsys, argv, code=2):
    """Run the CLI in process; the one stderr line it printed (asserting the exit code and one line)."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# 1. an infeasible budget stops before anything is written


def test_train_refuses_a_budget_beyond_the_hardware(tmp_path, small_corpus, capsys):
    out = tmp_path / "huge"
    line = _one_line_error(capsys, _train_args(small_corpus, out, 1e30))
    assert "--budget 1e+30" in line and "--yes" in line and " h of training" in line
    assert not out.exists()


# 2. eval never writes a partial result; train knows a finished job by its checkpoint


def _unfinish(folder: pathlib.Path, step: int = 10) -> None:
    """Make a trained job look killed at ``step``: the checkpoint says so, no result.json."""
    state = checkpoint.load_state(folder / "checkpoint")
    state["step"] = step
    (folder / "checkpoint" / "state.json").write_text(json.dumps(state))
    (folder / "result.json").unlink()


def test_eval_refuses_an_unfinished_job_and_train_then_finishes_it(tmp_path, small_corpus, capsys):
    folder = tmp_path / "job"
    full = train_job(_job(small_corpus), folder, progress=False)
    _unfinish(folder)
    line = _one_line_error(capsys, ["eval", str(folder), "--no-progress"])
    assert "has not finished training (step 10 of" in line and "harness train" in line
    assert not (folder / "result.json").exists()
    # what the old eval wrote: a result without method, size, budget or training FLOPs
    (folder / "result.json").write_text(json.dumps({"val_loss": 5.0, "downstream": {"arc_easy": 0.3}}))
    assert main(_train_args(small_corpus, folder)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "vanilla" and printed["train_flops"] > 0  # (the faked state kept its ledger)
    saved = json.loads((folder / "result.json").read_text())
    assert saved["method"] == "vanilla" and saved["budget"] == BUDGET and saved["train_steps"] == full["train_steps"]
    assert saved["downstream"] == {"arc_easy": 0.3}  # scores of the earlier eval survive


def test_eval_refuses_a_finished_job_without_its_result(tmp_path, small_corpus, capsys):
    folder = tmp_path / "job"
    train_job(_job(small_corpus), folder, progress=False)
    (folder / "result.json").unlink()  # killed while evaluating
    line = _one_line_error(capsys, ["eval", str(folder), "--no-progress"])
    assert "no full result.json" in line
    assert not (folder / "result.json").exists()


def test_eval_of_a_finished_job_keeps_its_record(tmp_path, small_corpus, capsys):
    folder = tmp_path / "job"
    full = train_job(_job(small_corpus), folder, progress=False)
    assert main(["eval", str(folder), "--json", "--no-progress"]) == 0
    saved = json.loads((folder / "result.json").read_text())
    for key in ("method", "size", "budget", "train_flops", "train_steps"):
        assert saved[key] == full[key]


# 3 and 6. --out that cannot be a folder: one line saying why


def test_out_pointing_at_a_file_is_one_line(tmp_path, small_corpus, capsys):
    existing = tmp_path / "result.txt"
    existing.write_text("keep me")
    line = _one_line_error(capsys, _train_args(small_corpus, existing))
    assert f"{existing} is a file, not a folder" in line
    assert existing.read_text() == "keep me"


def test_sweep_out_pointing_at_a_file_is_one_line(tmp_path, small_corpus, capsys):
    existing = tmp_path / "runs.txt"
    existing.write_text("keep me")
    argv = ["sweep", *_train_args(small_corpus, existing)[3:], "--yes"]  # without --method vanilla
    argv.remove("--size")
    argv.remove("pico")
    line = _one_line_error(capsys, [*argv, "--methods", "vanilla", "--sizes", "pico"])
    assert f"{existing} is a file, not a folder" in line and existing.read_text() == "keep me"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_out_that_cannot_be_created_says_why(small_corpus, capsys):
    line = _one_line_error(capsys, _train_args(small_corpus, "/proc/harness-x"))
    assert "/proc/harness-x cannot be created" in line and "/proc does not accept new folders" in line
    assert "No such file or directory" in line  # the system's reason, after ours


def test_plot_and_table_out_errors_are_one_line(tmp_path, capsys):
    _runs(tmp_path, torn=False)
    line = _one_line_error(capsys, ["table", str(tmp_path), "--out", str(tmp_path)])
    assert "is a folder; give a file name" in line
    (tmp_path / "file").write_text("x")
    line = _one_line_error(capsys, ["plot", str(tmp_path), "--out", str(tmp_path / "file" / "plots")])
    assert "is a file, not a folder" in line


# 4. validation before writing; a mismatch says what differs


def test_bad_data_source_leaves_nothing_behind(tmp_path, small_corpus, capsys):
    out = tmp_path / "job"
    line = _one_line_error(capsys, _train_args(tmp_path / "no-such-corpus", out))
    assert "no-such-corpus" in line
    assert not out.exists()  # no job.json to trip over
    out.mkdir()
    _one_line_error(capsys, _train_args(tmp_path / "no-such-corpus", out))
    assert list(out.iterdir()) == []
    # budget too small for one step: also refused before writing
    _one_line_error(capsys, _train_args(small_corpus, out, 10))
    assert list(out.iterdir()) == []
    assert main(_train_args(small_corpus, out)) == 0  # the corrected command needs no --force
    assert json.loads(capsys.readouterr().out)["method"] == "vanilla"


def test_a_different_job_names_the_differing_fields(tmp_path, small_corpus, capsys):
    out = tmp_path / "job"
    first = train_job(_job(small_corpus), out, progress=False)
    line = _one_line_error(capsys, _train_args(small_corpus, out, 7e9, "--set", "train.lr=1e-3"))
    assert "holds a different job (budget: 6000000000.0 -> 7000000000.0; train.lr: 0.003 -> 0.001)" in line
    assert "--force" in line
    assert json.loads((out / "result.json").read_text())["val_loss"] == first["val_loss"]  # untouched


# 5. torn or wrong-shaped lines of runs.jsonl are reported


def _runs(folder: pathlib.Path, torn: bool = True) -> None:
    record = {"job_id": "a", "status": "ok", "method": "vanilla", "size": "pico", "seed": 0, "params": 1000,
              "val_ppl": 50.0, "val_loss": 3.9, "infer_flops_per_token": 1e6, "train_flops": 1e12,
              "train_tokens": 1000, "budget": 1e12, "tags": {"match": "train-flops", "sweep_budget": 1e12}}
    lines = [json.dumps(record)]
    if torn:
        lines += ['{"job_id": "b", "status": "ok", "met', json.dumps(["not", "a", "record"]),
                  json.dumps({**record, "job_id": "c", "seed": 1})]
    (folder / "runs.jsonl").write_text("\n".join(lines) + "\n")


def test_store_counts_and_locates_skipped_lines(tmp_path):
    _runs(tmp_path)
    store = ResultsStore(tmp_path)
    assert len(store.records()) == 2
    assert store.skipped_lines == 2 and store.skipped_at == [2, 3]
    assert "skipped 2 torn or malformed line(s)" in store.skipped_note() and "(line 2, 3)" in store.skipped_note()


@pytest.mark.parametrize("command", ["table", "plot"])
def test_table_and_plot_report_skipped_lines(tmp_path, capsys, command):
    _runs(tmp_path)
    assert main([command, str(tmp_path)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "skipped 2 torn or malformed line(s)" in warnings[0] and str(tmp_path / "runs.jsonl") in warnings[0]
    assert "line 2, 3" in warnings[0]


def test_table_of_a_clean_store_warns_nothing(tmp_path, capsys):
    _runs(tmp_path, torn=False)
    assert main(["table", str(tmp_path)]) == 0
    assert "warning" not in capsys.readouterr().err


# kit: the FLOPs warning


def test_flops_warning_thresholds():
    base = {"method": "m", "infer_flops_per_token_analytic_max": 100.0}
    assert flops_warning({**base, "infer_flops_per_token": 101.9}, adaptive=True) is None
    assert flops_warning({**base, "infer_flops_per_token": 50.0}, adaptive=True) is None  # adaptive: below max
    assert "+3.0% above its analytic maximum" in flops_warning({**base, "infer_flops_per_token": 103.0}, True)
    assert flops_warning({**base, "infer_flops_per_token": 98.5}, adaptive=False) is None
    assert "-5.0% off its analytic count" in flops_warning({**base, "infer_flops_per_token": 95.0}, False)
    assert "harness check m" in flops_warning({**base, "infer_flops_per_token": 95.0}, False)


# 8. lm-eval keeps its built-in models next to ours


def test_lm_eval_registry_resolves_harness_and_builtin_models():
    from lm_eval.api.registry import get_model, model_registry

    import harness.lmeval.model

    assert "harness" in model_registry and "hf" in model_registry and "dummy" in model_registry
    assert get_model("harness") is harness.lmeval.model.HarnessLM
    assert get_model("dummy").__name__ == "DummyLM"
    pytest.importorskip("accelerate")  # lm-eval's hf model needs it (pip install lm-eval[hf])
    assert get_model("hf").__name__ == "HFLM"


def _tiny_llama(folder: pathlib.Path) -> None:
    """A 2-layer Llama with a 300-token byte-level BPE tokenizer, saved the way the Hub holds models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)


def test_harness_lm_eval_runs_lm_evals_own_hf_model(tmp_path, capsys):
    pytest.importorskip("accelerate")  # lm-eval's hf model needs it (pip install lm-eval[hf])
    _tiny_llama(tmp_path / "llama")
    assert main(["tasks", "--write", str(tmp_path / "tasks")]) == 0
    capsys.readouterr()
    out = subprocess.run(
        [sys.executable, "-m", "harness.lmeval.runner", "--model", "hf", "--model_args",
         f"pretrained={tmp_path / 'llama'},dtype=float32", "--tasks", "harness_arc_easy", "--include_path",
         str(tmp_path / "tasks"), "--limit", "4", "--device", "cpu", "--batch_size", "4"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Supported model names" not in out.stderr
    assert "|harness_arc_easy|" in out.stdout and "acc" in out.stdout
