"""Bad input, rounds 2 and 3 (issue 24): each defect of the issue reproduced; now one clear line and a non-zero
exit (or the right behaviour), and no finished result lost or overwritten."""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from harness import checkpoint
from harness.cli import main
from harness.core import registry
from harness.core.errors import TrainingError
from harness.core.registry import register
from harness.data import DataConfig
from harness.job import Job, TrainConfig
from harness.results import ResultsStore
from harness.train import Placement, flops_warning, train_job
from models.base import LanguageModel

SMALL = dict(seq_len=32, batch_size=4, checkpoint_every=5, log_every=1, eval_tokens=2048)
BUDGET = 6e9  # 11 steps of vanilla/pico (3 layers of width 128)


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


# ---------------------------------------------------------------------------------------------------
# Round 3 (issue 24): silent wrong inputs, a hanging Ray address, output-side tracebacks, training FLOPs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
    """One finished vanilla job; tests that change it work on a copy (``_copy``)."""
    folder = tmp_path_factory.mktemp("trained") / "job"
    train_job(_job(small_corpus), folder, progress=False)
    return folder


def _copy(folder: pathlib.Path, to: pathlib.Path) -> pathlib.Path:
    shutil.copytree(folder, to)
    return to


def _tree(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def read_only(monkeypatch):
    """A function making a folder read-only. As root permissions do not bind, so the refusal the kernel gives
    every other user is given here too, at the call every harness write to a folder starts with (mkstemp)."""
    made = []

    def make(folder: pathlib.Path) -> pathlib.Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        made.append(folder)
        if os.access(folder, os.W_OK):
            real = tempfile.mkstemp

            def mkstemp(*args, dir=None, **kwargs):
                if dir is not None and pathlib.Path(dir).resolve() == folder.resolve():
                    raise PermissionError(errno.EACCES, "Permission denied", str(dir))
                return real(*args, dir=dir, **kwargs)

            monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        return folder

    yield make
    for folder in made:
        folder.chmod(0o755)


# 1. an unknown method among known ones, and --seeds 0, are refused


def test_sweep_refuses_an_unknown_method_among_known_ones_and_zero_seeds(tmp_path, capsys):
    out = tmp_path / "never"
    study = tmp_path / "one.toml"
    study.write_text('budget = 1e12\nsizes = ["pico"]\n[[arms]]\nmethod = "vanilla"\n')
    line = _one_line_error(capsys, ["sweep", "--study", str(study), "--methods", "vanilla,nosuch", "--dry-run",
                                    "--out", str(out)])
    assert "unknown method 'nosuch'" in line
    line = _one_line_error(capsys, ["sweep", "--study", str(study), "--methods", "vanilla,looped", "--dry-run",
                                    "--out", str(out)])
    assert "has no arm of 'looped'" in line
    for mode in (["--study", str(study)], ["--budget", "1e12", "--methods", "vanilla"]):
        line = _one_line_error(capsys, ["sweep", *mode, "--seeds", "0", "--dry-run", "--out", str(out)])
        assert "--seeds 0: must be at least 1" in line
    assert not out.exists()


# 2. a Ray address that does not answer: bounded, one line, nothing left behind


def test_unreachable_ray_address_fails_in_bounded_time_and_leaves_nothing(tmp_path, small_corpus, capsys,
                                                                          monkeypatch):
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # a running instance would be joined instead of the address
        ray.shutdown()
    monkeypatch.setenv("HARNESS_RAY_CONNECT_TIMEOUT", "1")
    out = tmp_path / "job"
    started = time.time()
    line = _one_line_error(capsys, _train_args(small_corpus, out, BUDGET, "--devices", "2", "--address",
                                               "127.0.0.1:1"))
    assert time.time() - started < 30
    assert "cannot reach the Ray cluster at 127.0.0.1:1 within 1 s" in line and "HARNESS_RAY_CONNECT_TIMEOUT" in line
    assert not out.exists()


# 3. the output side: export, plot, claims, tasks --write


def test_export_never_writes_into_the_job_folder(trained, tmp_path, capsys):
    folder = _copy(trained, tmp_path / "job")
    before = _tree(folder)
    for out in (folder, folder / "hf"):
        line = _one_line_error(capsys, ["export", str(folder), str(out)])
        assert "is inside the job folder" in line
    assert _tree(folder) == before


def test_export_into_a_non_empty_folder_needs_force(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = _one_line_error(capsys, ["export", str(trained), str(out)])
    assert "is not empty" in line and "--force" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(["export", str(trained), str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()


def test_export_to_a_read_only_folder_is_one_line(trained, tmp_path, capsys, read_only):
    out = read_only(tmp_path / "locked")
    line = _one_line_error(capsys, ["export", str(trained), str(out)])
    assert f"cannot write export folder {out}" in line and "Permission denied" in line
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("command", ["plot", "claims"])
def test_plot_and_claims_on_a_read_only_results_folder(tmp_path, capsys, read_only, command):
    folder = tmp_path / "results"
    folder.mkdir()
    _runs(folder, torn=False)
    read_only(folder)
    line = _one_line_error(capsys, [command, str(folder)])
    assert f"{folder}" in line and "Permission denied" in line
    assert ("--out DIR" if command == "plot" else "--no-write") in line
    assert [p.name for p in folder.iterdir()] == ["runs.jsonl"]


def test_tasks_write_onto_an_existing_file_is_one_line(tmp_path, capsys):
    existing = tmp_path / "tasks.txt"
    existing.write_text("keep me")
    line = _one_line_error(capsys, ["tasks", "--write", str(existing)])
    assert f"{existing} is a file, not a folder" in line and existing.read_text() == "keep me"


# 4 and 5. eval: arguments first, and a folder that is not a job


@pytest.mark.parametrize("argument", [["--limit", "0"], ["--num-fewshot", "-1"]])
def test_eval_refuses_bad_arguments_before_any_work(trained, tmp_path, capsys, argument):
    folder = _copy(trained, tmp_path / "job")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    line = _one_line_error(capsys, ["eval", str(folder), "--tasks", "arc_easy", *argument, "--no-progress"])
    assert f"{argument[0]} {argument[1]}: must be" in line
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # tokens.npz untouched


def test_eval_on_a_folder_that_is_not_a_job(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    line = _one_line_error(capsys, ["eval", str(tmp_path), "--no-progress"])
    assert "is not a job folder (no job.json)" in line and "has not finished" not in line


# 6. no command


def test_no_command_exits_2_with_the_usage(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m harness") and "commands:" in err


# 7. training FLOPs of a plugin whose analytic count is low


class _Undercounted(LanguageModel):
    """Vanilla whose training count misses 10% of the work (inference is counted right)."""

    def analytic_flops_per_token(self, seq_len, training=False):
        full = super().analytic_flops_per_token(seq_len, training)
        return 0.9 * full if training else full


@pytest.fixture
def undercounted():
    register("undercounted_for_test")(_Undercounted)
    yield "undercounted_for_test"
    registry._PLUGINS.pop("undercounted_for_test", None)


def test_training_flops_off_the_plan_warn_early_record_and_mark_the_table(undercounted, tmp_path, small_corpus,
                                                                         capsys):
    job = Job(method=undercounted, budget=BUDGET, size="pico", data=DataConfig(source=small_corpus, vocab_size=512),
              train=TrainConfig(**SMALL))
    result = train_job(job, tmp_path / "job", progress=False)
    early = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(early) == 1 and "after 3 step(s) is +11.1% off the planned" in early[0]
    assert "harness check undercounted_for_test" in early[0]
    assert "measured training" in result["flops_warning"] and "+11.1% off the planned" in result["flops_warning"]
    assert "inference" not in result["flops_warning"]  # inference is counted right
    saved = json.loads((tmp_path / "job" / "result.json").read_text())
    assert saved["flops_warning"] == result["flops_warning"]
    # the sweep's table marks the row
    record = {**result, "job_id": "x", "status": "ok", "tags": {"match": "train-flops", "sweep_budget": BUDGET}}
    (tmp_path / "runs.jsonl").write_text(json.dumps(record) + "\n")
    assert main(["table", str(tmp_path)]) == 0
    assert "| undercounted_for_test (FLOPs warning) |" in capsys.readouterr().out


# 8. harness check: where a plugin crashed


class _Crashing(LanguageModel):
    """Vanilla whose training forward indexes past the end of a tensor."""

    def forward(self, input_ids, targets):
        return torch.zeros(1)[input_ids.shape[0]]  # the crash site the check must name


@pytest.fixture
def crashing():
    register("crashing_for_test")(_Crashing)
    yield "crashing_for_test"
    registry._PLUGINS.pop("crashing_for_test", None)


def test_check_names_the_crash_site_in_the_plugin_and_debug_prints_the_traceback(crashing, capsys, monkeypatch):
    monkeypatch.delenv("HARNESS_DEBUG", raising=False)
    assert main(["check", crashing]) == 1
    failed = [line for line in capsys.readouterr().err.splitlines() if ": training: " in line]
    assert len(failed) == 1 and "raised IndexError: index 2 is out of bounds" in failed[0]
    assert f"(at {__file__}:" in failed[0] and "in forward: return torch.zeros(1)[input_ids.shape[0]]" in failed[0]
    assert "HARNESS_DEBUG=1" in failed[0]
    monkeypatch.setenv("HARNESS_DEBUG", "1")
    assert main(["check", crashing]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "IndexError" in err


# 9. SIGINT or SIGTERM: a checkpoint at the end of the step, exit 130, and the resumed run ends as if never stopped


def test_interrupted_run_checkpoints_its_step_and_resumes_exactly(tmp_path, small_corpus, capsys, monkeypatch):
    settings = {**SMALL, "checkpoint_every": 1000}  # no checkpoint but the one the signal writes
    job = Job(method="vanilla", budget=BUDGET, size="pico", data=DataConfig(source=small_corpus, vocab_size=512),
              train=TrainConfig(**settings))
    full = train_job(job, tmp_path / "full", progress=False)
    for name, signum, folder in (("SIGINT", signal.SIGINT, tmp_path / "int"), ("SIGTERM", signal.SIGTERM,
                                                                                 tmp_path / "term")):
        def before_step(self, step, start_step, signum=signum):
            if step == 7 and start_step == 0:  # arrives in the middle of step 8 (7 steps done)
                os.kill(os.getpid(), signum)

        monkeypatch.setattr(Placement, "before_step", before_step)
        argv = ["train", "--method", "vanilla", "--size", "pico", "--budget", str(BUDGET), "--out", str(folder),
                "--no-progress", "--set", f"data.source={small_corpus}", "--set", "data.vocab_size=512",
                *(a for k, v in settings.items() for a in ("--set", f"train.{k}={v}"))]
        assert main(argv) == 130
        err = capsys.readouterr().err
        assert f"interrupted: stopped by {name} after step 8 of {full['train_steps']}, checkpoint written" in err
        assert checkpoint.load_state(folder / "checkpoint")["step"] == 8 and not (folder / "result.json").exists()
        assert main(argv) == 0
        resumed = json.loads((folder / "result.json").read_text())
        for key in ("val_loss", "train_flops", "train_steps", "infer_flops_per_token"):
            assert resumed[key] == full[key], key
        losses = [(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, (folder / "metrics.jsonl")
                                                                           .read_text().splitlines())]
        assert losses == [(r["step"], r.get("loss"), r.get("val_loss")) for r in
                          map(json.loads, (tmp_path / "full" / "metrics.jsonl").read_text().splitlines())]


# 10. a NaN loss suggests only what applies


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_nan_loss_suggests_only_what_applies(tmp_path, small_corpus, monkeypatch, grad_clip):
    import harness.train as train_module

    real = train_module._accumulate

    def accumulate(job, tokens, step, *args):
        loss, lm_loss, stats = real(job, tokens, step, *args)
        return (float("nan") if step == 2 else loss), lm_loss, stats

    monkeypatch.setattr(train_module, "_accumulate", accumulate)
    job = Job(method="vanilla", budget=BUDGET, size="pico", data=DataConfig(source=small_corpus, vocab_size=512),
              train=TrainConfig(**SMALL, grad_clip=grad_clip))
    with pytest.raises(TrainingError) as raised:
        train_job(job, tmp_path / "job", progress=False)
    message = str(raised.value)
    assert "loss became nan at step 2" in message and "lower train.lr (now 0.003)" in message
    assert ("grad_clip" in message) == (grad_clip == 0)


# 11. negative seeds


def test_negative_seed_is_refused(tmp_path, small_corpus, capsys):
    out = tmp_path / "job"
    line = _one_line_error(capsys, _train_args(small_corpus, out, BUDGET, "--seed", "-1"))
    assert "--seed -1: must be 0 or more" in line
    assert not out.exists()


# 12. analyze: nothing to analyse without extra steps


def test_analyze_without_extra_steps_says_so_and_writes_nothing(trained, tmp_path, capsys):
    folder = _copy(trained, tmp_path / "job")
    before = _tree(folder)
    line = _one_line_error(capsys, ["analyze", str(folder)])
    assert "nothing to analyse" in line and "took 0 extra steps" in line and "vanilla job" in line
    assert _tree(folder) == before
    _one_line_error(capsys, ["analyze", str(folder), "--out", str(tmp_path / "analysis")])
    assert not (tmp_path / "analysis").exists()


# 13. the documentation says which vocabulary applies where, where the main job writes, how long tests take


def test_docs_state_the_vocabularies_the_main_jobs_folder_and_the_test_time():
    from harness.core.config import CPU_VOCAB_SIZE, ModelConfig

    root = pathlib.Path(__file__).parents[1]
    readme, design = (root / "README.md").read_text(), (root / "docs" / "design.md").read_text()
    assert (CPU_VOCAB_SIZE, ModelConfig.vocab_size) == (2048, 8192)
    assert "vocabulary 8192 on the CPU rungs" not in design
    for text in (readme, design):
        assert "CPU_VOCAB_SIZE" in text and "2048" in text and "8192" in text
    assert "results/study_quick/" in readme and "results/study_quick/" in (root / ".gitignore").read_text()
    assert "test suite takes" in readme
