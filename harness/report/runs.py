"""Loading a results folder for reports: one row per job, and the seeds of an arm aggregated (means, 95% t
half-widths over seeds, the paired difference with vanilla). Reads only ``DIR/runs.jsonl``."""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any

from harness import stats
from harness.claims import arms_of
from harness.core.config import SIZES
from harness.core.errors import ReportError
from harness.report.style import display_name
from harness.results import FAILED, OK, ResultsStore

CI_KEYS = ("val_ppl", "val_bits_per_byte", "infer_flops_per_token", "train_flops")  # get a `<key>_ci95` column
_METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match", "word_perplexity", "perplexity", "bits_per_byte")
_LOWER_IS_BETTER = ("perplexity", "ppl", "bits_per_byte", "bpb", "loss", "flops")
_NOT_SCORES = ("stderr", "num_fewshot", "limit", "n_docs", "flops", "tokens", "mean_extra_steps")
_RECORD_KEYS = ("params", "infer_flops_per_token", "val_ppl", "val_bits_per_byte", "val_loss", "train_flops",
                "train_tokens", "mean_extra_steps", "consistency_gap", "jacobi_gap")
_GROUP_KEYS = ["match", "budget", "method", "variant", "label", "size"]


# ---------------------------------------------------------------------------------------------------
# loading


def _size_rank(size: str) -> int:
    return list(SIZES).index(size) if size in SIZES else len(SIZES)


def _score_metric(metrics: dict[str, Any]) -> str | None:
    numeric = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and not any(word in k for word in _NOT_SCORES)]
    for name in _METRIC_PREFERENCE:
        if name in numeric:
            return name
    return numeric[0] if numeric else None


def lower_is_better(column: str) -> bool:
    return any(word in column.lower() for word in _LOWER_IS_BETTER)


def _row(record: dict[str, Any]) -> dict[str, Any]:
    tags = record.get("tags") or {}
    variant = tags.get("variant") or ""
    row = {
        "match": tags.get("match", "train-flops"),  # a plain `harness train` job matches its budget
        "budget": float(tags.get("sweep_budget", record.get("budget") or float("nan"))),
        "method": record.get("method"), "variant": variant,
        "label": display_name(record.get("method"), variant)
        + (" (FLOPs warning)" if record.get("flops_warning") else ""),  # its FLOPs disagree with its analytic count
        "size": record.get("size"), "seed": record.get("seed", 0),
        **{key: record.get(key) for key in _RECORD_KEYS},  # None (shown "–") where an older record lacks one
    }
    for task, metrics in (record.get("downstream") or {}).items():
        metric = _score_metric(metrics or {})
        if metric is not None:
            row[f"{task} {metric}"] = metrics[metric]
    return row


@dataclass
class Runs:
    """The finished and failed jobs of a results folder."""

    folder: pathlib.Path
    ok: list[dict[str, Any]]  # one row per job (see _row)
    records: list[dict[str, Any]]  # the finished jobs' full records (curves, per-window losses)
    failed: list[dict[str, Any]]  # the failed records
    skipped_lines: int


def load_runs(folder: str | os.PathLike) -> Runs:
    folder = pathlib.Path(folder)
    store = ResultsStore(folder)
    if not store.path.exists():
        raise ReportError(f"no {store.path.name} in {folder}: give a folder written by `python -m harness sweep`")
    latest = store.latest()
    records = [r for r in latest.values() if r.get("status") == OK and r.get("val_ppl") is not None]
    ok = [_row(r) for r in records]
    failed = [r for r in latest.values() if r.get("status") == FAILED]
    if not ok:
        raise ReportError(f"{store.path} holds no finished job ({len(failed)} failed); nothing to report")
    _add_paired_deltas(ok, records)
    return Runs(folder, ok, records, failed, store.skipped_lines)


DELTA = "delta_loss_vs_vanilla"


def _add_paired_deltas(rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    """Give every non-vanilla row of a (match, budget, size) holding vanilla the paired difference of its arm's
    val_loss with vanilla's over their common seeds (the same value on each seed's row: aggregate keeps it)."""
    panels: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for record in records:
        row = _row(record)
        panels.setdefault((row["match"], row["budget"]), []).append(record)
    arms = {(*panel, a.method, a.variant, a.size): a for panel, part in panels.items() for a in arms_of(part)}
    for row in rows:
        key = (row["match"], row["budget"], row["method"], row["variant"], row["size"])
        vanilla = arms.get((row["match"], row["budget"], "vanilla", "", row["size"]))
        if row["method"] == "vanilla" or vanilla is None or key not in arms:
            continue
        interval = stats.paired(arms[key].by_seed("val_loss"), vanilla.by_seed("val_loss"))
        if interval.n:
            row[DELTA], row[f"{DELTA}_n"] = interval.mean, interval.n
            row[f"{DELTA}_ci95"] = interval.half_width if interval.n >= 2 else math.nan


def aggregate(rows: list[dict[str, Any]]) -> Any:
    """Seeds of one (match, budget, method, variant, size) in one row, as a pandas DataFrame in table order.

    Every numeric column holds the mean over the seeds that report it; ``<key>_ci95`` (for ``CI_KEYS``)
    the half-width of its 95% Student-t interval over seeds (NaN for a single seed); ``seeds`` their number.
    """
    import pandas as pd

    frame = pd.DataFrame(rows)
    numeric = [c for c in frame.columns if c not in _GROUP_KEYS + ["seed"]]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce")
    grouped = frame.groupby(_GROUP_KEYS, dropna=False, sort=False)
    table = grouped[numeric].mean()
    table["seeds"] = grouped["seed"].nunique()
    for key in CI_KEYS:
        table[f"{key}_ci95"] = grouped[key].agg(lambda v: stats.half_width(v.dropna()) if v.count() > 1 else math.nan)
    table = table.reset_index()
    table["size_rank"] = table["size"].map(_size_rank)
    table = table.sort_values(["match", "budget", "method", "variant", "size_rank", "params"])
    return table.drop(columns="size_rank").reset_index(drop=True)


_MATCH_ORDER = {"train-flops": 0, "tokens": 1}


def _groups(table) -> list[tuple[tuple[str, float], Any]]:
    """(match, budget) -> its rows; train-flops first, then tokens, then budgets in increasing order."""
    groups = [(key, part.reset_index(drop=True)) for key, part in table.groupby(["match", "budget"], sort=True)]
    return sorted(groups, key=lambda g: (_MATCH_ORDER.get(g[0][0], 2), g[0][0], g[0][1]))


def _tokens_how(budget: float, part) -> str:
    """Tokens mode: what every method trained on, with the token count where the rows give one."""
    tokens = part.dropna(subset=["train_tokens"]) if part is not None else None
    if tokens is None or tokens.empty:
        return (f"every method trained on the same tokens, those {budget:.3g} FLOPs buy vanilla at the study's "
                "reference rung or else at each size")
    if tokens["train_tokens"].nunique() == 1:
        return (f"every method trained on the same {_si(float(tokens['train_tokens'].iloc[0]))} tokens, those "
                f"{budget:.3g} FLOPs buy vanilla at the study's reference rung or else at each size")
    per_size = tokens.groupby("size", sort=False)["train_tokens"].unique()
    if all(len(counts) == 1 for counts in per_size):
        sizes = sorted(per_size.items(), key=lambda kv: _size_rank(kv[0]))
        counts = ", ".join(f"{_si(float(c[0]))} at {size}" for size, c in sizes)
        return (f"at each size every method trained on the same tokens, those {budget:.3g} FLOPs buy vanilla "
                f"at that size: {counts}")
    return (f"every method trained on the tokens {budget:.3g} FLOPs buy vanilla at the study's reference rung or "
            "else at each size, rounded to whole steps (train_tokens per row in the csv)")


def _caption(match: str, budget: float, part=None) -> str:
    if match == "tokens":
        how = f"{_tokens_how(budget, part)} (match: tokens)"
    else:
        how = f"every job trained with {budget:.3g} FLOPs (match: train-flops)"
    seeds = ""
    if part is not None and (part["seeds"] > 1).any():
        seeds = (" Mean ± half-width of its 95% Student-t interval over seeds (none shown for a single seed); "
                 "n = seeds.")
    if part is not None and DELTA in part and part[DELTA].notna().any():
        seeds += (" Δ loss vs vanilla: the paired per-seed difference in validation loss (nats) with vanilla of the "
                  "same size over their common seeds, mean ± 95% half-width (n pairs).")
    return (f"Matched compute: {how}. Perplexity and bits per byte on held-out validation text by deployed "
            f"decoding; inference FLOPs per token measured.{seeds} Best mean per column marked.")


def _si(x: float) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}"
    return f"{x:.3g}"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
