"""The plan: the jobs a request asks for, their sizes, tokens, FLOPs, hours and memory."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from harness.core import registry
from harness.core.config import SIZES, dataclass_from
from harness.core.errors import ConfigError, PlanError
from harness.data import DataConfig, Tokenizer
from harness.distributed import PARALLEL, check_devices
from harness.job import Job, TrainConfig, parse_overrides
from harness.plan.hardware import (
    MAX_DEVICES_PER_JOB,
    PARALLEL_PREFERENCE,
    Hardware,
    concurrent_jobs,
    detect_hardware,
    devices_note,
    job_hours,
    memory_per_device,
    suggest_devices,
)
from harness.plan.ladder import CHINCHILLA_TOKENS_PER_PARAM, REFERENCE_METHOD, SCALES, Counts, Scale, count, scale_of

MIN_STEPS = 25  # |round(x) - x| <= 0.5, so 25 steps keep training FLOPs within 2% of the budget
BUDGET_TOLERANCE = 0.02
DEFAULT_RUNGS = 3
MATCH_MODES = ("train-flops", "tokens")
RECIPE_FIELDS = ("lr", "warmup_fraction", "min_lr_ratio", "beta1", "beta2", "weight_decay")  # of TrainConfig

@dataclass
class Arm:
    """One arm of a comparison: a method with fixed model-config values (its variant), seeds and rungs.

    A plain request makes one arm per method and ``--vary`` combination; a study lists its arms.
    """

    method: str
    values: dict[str, Any] = field(default_factory=dict)  # model-config overrides that define the variant
    label: str = ""  # the variant's name in tables ("" = the method's defaults)
    seeds: int | None = None  # None: the request's seeds
    sizes: list[str] | None = None  # None: the request's sizes or the ladder rule


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
    arms: list[Arm] | None = None  # a study's arms; replaces methods and vary
    reference_size: str | None = None  # tokens mode: every job gets the tokens vanilla buys at this rung
    devices_per_job: int = 1  # each job on N devices (harness/distributed.py): its hours and memory per device
    parallel: str = "ddp"  # with devices_per_job > 1: ddp | fsdp

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
        if self.arms is not None and (self.methods or self.vary):
            raise ConfigError("a study's arms replace --methods and --vary; give one or the other")
        if self.reference_size is not None and self.match != "tokens":
            raise ConfigError(f"reference size {self.reference_size!r} needs --match tokens")
        if not (isinstance(self.devices_per_job, int) and self.devices_per_job >= 1):
            raise ConfigError(f"--devices-per-job {self.devices_per_job!r}: must be a whole number of at least 1")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"--parallel {self.parallel!r}: choose {' or '.join(PARALLEL)}")


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
    hours: float  # wall-clock hours on the request's devices_per_job devices (its device-hours: x that)
    memory_bytes: float  # peak bytes per device on those devices
    norm_eps: float  # the model's, resolved (the scale's default, a --set or the config's)
    weight_decay_from: str  # "method" (its reference recipe), "scale" or "--set"

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
    skipped: list[str]  # "method [variant] at size: reason" (e.g. its config is invalid at that rung)
    notes: list[str]

    @property
    def devices(self) -> int:
        return self.request.devices_per_job

    @property
    def device_hours(self) -> float:
        return sum(j.hours for j in self.jobs) * self.devices

    @property
    def concurrent_jobs(self) -> int:
        """Jobs at once: the workers (devices, or CPU job slots) over the devices each job takes."""
        return concurrent_jobs(self.hardware.workers, self.devices)

    @property
    def wall_hours(self) -> float:
        """Makespan of the jobs over the concurrent-job slots, longest job first (jobs cannot be split)."""
        loads = [0.0] * self.concurrent_jobs
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
            **({"devices_per_job": self.devices, "parallel": self.request.parallel} if self.devices > 1 else {}),
            "device_hours": self.device_hours, "wall_hours": self.wall_hours,
            "recipes": self.recipes(), "jobs": [j.to_dict() for j in self.jobs], "skipped": self.skipped,
            "notes": self.notes,
        }

    def recipes(self) -> list[dict[str, Any]]:
        """The optimiser settings and norm_eps of each (method, variant, rung), once however many seeds."""
        rows: dict[tuple[str, str, str], dict[str, Any]] = {}
        for j in self.jobs:
            rows.setdefault((j.method, j.variant, j.size), {
                "method": j.method, "variant": j.variant, "size": j.size,
                **{name: getattr(j.job.train, name) for name in RECIPE_FIELDS},
                "weight_decay_from": j.weight_decay_from, "norm_eps": j.norm_eps})
        return list(rows.values())


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


def _arm_name(method: str, label: str) -> str:
    return method + (f" [{label}]" if label else "")


def _variant_label(values: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def _resolve_vocab(data: DataConfig) -> tuple[int, str | None]:
    """Vocabulary the models will have: the BPE target, or the size of a tokenizer file given by path."""
    if data.tokenizer.strip() == "bpe":
        return data.vocab_size, None
    path = os.path.expanduser(data.tokenizer)
    if os.path.exists(path):


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
        train = _train_config(scale, scale.sizes[0], REFERENCE_METHOD, shared.train)
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


def _train_config(scale: Scale, size: str, method: str, *overrides: dict[str, str]) -> TrainConfig:
    values = scale.train_defaults(size, method)
    for extra in overrides:
        values.update(extra)
    return dataclass_from(TrainConfig, values)


def _data_config(scale: Scale, *overrides: dict[str, str]) -> DataConfig:
    values: dict[str, Any] = {}
    for extra in overrides:
        values.update(extra)
    if "vocab_size" not in values and str(values.get("tokenizer", "bpe")).strip() == "bpe":
        values["vocab_size"] = scale.vocab_size
    return dataclass_from(DataConfig, values)


def _unsharded(planned: PlannedJob) -> int:
    """Parameters FSDP keeps gathered through the step: the root's embeddings and head (see memory_per_device)."""
    return planned.params - planned.non_embedding_params


def _sweep_devices(jobs: list[PlannedJob], fitting: list[tuple[PlannedJob, float]],
                   capacity: float) -> tuple[int, str] | None:
    """The fewest devices (DDP before FSDP) on which every job of ``fitting`` (with its one-device bytes) fits
    ``capacity`` and every job's micro-batch splits; None when there is none."""
    if not fitting:
        return None
    for devices in range(2, MAX_DEVICES_PER_JOB + 1):
        if any(j.batch_size % devices for j in jobs):
            continue
        for parallel in PARALLEL_PREFERENCE:
            if all(memory_per_device(one, j.params, devices, parallel, _unsharded(j)) <= capacity
                   for j, one in fitting):
                return devices, parallel
    return None


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


@dataclass
class _Settings:
    model: dict[str, str]
    train: TrainConfig
    data: DataConfig
    vocab: int


class _Planner:
    """Resolves a request into jobs; one method per rule of the module docstring."""

    def __init__(self, request: PlanRequest):
        self.request = request
        self.shared, self.per_method = split_overrides(request.overrides)
        self.arms = request_arms(request, self.per_method)
        if request.sizes:
            for size in request.sizes:
                scale_of(size)
        for arm in self.arms:
            for size in arm.sizes or ():
                scale_of(size)
        self.scale = _choose_scale(request, self.shared)
        self.budget = float(request.budget)
        self.skipped: list[str] = []
        self.notes: list[str] = [f"scale: {self.scale.description}"]
        if request.overrides:
            self.notes.append("overrides (win over the scale's defaults): " + " ".join(request.overrides))
        vocab_note = _resolve_vocab(_data_config(self.scale, self.shared.data))[1]
        if vocab_note:
            self.notes.append(vocab_note)
        self.reference_counts: dict[str, Counts] = {}

    # -- settings and counts ----------------------------------------------------------------------

    def settings(self, method: str, size: str) -> _Settings:
        own = self.per_method.get(method, _Overrides({}, {}, {}))
        data = _data_config(self.scale, self.shared.data, own.data)
        vocab = self.request.vocab_size or _resolve_vocab(data)[0]
        train = _train_config(self.scale, size, method, self.shared.train, own.train)
        return _Settings({**self.scale.model, **self.shared.model, **own.model}, train, data, vocab)

    def weight_decay_from(self, method: str) -> str:
        own = self.per_method.get(method)
        if "weight_decay" in self.shared.train or (own is not None and "weight_decay" in own.train):
            return "--set"
        return self.scale.weight_decay_source(method)

    def batch_fixed(self, method: str) -> bool:
        """The user chose the batch: the plan must not shrink it."""
        own = self.per_method.get(method)
        return "batch_size" in self.shared.train or (own is not None and "batch_size" in own.train)

    def candidates(self, method: str, values: dict[str, str], sizes: Iterable[str],
                   label: str = "") -> list[tuple[str, Counts]]:
        """The rungs ``method`` (with ``values``) can be built at, and its counts there.

        A rung where its config is invalid (a ConfigError, e.g. MoR's (L-2)/R not whole) is skipped with
        one line naming the method, the rung and the reason: never a failed plan or a silently changed model.
        """
        out = []
        for size in sizes:
            st = self.settings(method, size)
            try:
                out.append((size, count(method, size, {**st.model, **values}, st.vocab, st.train.seq_len)))
            except ConfigError as exc:
                self.skipped.append(f"{_arm_name(method, label)} at {size}: {exc}")
        return out

    def closest(self, options: list[tuple[str, Counts]]) -> list[str]:
        """The request's rungs nearest Chinchilla-optimal at the budget (all of them when sizes are given)."""
        if self.request.sizes:
            return [size for size, _ in options]
        ranked = sorted(options, key=lambda o: abs(math.log(
            self.budget / o[1].train_flops_per_token / (CHINCHILLA_TOKENS_PER_PARAM * o[1].params))))
        keep = {size for size, _ in ranked[:self.request.rungs]}
        return [size for size, _ in options if size in keep]

    def sized_steps(self, flops_per_token: float, train: TrainConfig, fixed: bool,
                    spend: float) -> tuple[TrainConfig, int]:
        steps = _steps(flops_per_token * train.tokens_per_step, spend)
        if steps < MIN_STEPS and not fixed:
            per_sequence = flops_per_token * train.seq_len * train.grad_accum
            batch = max(1, min(train.batch_size, int(spend // (per_sequence * MIN_STEPS))))
            train = dataclasses.replace(train, batch_size=batch)
            steps = _steps(flops_per_token * train.tokens_per_step, spend)
        return train, steps

    def reference(self, size: str, fallback: Counts) -> Counts:
        if size not in self.reference_counts:
            st = self.settings(REFERENCE_METHOD, size)
            try:
                self.reference_counts[size] = count(REFERENCE_METHOD, size, st.model, st.vocab, st.train.seq_len)
            except ConfigError as exc:
                if self.request.match == "tokens":
                    raise PlanError(f"--match tokens needs {REFERENCE_METHOD} at {size}, which the overrides "
                                    f"break ({exc}); give them per method (METHOD:FIELD=V)") from None
                self.reference_counts[size] = fallback  # only the memory estimate uses it
        return self.reference_counts[size]

    def tokens_bought(self, size: str) -> tuple[int, TrainConfig]:
        """Tokens mode: what the budget buys vanilla at ``size`` (or at the request's reference rung)."""
        size = self.request.reference_size or size
        ref = self.reference(size, None)  # type: ignore[arg-type]
        train = self.settings(REFERENCE_METHOD, size).train
        train, steps = self.sized_steps(ref.train_flops_per_token, train, self.batch_fixed(REFERENCE_METHOD),
                                        self.budget)
        return steps * train.tokens_per_step, train

    # -- the jobs ---------------------------------------------------------------------------------

    def rungs(self, arm: Arm, options: list[tuple[str, Counts]], reference_rungs: list[str] | None) -> list[str]:
        if arm.sizes:
            return [size for size, _ in options]
        if reference_rungs is not None:  # tokens mode: vanilla's rungs (those this method can build)
            return [size for size, _ in options if size in reference_rungs]
        return self.closest(options)

    def arm_jobs(self, arm: Arm, reference_rungs: list[str] | None) -> list[PlannedJob]:
        options = self.candidates(arm.method, arm.values, arm.sizes or self.request.sizes or self.scale.sizes,
                                  arm.label)
        counts = dict(options)
        jobs = []
        for size in self.rungs(arm, options, reference_rungs):
            jobs.extend(self.size_jobs(arm, size, counts[size]))
        return jobs

    def size_jobs(self, arm: Arm, size: str, c: Counts) -> list[PlannedJob]:
        st = self.settings(arm.method, size)
        model, train = {**st.model, **arm.values}, st.train
        ref = self.reference(size, c)
        if self.request.match == "tokens":
            tokens, ref_train = self.tokens_bought(size)
            if not self.batch_fixed(arm.method):
                train = dataclasses.replace(train, batch_size=ref_train.batch_size)
            steps = max(1, round(tokens / train.tokens_per_step))
            spend = steps * train.tokens_per_step * c.train_flops_per_token
        else:
            train, steps = self.sized_steps(c.train_flops_per_token, train, self.batch_fixed(arm.method), self.budget)
            spend = self.budget
        if steps < 1:
            self.skipped.append(f"{_arm_name(arm.method, arm.label)} at {size}: the budget buys less than one "
                                f"sequence of {train.seq_len} tokens ({c.train_flops_per_token * train.seq_len:.3g} "
                                "FLOPs)")
            return []
        tokens = steps * train.tokens_per_step
        planned_flops = tokens * c.train_flops_per_token
        error = planned_flops / self.budget - 1 if self.request.match == "train-flops" else 0.0
        if abs(error) > BUDGET_TOLERANCE:
            why = ("train.batch_size is fixed by --set; lower it for more, smaller steps"
                   if self.batch_fixed(arm.method)
                   else "even one sequence per step gives too few steps; raise --budget")
            self.notes.append(f"{arm.method}/{size}: {steps} steps of {train.batch_size} x {train.seq_len} tokens "
                              f"train {planned_flops:.3g} FLOPs, {error:+.1%} off the budget ({why})")
        tags: dict[str, Any] = {"match": self.request.match, "sweep_budget": self.budget}
        if arm.label:
            tags["variant"] = arm.label
        if self.request.match == "tokens":
            tags["tokens_of"] = REFERENCE_METHOD
        norm_eps = registry.get(arm.method).make_config(size, {**model, "vocab_size": st.vocab}).norm_eps
        jobs = []
        for seed in range(arm.seeds or self.request.seeds):
            job = Job(method=arm.method, budget=spend, size=size, seed=seed, model=dict(model), train=train,
                      data=st.data, tags=dict(tags))
            jobs.append(PlannedJob(
                job=job, job_id=job.job_id(), method=arm.method, variant=arm.label, size=size, seed=seed,
                params=c.params, non_embedding_params=c.non_embedding_params,
                train_flops_per_token=c.train_flops_per_token, infer_flops_per_token_max=c.infer_flops_per_token_max,
                batch_size=train.batch_size, grad_accum=train.grad_accum, seq_len=train.seq_len, steps=steps,
                tokens=tokens, train_flops=planned_flops, budget_error=error,
                chinchilla_tokens=CHINCHILLA_TOKENS_PER_PARAM * c.params, hours=0.0,
                memory_bytes=_memory(c, ref, train, st.vocab, bf16=False), norm_eps=norm_eps,
                weight_decay_from=self.weight_decay_from(arm.method)))
        return jobs

    def jobs(self) -> list[PlannedJob]:
        reference_rungs = None
        if self.request.match == "tokens" and not self.request.reference_size:
            sizes = self.request.sizes or self.scale.sizes
            reference_rungs = self.closest(self.candidates(REFERENCE_METHOD, {}, sizes))
        jobs = [job for arm in self.arms for job in self.arm_jobs(arm, reference_rungs)]
        if not jobs:
            detail = "; ".join(self.skipped[:3]) or "no method can be built at the chosen rungs"
            raise PlanError(f"nothing to run at budget {self.budget:.3g} FLOPs ({detail}); raise --budget or pick "
                            "--sizes")
        return jobs

    # -- hardware ---------------------------------------------------------------------------------

    def estimate(self, jobs: list[PlannedJob], hardware: Hardware | None) -> Hardware:
        """Hours and memory of every job on ``request.devices_per_job`` devices of ``hardware`` (probed here
        when not given): wall hours by :func:`~harness.plan.hardware.job_hours`, memory per device by
        :func:`~harness.plan.hardware.memory_per_device` from the one-device estimate."""
        request = self.request
        if hardware is None:
            smallest = min(jobs, key=lambda j: SIZES[j.size].d_model)
            probe_train = _train_config(self.scale, smallest.size, REFERENCE_METHOD, self.shared.train)
            hardware = detect_hardware(self.scale, probe_train, self.vocab(), gpu=request.gpu, mfu=request.mfu,
                                       workers=request.workers, cpus_per_job=request.cpus_per_job,
                                       probe_size=smallest.size)
        one_device = []
        for planned in jobs:
            planned.hours = job_hours(planned.train_flops, hardware, request.devices_per_job)
            if hardware.kind != "cpu":  # bf16 activations on accelerators
                st = self.settings(planned.method, planned.size)
                c = count(planned.method, planned.size, planned.job.model, st.vocab, st.train.seq_len)
                planned.memory_bytes = _memory(c, self.reference_counts.get(planned.size, c), planned.job.train,
                                               st.vocab, bf16=True)
            one_device.append(planned.memory_bytes)
            planned.memory_bytes = memory_per_device(planned.memory_bytes, planned.params, request.devices_per_job,
                                                     request.parallel, _unsharded(planned))
        self.split_notes(jobs)
        self.device_notes(jobs, one_device, hardware)
        return hardware

    def split_notes(self, jobs: list[PlannedJob]) -> None:
        """A job whose micro-batch does not split over the devices: the sweep refuses it; say so here too."""
        refused = []
        for planned in jobs:
            try:
                check_devices(planned.job.train, self.request.devices_per_job)
            except ConfigError as exc:
                refused.append(f"{_arm_name(planned.method, planned.variant)}/{planned.size}: {exc}")
        self.notes.extend(dict.fromkeys(refused))  # once per (arm, rung), whatever the seeds

    def device_notes(self, jobs: list[PlannedJob], one_device: list[float], hardware: Hardware) -> None:
        """Per job that does not fit a device as requested: the fewest devices (DDP before FSDP) it fits on;
        then the one ``--devices-per-job N --parallel X`` on which every such job fits, since a sweep runs
        all its jobs on one N (decided: the cheapest such setting, not the largest N suggested, which at
        DDP may not fit a job that needed FSDP at a smaller N)."""
        capacity = hardware.memory_bytes
        if not capacity:
            return
        misfits = [(j, one) for j, one in zip(jobs, one_device) if j.memory_bytes > capacity]
        if not misfits:
            return
        notes = [devices_note(f"{_arm_name(j.method, j.variant)}/{j.size}", one, j.params, hardware, j.batch_size,
                              _unsharded(j)) for j, one in misfits]
        self.notes.extend(dict.fromkeys(n for n in notes if n))
        fitting = [(j, one) for j, one in misfits  # the others fit nowhere: their note says to lower the batch
                   if suggest_devices(one, j.params, capacity, j.batch_size, unsharded_params=_unsharded(j))]
        found = _sweep_devices(jobs, fitting, capacity)
        if found is None:
            return
        devices, parallel = found
        now = (f" on {self.request.devices_per_job} devices ({self.request.parallel})"
               if self.request.devices_per_job > 1 else "")
        self.notes.append(
            f"{len(misfits)} job(s) do not fit one {hardware.name}'s {capacity / 1e9:.0f} GB{now}: sweep with "
            f"--devices-per-job {devices} --parallel {parallel} (a sweep runs every job on the same N; sweep the "
            "jobs that fit one device separately to keep them on one)")

    def vocab(self) -> int:
        return self.request.vocab_size or _resolve_vocab(_data_config(self.scale, self.shared.data))[0]

    def data_notes(self, jobs: list[PlannedJob]) -> None:
        sources = {j.job.data.source for j in jobs}
        if self.scale.name == "pythia" and "embedded" in sources:
            self.notes.append("data: the embedded corpus holds ~3.7M training tokens; Pythia-scale jobs need a real "
                              "corpus (--set data.source=hf:<dataset> or a folder of .jsonl/.parquet)")
        hub = sorted({name for data in {_data_key(j.job.data): j.job.data for j in jobs}.values()
                      for name in hub_sources(data)})
        if hub:
            self.notes.append("needs the hub (or a local cache) for: " + ", ".join(hub))
        self.notes.append("hours count training only; evaluation (perplexity by deployed decoding, downstream "
                          "tasks) adds to it")


def hub_sources(data: DataConfig) -> set[str]:
    """The hub names a job's data needs: ``hf:`` sources and tokenizers that are neither "bpe" nor a file."""
    needs = {s for s in (data.source, data.val_source) if s and s.startswith("hf:")}
    spec = data.tokenizer.strip()
    if spec != "bpe" and not os.path.exists(os.path.expanduser(spec)):
        needs.add(f"tokenizer {spec}")
    return needs


def _data_key(data: DataConfig) -> str:
    return repr(sorted(dataclasses.asdict(data).items()))


def request_arms(request: PlanRequest, per_method: dict[str, _Overrides]) -> list[Arm]:
    """The comparison's arms: given (a study), or every (method, --vary combination) of the request."""
    if request.arms:
        arms = list(request.arms)
        for arm in arms:
            registry.get(arm.method)
        named = {arm.method for arm in arms}
    else:
        variants = parse_vary(request.vary)
        methods = list(request.methods) if request.methods else list(registry.plugins())
        for method in methods:
            registry.get(method)
        for method in variants:
            if method not in methods:
                raise PlanError(f"override or --vary for {method!r}, which is not among the swept methods "
                                f"({', '.join(methods)})")
        arms = [Arm(method, values, _variant_label(values)) for method in methods
                for values in variants.get(method, [{}])]
        named = set(methods)
    for method in per_method:
        if method not in named:
            raise PlanError(f"override for {method!r}, which is not among the swept methods "
                            f"({', '.join(sorted(named))})")
    return arms


def vanilla_train_flops_per_token(size: str, overrides: list[str]) -> float:
    """Training FLOPs per token of the reference method at ``size`` under ``--set`` pairs (a study's tokens)."""
    scale = scale_of(size)
    shared, per_method = split_overrides(overrides)
    own = per_method.get(REFERENCE_METHOD, _Overrides({}, {}, {}))
    train = _train_config(scale, size, REFERENCE_METHOD, shared.train, own.train)
    vocab = _resolve_vocab(_data_config(scale, shared.data, own.data))[0]
    model = {**scale.model, **shared.model, **own.model}
    return count(REFERENCE_METHOD, size, model, vocab, train.seq_len).train_flops_per_token


def make_plan(request: PlanRequest, hardware: Hardware | None = None) -> Plan:
    """Resolve ``request`` into jobs (see the module docstring for every rule); probes hardware if not given."""
    planner = _Planner(request)
    jobs = planner.jobs()
    hardware = planner.estimate(jobs, hardware)
    planner.data_notes(jobs)
    skipped = list(dict.fromkeys(planner.skipped))  # tokens mode looks at vanilla's rungs twice
    return Plan(request, planner.scale, hardware, planner.vocab(), jobs, skipped, planner.notes)


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


def _vs_budget(job: PlannedJob, request: PlanRequest) -> str:
    """Train-flops mode: the distance from the budget; tokens mode: the cost relative to vanilla's."""
    if request.match == "tokens":
        return f"{job.train_flops / request.budget:.2f}x"
    return f"{job.train_flops / request.budget - 1:+.1%}"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    return ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
            *("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)]


def format_plan(plan: Plan) -> str:
    r = plan.request
    mode = ("every job trains with the budget's FLOPs" if r.match == "train-flops"
            else f"every method trains on the tokens the budget buys {REFERENCE_METHOD}")
    lines = [(f"plan: budget {r.budget:.3g} training FLOPs per job, match {r.match} ({mode}), "
              f"{len(plan.jobs)} job(s), {r.seeds} seed(s)"),
             f"sizes: {plan.rule()}",
             f"hardware: {plan.hardware.basis}"]
    if plan.devices > 1:
        lines.append(f"devices: each job on {plan.devices} devices ({r.parallel}); est. time is its wall time on "
                     f"them (x {plan.devices} device-hours), memory is per device")
    lines.append("")
    header = ("method", "size", "params", "batch", "steps", "tokens", "tok/param", "train FLOPs",
              "vs vanilla" if r.match == "tokens" else "vs budget", "FLOPs/token",
              "est. time" if plan.devices == 1 else f"est. time ({plan.devices}x)",
              "memory" if plan.devices == 1 else f"memory/device ({r.parallel})")
    rows = []
    for j in plan.jobs:
        name = _arm_name(j.method, j.variant) + (f" s{j.seed}" if r.seeds > 1 else "")
        batch = str(j.batch_size) if j.grad_accum == 1 else f"{j.batch_size}x{j.grad_accum}"
        rows.append((name, j.size, _si(j.params), batch, f"{j.steps:,}", _si(j.tokens),
                     f"{j.tokens / j.params:.2g}", f"{j.train_flops:.3g}",
                     _vs_budget(j, r), _si(j.train_flops_per_token), _hours(j.hours),
                     _si(j.memory_bytes, "B")))
    lines += _table(header, rows)
    lines += ["", "recipe: AdamW (betas), linear warm-up over a fraction of the steps, cosine to min-lr x lr "
                  "(weight decay: from the method's reference recipe, the scale's default or --set)"]
    lines += _table(("method", "size", "lr", "warm-up", "min-lr", "betas", "weight decay", "norm_eps"),
                    [(_arm_name(x["method"], x["variant"]), x["size"], f"{x['lr']:.3g}",
                      f"{100 * x['warmup_fraction']:.3g}%", f"{x['min_lr_ratio']:g}", f"{x['beta1']:g}, {x['beta2']:g}",
                      f"{x['weight_decay']:g} ({x['weight_decay_from']})", f"{x['norm_eps']:g}")
                     for x in plan.recipes()])
    unit = ("GPU-hours" if plan.hardware.kind != "cpu"
            else "CPU job-hours" if plan.devices == 1 else "CPU worker-hours")
    at_once = (f", {plan.concurrent_jobs} job(s) of {plan.devices} devices at once" if plan.devices > 1 else "")
    lines += ["", (f"total: {plan.device_hours:,.2f} {unit}; wall ~{_hours(plan.wall_hours)} on "
                   f"{plan.hardware.workers} worker(s){at_once}")]
    for item in plan.skipped:
        lines.append(f"skipped {item}")  # one line each: method, rung, reason
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


