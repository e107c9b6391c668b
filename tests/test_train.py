"""One job end to end: budget matching, determinism, resume after a kill, clear errors."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import models.backbone as backbone
from harness.core import registry
from harness.data import DataConfig
from harness.job import Job, TrainConfig
from harness.train import train_job

SMALL = dict(seq_len=32, batch_size=4, checkpoint_every=5, log_every=1, eval_tokens=2048)


@pytest.fixture(autouse=True)
def _small_data(small_corpus, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "DATA", small_corpus)


DATA = None


def _job(method="vanilla", budget=1.3e10, **train):  # >= 25 steps at pico: rounding stays within 2%
    return Job(method=method, budget=budget, size="pico", data=DataConfig(source=DATA, vocab_size=512),
               train=TrainConfig(**{**SMALL, **train}))


def _data_args():
    return ["--set", f"data.source={DATA}", "--set", "data.vocab_size=512"]


def _curve(folder):
    """Every metrics line's training or learning-curve loss, in order."""
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [line.get("loss", line.get("val_loss")) for line in lines]


def cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600, **kw)


def test_budget_is_matched_and_result_complete(tmp_path):
    result = train_job(_job(), tmp_path / "run", progress=False)
    assert abs(result["train_flops"] - result["budget"]) / result["budget"] < 0.02
    for key in ("method", "size", "seed", "params", "budget", "train_tokens", "train_flops", "val_loss",
                "val_ppl", "infer_flops_per_token", "wall_seconds", "config"):
        assert key in result
    assert result["val_ppl"] == pytest.approx(torch.tensor(result["val_loss"]).exp().item(), rel=1e-6)
    # perplexity scoring is cached decoding; vanilla's parallel loss must be the same number
    assert abs(result["parallel_gap"]) < 1e-4
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["val_loss"] == result["val_loss"]


def test_same_seed_same_curve_bitwise(tmp_path):
    train_job(_job(), tmp_path / "a", progress=False)
    train_job(_job(), tmp_path / "b", progress=False)
    assert _curve(tmp_path / "a") == _curve(tmp_path / "b")
    other = _job()
    other.seed = 1
    train_job(other, tmp_path / "c", progress=False)
    assert _curve(tmp_path / "c") != _curve(tmp_path / "a")


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    args = ["train", "--method", "vanilla", "--budget", "9e9", "--size", "pico", "--no-progress",
            *_data_args(), *[f"--set=train.{k}={v}" for k, v in SMALL.items()]]
    reference = cli(*args, "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args, "--out", str(tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "result.json").exists(), "job finished before it could be killed"
    resumed = cli(*args, "--out", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    ref = json.loads((tmp_path / "ref" / "result.json").read_text())
    got = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert got["val_loss"] == ref["val_loss"]
    assert got["train_flops"] == ref["train_flops"]
    assert _curve(tmp_path / "killed") == _curve(tmp_path / "ref")


def test_finished_job_is_not_rerun_and_other_job_is_refused(tmp_path):
    first = train_job(_job(), tmp_path / "run", progress=False)
    again = train_job(_job(), tmp_path / "run", progress=False)
    assert again == first
    with pytest.raises(Exception, match="holds a different job"):
        train_job(_job(budget=9e9), tmp_path / "run", progress=False)


def test_nan_loss_is_a_clear_error_and_keeps_checkpoint(tmp_path, monkeypatch):
    vanilla = registry.get("vanilla").cls
    original = vanilla.forward
    calls = {"n": 0}

    def poisoned(self, input_ids, targets):
        out = original(self, input_ids, targets)
        calls["n"] += 1
        if calls["n"] > 6:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(vanilla, "forward", poisoned)
    with pytest.raises(Exception, match=r"loss became nan at step 6 .*checkpoint \(step 5\) is kept"):
        train_job(_job(curve_points=0), tmp_path / "run", progress=False)  # training forwards only


@pytest.mark.parametrize("args,needle", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "vanilla", "--set", "d_model=-4"], "d_model"),
    (["--method", "vanilla", "--set", "data.source=/nonexistent/corpus.txt"], "nonexistent"),
    (["--method", "vanilla", "--set", "train.lr=-1"], "TrainConfig.lr"),
    (["--method", "vanilla", "--budget", "10"], "less than one step"),
])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    base = {"--budget": "1e9", "--out": str(tmp_path / "x")}
    for key, value in base.items():
        if key not in args:
            args = [*args, key, value]
    data = [] if any("data.source" in a for a in args) else _data_args()
    out = cli("train", "--size", "pico", "--no-progress", *data, *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], out.stderr


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train_job(_job(), tmp_path / "run", progress=False)
    (tmp_path / "run" / "checkpoint" / "model.safetensors").write_bytes(b"not a safetensors file")
    out = cli("eval", str(tmp_path / "run"), "--no-progress")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "corrupt" in out.stderr and "model.safetensors" in out.stderr


def test_eval_reproduces_saved_result(tmp_path):
    result = train_job(_job(), tmp_path / "run", progress=False)
    out = cli("eval", str(tmp_path / "run"), "--json", "--no-progress")
    assert out.returncode == 0, out.stderr
    again = json.loads(out.stdout)
    assert again["val_loss"] == pytest.approx(result["val_loss"], abs=1e-6)
    assert again["infer_flops_per_token"] == result["infer_flops_per_token"]


def test_gradient_accumulation_counts_every_micro_batch(tmp_path):
    plain = train_job(_job(), tmp_path / "plain", progress=False)
    accumulated = train_job(_job(batch_size=2, grad_accum=2), tmp_path / "accum", progress=False)
    # same sequences per step (4 = 2 x 2), so the same steps and tokens, and the budget is still matched
    assert accumulated["train_steps"] == plain["train_steps"]
    assert accumulated["train_tokens"] == plain["train_tokens"]
    assert abs(accumulated["train_flops"] - accumulated["budget"]) / accumulated["budget"] < 0.02


# -- --compile: a run option, not part of the job --------------------------------------------------------

def _checkpoint_files(folder):
    return sorted(p.name for p in (folder / "checkpoint").iterdir())


@pytest.mark.skipif(not backbone.compiled_steps_available("cpu"), reason="no C++ compiler for torch.compile")
def test_compiled_training_writes_the_same_job(tmp_path):
    eager = train_job(_job(), tmp_path / "eager", progress=False)
    compiled = train_job(_job(), tmp_path / "compiled", progress=False, compile_blocks=True)
    assert compiled["compiled_blocks"] is True and "compiled_blocks" not in eager
    assert compiled["job_id"] == eager["job_id"]  # the same job: id, folder name, budget
    assert (tmp_path / "compiled" / "job.json").read_text() == (tmp_path / "eager" / "job.json").read_text()
    assert _checkpoint_files(tmp_path / "compiled") == _checkpoint_files(tmp_path / "eager")
    assert compiled["train_flops"] == eager["train_flops"]  # the ledger counts compiled blocks alike
    # float32 summation order differs per step (inductor), so the curves agree closely, not bitwise
    assert _curve(tmp_path / "compiled") == pytest.approx(_curve(tmp_path / "eager"), rel=1e-3)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-3)


def test_compile_without_a_compiler_says_so_and_trains_eagerly(tmp_path, monkeypatch, capsys):
    train_job(_job(), tmp_path / "eager", progress=False)
    monkeypatch.setattr(backbone, "compiled_steps_available", lambda device: False)
    result = train_job(_job(), tmp_path / "fallback", progress=False, compile_blocks=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "--compile" in line]
    assert len(lines) == 1 and "unavailable" in lines[0] and "training eagerly" in lines[0]
    assert "compiled_blocks" not in result
    assert _curve(tmp_path / "fallback") == _curve(tmp_path / "eager")  # bitwise: the eager path


def test_train_command_passes_compile_as_a_run_option(monkeypatch):
    from harness.commands import train as train_command

    seen = []
    monkeypatch.setattr(train_command, "train_job", lambda job, out, **kw: seen.append((job, kw)) or {})
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    base = ["--method", "vanilla", "--budget", "1e9", "--out", "unused", "--size", "pico"]
    for extra in (["--compile"], []):
        assert train_command.run(parser.parse_args(base + extra)) == 0
    (compiled_job, compiled), (plain_job, plain) = seen
    assert compiled["compile_blocks"] is True and plain["compile_blocks"] is False
    assert compiled_job.job_id() == plain_job.job_id()
