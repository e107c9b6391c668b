"""What every benchmark shares: the configuration, the targets, timing, machine info, method roles."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.core import registry
from harness.core.config import CPU_SIZES, SIZES, ConfigError
from harness.core.registry import Plugin
from harness.data import DataConfig

SCHEMA_VERSION = 2  # 2: ratios and utilisation per round, peak timed inside each section
SECTIONS = ("train", "decode", "prune", "jacobi", "threads", "gpu")

# The targets the project set (see the docstring of harness/bench/__init__.py).
TARGET_TRAIN_RATIO = 1.0
TARGET_DECODE_SPEEDUP = 10.0
TARGET_DECODE_TOKENS = 512  # the decoding target is defined at this generation length
TARGET_PRUNE_EFFICIENCY = 0.8
TARGET_JACOBI_OVERHEAD = 1.15
# Training FLOP/s as a fraction of the matmul peak (issue "Speed where the studies spend their time")
TARGET_UTILIZATION = {"vanilla": 0.60, "jacobi": 0.55}



@dataclass
class BenchConfig:
    """What the benchmark runs; :meth:`full` and :meth:`quick` are the two command-line profiles."""

    profile: str = "full"
    sections: tuple[str, ...] = SECTIONS
    threads: int = 1  # 0 = torch's default
    warmup: int = 2  # untimed calls of every contender before timing
    repeats: int = 5  # timed rounds (medians)
    # 1. training throughput (and 5. utilisation): the trainer's default shape
    sizes: tuple[str, ...] = CPU_SIZES
    seq_len: int = 128
    batch_size: int = 16
    # 2. cached decoding against recomputation
    decode_size: str = "tiny"
    decode_tokens: int = 512
    decode_prompt: int = 16
    decode_batches: tuple[int, ...] = (1, 4)
    decode_repeats: int = 3
    # 3. hard-pruned PonderLM-3 against PonderLM-2
    prune_size: str = "tiny"
    prune_latent_steps: int = 3
    prune_kept_steps: int = 1
    prune_seq_len: int = 64
    prune_batch: int = 4
    decode_compile: bool = True  # also time the compiled one-slot step (Decoder.compile_slot_steps)
    # 4. Jacobi training of PonderLM-2/3 against vanilla, at the reference study's rung and shape
    # (harness/studies/paper.toml: pico, 16 x 128) and K (PonderLM-2 at 1 and 3, PonderLM-3 at 3)
    jacobi_size: str = "pico"
    jacobi_batch: int = 16
    jacobi_latent_steps: tuple[int, ...] = (1, 3)
    jacobi_repeats: int = 5  # rounds: each gives a ratio and a utilisation of its own (PerRound)
    jacobi_compiled: bool = True  # also time each model's step (last J of its config) with its blocks compiled
    # 5. the matmul peak: n x n float32 matmuls
    peak_matmul_n: int = 2048
    # 6. threads per job: (concurrent jobs, threads per job) configurations of one training job each
    threads_method: str = "ponderlm3"
    threads_size: str = "pico"
    threads_batch: int = 16
    threads_seq_len: int = 128
    threads_steps: int = 3
    threads_configs: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 1), (2, 2))
    # 7. GPU rows (only with CUDA): bf16 training of these methods at these rungs
    gpu_methods: tuple[str, ...] = ("vanilla", "ponderlm3")
    gpu_sizes: tuple[str, ...] = ("70m", "160m")
    gpu_batch: int = 4
    gpu_seq_len: int = 1024
    gpu_vocab_size: int = 50304
    gpu_repeats: int = 5
    gpu_peak_n: int = 8192
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        self.sections = tuple(self.sections)
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"bench sections {', '.join(unknown)} unknown; choose from {', '.join(SECTIONS)}")
        self.sizes, self.decode_batches = tuple(self.sizes), tuple(self.decode_batches)
        self.jacobi_latent_steps, self.gpu_sizes = tuple(self.jacobi_latent_steps), tuple(self.gpu_sizes)
        self.gpu_methods = tuple(self.gpu_methods)
        self.threads_configs = tuple((int(j), int(t)) for j, t in self.threads_configs)
        if not self.jacobi_latent_steps or any(k < 1 for k in self.jacobi_latent_steps):
            raise ConfigError(f"BenchConfig.jacobi_latent_steps={self.jacobi_latent_steps}: give K values >= 1")
        if not self.threads_configs or any(j < 1 or t < 1 for j, t in self.threads_configs):
            raise ConfigError(f"BenchConfig.threads_configs={self.threads_configs}: give (jobs, threads) pairs >= 1")
        for name in ("sizes", "gpu_sizes"):
            bad = [s for s in getattr(self, name) if s not in SIZES]
            if bad:
                raise ConfigError(f"BenchConfig.{name}: unknown size(s) {', '.join(bad)}; "
                                  f"choose from {', '.join(SIZES)}")
        if not self.decode_batches or any(b < 1 for b in self.decode_batches):
            raise ConfigError(f"BenchConfig.decode_batches={self.decode_batches}: give batch sizes >= 1")
        for name in ("decode_size", "prune_size", "jacobi_size", "threads_size"):
            if getattr(self, name) not in SIZES:
                raise ConfigError(f"BenchConfig.{name}={getattr(self, name)!r}: choose one of {', '.join(SIZES)}")
        if self.warmup < 0:
            raise ConfigError(f"BenchConfig.warmup={self.warmup}: must be >= 0")
        positive = ("repeats", "seq_len", "batch_size", "decode_tokens", "decode_prompt",
                    "decode_repeats", "prune_latent_steps", "prune_seq_len", "prune_batch", "jacobi_batch",
                    "jacobi_repeats", "peak_matmul_n", "threads_batch", "threads_seq_len", "threads_steps",
                    "gpu_batch", "gpu_seq_len", "gpu_vocab_size", "gpu_repeats", "gpu_peak_n")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"BenchConfig.{name}={getattr(self, name)!r}: must be positive")
        if not 0 <= self.prune_kept_steps < self.prune_latent_steps:
            raise ConfigError(f"BenchConfig.prune_kept_steps={self.prune_kept_steps}: must lie in "
                              f"[0, prune_latent_steps={self.prune_latent_steps}) so that something is pruned")
        if self.threads < 0:
            raise ConfigError(f"BenchConfig.threads={self.threads}: must be >= 0 (0 = torch's default)")

    @classmethod
    def full(cls, **changes: Any) -> BenchConfig:
        return cls(**changes)

    @classmethod
    def quick(cls, **changes: Any) -> BenchConfig:
        """Same measurements on smaller shapes and fewer rounds (under two minutes on two cores)."""
        return cls(**{"profile": "quick", "warmup": 1, "repeats": 3, "seq_len": 64, "batch_size": 8,
                      "decode_tokens": 128, "decode_repeats": 2, "prune_seq_len": 32, "prune_batch": 2,
                      "jacobi_batch": 4, "jacobi_latent_steps": (3,), "jacobi_repeats": 2, "jacobi_compiled": False,
                      "peak_matmul_n": 1024,
                      "threads_method": "vanilla", "threads_batch": 8, "threads_seq_len": 64,
                      "gpu_sizes": ("70m",), "gpu_repeats": 3, **changes})


# ---------------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Seconds per call of one contender: the median and every timed sample."""

    median: float
    samples: list[float]

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the samples were."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median > 0 else float("nan")


def time_interleaved(contenders: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                     tick: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Warm every contender up, then time ``repeats`` rounds of one call each, in turn; medians.

    Interleaving (A, B, A, B, ...) makes a change in machine load during the run hit every contender
    alike, which a block of A's followed by a block of B's does not.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
            if tick is not None:
                tick()
    return {name: Timing(statistics.median(s), s) for name, s in samples.items()}


@dataclass
class PerRound:
    """A quantity computed in every timed round (from that round's samples only): median and range.

    Ratios and utilisations are formed round by round -- A's time over B's time *in the same round*,
    FLOP/s over the matmul peak measured *in the same round* -- so a drift of the machine's speed
    between rounds (measured on these VMs: 20-60% within minutes) cancels instead of landing in the
    result. ``decided(target, at_most)``: whether every round is on the median's side of a target.
    """

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def met(self, target: float, at_most: bool) -> bool:
        return self.median <= target if at_most else self.median >= target

    def decided(self, target: float, at_most: bool) -> bool:
        """True when every round alone gives the median's verdict (the noise does not reach the target)."""
        met = self.met(target, at_most)
        return all((v <= target if at_most else v >= target) == met for v in self.values)

    def as_dict(self, name: str) -> dict[str, Any]:
        return {name: self.median, f"{name}_low": self.low, f"{name}_high": self.high, f"{name}_rounds": self.values}


def per_round(numerators: list[float], denominators: list[float]) -> PerRound:
    """Round-by-round quotients of two equally long sample lists."""
    if len(numerators) != len(denominators):
        raise ValueError(f"per_round: {len(numerators)} against {len(denominators)} rounds")
    return PerRound([a / b for a, b in zip(numerators, denominators)])


PEAK = "matmul peak"  # the contender that measures the peak inside a section's rounds


def peak_contender(n: int) -> tuple[Callable[[], Any], float]:
    """An n x n float32 matmul as a timed contender and its FLOPs (2 n^3): timed in the same rounds as
    the training steps, it gives each round's peak, so utilisation is judged against the machine's
    speed at that moment."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)
    out = torch.empty(n, n)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n ** 3


def measure_matmul_peak(n: int, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of n x n float32 matmuls (2 n^3 FLOPs each) at the current thread count: the peak."""
    matmul, flops = peak_contender(n)
    timing = time_interleaved({"matmul": matmul}, warmup=2, repeats=repeats)["matmul"]
    return {"n": n, "seconds": timing.median, "flops_per_s": flops / timing.median}


# Operator names by the kind of work (torch.profiler keys): weight matmuls, and attention kernels whatever
# backend SDPA picked; everything else (elementwise, norms, copies, the loss's softmax) is "other".
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul"})


def op_kind(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention"
    return "other"


def profile_step(fn: Callable[[], Any], repeats: int = 3) -> dict[str, float]:
    """Seconds of one call of ``fn`` spent in matmuls, attention kernels and everything else: self CPU time
    of every operator under torch.profiler (which adds a little to "other"), the median of ``repeats``
    profiled calls per kind, since a single call takes the machine's hiccups whole."""
    from torch.profiler import ProfilerActivity, profile

    samples: dict[str, list[float]] = {"matmul": [], "attention": [], "other": []}
    for _ in range(repeats):
        prof = profile(activities=[ProfilerActivity.CPU])
        with _stderr_silenced():  # the profiler's C++ side prints a line at start and at stop
            prof.start()
        fn()
        with _stderr_silenced():
            prof.stop()
        seconds = dict.fromkeys(samples, 0.0)
        for event in prof.key_averages():
            seconds[op_kind(event.key)] += event.self_cpu_time_total / 1e6
        for kind, t in seconds.items():
            samples[kind].append(t)
    return {kind: statistics.median(ts) for kind, ts in samples.items()}


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the duration (what native code prints; Python's stderr is flushed)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def train_step(forward: Callable[[], torch.Tensor], module: torch.nn.Module) -> Callable[[], None]:
    """One training step (zero grads, forward, backward) as a timed contender."""
    def step() -> None:
        module.zero_grad(set_to_none=True)
        forward().backward()
    return step


def methods_with_role(role: str) -> list[Plugin]:
    """The registered methods that declare ``role`` in their ``bench_roles``, by name."""
    return [p for p in registry.plugins().values() if role in p.cls.bench_roles]


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


__all__ = ["PEAK", "BenchConfig", "PerRound", "SCHEMA_VERSION", "SECTIONS", "TARGET_DECODE_SPEEDUP",
           "TARGET_DECODE_TOKENS",
           "TARGET_JACOBI_OVERHEAD", "TARGET_PRUNE_EFFICIENCY", "TARGET_TRAIN_RATIO", "TARGET_UTILIZATION", "Timing",
           "load_average", "machine_info", "measure_matmul_peak", "methods_with_role", "op_kind", "peak_contender",
           "per_round", "profile_step",
           "time_interleaved", "train_step"]
