"""4. Training-step time of the Jacobi-trained methods against vanilla, next to their FLOPs ratio."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from harness.bench.common import TARGET_JACOBI_OVERHEAD, BenchConfig, methods_with_role, time_interleaved, train_step
from harness.core import compute, registry
from harness.data import TokenizedCorpus, batch_at
from models.base import JACOBI_TRAINING

REFERENCE = "vanilla"  # what every Jacobi-trained method's step time is compared with


def jacobi_methods() -> list[str]:
    """The methods that declare the ``jacobi_training`` role, by name."""
    return [p.name for p in methods_with_role(JACOBI_TRAINING)]


def bench_jacobi_training(cfg: BenchConfig, corpus: TokenizedCorpus, tick) -> list[dict[str, Any]]:
    inputs, targets = batch_at(corpus.train, 0, cfg.jacobi_batch, cfg.seq_len, seed=0)
    tokens = inputs.numel()
    models = {}
    for name in (REFERENCE, *jacobi_methods()):
        torch.manual_seed(0)
        models[name] = registry.build(name, cfg.jacobi_size, {"vocab_size": corpus.vocab_size}).train()

    # One contender per (method, J): J is a forward argument, so each is timed at a fixed J.
    contenders: dict[str, Callable[[], None]] = {}
    ledger_flops: dict[str, float] = {}
    for name, model in models.items():
        passes = model.config.jacobi_passes if name != REFERENCE else (None,)
        for j in passes:
            key = name if j is None else f"{name}/J={j}"
            kwargs = {} if j is None else {"jacobi_passes": j}
            contenders[key] = train_step(lambda m=model, kw=kwargs: m(inputs, targets, **kw).loss, model)
            with compute.measure() as ledger:
                contenders[key]()
            ledger_flops[key] = ledger.totals.train_flops / tokens
    timings = time_interleaved(contenders, cfg.warmup, cfg.jacobi_repeats, tick)

    reference_seconds = timings[REFERENCE].median
    reference_flops = models[REFERENCE].train_flops_per_token(cfg.seq_len)
    rows = []
    for name, model in models.items():
        keys = [k for k in contenders if k == name or k.startswith(name + "/")]
        seconds = statistics.fmean(timings[k].median for k in keys)  # uniform draw of J
        measured = statistics.fmean(ledger_flops[k] for k in keys)
        analytic = model.train_flops_per_token(cfg.seq_len)
        time_ratio, flops_ratio = seconds / reference_seconds, analytic / reference_flops
        row = {
            "method": name, "size": cfg.jacobi_size, "batch_size": cfg.jacobi_batch, "seq_len": cfg.seq_len,
            "latent_steps": model.max_extra_steps(),
            "jacobi_passes": [] if name == REFERENCE else list(model.config.jacobi_passes),
            "step_seconds": seconds, "tokens_per_s": tokens / seconds,
            "train_flops_per_token": analytic, "ledger_train_flops_per_token": measured,
            "time_ratio": time_ratio, "flops_ratio": flops_ratio, "overhead": time_ratio / flops_ratio,
        }
        if name != REFERENCE:
            row.update(target=TARGET_JACOBI_OVERHEAD, met=time_ratio / flops_ratio <= TARGET_JACOBI_OVERHEAD)
        rows.append(row)
    return rows


def planned_runs(cfg: BenchConfig) -> int:
    """Timed calls of :func:`bench_jacobi_training` (for the progress bar)."""
    passes = sum(len(registry.get(m).make_config(cfg.jacobi_size).jacobi_passes) for m in jacobi_methods())
    return cfg.jacobi_repeats * (1 + passes)


__all__ = ["REFERENCE", "bench_jacobi_training", "jacobi_methods", "planned_runs"]
