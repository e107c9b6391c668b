"""Reports of a sweep folder: Pareto plots and the comparison table a paper prints.

``python -m harness plot DIR [--out DIR2]`` writes

* ``pareto_inference_flops.png``: validation perplexity against *measured* inference FLOPs per token,
  one colour per method (variants of a method, e.g. a ``--vary`` over PonderLM-3's penalty, share it),
  one marker per size, each method's Pareto frontier drawn (the points no other point of the same
  method beats on both axes), log axes, the match mode and budget in the title;
* ``ppl_vs_train_flops.png``: validation perplexity against measured training FLOPs.

``python -m harness table DIR [--format md|latex|csv] [--out FILE]`` prints (or writes) the table:
method, size, parameters, inference FLOPs/token (measured), perplexity, mean extra steps where a method
reports them, downstream scores where present (one metric per task: acc_norm, else acc, else the first
reported), and the number of seeds when there are several. The best value of every quality column is
marked: bold in md and latex, a ``best`` column naming the columns in csv. "Best" means lowest for
FLOPs and perplexities, highest for accuracies. Seeds of one (method, variant, size) are averaged.

Both read only ``DIR/runs.jsonl`` (:mod:`harness.results`), so they work on a results folder without
checkpoints. Jobs of different match modes or budgets are never mixed: each gets its own table and
its own panel. Failed jobs are listed under the md and latex tables with their error.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from harness.core.config import SIZES
from harness.core.errors import ReportError
from harness.results import FAILED, OK, ResultsStore

PARETO_PNG = "pareto_inference_flops.png"
TRAIN_PNG = "ppl_vs_train_flops.png"
TABLE_FILES = {"md": "table.md", "latex": "table.tex", "csv": "table.csv"}
_METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match", "word_perplexity", "perplexity", "bits_per_byte")
_LOWER_IS_BETTER = ("perplexity", "ppl", "bits_per_byte", "bpb", "loss", "flops")
_NOT_SCORES = ("stderr", "num_fewshot", "limit", "n_docs", "flops", "tokens", "mean_extra_steps")


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
        "label": record.get("method") + (f" [{variant}]" if variant else ""),
        "size": record.get("size"), "seed": record.get("seed", 0), "params": record.get("params"),
        "infer_flops_per_token": record.get("infer_flops_per_token"), "val_ppl": record.get("val_ppl"),
        "val_loss": record.get("val_loss"), "train_flops": record.get("train_flops"),
        "train_tokens": record.get("train_tokens"), "mean_extra_steps": record.get("mean_extra_steps"),
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
    failed: list[dict[str, Any]]  # the failed records
    skipped_lines: int


def load_runs(folder: str | os.PathLike) -> Runs:
    folder = pathlib.Path(folder)
    store = ResultsStore(folder)
    if not store.path.exists():
        raise ReportError(f"no {store.path.name} in {folder}: give a folder written by `python -m harness sweep`")
    latest = store.latest()
    ok = [_row(r) for r in latest.values() if r.get("status") == OK and r.get("val_ppl") is not None]
    failed = [r for r in latest.values() if r.get("status") == FAILED]
    if not ok:
        raise ReportError(f"{store.path} holds no finished job ({len(failed)} failed); nothing to report")
    return Runs(folder, ok, failed, store.skipped_lines)


def aggregate(rows: list[dict[str, Any]]) -> Any:
    """Mean over seeds per (match, budget, method, variant, size), as a pandas DataFrame in table order."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    keys = ["match", "budget", "method", "variant", "label", "size"]
    numeric = [c for c in frame.columns if c not in keys + ["seed"]]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce")
    grouped = frame.groupby(keys, dropna=False, sort=False)
    table = grouped[numeric].mean()
    table["seeds"] = grouped["seed"].nunique()
    table["val_ppl_std"] = grouped["val_ppl"].std()
    table = table.reset_index()
    table["size_rank"] = table["size"].map(_size_rank)
    table = table.sort_values(["match", "budget", "method", "variant", "size_rank", "params"])
    return table.drop(columns="size_rank").reset_index(drop=True)


_MATCH_ORDER = {"train-flops": 0, "tokens": 1}


def _groups(table) -> list[tuple[tuple[str, float], Any]]:
    """(match, budget) -> its rows; train-flops first, then tokens, then budgets in increasing order."""
    groups = [(key, part.reset_index(drop=True)) for key, part in table.groupby(["match", "budget"], sort=True)]
    return sorted(groups, key=lambda g: (_MATCH_ORDER.get(g[0][0], 2), g[0][0], g[0][1]))


def _caption(match: str, budget: float) -> str:
    if match == "tokens":
        how = f"every method trained on the tokens {budget:.3g} FLOPs buy vanilla at the same size (match: tokens)"
    else:
        how = f"every job trained with {budget:.3g} FLOPs (match: train-flops)"
    return (f"Matched compute: {how}. Perplexity on held-out validation text by deployed decoding; inference "
            "FLOPs per token measured. Best per column marked.")


# ---------------------------------------------------------------------------------------------------
# tables


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    kind: str  # "text" | "params" | "flops" | "ppl" | "steps" | "score" | "count"
    ranked: bool  # mark the best value


def _columns(part) -> list[Column]:
    columns = [Column("label", "Method", "text", False), Column("size", "Size", "text", False),
               Column("params", "Params", "params", False),
               Column("infer_flops_per_token", "Inference FLOPs/token", "flops", True),
               Column("val_ppl", "Perplexity", "ppl", True)]
    if part["mean_extra_steps"].notna().any():
        columns.append(Column("mean_extra_steps", "Mean extra steps", "steps", False))
    fixed = {"match", "budget", "method", "variant", "label", "size", "seed", "params", "infer_flops_per_token",
             "val_ppl", "val_loss", "train_flops", "train_tokens", "mean_extra_steps", "seeds", "val_ppl_std"}
    for key in sorted(c for c in part.columns if c not in fixed and part[c].notna().any()):
        kind = "ppl" if lower_is_better(key) else "score"
        columns.append(Column(key, key, kind, True))
    if (part["seeds"] > 1).any():
        columns.append(Column("seeds", "Seeds", "count", False))
    return columns


def _best(part, column: Column) -> set[int]:
    values = part[column.key]
    if not column.ranked or values.notna().sum() < 2 or values.dropna().nunique() < 2:
        return set()  # nothing to single out when every row ties
    target = values.min() if column.kind in ("flops", "ppl") else values.max()
    return {i for i, v in values.items() if v == target}


def _si(x: float) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}"
    return f"{x:.3g}"


def _fmt(value: Any, column: Column, latex: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "--" if latex else "–"
    if column.kind == "text":
        return str(value)
    if column.kind in ("params", "flops"):
        return _si(float(value))
    if column.kind == "ppl":
        return f"{value:.2f}"
    if column.kind == "steps":
        return f"{value:.2f}"
    if column.kind == "count":
        return str(int(value))
    return f"{100 * value:.1f}" if 0 <= value <= 1 else f"{value:.3g}"  # accuracies as percentages


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "{": r"\{",
                  "}": r"\}", "$": r"\$", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _failed_lines(runs: Runs) -> list[str]:
    lines = []
    for record in runs.failed:
        variant = (record.get("tags") or {}).get("variant")
        name = f"{record.get('method')}/{record.get('size')} seed {record.get('seed')}"
        name += f" [{variant}]" if variant else ""
        lines.append(f"{name}: {record.get('error')}")
    return lines


def table_markdown(runs: Runs) -> str:
    out: list[str] = []
    for (match, budget), part in _groups(aggregate(runs.ok)):
        columns = _columns(part)
        best = {c.key: _best(part, c) for c in columns}
        out.append(f"*{_caption(match, budget)}*")
        out.append("")
        out.append("| " + " | ".join(c.header for c in columns) + " |")
        out.append("| " + " | ".join("---" if c.kind == "text" else "---:" for c in columns) + " |")
        for i, row in part.iterrows():
            cells = []
            for c in columns:
                text = _fmt(row[c.key], c)
                cells.append(f"**{text}**" if i in best[c.key] else text)
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    failed = _failed_lines(runs)
    if failed:
        out.append("Failed jobs (not in the table):")
        out.extend(f"- {line}" for line in failed)
        out.append("")
    return "\n".join(out)


def table_latex(runs: Runs) -> str:
    out: list[str] = ["% generated by `python -m harness table DIR --format latex`; needs \\usepackage{booktabs}"]
    for (match, budget), part in _groups(aggregate(runs.ok)):
        columns = _columns(part)
        best = {c.key: _best(part, c) for c in columns}
        out += [r"\begin{table}[t]", r"\centering", r"\small",
                r"\begin{tabular}{" + "".join("l" if c.kind == "text" else "r" for c in columns) + "}",
                r"\toprule", " & ".join(_latex_escape(c.header) for c in columns) + r" \\", r"\midrule"]
        for i, row in part.iterrows():
            cells = []
            for c in columns:
                text = _latex_escape(_fmt(row[c.key], c, latex=True))
                cells.append(rf"\textbf{{{text}}}" if i in best[c.key] else text)
            out.append(" & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_latex_escape(_caption(match, budget))}}}",
                r"\end{table}", ""]
    for line in _failed_lines(runs):
        out.append(f"% failed: {line}")
    return "\n".join(out) + "\n"


def table_csv(runs: Runs) -> str:
    import io

    table = aggregate(runs.ok)
    parts = []
    for _, part in _groups(table):
        columns = _columns(part)
        best = {c.key: _best(part, c) for c in columns}
        part = part.copy()
        part["best"] = [";".join(c.key for c in columns if i in best[c.key]) for i in part.index]
        parts.append(part)
    import pandas as pd

    merged = pd.concat(parts, ignore_index=True)
    front = ["match", "budget", "method", "variant", "size", "params", "infer_flops_per_token", "val_ppl",
             "val_ppl_std", "mean_extra_steps", "seeds", "best"]
    ordered = [c for c in front if c in merged.columns] + [c for c in merged.columns if c not in front and c != "label"]
    buffer = io.StringIO()
    merged[ordered].to_csv(buffer, index=False, float_format="%.6g")
    return buffer.getvalue()


FORMATTERS = {"md": table_markdown, "latex": table_latex, "csv": table_csv}


def make_table(folder: str | os.PathLike, fmt: str = "md") -> str:
    if fmt not in FORMATTERS:
        raise ReportError(f"--format {fmt!r}: choose one of {', '.join(FORMATTERS)}")
    return FORMATTERS[fmt](load_runs(folder))


# ---------------------------------------------------------------------------------------------------
# plots


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (lower is better for both), by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _palette(methods: list[str]) -> dict[str, Any]:
    import seaborn as sns

    colours = sns.color_palette("tab10" if len(methods) <= 10 else "husl", len(methods))
    return dict(zip(methods, colours))


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")


def _minor_label(value: float, axis) -> str:
    """Minor ticks of a log axis: all labelled within a decade, else only 2x and 5x (they would crowd)."""
    low, high = axis.get_view_interval()
    if low > 0 and high / low < 10:
        return _si(value)
    leading = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
    return _si(value) if leading in (2, 5) else ""


def _plot(runs: Runs, x: str, xlabel: str, title: str, path: pathlib.Path, frontier: bool) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib import ticker

    table = aggregate(runs.ok)
    table = table[table[x].notna() & (table[x] > 0) & table["val_ppl"].notna() & (table["val_ppl"] > 0)]
    if table.empty:
        raise ReportError(f"no finished job in {runs.folder} has both {x} and val_ppl; nothing to plot")
    groups = _groups(table)
    methods = sorted(table["method"].unique())
    colours = _palette(methods)
    sizes = sorted(table["size"].unique(), key=_size_rank)
    markers = {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(sizes)}
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(groups), figsize=(8.5 * len(groups), 6), squeeze=False)
    for ax, ((match, budget), part) in zip(axes[0], groups):
        for method in methods:
            rows = part[part["method"] == method]
            if rows.empty:
                continue
            for _, row in rows.iterrows():
                ax.scatter(row[x], row["val_ppl"], color=colours[method], marker=markers[row["size"]], s=70,
                           edgecolor="black", linewidth=0.5, zorder=3)
                if row["seeds"] > 1 and row["val_ppl_std"] > 0:
                    ax.errorbar(row[x], row["val_ppl"], yerr=row["val_ppl_std"], color=colours[method], zorder=2)
                label = row["size"] + (f" {row['variant']}" if row["variant"] else "")
                ax.annotate(label, (row[x], row["val_ppl"]), textcoords="offset points", xytext=(5, 4),
                            fontsize=7, color=colours[method])
            if frontier:
                front = pareto_front(zip(rows[x], rows["val_ppl"]))
                ax.plot([p[0] for p in front], [p[1] for p in front], color=colours[method], linewidth=1.6,
                        alpha=0.85, zorder=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        # plain numbers (k, M, G) instead of 10^x labels: perplexities span well under a decade
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _si(v)))
            axis.set_minor_formatter(ticker.FuncFormatter(lambda v, _, axis=axis: _minor_label(v, axis)))
        ax.grid(True, which="major", alpha=0.5)
        ax.grid(True, which="minor", alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation perplexity (deployed decoding)")
        ax.set_title(f"{title}\nmatch: {match}, budget {budget:.3g} FLOPs per job", fontsize=11)
    handles = [plt.Line2D([], [], color=colours[m], marker="o", linestyle="-" if frontier else "", label=m)
               for m in methods]
    handles += [plt.Line2D([], [], color="black", marker=markers[s], markerfacecolor="none", linestyle="", label=s)
                for s in sizes]  # hollow black: no method's colour
    axes[0][-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                       title="method (line: Pareto frontier) / size" if frontier else "method / size", fontsize=8,
                       title_fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def make_plots(folder: str | os.PathLike, out: str | os.PathLike | None = None) -> list[pathlib.Path]:
    runs = load_runs(folder)
    target = pathlib.Path(out) if out else runs.folder
    return [
        _plot(runs, "infer_flops_per_token", "measured inference FLOPs per token",
              "Perplexity vs measured inference compute", target / PARETO_PNG, frontier=True),
        _plot(runs, "train_flops", "measured training FLOPs", "Perplexity vs training compute",
              target / TRAIN_PNG, frontier=False),
    ]


def write_reports(folder: str | os.PathLike) -> list[pathlib.Path]:
    """Plots and all three table formats into ``folder`` (what a sweep does at its end)."""
    runs = load_runs(folder)
    paths = make_plots(folder)
    for fmt, name in TABLE_FILES.items():
        path = runs.folder / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(FORMATTERS[fmt](runs))
        os.replace(tmp, path)  # a reader never sees half a table
        paths.append(path)
    return paths


__all__ = ["PARETO_PNG", "TABLE_FILES", "TRAIN_PNG", "ReportError", "aggregate", "load_runs", "make_plots",
           "make_table", "pareto_front", "table_csv", "table_latex", "table_markdown", "write_reports"]
