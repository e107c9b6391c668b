"""A job: everything that determines one run (method, size, budget, seed, overrides), and the model it builds.

This is the module every layer above the models shares: training (:mod:`harness.train`), evaluation
(:mod:`harness.evaluate`), the lm-eval model, plans and sweeps all speak in :class:`Job`. A job's hash
is its id; sweeps use it as the job folder's name and to skip finished work.

``--set`` keys: ``train.<field>`` and ``data.<field>`` set :class:`TrainConfig` and
:class:`~harness.data.DataConfig`; any other key sets a field of the method's model config
(``python -m harness list``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch

from harness import checkpoint, hf
from harness.core import registry
from harness.core.config import dataclass_from, require
from harness.core.errors import CheckpointError, ConfigError
from harness.core.io import read_json
from harness.data import DataConfig, load_corpus


@dataclass
class TrainConfig:
    """Optimisation and evaluation settings shared by every method (set with ``--set train.X=...``)."""

    seq_len: int = 128  # tokens per training sequence
    batch_size: int = 16  # sequences per micro-batch (what must fit in memory)
    grad_accum: int = 1  # micro-batches per optimizer step: a step sees batch_size x grad_accum sequences
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    checkpoint_every: int = 50  # steps between checkpoints (and at the end)
    log_every: int = 10
    eval_tokens: int = 32768  # validation tokens for perplexity (0 = the whole split)
    eval_batch_size: int = 32
    # Learning curve: the parallel (training-form) validation loss on the evaluation windows at this many
    # evenly spaced steps, the last one included (result.json "curve"); 0 = none. The PonderLM family's
    # parallel form is its Jacobi solve (gap < 0.005% of the loss at the CPU rungs), MoR's its top-k routing.
    curve_points: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "checkpoint_every", "log_every", "eval_batch_size"):
            require(self, name, getattr(self, name) > 0, "must be positive")
        require(self, "lr", self.lr > 0, "must be positive")
        require(self, "min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must lie in [0, 1]")
        require(self, "warmup_fraction", 0 <= self.warmup_fraction < 1, "must lie in [0, 1)")
        require(self, "weight_decay", self.weight_decay >= 0, "must be >= 0")
        require(self, "beta1", 0 <= self.beta1 < 1, "must lie in [0, 1)")
        require(self, "beta2", 0 <= self.beta2 < 1, "must lie in [0, 1)")
        require(self, "grad_clip", self.grad_clip >= 0, "must be >= 0 (0 disables clipping)")
        require(self, "eval_tokens", self.eval_tokens >= 0, "must be >= 0 (0 = the whole split)")
        require(self, "curve_points", self.curve_points >= 0, "must be >= 0 (0 = no learning curve)")
        require(self, "precision", self.precision in ("auto", "fp32", "bf16"), "choose auto, fp32 or bf16")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


@dataclass
class Job:
    """Everything that determines a run; its hash is the job id used by sweeps."""

    method: str
    budget: float
    size: str = "nano"
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)  # model-config overrides
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tags: dict[str, Any] = field(default_factory=dict)  # recorded, not used (e.g. the sweep's match mode)
    # A Hugging Face Llama checkpoint (folder or "hf:<name>") the backbone starts from (harness/hf.py); its
    # config sets the shape, so ``size`` is then unused. Left out of to_dict() while unset: see to_dict.
    init_from: str = ""

    def __post_init__(self) -> None:
        if not (self.budget > 0 and math.isfinite(self.budget)):
            raise ConfigError(f"budget={self.budget!r}: must be a positive number of FLOPs, e.g. 1e12")
        if self.seed < 0:  # step_seed() would fold it onto a large positive seed: another job's by accident
            raise ConfigError(f"--seed {self.seed}: must be 0 or more")
        registry.get(self.method)  # unknown method -> clear error now, not after loading data

    def to_dict(self) -> dict[str, Any]:
        # The job id hashes this dict, and job.json must equal it on resume: an unset init_from is left
        # out so every job written before the field existed keeps its id and its folder.
        d = dataclasses.asdict(self)
        if not self.init_from:
            del d["init_from"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        d = dict(d)
        d["train"] = dataclass_from(TrainConfig, d.get("train", {}))
        d["data"] = dataclass_from(DataConfig, d.get("data", {}))
        return cls(**d)

    def job_id(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def parse_overrides(pairs: list[str]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """``["lr=1", "train.lr=3e-3", ...]`` -> (model, train, data) override dicts."""
    model, train, data = {}, {}, {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set train.lr=1e-3")
        key, value = pair.split("=", 1)
        target = {"train": train, "data": data}.get(key.split(".", 1)[0]) if "." in key else None
        if target is None:
            model[key] = value
        else:
            target[key.split(".", 1)[1]] = value
    return model, train, data



def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"TrainConfig.device={name!r}: CUDA is not available here; use device=auto or cpu")
    return device


def autocast_for(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def make_model(job: Job, vocab_size: int):
    plugin = registry.get(job.method)
    if job.init_from:  # the checkpoint's config sets the shape (harness.hf.model_config)
        return plugin.build(hf.model_config(plugin, job.init_from, job.model, vocab_size))
    config = plugin.make_config(job.size, {"vocab_size": vocab_size, **job.model})
    return plugin.build(config)


def load_job(folder: str | pathlib.Path):
    """(job, model on CPU, its corpus) of a saved job folder; CheckpointError if anything is off."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"job folder not found: {folder}")
    job = Job.from_dict(read_json(folder / "job.json", "job description"))
    state = checkpoint.load_state(folder / "checkpoint")
    corpus = load_corpus(job.data)
    model = make_model(job, corpus.tokenizer.vocab_size)
    if type(model.config).from_dict(state["model_config"]) != model.config:  # JSON has lists, not tuples
        raise CheckpointError(f"{folder}/checkpoint was written for another model config; retrain the job")
    checkpoint.load_weights(folder / "checkpoint", model)
    return job, model, corpus
