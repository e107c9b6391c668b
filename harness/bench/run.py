"""The whole run: the sections of a :class:`BenchConfig`, utilisation, targets, and the tables."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from harness.bench.common import (
    SCHEMA_VERSION,
    TARGET_DECODE_TOKENS,
    TARGET_UTILIZATION,
    BenchConfig,
    PerRound,
    load_average,
    machine_info,
    measure_matmul_peak,
    methods_with_role,
)
from harness.bench.decode_cache import bench_decode_cache
from harness.bench.gpu import bench_gpu
from harness.bench.jacobi_training import REFERENCE, bench_jacobi_training, planned_runs
from harness.bench.pruned_decode import bench_pruned_decode
from harness.bench.threads import bench_threads
from harness.bench.train_throughput import bench_train_throughput
from harness.data import TokenizedCorpus, load_corpus
from harness.plan import study
from models.base import PRUNED_DECODING

UTILIZATION_STUDY = "paper"  # utilisation is judged at the rungs this study trains each method at


def study_rungs(name: str = UTILIZATION_STUDY) -> dict[str, set[str]]:
    """method -> the rungs the study trains it at (an arm without its own sizes takes the study's)."""
    loaded = study.load(name)
    rungs: dict[str, set[str]] = {}
    for arm in loaded.arms:
        rungs.setdefault(arm.method, set()).update(arm.sizes or loaded.sizes or [])
    return rungs


def utilization_rows(report: dict[str, Any], rungs: dict[str, set[str]] | None = None) -> list[dict[str, Any]]:
    """Achieved training FLOP/s of every training measurement over the matmul peak timed in the same rounds
    (round by round, then the median and range); rows of our models at a rung the reference study trains
    them at carry the target (``rungs``: :func:`study_rungs`)."""
    rungs = study_rungs() if rungs is None else rungs
    rows = []

    def add(what: str, method: str | None, size: str, achieved: float, row: dict[str, Any], field: str,
            target: float | None) -> None:
        fraction = PerRound(row[f"{field}_rounds"])
        out = {"what": what, "size": size, "flops_per_s": achieved, "peak_flops_per_s": row["peak_flops_per_s"],
               **fraction.as_dict("fraction_of_peak")}
        if method is not None and size in rungs.get(method, ()):
            out.update(target=target, met=fraction.met(target, at_most=False),
                       decided=fraction.decided(target, at_most=False))
        rows.append(out)

    for row in report.get("train_throughput", []):
        add("ours vanilla train step", "vanilla", row["size"], row["train_flops_per_token"] * row["ours_tokens_per_s"],
            row, "ours_fraction_of_peak", TARGET_UTILIZATION["vanilla"])
        add("transformers vanilla train step", None, row["size"],
            row["train_flops_per_token"] * row["transformers_tokens_per_s"], row, "transformers_fraction_of_peak", None)
    for row in report.get("jacobi_training", []):
        kind = "vanilla" if row["method"] == REFERENCE else "jacobi"
        add(f"{row.get('variant', row['method'])} train step", row["method"], row["size"],
            row["train_flops_per_token"] * row["tokens_per_s"], row, "fraction_of_peak", TARGET_UTILIZATION[kind])
    return rows


def target_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per target: what was measured, the value, the target and whether it is met (None: the
    run's shape is not the one the target is defined at)."""
    rows = []
    for r in report.get("train_throughput", []):
        rows.append({"section": "train_throughput", "what": f"vanilla {r['size']}: ours / transformers tokens/s",
                     "value": r["ratio"], "low": r["ratio_low"], "high": r["ratio_high"],
                     "target": f">= {r['target']:g}", "met": r["met"], "decided": r["decided"]})
    for r in report.get("decode_cache", []):
        path = "compiled cached" if r.get("compiled") else "cached"
        rows.append({"section": "decode_cache", "what": f"{path} vs recompute, {r['generated_tokens']} tokens, "
                                                        f"batch {r['batch_size']}",
                     "value": r["best_speedup"], "target": f">= {r['target']:g}x", "met": r["met"]})
    for r in report.get("pruned_decode", []):
        rows.append({"section": "pruned_decode", "what": f"wall saving / FLOPs saving ({r['pruned_fraction']:.0%} "
                                                         "of latent steps pruned)",
                     "value": r["efficiency"], "low": r["efficiency_low"], "high": r["efficiency_high"],
                     "target": f">= {r['target']:g}", "met": r["met"], "decided": r["decided"]})
    for r in report.get("jacobi_training", []):
        if "target" in r:
            rows.append({"section": "jacobi_training",
                         "what": f"{r.get('variant', r['method'])} {r['size']}: time ratio / FLOPs ratio",
                         "value": r["overhead"], "low": r["overhead_low"], "high": r["overhead_high"],
                         "target": f"<= {r['target']:g}", "met": r["met"], "decided": r["decided"]})
    for r in report.get("utilization", []):
        if "target" in r:
            rows.append({"section": "utilization", "what": f"{r['what']} {r['size']}: fraction of the matmul peak",
                         "value": r["fraction_of_peak"], "low": r["fraction_of_peak_low"],
                         "high": r["fraction_of_peak_high"], "target": f">= {r['target']:g}", "met": r["met"],
                         "decided": r["decided"]})
    return rows


def benchmark(cfg: BenchConfig, progress: bool = True, corpus: TokenizedCorpus | None = None) -> dict[str, Any]:
    """Run the sections of ``cfg`` and return the report (the JSON the command writes)."""
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    try:
        report: dict[str, Any] = {"schema": SCHEMA_VERSION, "profile": cfg.profile,
                                  "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                                  "machine": machine_info() | {"load_before": load_average()}}
        if corpus is None:
            corpus = load_corpus(cfg.data)
        plan = {"train": len(cfg.sizes) * 3 * cfg.repeats,
                "decode": len(cfg.decode_batches) * (3 if cfg.decode_compile else 2) * cfg.decode_repeats,
                "prune": 2 * cfg.repeats * len(methods_with_role(PRUNED_DECODING)),
                "jacobi": planned_runs(cfg), "threads": len(cfg.threads_configs),
                "gpu": len(cfg.gpu_sizes) * len(cfg.gpu_methods) * cfg.gpu_repeats if torch.cuda.is_available()
                else 0}
        total = sum(plan[s] for s in cfg.sections)
        with tqdm(total=total, desc="bench", unit="run", disable=not progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            tick = lambda: bar.update(1)  # noqa: E731 (a one-line callback)
            bar.set_postfix_str("matmul peak")
            report["peak_matmul"] = measure_matmul_peak(cfg.peak_matmul_n)
            runners = {"train": ("train_throughput", bench_train_throughput),
                       "decode": ("decode_cache", bench_decode_cache),
                       "prune": ("pruned_decode", bench_pruned_decode),
                       "jacobi": ("jacobi_training", bench_jacobi_training),
                       "threads": ("threads", bench_threads),
                       "gpu": ("gpu", bench_gpu)}
            for section in cfg.sections:
                key, runner = runners[section]
                bar.set_postfix_str(key)
                report[key] = runner(cfg, corpus, tick)
        report["utilization"] = utilization_rows(report)
        report["targets"] = target_rows(report)
        report["machine"]["load_after"] = load_average()
        report["seconds"] = time.time() - started
        return report
    finally:
        torch.set_num_threads(threads_before)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "met" if value else "MISSED"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
            return f"{value:.3g}"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def _table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> list[str]:
    if not rows:
        return []
    cells = [[_fmt(row.get(key, "")) for key, _ in columns] for row in rows]
    widths = [max(len(head), *(len(c[i]) for c in cells)) for i, (_, head) in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    return [title, line([head for _, head in columns]), line(["-" * w for w in widths]),
            *(line(c) for c in cells), ""]


def _with_agreement(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with ``decided`` shown as whether every round agrees with the verdict ("yes" / "no")."""
    return [{**r, "decided": ("yes" if r["decided"] else "no")} if "decided" in r else r for r in rows]


def format_report(report: dict[str, Any]) -> str:
    """The human-readable tables of a report."""
    m, peak = report["machine"], report["peak_matmul"]
    out = [f"bench ({report['profile']}): {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
           f"{report['config']['threads'] or m['torch_threads']} thread(s); load {m.get('load_before')} -> "
           f"{m.get('load_after')}; {report.get('seconds', 0):.0f} s",
           f"matmul peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['n']}x{peak['n']} float32)", ""]
    out += _table("1. training step throughput, vanilla vs transformers LlamaForCausalLM (float32, same loss)",
                  _with_agreement(report.get("train_throughput", [])),
                  [("size", "size"), ("ours_tokens_per_s", "ours tok/s"), ("transformers_tokens_per_s", "HF tok/s"),
                   ("ratio", "ratio"), ("ratio_low", "min"), ("ratio_high", "max"), ("max_logit_diff", "logit diff"),
                   ("met", "target >= 1"), ("decided", "every round")])
    out += _table("2. cached decoding vs recomputing the prefix (vanilla, greedy)", report.get("decode_cache", []),
                  [("size", "size"), ("batch_size", "batch"), ("generated_tokens", "tokens"),
                   ("cached_seconds", "cached s"), ("recompute_seconds", "recompute s"),
                   ("cached_ms_per_token", "ms/token"), ("speedup", "speedup"), ("tokens_agree", "agree"),
                   ("compiled_ms_per_token", "compiled ms/token"), ("compiled_speedup", "compiled speedup"),
                   ("compiled_tokens_agree", "agree"), ("met", "target >= 10x")])
    for row in report.get("pruned_decode", []):
        method, twin = row["method"], row["twin"]
        out += _table(f"3. {method} hard-pruned decoding vs {twin} (model.score, ledger FLOPs)", _with_agreement([row]),
                      [("size", "size"), ("latent_steps", "K"), ("pruned_fraction", "pruned"),
                       (f"{twin}_seconds", f"{twin} s"), (f"{method}_seconds", f"{method} s"),
                       ("flops_saving", "FLOPs saved"), ("wall_saving", "time saved"), ("efficiency", "ratio"),
                       ("efficiency_low", "min"), ("efficiency_high", "max"), ("met", "target >= 0.8"),
                       ("decided", "every round")])
    out += _table("4. Jacobi training step vs vanilla (mean over the J values drawn; ratios round by round)",
                  _with_agreement(report.get("jacobi_training", [])),
                  [("variant", "method"), ("size", "size"), ("step_seconds", "step s"), ("time_ratio", "time x"),
                   ("flops_ratio", "FLOPs x"), ("overhead", "time/FLOPs"), ("overhead_low", "min"),
                   ("overhead_high", "max"), ("met", "target"), ("decided", "every round"),
                   ("compiled_speedup", "compiled x"), ("compiled_fraction_of_peak", "compiled of peak")])
    out += _table("4b. where the Jacobi section's step time goes (profiled steps at the last J; attention "
                  "efficiency: its FLOP/s over the matmuls'; ceiling: the fraction of the peak with matmuls at "
                  "the peak, attention at that efficiency, the rest free)",
                  [{**r, **{f"share_{k}": v for k, v in r["time_shares"].items()}}
                   for r in report.get("jacobi_training", []) if "time_shares" in r],
                  [("variant", "method"), ("share_matmul", "matmul"), ("share_attention", "attention"),
                   ("share_other", "other"), ("matmul_flops_per_s", "matmul FLOP/s"),
                   ("attention_flops_per_s", "attention FLOP/s"), ("attention_efficiency", "attention eff."),
                   ("utilization_ceiling", "ceiling")])
    out += _table("5. achieved training FLOP/s as a fraction of the matmul peak timed in the same rounds "
                  "(target at the study's rungs)", _with_agreement(report.get("utilization", [])),
                  [("what", "what"), ("size", "size"), ("flops_per_s", "FLOP/s"), ("peak_flops_per_s", "peak"),
                   ("fraction_of_peak", "of peak"), ("fraction_of_peak_low", "min"), ("fraction_of_peak_high", "max"),
                   ("target", "target"), ("met", "met"), ("decided", "every round")])
    threads = report.get("threads")
    if threads:
        out += _table(f"6. threads per job: {threads['method']} {threads['size']} training, concurrent jobs "
                      f"({threads['cores']} cores); recommended threads per job: "
                      f"{threads['recommended_threads_per_job']}", threads["rows"],
                      [("jobs", "jobs"), ("threads_per_job", "threads/job"),
                       ("tokens_per_s_per_job", "tok/s per job"), ("total_tokens_per_s", "tok/s total")])
    gpu = report.get("gpu")
    if gpu and "rows" in gpu:
        out += _table(f"7. GPU bf16 training on {gpu['device']} (peak {gpu['peak_matmul']['flops_per_s'] / 1e12:.0f} "
                      "TFLOP/s)", gpu["rows"],
                      [("method", "method"), ("size", "size"), ("tokens_per_s", "tok/s"), ("mfu", "MFU"),
                       ("sdpa_kernels", "SDPA kernels"), ("max_memory_gb", "GiB")])
    elif gpu:
        out.append(f"7. GPU rows: {gpu.get('skipped')}")
        out.append("")
    judged = [t for t in report.get("targets", []) if t["met"] is not None]
    out.append(f"targets met: {sum(t['met'] for t in judged)} of {len(judged)}")
    for t in judged:
        spread = f", rounds {_fmt(t['low'])}-{_fmt(t['high'])}" if "low" in t else ""
        if not t["met"]:
            out.append(f"  MISSED  {t['section']}: {t['what']} = {_fmt(t['value'])} (target {t['target']}{spread})")
    undecided = [t for t in judged if t.get("decided") is False]
    if undecided:
        out.append(f"  {len(undecided)} verdict(s) within this run's noise (some rounds alone give the other verdict): "
                   + "; ".join(f"{t['what']}" for t in undecided))
    unjudged = len(report.get("targets", [])) - len(judged)
    if unjudged:
        out.append(f"  ({unjudged} not judged: decoding targets are defined at {TARGET_DECODE_TOKENS} generated "
                   "tokens)")
    return "\n".join(out)


__all__ = ["benchmark", "format_report", "target_rows", "utilization_rows"]
