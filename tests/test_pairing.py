"""Seeds pair (docs/design.md, "Evidence: statistics and regime"): seed s gives every method the same training
batches, the same validation windows and the same initial values for the parameters it shares with vanilla,
so per-seed differences between arms are paired (harness/stats.py)."""

from __future__ import annotations

import pytest
import torch

from harness import train
from harness.data import DataConfig, batch_at
from harness.job import Job, TrainConfig

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = ("vanilla", "ponderlm2", "ponderlm3", "pondering", "looped", "pause")


def _job(method: str, seed: int, corpus: str) -> Job:
    return Job(method=method, budget=1e11, size="pico", seed=seed,
               train=TrainConfig(batch_size=2, seq_len=32, eval_tokens=256, curve_points=2, checkpoint_every=100),
               data=DataConfig(source=corpus, vocab_size=512))


def _drawn_batches(monkeypatch, job: Job, tmp_path, steps: int = 2) -> list[torch.Tensor]:
    """The input batches the trainer draws for ``job`` in its first ``steps`` steps."""
    drawn: list[torch.Tensor] = []
    original = batch_at  # the real one (train.batch_at may already be an earlier call's spy)

    def spy(*args, **kwargs):
        inputs, targets = original(*args, **kwargs)
        drawn.append(inputs.clone())
        return inputs, targets

    monkeypatch.setattr(train, "batch_at", spy)
    tmp_path.mkdir(parents=True)
    prepared = train.prepare(job)
    prepared.steps = steps
    train.run_steps(job, tmp_path, prepared, train.Placement(), None, 0.0, progress=False)
    return drawn


def test_every_method_draws_the_same_training_batches_at_a_seed(monkeypatch, tmp_path, small_corpus):
    batches = {m: _drawn_batches(monkeypatch, _job(m, 3, small_corpus), tmp_path / m) for m in ("vanilla", "ponderlm2")}
    assert len(batches["vanilla"]) == 2
    for a, b in zip(batches["vanilla"], batches["ponderlm2"]):
        assert torch.equal(a, b)
    other = _drawn_batches(monkeypatch, _job("vanilla", 4, small_corpus), tmp_path / "seed4")
    assert not torch.equal(other[0], batches["vanilla"][0])  # another seed, another order


@pytest.mark.parametrize("method", METHODS[1:])
def test_shared_parameters_start_equal_to_vanillas_at_a_seed(method, small_corpus):
    vanilla = dict(train.prepare(_job("vanilla", 5, small_corpus)).model.named_parameters())
    other = dict(train.prepare(_job(method, 5, small_corpus)).model.named_parameters())
    shared = [n for n in vanilla if n in other and other[n].shape == vanilla[n].shape]
    assert "decoder.embed.weight" in shared or any("embed" in n for n in shared)
    assert len(shared) >= len(vanilla) - 1, f"{method} shares only {len(shared)} of {len(vanilla)} tensors"
    for name in shared:
        assert torch.equal(vanilla[name], other[name]), f"{method}: {name} starts differently from vanilla's"
    reseeded = dict(train.prepare(_job("vanilla", 6, small_corpus)).model.named_parameters())
    assert not torch.equal(reseeded[shared[0]], vanilla[shared[0]])


def test_validation_windows_do_not_depend_on_the_method_or_seed(small_corpus):
    from harness.data import validation_windows

    windows = []
    for method, seed in (("vanilla", 0), ("ponderlm3", 7)):
        job = _job(method, seed, small_corpus)
        corpus = train.prepare(job).corpus
        windows.append(validation_windows(corpus.val, job.train.seq_len, job.train.eval_tokens))
    assert windows[0].shape[0] > 1 and torch.equal(windows[0], windows[1])


def test_the_learning_curve_is_recorded_and_costs_no_training_flops(tmp_path, small_corpus):
    job = _job("ponderlm2", 0, small_corpus)
    prepared = train.prepare(job)
    prepared.steps = 4
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    with_curve = train.run_steps(job, tmp_path / "a", prepared, train.Placement(), None, 0.0, progress=False)
    assert [p["step"] for p in with_curve["curve"]] == [2, 4]
    assert with_curve["curve"][-1]["val_loss"] == pytest.approx(with_curve["parallel_val_loss"], rel=1e-6)
    windows = with_curve["val_window_loss"]
    assert len(windows) == (256 - 1) // 32  # one mean NLL per validation window, in window order
    assert sum(windows) / len(windows) == pytest.approx(with_curve["val_loss"], abs=1e-5)
    bare = Job.from_dict({**job.to_dict(), "train": {**job.to_dict()["train"], "curve_points": 0}})
    prepared = train.prepare(bare)
    prepared.steps = 4
    without = train.run_steps(bare, tmp_path / "b", prepared, train.Placement(), None, 0.0, progress=False)
    assert "curve" not in without
    assert without["train_flops"] == with_curve["train_flops"]  # evaluation is not training compute
    assert without["val_loss"] == with_curve["val_loss"]  # and it leaves the training untouched


def test_curve_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert train.curve_at(1000, 10) == set(range(100, 1001, 100))
    assert train.curve_at(3, 10) == {1, 2, 3}
    assert train.curve_at(50, 0) == set()
