"""4. Training-step time of the Jacobi-trained methods against vanilla, next to their FLOPs ratio.

Measured where the studies spend their time: at ``jacobi_size`` and batch (the reference study's pico,
16 x 128) and at every K of ``jacobi_latent_steps`` (through the method's declared ``steps_field``; a
method without one runs at its defaults).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from typing import Any

import torch

from harness.bench.common import (
    PEAK,
    TARGET_JACOBI_OVERHEAD,
    BenchConfig,
    PerRound,
    methods_with_role,
    peak_contender,
    per_round,
    profile_step,
    time_interleaved,
    train_step,
)
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

    # One contender per (model, J): J is a forward argument, so each is timed at a fixed J. The matmul
    # peak runs in the same rounds, so each round's utilisation is judged against that round's peak.
    contenders: dict[str, Callable[[], None]] = {}
    ledgers: dict[str, compute.LedgerTotals] = {}
    for key, (name, model) in models.items():
        passes = model.config.jacobi_passes if name != REFERENCE else (None,)
        for j in passes:
            contender = key if j is None else f"{key}/J={j}"
            kwargs = {} if j is None else {"jacobi_passes": j}
            contenders[contender] = train_step(lambda m=model, kw=kwargs: m(inputs, targets, **kw).loss, model)
            with compute.measure() as ledger:
                contenders[contender]()
            ledgers[contender] = ledger.totals
    compiled = compiled_twins(models) if cfg.jacobi_compiled else {}
    for key, model in compiled.items():  # timed at the last J; its first call (the ledger's) compiles
        last = eager_contenders(contenders, key)[-1]
        passes = {} if models[key][0] == REFERENCE else {"jacobi_passes": model.config.jacobi_passes[-1]}
        contenders[f"{key}/compiled"] = train_step(lambda m=model, kw=passes: m(inputs, targets, **kw).loss, model)
        with compute.measure() as ledger:
            contenders[f"{key}/compiled"]()
        if ledger.totals.train_flops != ledgers[last].train_flops:
            raise RuntimeError(f"bench: the compiled {key} counted {ledger.totals.train_flops:.6g} FLOPs, eager "
                               f"{ledgers[last].train_flops:.6g}")
    contenders[PEAK], peak_flops = peak_contender(cfg.peak_matmul_n)
    timings = time_interleaved(contenders, cfg.warmup, cfg.jacobi_repeats, tick)
    peaks = [peak_flops / t for t in timings[PEAK].samples]

    reference_steps = timings[REFERENCE].samples
    reference_flops = models[REFERENCE][1].train_flops_per_token(cfg.seq_len)
    rows = []
    for key, (name, model) in models.items():
        keys = eager_contenders(contenders, key)
        # a round's step time under the uniform draw of J: the mean over the J values of that round
        steps = [statistics.fmean(timings[k].samples[r] for k in keys) for r in range(len(reference_steps))]
        measured = statistics.fmean(ledgers[k].train_flops / tokens for k in keys)
        analytic = model.train_flops_per_token(cfg.seq_len)
        flops_ratio = analytic / reference_flops
        time_ratio = per_round(steps, reference_steps)
        overhead = PerRound([t / flops_ratio for t in time_ratio.values])
        utilisation = per_round([analytic * tokens / s for s in steps], peaks)
        row = {
            "method": name, "variant": key, "size": cfg.jacobi_size, "batch_size": cfg.jacobi_batch,
            "seq_len": cfg.seq_len, "latent_steps": model.max_extra_steps(),
            "jacobi_passes": [] if name == REFERENCE else list(model.config.jacobi_passes),
            "step_seconds": statistics.median(steps), "tokens_per_s": tokens / statistics.median(steps),
            "train_flops_per_token": analytic, "ledger_train_flops_per_token": measured,
            "time_ratio": time_ratio.median, "flops_ratio": flops_ratio, **overhead.as_dict("overhead"),
            **utilisation.as_dict("fraction_of_peak"), "peak_flops_per_s": statistics.median(peaks),
            "spread": max(timings[k].spread for k in keys),
            **where_the_time_goes(contenders[keys[-1]], ledgers[keys[-1]]),
        }
        if key in compiled:  # the same step (last J) through Decoder.compile_training_blocks
            eager, fast = timings[keys[-1]].samples, timings[f"{key}/compiled"].samples
            row.update(**per_round(eager, fast).as_dict("compiled_speedup"),
                       **per_round([ledgers[keys[-1]].train_flops / t for t in fast], peaks).as_dict(
                           "compiled_fraction_of_peak"))
        if name != REFERENCE:
            row.update(target=TARGET_JACOBI_OVERHEAD, met=overhead.met(TARGET_JACOBI_OVERHEAD, at_most=True),
                       decided=overhead.decided(TARGET_JACOBI_OVERHEAD, at_most=True))
        rows.append(row)
    return rows


def eager_contenders(contenders: dict[str, Callable[[], None]], key: str) -> list[str]:
    """The eager contenders of model ``key`` (one per J, in the config's order), not its compiled twin."""
    return [k for k in contenders if k == key or k.startswith(key + "/J=")]


def compiled_twins(models: dict[str, tuple[str, torch.nn.Module]]) -> dict[str, torch.nn.Module]:
    """A copy of every model with ``Decoder.compile_training_blocks`` on (same weights); none where torch.compile
    cannot build code here."""
    twins = {}
    for key, (_, model) in models.items():
        twin = copy.deepcopy(model)
        if not twin.decoder.compile_training_blocks():
            return {}
        twins[key] = twin
    return twins


def where_the_time_goes(step: Callable[[], None], ledger: compute.LedgerTotals) -> dict[str, Any]:
    """Profiled steps (at the last J; per kind the median of three): the shares of the step's time in
    matmuls, attention kernels and the rest, the FLOP/s each kind reached, ``attention_efficiency`` (the
    attention's FLOP/s over the matmuls', in the same steps) and ``utilization_ceiling``: the fraction of
    the peak the step would reach with its matmuls *at* the peak, its attention at its measured efficiency
    relative to them, and everything else free, 1 / (f_matmul + f_attention / attention_efficiency) over
    the FLOP fractions f. A generous bound, and free of the peak measurement, which drifts on a shared
    machine and not always with the step (see the module docstring of harness.bench): a target above it
    cannot be met by removing overhead, only by a faster attention kernel.
    """
    seconds = profile_step(step)
    total = sum(seconds.values())
    grad_factor = ledger.train_flops / ledger.forward_flops  # 3 when every pass is trained
    flops = {"matmul": grad_factor * (ledger.matmul_flops + ledger.other_flops),
             "attention": grad_factor * ledger.attention_flops}
    row: dict[str, Any] = {"time_shares": {kind: t / total for kind, t in seconds.items()}}
    rates = {kind: flops[kind] / seconds[kind] if seconds[kind] > 0 else None for kind in flops}
    row.update({f"{kind}_flops_per_s": rate for kind, rate in rates.items()})
    if rates["matmul"] and rates["attention"]:
        efficiency = rates["attention"] / rates["matmul"]
        fraction = {kind: f / sum(flops.values()) for kind, f in flops.items()}
        row.update(attention_efficiency=efficiency,
                   utilization_ceiling=1.0 / (fraction["matmul"] + fraction["attention"] / efficiency))
    return row


def planned_runs(cfg: BenchConfig) -> int:
    """Timed calls of :func:`bench_jacobi_training` (for the progress bar)."""
    passes = sum(len(_passes(registry.get(name), cfg, overrides)) for _, name, overrides in jacobi_variants(cfg))
    compiled = 1 + len(jacobi_variants(cfg)) if cfg.jacobi_compiled else 0
    return cfg.jacobi_repeats * (2 + passes + compiled)  # + vanilla + the matmul peak + compiled twins


__all__ = ["REFERENCE", "bench_jacobi_training", "compiled_twins", "eager_contenders", "jacobi_methods",
           "jacobi_variants", "planned_runs", "where_the_time_goes"]
