"""Budget planning: the jobs a sweep at a training-FLOPs budget runs, and what they need.

``python -m harness plan --budget FLOPS [--methods a,b] [--sizes s1,s2] [--match train-flops|tokens]
[--seeds N] [--rungs N] [--gpu h100] [--json] [--set k=v ...] [--vary METHOD:FIELD=v1,v2]``

Decisions (each is printed with the plan):

* **Counting.** Parameters and training FLOPs per token come from the method itself: its config is
  built for the rung and the model constructed on the ``meta`` device (no memory, milliseconds even
  for 2.8b), then ``model.train_flops_per_token(seq_len)`` and ``num_params()`` are read.
* **Scale.** Two settings of the shared ladder (``models/config.py``): the CPU rungs (pico..tiny) train
  with ``TrainConfig``'s defaults (sequences of 128 tokens, 16 per step, BPE vocabulary 8192); the
  Pythia rungs (70m..2.8b) with Pythia's recipe where one GPU per job allows it: sequences of 2048
  tokens, 16 per step (32,768 tokens, so that vanilla up to 1b fits one 80 GB GPU; Pythia used 1024
  sequences, which needs gradient accumulation that ``TrainConfig`` does not have), Pythia's learning
  rate for the rung, 1% warm-up, cosine to 10%, weight decay 0.01, and a 50,304-token vocabulary
  (Pythia's padded size). A sweep uses one scale: the one holding vanilla's Chinchilla-closest rung at
  this budget (below).
* **Sizes (an IsoFLOP ladder per method).** Unless ``--sizes`` is given, each method gets the
  ``--rungs`` (default 3) rungs of that scale whose Chinchilla-optimal tokens (20 x total parameters,
  Hoffmann et al. 2022 count embeddings) are closest, in log ratio, to the tokens the budget buys the
  method at that rung. A method that costs more per token therefore lands on smaller rungs. Rungs a
  method cannot be built at (a config error) are skipped and listed.
* **Matching.** ``--match train-flops`` (default): every job trains with the budget's FLOPs, so a
  method that costs more per token sees fewer tokens. ``--match tokens`` (the papers' protocol): every
  method trains on the tokens the budget buys vanilla at the same rung (and on vanilla's rungs); its
  training FLOPs are then larger, and methods are compared at measured inference FLOPs. The mode is
  recorded in every job's ``tags``.
* **Rounding.** The trainer takes ``round(budget / (FLOPs per token x tokens per step))`` steps; the
  plan reports that rounded figure (tokens = steps x batch x seq_len). Rounding is within 0.5/steps of
  the budget, so a job with fewer than 25 steps gets a smaller batch (unless ``train.batch_size`` is
  set explicitly) so that it has 25 and its training FLOPs land within 2% of the budget.
* **Estimates.** Hours = planned training FLOPs / the FLOP/s one job is assumed to reach: measured
  here (a few training steps of vanilla at the smallest CPU rung, or a matmul probe on a GPU times an
  assumed utilisation), or, with ``--gpu NAME``, the GPU's peak dense bf16 FLOP/s times an assumed MFU.
  Evaluation time is not included. Wall time spreads the jobs over the workers (longest first). Memory
  is a rough per-job estimate: 16 bytes per parameter (fp32 weights, gradients, AdamW moments), Korthikanti
  et al.'s 34 bytes x seq x batch x d_model x layers of bf16 activations (flash attention) scaled by the
  method's training FLOPs over vanilla's, and the logits.
* **Overrides.** ``--set KEY=VALUE`` applies to every job (``train.X``, ``data.X`` or a model field);
  ``--set METHOD:KEY=VALUE`` to one method only; ``--vary METHOD:FIELD=v1,v2`` adds one job per value
  (e.g. PonderLM-3's compute penalty, whose sweep traces its Pareto curve), tagged ``variant``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from harness import registry
from harness.data import DataConfig
from harness.train import Job, TrainConfig, _dataclass_from, parse_overrides
from models.config import CPU_SIZES, PYTHIA_SIZES, SIZES, ConfigError

CHINCHILLA_TOKENS_PER_PARAM = 20.0
MIN_STEPS = 25  # |round(x) - x| <= 0.5, so 25 steps keep training FLOPs within 2% of the budget
BUDGET_TOLERANCE = 0.02
DEFAULT_RUNGS = 3
MATCH_MODES = ("train-flops", "tokens")
REFERENCE_METHOD = "vanilla"  # whose tokens --match tokens gives every method, and who picks the scale


class PlanError(ConfigError):
    """The request cannot be planned (budget too small, mixed scales, bad --vary); one line."""


# ---------------------------------------------------------------------------------------------------
# scales


@dataclass(frozen=True)
class Scale:
    """One setting of the size ladder: its rungs and the training/data defaults its jobs use."""

    name: str
    sizes: tuple[str, ...]
    train: dict[str, Any]  # TrainConfig fields (user --set train.X wins)
    vocab_size: int  # BPE vocabulary when the data uses the default tokenizer
    description: str
    size_train: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-rung TrainConfig fields


# Pythia (Biderman et al. 2023, table of hyper-parameters): learning rate per model size.
PYTHIA_LR = {"70m": 1e-3, "160m": 6e-4, "410m": 3e-4, "1b": 3e-4, "1.4b": 2e-4, "2.8b": 1.6e-4}

SCALES: dict[str, Scale] = {
    "cpu": Scale("cpu", CPU_SIZES, {}, 8192,
                 "CPU rungs, TrainConfig defaults: seq_len 128, 16 sequences per step, BPE vocabulary 8192"),
    "pythia": Scale(
        "pythia", PYTHIA_SIZES,
        {"seq_len": 2048, "batch_size": 8, "grad_accum": 128, "warmup_fraction": 0.01, "min_lr_ratio": 0.1, "weight_decay": 0.01,
         "eval_tokens": 262144, "eval_batch_size": 8, "checkpoint_every": 1000},
        50304,
        "Pythia rungs: seq_len 2048, 1024 sequences (2M tokens) per step as Pythia, in 128 micro-batches of "
        "8 on one GPU per job, Pythia's lr per rung, 1% warm-up, cosine "
        "to 10%, weight decay 0.01, vocabulary 50304 (Pythia's padded size)",
        {size: {"lr": lr} for size, lr in PYTHIA_LR.items()}),
}


def scale_of(size: str) -> Scale:
    for scale in SCALES.values():
        if size in scale.sizes:
            return scale
    raise ConfigError(f"size: unknown size {size!r}; choose one of {', '.join(SIZES)}")


# ---------------------------------------------------------------------------------------------------
# hardware


# Peak dense bf16 tensor FLOP/s (vendor data sheets, no sparsity) and memory per device.
GPU_TABLE: dict[str, tuple[float, float]] = {
    "a100": (312e12, 80e9), "a100-40gb": (312e12, 40e9), "h100": (989e12, 80e9), "h100-pcie": (756e12, 80e9),
    "h200": (989e12, 141e9), "b200": (2250e12, 180e9), "l4": (121e12, 24e9), "a10": (125e12, 24e9),
    "l40s": (362e12, 48e9), "mi250x": (383e12, 128e9), "mi300x": (1307e12, 192e9),
}
DEFAULT_MFU = 0.4  # assumed model-FLOPs utilisation of peak for a named GPU
MATMUL_UTILISATION = 0.5  # assumed share of a measured matmul rate that training reaches
ASSUMED_GPUS_FOR_NAMED = 8  # workers assumed for --gpu NAME when none are found here (one 8-GPU node)


@dataclass
class Hardware:
    """What one job is assumed to achieve, how that was found, and how many jobs run at once."""

    name: str
    kind: str  # "cpu" | "cuda" | "table"
    flops_per_second: float  # achieved training FLOP/s of one job
    basis: str  # how flops_per_second was obtained, stated with the plan
    memory_bytes: float | None  # per device; None on CPU
    workers: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _matmul_probe(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 0.3) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    runs, started = 0, time.perf_counter()
    while True:
        a @ b
        runs += 1
        sync()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and runs >= 3:
            return 2.0 * n ** 3 * runs / elapsed


def _model_step_probe(size: str, train: TrainConfig, vocab_size: int, threads: int) -> float:
    """Achieved training FLOP/s of vanilla at ``size`` on this CPU: a warm-up step, then >= 3 timed."""
    from harness.train import build_optimizer

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = registry.build(REFERENCE_METHOD, size, {"vocab_size": vocab_size})
        optimizer = build_optimizer(model, train)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(vocab_size, (train.batch_size, train.seq_len + 1), generator=generator)

        def step() -> None:
            loss = model(ids[:, :-1], ids[:, 1:]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()
        runs, started = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - started < 0.5:
            step()
            runs += 1
        elapsed = time.perf_counter() - started
        tokens = runs * train.batch_size * train.seq_len  # the probe runs one micro-batch a step
        return tokens * model.train_flops_per_token(train.seq_len) / elapsed
    finally:
        torch.set_num_threads(previous)


def detect_hardware(scale: Scale, train: TrainConfig, vocab_size: int, *, gpu: str | None = None,
                    mfu: float | None = None, workers: int | None = None, cpus_per_job: int = 1,
                    probe_size: str | None = None) -> Hardware:
    """The hardware a plan is estimated on: a named GPU from the table, else what is found here."""
    if gpu:
        key = gpu.lower().replace("nvidia", "").replace(" ", "").strip("-")
        if key not in GPU_TABLE:
            raise ConfigError(f"--gpu {gpu!r}: unknown GPU; known: {', '.join(GPU_TABLE)}")
        peak, memory = GPU_TABLE[key]
        util = DEFAULT_MFU if mfu is None else mfu
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        count = workers or found or ASSUMED_GPUS_FOR_NAMED
        assumed = "" if workers or found else f" ({ASSUMED_GPUS_FOR_NAMED} assumed; set --workers)"
        return Hardware(key, "table", peak * util,
                        f"{key}: peak dense bf16 {peak / 1e12:.0f} TFLOP/s x assumed MFU {util:g}; "
                        f"{count} GPU(s){assumed}", memory, count)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(device)
        rate = _matmul_probe(device, torch.bfloat16, 8192)
        util = MATMUL_UTILISATION if mfu is None else mfu
        count = workers or torch.cuda.device_count()
        return Hardware(props.name, "cuda", rate * util,
                        f"measured bf16 matmul {rate / 1e12:.0f} TFLOP/s on {props.name} x assumed utilisation "
                        f"{util:g}; {count} GPU(s) found", float(props.total_memory), count)
    count = workers or max(1, (os.cpu_count() or 1) // cpus_per_job)
    if scale.name == "cpu" and probe_size is not None:
        rate = _model_step_probe(probe_size, train, vocab_size, cpus_per_job)
        basis = (f"measured: training steps of {REFERENCE_METHOD}/{probe_size} here with {cpus_per_job} thread(s), "
                 f"{rate / 1e9:.1f} GFLOP/s; {count} job(s) at once")
        return Hardware("cpu", "cpu", rate, basis, None, count)
    rate = _matmul_probe(torch.device("cpu"), torch.float32, 1024)
    util = MATMUL_UTILISATION if mfu is None else mfu
    return Hardware("cpu", "cpu", rate * util,
                    f"measured fp32 matmul {rate / 1e9:.1f} GFLOP/s on this CPU x assumed utilisation {util:g}; "
                    f"{count} job(s) at once", None, count)


# ---------------------------------------------------------------------------------------------------
# counting


@dataclass(frozen=True)
class Counts:
    params: int
    non_embedding_params: int
    train_flops_per_token: float
    infer_flops_per_token_max: float  # analytic; adaptive methods execute less (measured in results)
    d_model: int
    n_layers: int


@contextlib.contextmanager
def _skip_initialisation() -> Iterator[None]:
    """Make in-place initialisers no-ops while a model is built on ``meta`` (they are 5-10x the build).

    Meta tensors hold no values, so nothing is lost; only shapes (hence parameter counts and FLOPs)
    matter. The plan runs on the main thread before any job, so the temporary patch is not shared.
    """
    names = ("normal_", "uniform_", "fill_", "zero_")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    for name in names:
        setattr(torch.Tensor, name, lambda self, *args, **kwargs: self)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@functools.cache
def _count(method: str, size: str, model_overrides: str, vocab_size: int, seq_len: int) -> Counts:
    plugin = registry.get(method)
    config = plugin.make_config(size, {**json.loads(model_overrides), "vocab_size": vocab_size})
    try:
        with torch.device("meta"), _skip_initialisation():  # shapes only: no memory, even at 2.8b
            model = plugin.build(config)
    except ConfigError:
        raise
    except Exception:
        if SIZES[size].d_model > 256:  # a plugin that cannot be built on meta: too big to build for real
            raise
        model = plugin.build(config)
    return Counts(model.num_params(), model.num_params(non_embedding=True),
                  float(model.train_flops_per_token(seq_len)), float(model.analytic_flops_per_token(seq_len)),
                  config.d_model, config.n_layers)


def count(method: str, size: str, model_overrides: dict[str, Any], vocab_size: int, seq_len: int) -> Counts:
    """Parameters and per-token FLOPs of ``method`` at ``size`` (built on the meta device, cached)."""
    return _count(method, size, json.dumps(model_overrides, sort_keys=True, default=str), vocab_size, seq_len)


# ---------------------------------------------------------------------------------------------------
# the plan


@dataclass
class PlanRequest:
    """What the user asked for (``plan`` and ``sweep`` share it)."""

    budget: float
    methods: list[str] | None = None  # None: every registered method
    sizes: list[str] | None = None  # None: the ladder rule
    rungs: int = DEFAULT_RUNGS
    match: str = "train-flops"
    seeds: int = 1
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE, METHOD:KEY=VALUE
    vary: list[str] = field(default_factory=list)  # --vary METHOD:FIELD=v1,v2
    gpu: str | None = None
    mfu: float | None = None
    workers: int | None = None
    cpus_per_job: int = 1
    vocab_size: int | None = None  # the tokenizer's real size when the caller knows it (the sweep)

    def __post_init__(self) -> None:
        if not (isinstance(self.budget, (int, float)) and self.budget > 0 and math.isfinite(self.budget)):
            raise ConfigError(f"--budget {self.budget!r}: must be a positive number of training FLOPs, e.g. 1e12")
        if self.match not in MATCH_MODES:
            raise ConfigError(f"--match {self.match!r}: choose one of {', '.join(MATCH_MODES)}")
        if self.seeds < 1:
            raise ConfigError(f"--seeds {self.seeds}: must be at least 1")
        if self.rungs < 1:
            raise ConfigError(f"--rungs {self.rungs}: must be at least 1")
        if self.cpus_per_job < 1:
            raise ConfigError(f"--cpus-per-job {self.cpus_per_job}: must be at least 1")
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise ConfigError(f"--mfu {self.mfu}: must lie in (0, 1]")


@dataclass
class PlannedJob:
    job: Job
    job_id: str
    method: str
    variant: str  # "" or "field=value,..." from --vary
    size: str
    seed: int
    params: int
    non_embedding_params: int
    train_flops_per_token: float
    infer_flops_per_token_max: float
    batch_size: int  # sequences per micro-batch
    grad_accum: int  # micro-batches per step
    seq_len: int
    steps: int
    tokens: int
    train_flops: float  # steps x batch x seq_len x FLOPs per token: what the trainer will run
    budget_error: float  # train_flops / sweep budget - 1 (train-flops mode); 0 by construction in tokens mode
    chinchilla_tokens: float
    hours: float
    memory_bytes: float

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "job"}
        d["job"] = self.job.to_dict()
        return d


@dataclass
class Plan:
    request: PlanRequest
    scale: Scale
    hardware: Hardware
    vocab_size: int
    jobs: list[PlannedJob]
    skipped: list[str]  # "method/size: reason"
    notes: list[str]

    @property
    def device_hours(self) -> float:
        return sum(j.hours for j in self.jobs)

    @property
    def wall_hours(self) -> float:
        """Makespan of the jobs over the workers, longest job first (jobs cannot be split)."""
        loads = [0.0] * max(1, self.hardware.workers)
        for hours in sorted((j.hours for j in self.jobs), reverse=True):
            loads[loads.index(min(loads))] += hours
        return max(loads)

    def rule(self) -> str:
        if self.request.sizes:
            return f"sizes given: {', '.join(self.request.sizes)}"
        who = f"{REFERENCE_METHOD}'s" if self.request.match == "tokens" else "each method's"
        return (f"{who} {self.request.rungs} rung(s) of the {self.scale.name} ladder whose Chinchilla-optimal tokens "
                f"(20 x params) are closest to what the budget buys there")

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.request.budget, "match": self.request.match, "seeds": self.request.seeds,
            "scale": {"name": self.scale.name, "description": self.scale.description}, "size_rule": self.rule(),
            "vocab_size": self.vocab_size, "hardware": self.hardware.to_dict(),
            "device_hours": self.device_hours, "wall_hours": self.wall_hours,
            "jobs": [j.to_dict() for j in self.jobs], "skipped": self.skipped, "notes": self.notes,
        }


@dataclass
class _Overrides:
    model: dict[str, str]
    train: dict[str, str]
    data: dict[str, str]


def split_overrides(pairs: Iterable[str]) -> tuple[_Overrides, dict[str, _Overrides]]:
    """``--set`` pairs -> (for every method, {method: for that method}); ``METHOD:KEY=VALUE`` is per method."""
    shared: list[str] = []
    per_method: dict[str, list[str]] = {}
    for pair in pairs:
        head = pair.split("=", 1)[0]
        if ":" in head:
            method, rest = pair.split(":", 1)
            registry.get(method)  # unknown method -> one-line error naming the registered ones
            per_method.setdefault(method, []).append(rest)
        else:
            shared.append(pair)
    return _Overrides(*parse_overrides(shared)), {m: _Overrides(*parse_overrides(p)) for m, p in per_method.items()}


def parse_vary(specs: Iterable[str]) -> dict[str, list[dict[str, str]]]:
    """``METHOD:FIELD=v1,v2`` (``;`` between values whose field is itself a list) -> variants per method."""
    axes: dict[str, list[tuple[str, list[str]]]] = {}
    for spec in specs:
        head, _, values = spec.partition("=")
        method, _, name = head.partition(":")
        if not (method and name and values):
            raise PlanError(f"--vary {spec!r}: expected METHOD:FIELD=v1,v2,..., "
                            "e.g. ponderlm3:compute_penalty=0.003,0.01")
        registry.get(method)
        items = [v.strip() for v in values.split(";" if ";" in values else ",") if v.strip()]
        axes.setdefault(method, []).append((name, items))
    variants: dict[str, list[dict[str, str]]] = {}
    for method, method_axes in axes.items():
        combos: list[dict[str, str]] = [{}]
        for name, items in method_axes:
            combos = [{**c, name: v} for c in combos for v in items]
        variants[method] = combos
    return variants


def _variant_label(values: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def _resolve_vocab(data: DataConfig) -> tuple[int, str | None]:
    """Vocabulary the models will have: the BPE target, or the size of a tokenizer file given by path."""
    if data.tokenizer.strip() == "bpe":
        return data.vocab_size, None
    path = os.path.expanduser(data.tokenizer)
    if os.path.exists(path):
        from harness.data import Tokenizer

        return Tokenizer.load(path).vocab_size, None
    return data.vocab_size, (f"vocabulary of tokenizer {data.tokenizer!r} not known before it is loaded; "
                             f"counted with data.vocab_size={data.vocab_size}")


def _choose_scale(request: PlanRequest, shared: _Overrides) -> Scale:
    if request.sizes:
        scales = {scale_of(s).name for s in request.sizes}
        if len(scales) > 1:
            raise PlanError(f"--sizes {','.join(request.sizes)} mixes CPU and Pythia rungs, which train with "
                            "different sequence lengths; sweep them separately")
        return SCALES[scales.pop()]
    best: tuple[float, Scale] | None = None
    for scale in SCALES.values():
        train = _train_config(scale, scale.sizes[0], shared.train, {})
        data = _data_config(scale, shared.data, {})
        vocab = _resolve_vocab(data)[0]
        for size in scale.sizes:
            try:  # the backbone's shape decides; model overrides may name fields vanilla does not have
                c = count(REFERENCE_METHOD, size, {}, vocab, train.seq_len)
            except ConfigError:
                continue
            distance = abs(math.log(request.budget / c.train_flops_per_token
                                    / (CHINCHILLA_TOKENS_PER_PARAM * c.params)))
            if best is None or distance < best[0]:
                best = (distance, scale)
    if best is None:
        raise PlanError(f"{REFERENCE_METHOD} cannot be built at any rung with these overrides")
    return best[1]


def _train_config(scale: Scale, size: str, *overrides: dict[str, str]) -> TrainConfig:
    values: dict[str, Any] = {**scale.train, **scale.size_train.get(size, {})}
    for extra in overrides:
        values.update(extra)
    return _dataclass_from(TrainConfig, values)


def _data_config(scale: Scale, *overrides: dict[str, str]) -> DataConfig:
    values: dict[str, Any] = {}
    for extra in overrides:
        values.update(extra)
    if "vocab_size" not in values and str(values.get("tokenizer", "bpe")).strip() == "bpe":
        values["vocab_size"] = scale.vocab_size
    return _dataclass_from(DataConfig, values)


def _steps(flops_per_step: float, budget: float) -> int:
    return round(budget / flops_per_step)


def _memory(c: Counts, reference: Counts, train: TrainConfig, vocab: int, bf16: bool) -> float:
    """Rough peak bytes of one training job (see the module docstring)."""
    states = 16.0 * c.params
    element = 2.0 if bf16 else 4.0
    activations = 17.0 * element * train.seq_len * train.batch_size * c.d_model * c.n_layers
    activations *= c.train_flops_per_token / reference.train_flops_per_token
    logits = train.batch_size * train.seq_len * vocab * (element + 8.0)  # logits, fp32 copy, gradient
    return states + activations + logits


def make_plan(request: PlanRequest, hardware: Hardware | None = None) -> Plan:
    """Resolve ``request`` into jobs (see the module docstring for every rule); probes hardware if not given."""
    shared, per_method = split_overrides(request.overrides)
    variants = parse_vary(request.vary)
    methods = list(request.methods) if request.methods else list(registry.plugins())
    for method in methods:
        registry.get(method)
    for method in list(per_method) + list(variants):
        if method not in methods:
            raise PlanError(f"override or --vary for {method!r}, which is not among the swept methods "
                            f"({', '.join(methods)})")
    if request.sizes:
        for size in request.sizes:
            scale_of(size)
    scale = _choose_scale(request, shared)
    notes: list[str] = [f"scale: {scale.description}"]
    if request.overrides:
        notes.append("overrides (win over the scale's defaults): " + " ".join(request.overrides))
    skipped: list[str] = []
    budget = float(request.budget)

    def settings(method: str, size: str) -> tuple[dict[str, str], TrainConfig, DataConfig, int]:
        own = per_method.get(method, _Overrides({}, {}, {}))
        data = _data_config(scale, shared.data, own.data)
        vocab = request.vocab_size or _resolve_vocab(data)[0]
        return {**shared.model, **own.model}, _train_config(scale, size, shared.train, own.train), data, vocab

    def batch_fixed(method: str) -> bool:  # the user chose the batch: the plan must not shrink it
        own = per_method.get(method)
        return "batch_size" in shared.train or (own is not None and "batch_size" in own.train)
    vocab_note = _resolve_vocab(_data_config(scale, shared.data))[1]
    if vocab_note:
        notes.append(vocab_note)

    def sized_steps(flops_per_token: float, train: TrainConfig, fixed: bool, spend: float) -> tuple[TrainConfig, int]:
        steps = _steps(flops_per_token * train.tokens_per_step, spend)
        if steps < MIN_STEPS and not fixed:
            per_sequence = flops_per_token * train.seq_len * train.grad_accum
            batch = max(1, min(train.batch_size, int(spend // (per_sequence * MIN_STEPS))))
            train = dataclasses.replace(train, batch_size=batch)
            steps = _steps(flops_per_token * train.tokens_per_step, spend)
        return train, steps

    def candidates(method: str, model: dict[str, str]) -> list[tuple[str, Counts]]:
        out = []
        for size in (request.sizes or scale.sizes):
            base_model, train, _, vocab = settings(method, size)
            try:
                out.append((size, count(method, size, {**base_model, **model}, vocab, train.seq_len)))
            except ConfigError as exc:
                skipped.append(f"{method}/{size}: {exc}")
        return out

    def closest(options: list[tuple[str, Counts]]) -> list[str]:
        if request.sizes:
            return [size for size, _ in options]
        ranked = sorted(options, key=lambda o: abs(math.log(
            budget / o[1].train_flops_per_token / (CHINCHILLA_TOKENS_PER_PARAM * o[1].params))))
        keep = {size for size, _ in ranked[:request.rungs]}
        return [size for size, _ in options if size in keep]

    reference_rungs: list[str] | None = None
    if request.match == "tokens":
        reference_rungs = closest(candidates(REFERENCE_METHOD, {}))

    jobs: list[PlannedJob] = []
    reference_counts: dict[str, Counts] = {}
    for method in methods:
        for values in variants.get(method, [{}]):
            options = candidates(method, values)
            if reference_rungs is not None:  # tokens mode: vanilla's rungs (those this method can build)
                rungs = [size for size, _ in options if size in reference_rungs]
            else:
                rungs = closest(options)
            counts = dict(options)
            for size in rungs:
                model, train, data, vocab = settings(method, size)
                model = {**model, **values}
                c = counts[size]
                if size not in reference_counts:
                    ref_model, ref_train, _, ref_vocab = settings(REFERENCE_METHOD, size)
                    try:
                        reference_counts[size] = count(REFERENCE_METHOD, size, ref_model, ref_vocab, ref_train.seq_len)
                    except ConfigError as exc:
                        if request.match == "tokens":
                            raise PlanError(f"--match tokens needs {REFERENCE_METHOD} at {size}, which the "
                                            f"overrides break ({exc}); give them per method (METHOD:FIELD=V)") from None
                        reference_counts[size] = c  # only the memory estimate uses it
                ref = reference_counts[size]
                if request.match == "tokens":
                    ref_model, ref_train, _, _ = settings(REFERENCE_METHOD, size)
                    ref_train, ref_steps = sized_steps(ref.train_flops_per_token, ref_train,
                                                       batch_fixed(REFERENCE_METHOD), budget)
                    tokens_bought = ref_steps * ref_train.tokens_per_step
                    if not batch_fixed(method):
                        train = dataclasses.replace(train, batch_size=ref_train.batch_size)
                    steps = max(1, round(tokens_bought / train.tokens_per_step))
                    spend = steps * train.tokens_per_step * c.train_flops_per_token
                else:
                    train, steps = sized_steps(c.train_flops_per_token, train, batch_fixed(method), budget)
                    spend = budget
                if steps < 1:
                    skipped.append(f"{method}/{size}: the budget buys less than one sequence of {train.seq_len} "
                                   f"tokens ({c.train_flops_per_token * train.seq_len:.3g} FLOPs)")
                    continue
                tokens = steps * train.tokens_per_step
                planned_flops = tokens * c.train_flops_per_token
                error = planned_flops / budget - 1 if request.match == "train-flops" else 0.0
                if abs(error) > BUDGET_TOLERANCE:
                    why = ("train.batch_size is fixed by --set; lower it for more, smaller steps"
                           if batch_fixed(method) else "even one sequence per step gives too few steps; raise --budget")
                    notes.append(f"{method}/{size}: {steps} steps of {train.batch_size} x {train.seq_len} tokens "
                                 f"train {planned_flops:.3g} FLOPs, {error:+.1%} off the budget ({why})")
                tags: dict[str, Any] = {"match": request.match, "sweep_budget": budget}
                if values:
                    tags["variant"] = _variant_label(values)
                if request.match == "tokens":
                    tags["tokens_of"] = REFERENCE_METHOD
                for seed in range(request.seeds):
                    job = Job(method=method, budget=spend, size=size, seed=seed, model=dict(model), train=train,
                              data=data, tags=dict(tags))
                    jobs.append(PlannedJob(
                        job=job, job_id=job.job_id(), method=method, variant=tags.get("variant", ""), size=size,
                        seed=seed, params=c.params, non_embedding_params=c.non_embedding_params,
                        train_flops_per_token=c.train_flops_per_token,
                        infer_flops_per_token_max=c.infer_flops_per_token_max, batch_size=train.batch_size, grad_accum=train.grad_accum,
                        seq_len=train.seq_len, steps=steps, tokens=tokens, train_flops=planned_flops,
                        budget_error=error, chinchilla_tokens=CHINCHILLA_TOKENS_PER_PARAM * c.params, hours=0.0,
                        memory_bytes=_memory(c, ref, train, vocab, bf16=False)))
    if not jobs:
        detail = "; ".join(skipped[:3]) or "no method can be built at the chosen rungs"
        raise PlanError(f"nothing to run at budget {budget:.3g} FLOPs ({detail}); raise --budget or pick --sizes")

    if hardware is None:
        smallest = min(jobs, key=lambda j: SIZES[j.size].d_model)
        probe_train = _train_config(scale, smallest.size, shared.train)
        hardware = detect_hardware(scale, probe_train, request.vocab_size or _resolve_vocab(
            _data_config(scale, shared.data))[0], gpu=request.gpu, mfu=request.mfu, workers=request.workers,
            cpus_per_job=request.cpus_per_job, probe_size=smallest.size)
    bf16 = hardware.kind != "cpu"
    for planned in jobs:
        planned.hours = planned.train_flops / hardware.flops_per_second / 3600.0
        if bf16:
            model, train, _, vocab = settings(planned.method, planned.size)
            c = count(planned.method, planned.size, planned.job.model, vocab, train.seq_len)
            planned.memory_bytes = _memory(c, reference_counts[planned.size], planned.job.train, vocab, bf16=True)
    if hardware.memory_bytes:
        too_big = [j for j in jobs if j.memory_bytes > hardware.memory_bytes]
        if too_big:
            worst = max(too_big, key=lambda j: j.memory_bytes)
            notes.append(f"{len(too_big)} job(s) need more than one {hardware.name}'s "
                         f"{hardware.memory_bytes / 1e9:.0f} GB "
                         f"(worst: {worst.method}/{worst.size}, ~{worst.memory_bytes / 1e9:.0f} GB): lower "
                         "train.batch_size for them (METHOD:train.batch_size=N) or use larger GPUs")
    if scale.name == "pythia" and shared.data.get("source", "embedded") == "embedded":
        notes.append("data: the embedded corpus holds ~3.7M training tokens; Pythia-scale jobs need a real corpus "
                     "(--set data.source=hf:<dataset> or a folder of .jsonl/.parquet)")
    notes.append("hours count training only; evaluation (perplexity by deployed decoding, downstream tasks) adds to it")
    skipped = list(dict.fromkeys(skipped))  # tokens mode looks at vanilla's rungs twice
    return Plan(request, scale, hardware, request.vocab_size or _resolve_vocab(_data_config(scale, shared.data))[0],
                jobs, skipped, notes)


# ---------------------------------------------------------------------------------------------------
# output


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    return f"{h:,.1f} h"


def format_plan(plan: Plan) -> str:
    r = plan.request
    mode = ("every job trains with the budget's FLOPs" if r.match == "train-flops"
            else f"every method trains on the tokens the budget buys {REFERENCE_METHOD}")
    lines = [(f"plan: budget {r.budget:.3g} training FLOPs per job, match {r.match} ({mode}), "
              f"{len(plan.jobs)} job(s), {r.seeds} seed(s)"),
             f"sizes: {plan.rule()}",
             f"hardware: {plan.hardware.basis}", ""]
    header = ("method", "size", "params", "batch", "steps", "tokens", "tok/param", "train FLOPs", "vs budget",
              "FLOPs/token", "est. time", "memory")
    rows = []
    for j in plan.jobs:
        name = j.method + (f" [{j.variant}]" if j.variant else "") + (f" s{j.seed}" if r.seeds > 1 else "")
        rows.append((name, j.size, _si(j.params), (str(j.batch_size) if j.grad_accum == 1 else f"{j.batch_size}x{j.grad_accum}"), f"{j.steps:,}", _si(j.tokens),
                     f"{j.tokens / j.params:.2g}", f"{j.train_flops:.3g}",
                     f"{j.train_flops / r.budget - 1:+.1%}", _si(j.train_flops_per_token), _hours(j.hours),
                     _si(j.memory_bytes, "B")))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows)
    unit = "GPU-hours" if plan.hardware.kind != "cpu" else "CPU job-hours"
    lines += ["", (f"total: {plan.device_hours:,.2f} {unit}; wall ~{_hours(plan.wall_hours)} on "
                   f"{plan.hardware.workers} worker(s)")]
    for item in plan.skipped:
        lines.append(f"skipped {item}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# CLI


def _csv(text: str | None) -> list[str] | None:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return items or None


def add_request_arguments(parser: argparse.ArgumentParser, budget_required: bool = True) -> None:
    """The arguments ``plan`` and ``sweep`` share."""
    parser.add_argument("--budget", type=float, required=budget_required,
                        help="training FLOPs per job, e.g. 1e20" + ("" if budget_required else
                                                                     " (default: the embedded default sweep)"))
    parser.add_argument("--methods", default="", help="comma-separated methods (default: every registered one)")
    parser.add_argument("--sizes", default="", help="comma-separated ladder rungs (default: the IsoFLOP rule)")
    parser.add_argument("--rungs", type=int, default=DEFAULT_RUNGS, help="rungs per method chosen by the rule")
    parser.add_argument("--match", choices=MATCH_MODES, default="train-flops",
                        help="train-flops: equal training FLOPs; tokens: the tokens vanilla gets (papers' protocol)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per (method, size): 0..N-1")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="train.FIELD, data.FIELD or a model field for every job; METHOD:KEY=VALUE for one method")
    parser.add_argument("--vary", action="append", default=[], metavar="METHOD:FIELD=V1,V2",
                        help="extra jobs per value (e.g. ponderlm3:compute_penalty=0.003,0.01,0.03)")
    parser.add_argument("--gpu", default=None, help=f"estimate on a named GPU: {', '.join(GPU_TABLE)}")
    parser.add_argument("--mfu", type=float, default=None, help="assumed utilisation for the estimate")
    parser.add_argument("--workers", type=int, default=None, help="jobs at once for the wall-time estimate")
    parser.add_argument("--cpus-per-job", type=int, default=1, help="CPU cores (threads) per job")


def request_from_args(args: argparse.Namespace, budget: float | None = None) -> PlanRequest:
    return PlanRequest(budget=args.budget if budget is None else budget, methods=_csv(args.methods),
                       sizes=_csv(args.sizes), rungs=args.rungs, match=args.match, seeds=args.seeds,
                       overrides=list(args.overrides), vary=list(args.vary), gpu=args.gpu, mfu=args.mfu,
                       workers=args.workers, cpus_per_job=args.cpus_per_job)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_request_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    plan = make_plan(request_from_args(args))
    print(json.dumps(plan.to_dict(), indent=2, default=str) if args.json else format_plan(plan))
    return 0


__all__ = [
    "GPU_TABLE",
    "MATCH_MODES",
    "SCALES",
    "Hardware",
    "Plan",
    "PlanError",
    "PlanRequest",
    "PlannedJob",
    "Scale",
    "count",
    "detect_hardware",
    "format_plan",
    "make_plan",
]
