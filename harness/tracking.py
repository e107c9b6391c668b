"""Per-job training logs a tracking tool reads: TensorBoard event files (default) or Weights & Biases offline.

The trainer (:func:`harness.train.run_steps`) talks to a :class:`Tracker` through three calls and nothing else:
``log(scalars, step)`` at every logged step and learning-curve point, ``finish(result)`` once the job is
evaluated (the deployed numbers: validation loss, perplexity, bits per byte, deployed extra steps), and the
context manager's exit (close on an error, flush otherwise). Models never import this module.

* ``tensorboard`` (``--tracker tensorboard``, the default): ``DIR/tensorboard/events.out.tfevents.*`` through
  ``torch.utils.tensorboard.SummaryWriter``. Tags: ``train/loss``, ``train/lm_loss``, ``train/lr``,
  ``train/grad_norm``, ``train/tokens_per_second``, ``train/train_flops``, ``steps/expected_extra`` (the
  training forward's ``mean_extra_steps``: an expectation for PonderLM-3, the router's mean for MoR and gated
  depth), other training stats as ``train/<name>``, ``val/loss`` (the learning curve), and at the last step
  ``eval/val_loss``, ``eval/val_ppl``, ``eval/val_bits_per_byte`` and ``steps/deployed_extra`` (deployed
  decoding's mean extra steps). A resumed job opens its writer with ``purge_step`` just past the checkpoint's
  step, so TensorBoard drops the events that the interrupted attempt wrote after it. ``tensorboard --logdir
  OUT/jobs`` shows every job of a sweep.
* ``wandb`` (``--tracker wandb``): the same scalars to W&B in offline mode (``DIR/wandb/``; ``wandb sync``
  uploads it later), run id = the job id, so a resumed job continues its run. ``wandb`` is an optional extra
  (``pip install wandb``); without it the job stops before training with one line saying so.
* ``none``: nothing.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

from harness.core.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "none")
DEFAULT_TRACKER = "tensorboard"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
# metrics.jsonl keys -> tags; a training stat not named here is logged as train/<key>
_TAGS = {"loss": "train/loss", "lm_loss": "train/lm_loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
         "tokens_per_second": "train/tokens_per_second", "train_flops": "train/train_flops",
         "mean_extra_steps": "steps/expected_extra", "val_loss": "val/loss"}
_SKIP = {"step", "tokens"}
_RESULT_TAGS = {"val_loss": "eval/val_loss", "val_ppl": "eval/val_ppl", "val_bits_per_byte": "eval/val_bits_per_byte",
                "mean_extra_steps": "steps/deployed_extra"}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl line as tagged scalars (finite numbers only)."""
    out = {}
    for key, value in record.items():
        if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[_TAGS.get(key, f"train/{key}")] = float(value)
    return out


class Tracker:
    """No tracking (``--tracker none``, and every rank but 0); the base of the real ones."""

    def log(self, values: dict[str, Any], step: int) -> None:
        """Log a metrics.jsonl line (or any flat dict of numbers) at optimizer step ``step``."""

    def finish(self, result: dict[str, Any]) -> None:
        """Log the evaluated job's deployed numbers at its last step, then close."""
        self.close()

    def close(self) -> None:
        """Flush and release the writer."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.close()  # the job stops here: nothing more will come


class TensorBoardTracker(Tracker):
    def __init__(self, folder: pathlib.Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # a resume drops what the interrupted attempt logged after its checkpoint (metrics.jsonl does the same)
        self.writer = SummaryWriter(log_dir=str(folder / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step
                                    else None)
        self.last_step = start_step

    def log(self, values: dict[str, Any], step: int) -> None:
        for tag, value in scalars(values).items():
            self.writer.add_scalar(tag, value, step)
        self.last_step = step
        self.writer.flush()

    def finish(self, result: dict[str, Any]) -> None:
        step = int(result.get("train_steps") or self.last_step)
        for key, tag in _RESULT_TAGS.items():
            value = result.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), step)
        self.close()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, folder: pathlib.Path, job: Any, start_step: int):
        import wandb

        (folder / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(mode="offline", dir=str(folder), project="ponder-harness", id=job.job_id(),
                              name=f"{job.method}/{job.size}/seed{job.seed}", config=job.to_dict(), resume="allow",
                              reinit=True)
        self.last_step = start_step

    def log(self, values: dict[str, Any], step: int) -> None:
        self.run.log(scalars(values), step=step)
        self.last_step = step

    def finish(self, result: dict[str, Any]) -> None:
        step = max(int(result.get("train_steps") or 0), self.last_step)
        final = {tag: float(result[key]) for key, tag in _RESULT_TAGS.items()
                 if isinstance(result.get(key), (int, float)) and math.isfinite(result[key])}
        self.run.log(final, step=step)
        self.close()

    def close(self) -> None:
        self.run.finish()


def check_tracker(kind: str) -> None:
    """A ConfigError (one line) for an unknown tracker, or for wandb when it is not installed."""
    if kind not in TRACKERS:
        raise ConfigError(f"--tracker {kind!r}: choose one of {', '.join(TRACKERS)}")
    if kind == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("--tracker wandb needs the optional package wandb (pip install wandb); it logs offline "
                              "into each job's folder. Or use --tracker tensorboard (the default)")
    if kind == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--tracker tensorboard needs the package tensorboard (a dependency: pip install -e . "
                              "installs it); or pass --tracker none")


def open_tracker(kind: str | None, folder: pathlib.Path, job: Any, start_step: int = 0) -> Tracker:
    """The tracker ``kind`` for the job in ``folder``, resuming at ``start_step``; None or "none": no tracking."""
    if kind in (None, "none"):
        return Tracker()
    check_tracker(kind)
    if kind == "wandb":
        return WandbTracker(folder, job, start_step)
    return TensorBoardTracker(folder, start_step)


__all__ = ["DEFAULT_TRACKER", "TENSORBOARD_DIR", "TRACKERS", "TensorBoardTracker", "Tracker", "WandbTracker",
           "check_tracker", "open_tracker", "scalars"]
