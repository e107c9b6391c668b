"""Each job's training logs for a tracking tool: TensorBoard event files read back with TensorBoard's own reader;
W&B is optional and its absence is one line."""

from __future__ import annotations

import importlib.util
import json

import pytest

from harness import tracking
from harness.core.errors import ConfigError
from harness.data import DataConfig
from harness.job import Job, TrainConfig
from harness.train import train_job

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL = dict(seq_len=32, batch_size=4, checkpoint_every=5, log_every=1, eval_tokens=2048, curve_points=3)


def _job(source, method="ponderlm3", budget=1.3e10):
    return Job(method=method, budget=budget, size="pico", data=DataConfig(source=source, vocab_size=512),
               train=TrainConfig(**SMALL))


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder / tracking.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_a_jobs_tensorboard_events_read_back(tmp_path, small_corpus):
    result = train_job(_job(small_corpus), tmp_path / "run", progress=False)
    events = _events(tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "loss" in line]
    curve = [line for line in lines if "val_loss" in line]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "train/train_flops"):
        assert [s for s, _ in events[tag]] == [line["step"] for line in logged], tag
    assert [v for _, v in events["train/loss"]] == pytest.approx([line["loss"] for line in logged], rel=1e-6)
    assert [v for _, v in events["train/lr"]] == pytest.approx([line["lr"] for line in logged], rel=1e-6)
    # PonderLM-3's expected extra steps in training, its deployed ones once evaluated
    assert [v for _, v in events["steps/expected_extra"]] == pytest.approx([x["mean_extra_steps"] for x in logged],
                                                                            rel=1e-6)
    assert events["steps/deployed_extra"] == [(result["train_steps"], pytest.approx(result["mean_extra_steps"]))]
    # the learning curve, and the evaluated numbers at the last step
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in events["val/loss"]] == [(p["step"], p["val_loss"])
                                                                                for p in curve]
    assert events["eval/val_loss"][0][1] == pytest.approx(result["val_loss"], rel=1e-6)
    assert events["eval/val_ppl"][0][1] == pytest.approx(result["val_ppl"], rel=1e-5)


def test_no_tracker_writes_no_events(tmp_path, small_corpus):
    train_job(_job(small_corpus, method="vanilla", budget=4e9), tmp_path / "run", progress=False, tracker="none")
    assert not (tmp_path / "run" / tracking.TENSORBOARD_DIR).exists()
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_scalars_tags_and_skips():
    assert tracking.scalars({"step": 3, "tokens": 9, "loss": 2.0, "mean_extra_steps": 1.5, "jacobi_passes": 2,
                             "note": "x", "bad": float("nan"), "flag": True}) == {
        "train/loss": 2.0, "steps/expected_extra": 1.5, "train/jacobi_passes": 2.0}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_is_one_line():
    with pytest.raises(ConfigError, match=r"--tracker wandb needs the optional package wandb \(pip install wandb\)"):
        tracking.check_tracker("wandb")
    with pytest.raises(ConfigError, match="choose one of tensorboard, wandb, none"):
        tracking.check_tracker("mlflow")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="the optional package wandb is not installed")
def test_wandb_logs_offline(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_job(_job(small_corpus, method="vanilla", budget=4e9), tmp_path / "run", progress=False, tracker="wandb")
    assert any((tmp_path / "run" / "wandb").glob("offline-run-*"))
