"""7. GPU rows: bf16 training throughput, MFU and the SDPA kernel every attention call takes.

Runs only when CUDA is present (CI and CPU machines record ``{"skipped": ...}``). For each method of
``gpu_methods`` (vanilla and PonderLM-3 by default: the reference and the method every study is about)
at each rung of ``gpu_sizes`` (70m, 160m), one training step (forward + backward under bf16 autocast,
as ``harness.train`` runs on a GPU) on random token ids of the Pythia vocabulary is timed; MFU is the
achieved training FLOP/s (analytic ``train_flops_per_token`` x tokens/s) over the device's bf16 peak,
measured in the same run with large bf16 matmuls, as the CPU peak is. ``sdpa_kernels`` counts the
attention calls of one forward by the kernel SDPA dispatched them to (flash, efficient, cudnn, math),
read from the profiler's op names: PonderLM-3's key-bias channel pads the head dimension to a multiple
of 8 so that its calls can take a fused kernel, and this row shows whether they do.
"""

from __future__ import annotations

import collections
from typing import Any

import torch

from harness.bench.common import BenchConfig, time_interleaved
from harness.core import registry
from harness.data import TokenizedCorpus

SDPA_PREFIX = "aten::_scaled_dot_product_"


def measure_bf16_peak(device: torch.device, n: int, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of n x n bf16 matmuls on ``device`` (2 n^3 FLOPs each)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=generator, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, generator=generator, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)

    def matmul() -> None:
        torch.mm(a, b, out=out)
        _sync(device)

    timing = time_interleaved({"matmul": matmul}, warmup=2, repeats=repeats)["matmul"]
    return {"n": n, "seconds": timing.median, "flops_per_s": 2.0 * n ** 3 / timing.median}


def sdpa_kernels(forward) -> dict[str, int]:
    """Attention calls of ``forward()`` by the SDPA kernel that ran them (profiler op names)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        forward()
    counts: collections.Counter[str] = collections.Counter()
    for event in prof.events():
        name = event.name
        if name.startswith(SDPA_PREFIX) and not name.endswith("_backward"):
            counts[name[len(SDPA_PREFIX):]] += 1
    return dict(sorted(counts.items()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_gpu(cfg: BenchConfig, corpus: TokenizedCorpus | None, tick,
              device: torch.device | str | None = None) -> dict[str, Any]:
    """The GPU rows; ``device`` defaults to CUDA and the section is skipped without it (tests pass "cpu"
    with tiny shapes to run the machinery)."""
    if device is None:
        if not torch.cuda.is_available():
            return {"skipped": "no CUDA device"}
        device = torch.device("cuda")
    device = torch.device(device)
    peak = measure_bf16_peak(device, cfg.gpu_peak_n)
    generator = torch.Generator().manual_seed(0)
    shape = (cfg.gpu_batch, cfg.gpu_seq_len)
    inputs = torch.randint(0, cfg.gpu_vocab_size, shape, generator=generator).to(device)
    targets = torch.randint(0, cfg.gpu_vocab_size, shape, generator=generator).to(device)
    tokens = inputs.numel()
    rows = []
    for size in cfg.gpu_sizes:
        for method in cfg.gpu_methods:
            torch.manual_seed(0)
            model = registry.build(method, size, {"vocab_size": cfg.gpu_vocab_size}).to(device).train()

            def forward(model=model) -> torch.Tensor:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return model(inputs, targets).loss

            def step(model=model, forward=forward) -> None:
                model.zero_grad(set_to_none=True)
                forward().backward()
                _sync(device)

            kernels = sdpa_kernels(forward)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timing = time_interleaved({"step": step}, cfg.warmup, cfg.gpu_repeats, tick)["step"]
            flops = model.train_flops_per_token(cfg.gpu_seq_len)
            rate = tokens / timing.median
            rows.append({
                "method": method, "size": size, "batch_size": cfg.gpu_batch, "seq_len": cfg.gpu_seq_len,
                "latent_steps": model.max_extra_steps(), "step_seconds": timing.median, "tokens_per_s": rate,
                "train_flops_per_token": flops, "mfu": flops * rate / peak["flops_per_s"],
                "sdpa_kernels": kernels, "spread": timing.spread,
                "max_memory_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
            })
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return {"device": name, "dtype": "bfloat16", "peak_matmul": peak, "rows": rows}


__all__ = ["bench_gpu", "measure_bf16_peak", "sdpa_kernels"]
