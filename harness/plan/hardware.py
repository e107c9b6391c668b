"""What one job can reach on the hardware found here (or on a named GPU), for the plan's estimates."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from harness.core import registry
from harness.core.errors import ConfigError
from harness.job import TrainConfig
from harness.plan.ladder import REFERENCE_METHOD, Scale
from harness.train import build_optimizer

# A plan (sweep) or a single job (train) estimated to need longer than this on the hardware found asks
# for --yes before it starts.
CONFIRM_HOURS = 24.0

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
    workers: int  # devices (GPUs, or CPU job slots): jobs at once when each takes one, fewer with --devices-per-job

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
# one job on several devices (harness/distributed.py): hours, memory per device, what to suggest

SCALING_EFFICIENCY = 0.9  # assumed share of N x one device's rate that a job on N > 1 devices reaches
STATE_BYTES_PER_PARAM = 16.0  # fp32 weights and gradients and AdamW's two moments (the plan's memory estimate)
MAX_DEVICES_PER_JOB = 8  # what a suggestion may ask for: one node of 8 GPUs
PARALLEL_PREFERENCE = ("ddp", "fsdp")  # at equal N, DDP first: it moves the gradients once, FSDP also the weights


def job_hours(train_flops: float, hardware: Hardware, devices: int = 1) -> float:
    """Wall-clock hours of one job on ``devices`` devices of ``hardware``; its device-hours are this x devices.

    N devices train the same global batch N times as fast, times :data:`SCALING_EFFICIENCY` (gradient
    communication is not modelled beyond that).
    """
    rate = hardware.flops_per_second * devices * (SCALING_EFFICIENCY if devices > 1 else 1.0)
    return train_flops / rate / 3600.0


def concurrent_jobs(workers: int, devices: int = 1) -> int:
    """Jobs that run at once on ``workers`` devices when each takes ``devices`` (the plan's wall time)."""
    return max(1, workers // max(1, devices))


def memory_per_device(memory_bytes: float, params: int, devices: int = 1, parallel: str = "ddp",
                      unsharded_params: int = 0) -> float:
    """Peak bytes per device of a job whose one-device estimate is ``memory_bytes``.

    The one-device estimate (harness.plan.planning: 16 bytes per parameter of weights, gradients and AdamW
    moments, plus the activations and logits of one micro-batch) splits as harness/distributed.py runs it:
    every micro-batch is divided over the N devices, so activations and logits divide by N; DDP keeps all
    parameter states on every device, FSDP divides them by N too, but holds the parameters of the unit it is
    running unsharded, with their gradients (``unsharded_params``: for the plan, the root's embeddings and
    head, which stay gathered through the step; a block's are smaller and left out).
    """
    if devices <= 1:
        return memory_bytes
    states = STATE_BYTES_PER_PARAM * params
    rest = max(0.0, memory_bytes - states)
    if parallel == "ddp":
        return states + rest / devices
    return states / devices + 8.0 * unsharded_params + rest / devices


def suggest_devices(memory_bytes: float, params: int, device_memory: float, batch_size: int, *,
                    unsharded_params: int = 0, max_devices: int = MAX_DEVICES_PER_JOB) -> tuple[int, str] | None:
    """The fewest devices, and the strategy, on which the job fits ``device_memory`` per device.

    N runs over the divisors of ``train.batch_size`` up to ``max_devices`` (a micro-batch splits evenly
    over the devices), DDP before FSDP at each N. None when nothing fits: the micro-batch must shrink.
    """
    for devices in range(1, max_devices + 1):
        if batch_size % devices:
            continue
        for parallel in PARALLEL_PREFERENCE:
            if memory_per_device(memory_bytes, params, devices, parallel, unsharded_params) <= device_memory:
                return devices, parallel
    return None


def devices_note(name: str, memory_bytes: float, params: int, hardware: Hardware, batch_size: int,
                 unsharded_params: int = 0) -> str | None:
    """One plan note for a job that does not fit one device of ``hardware``, None when it fits (or on a CPU)."""
    if not hardware.memory_bytes or memory_bytes <= hardware.memory_bytes:
        return None
    need = (f"{name} needs ~{memory_bytes / 1e9:.0f} GB, more than one {hardware.name}'s "
            f"{hardware.memory_bytes / 1e9:.0f} GB")
    found = suggest_devices(memory_bytes, params, hardware.memory_bytes, batch_size, unsharded_params=unsharded_params)
    if found is None:
        return (f"{need}, even split over {MAX_DEVICES_PER_JOB} devices: lower its train.batch_size "
                "(METHOD:train.batch_size=N, raising train.grad_accum keeps the batch)")
    devices, parallel = found
    per_device = memory_per_device(memory_bytes, params, devices, parallel, unsharded_params)
    return (f"{need}: run it with --devices-per-job {devices} --parallel {parallel} (~{per_device / 1e9:.0f} GB "
            "per device; the job and its id stay the same)")
