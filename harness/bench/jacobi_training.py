"""4. Training-step time of the Jacobi-trained methods against vanilla, next to their FLOPs ratio.

Measured where the studies spend their time: at ``jacobi_size`` and batch (the reference study's pico,
16 x 128) and at every K of ``jacobi_latent_steps`` (through the method's declared ``steps_field``; a
method without one runs at its defaults).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from harness.bench.common import TARGET_JACOBI_OVERHEAD, BenchConfig, methods_with_role, time_interleaved, train_step
from harness.core import compute, registry
from harness.core.registry import Plugin
from harness.data import TokenizedCorpus, batch_at
from models.base import JACOBI_TRAINING

REFERENCE = "vanilla"  # what every Jacobi-trained method's step time is compared with


def jacobi_methods() -> list[str]:
    """The methods that declare the ``jacobi_training`` role, by name."""
    return [p.name for p in methods_with_role(JACOBI_TRAINING)]


def jacobi_variants(cfg: BenchConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """(row key, method, config overrides) of every Jacobi-trained model the section times."""
    variants = []
    for plugin in methods_with_role(JACOBI_TRAINING):
        steps_field = plugin.cls.steps_field
        if steps_field is None:
            variants.append((plugin.name, plugin.name, {}))
            continue
        variants += [(f"{plugin.name} K={k}", plugin.name, {steps_field: k}) for k in cfg.jacobi_latent_steps]
    return variants


def _passes(plugin: Plugin, cfg: BenchConfig, overrides: dict[str, Any]) -> tuple[int, ...]:
    return tuple(plugin.make_config(cfg.jacobi_size, overrides).jacobi_passes)


def bench_jacobi_training(cfg: BenchConfig, corpus: TokenizedCorpus, tick) -> list[dict[str, Any]]:
    inputs, targets = batch_at(corpus.train, 0, cfg.jacobi_batch, cfg.seq_len, seed=0)
    tokens = inputs.numel()
    models = {}
    for key, name, overrides in [(REFERENCE, REFERENCE, {}), *jacobi_variants(cfg)]:
        torch.manual_seed(0)
        models[key] = (name, registry.build(name, cfg.jacobi_size, {"vocab_size": corpus.vocab_size,
                                                                     **overrides}).train())

    # One contender per (model, J): J is a forward argument, so each is timed at a fixed J.
    contenders: dict[str, Callable[[], None]] = {}
    ledger_flops: dict[str, float] = {}
    for key, (name, model) in models.items():
        passes = model.config.jacobi_passes if name != REFERENCE else (None,)
        for j in passes:
            contender = key if j is None else f"{key}/J={j}"
            kwargs = {} if j is None else {"jacobi_passes": j}
            contenders[contender] = train_step(lambda m=model, kw=kwargs: m(inputs, targets, **kw).loss, model)
            with compute.measure() as ledger:
                contenders[contender]()
            ledger_flops[contender] = ledger.totals.train_flops / tokens
    timings = time_interleaved(contenders, cfg.warmup, cfg.jacobi_repeats, tick)

    reference_seconds = timings[REFERENCE].median
    reference_flops = models[REFERENCE][1].train_flops_per_token(cfg.seq_len)
    rows = []
    for key, (name, model) in models.items():
        keys = [k for k in contenders if k == key or k.startswith(key + "/")]
        seconds = statistics.fmean(timings[k].median for k in keys)  # uniform draw of J
        measured = statistics.fmean(ledger_flops[k] for k in keys)
        analytic = model.train_flops_per_token(cfg.seq_len)
        time_ratio, flops_ratio = seconds / reference_seconds, analytic / reference_flops
        row = {
            "method": name, "variant": key, "size": cfg.jacobi_size, "batch_size": cfg.jacobi_batch,
            "seq_len": cfg.seq_len, "latent_steps": model.max_extra_steps(),
            "jacobi_passes": [] if name == REFERENCE else list(model.config.jacobi_passes),
            "step_seconds": seconds, "tokens_per_s": tokens / seconds,
            "train_flops_per_token": analytic, "ledger_train_flops_per_token": measured,
            "time_ratio": time_ratio, "flops_ratio": flops_ratio, "overhead": time_ratio / flops_ratio,
            "spread": max(timings[k].spread for k in keys),
        }
        if name != REFERENCE:
            row.update(target=TARGET_JACOBI_OVERHEAD, met=time_ratio / flops_ratio <= TARGET_JACOBI_OVERHEAD)
        rows.append(row)
    return rows


def planned_runs(cfg: BenchConfig) -> int:
    """Timed calls of :func:`bench_jacobi_training` (for the progress bar)."""
    passes = sum(len(_passes(registry.get(name), cfg, overrides)) for _, name, overrides in jacobi_variants(cfg))
    return cfg.jacobi_repeats * (1 + passes)


__all__ = ["REFERENCE", "bench_jacobi_training", "jacobi_methods", "jacobi_variants", "planned_runs"]
