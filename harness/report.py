"""Reports of a sweep folder: Pareto plots and the comparison table a paper prints.

``python -m harness plot DIR [--out DIR2]`` writes

* ``pareto_inference_flops.png``: validation perplexity against *measured* inference FLOPs per token,
  one colour per method (variants of a method, e.g. a ``--vary`` over PonderLM-3's penalty, share it),
  one marker per size, each method's Pareto frontier drawn (the points no other point of the same
  method beats on both axes), log axes, the match mode and budget in the title;
* ``ppl_vs_train_flops.png``: validation perplexity against measured training FLOPs;
* ``pareto_bits_per_byte.png``: the Pareto plot with validation bits per byte on the y axis (the
  tokenizer-independent metric: summed token NLL / (ln 2 x UTF-8 bytes)). Written only when some run
  reports ``val_bits_per_byte``, on a linear y axis (bits per byte is a scaled loss, as log perplexity
  is); points whose runs lack it are left out, and the panel title says how many.
  Perplexity stays the y axis of the first two plots, so they read the same for old and new folders.

Every point is the mean over the seeds of one (method, variant, size); seeds with several runs get
error bars of +- one sample standard deviation over seeds on the y axis, and on the x axis too where
the x value varies across seeds (measured inference FLOPs of adaptive methods). Frontiers go through
these means, never through single seeds.

``python -m harness table DIR [--format md|latex|csv] [--out FILE]`` prints (or writes) the table:
method, size, parameters, inference FLOPs/token (measured), perplexity, bits per byte ("–" for runs
recorded before it existed), mean extra steps where a method reports them, downstream scores where
present (one metric per task: acc_norm, else acc, else the first reported), and the number of seeds.
Values are means over seeds; perplexity, bits per byte and (where it varies across seeds) inference
FLOPs are printed as ``mean ± std`` (``$\\pm$`` in LaTeX; sample standard deviation, n-1), the std left
out for a single seed. The csv has the means in the plain columns and the stds in ``<column>_std``
columns (empty for a single seed). The best mean of every quality column is marked: bold in md and
latex (the mean only, not its std), a ``best`` column naming the columns in csv. "Best" means lowest
for FLOPs, perplexities and bits per byte, highest for accuracies.

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

from harness.claims import write_claims
from harness.core.config import SIZES
from harness.core.errors import ReportError
from harness.core.io import write_bytes_atomic
from harness.results import FAILED, OK, ResultsStore

PARETO_PNG = "pareto_inference_flops.png"
TRAIN_PNG = "ppl_vs_train_flops.png"
BPB_PNG = "pareto_bits_per_byte.png"
TABLE_FILES = {"md": "table.md", "latex": "table.tex", "csv": "table.csv"}
STD_KEYS = ("val_ppl", "val_bits_per_byte", "infer_flops_per_token", "train_flops")  # get a `<key>_std` column
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
        "label": record.get("method") + (f" [{variant}]" if variant else ""),
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
    """Seeds of one (match, budget, method, variant, size) in one row, as a pandas DataFrame in table order.

    Every numeric column holds the mean over the seeds that report it; ``<key>_std`` (for ``STD_KEYS``)
    the sample standard deviation over seeds (ddof 1; NaN for a single seed); ``seeds`` their number.
    """
    import pandas as pd

    frame = pd.DataFrame(rows)
    numeric = [c for c in frame.columns if c not in _GROUP_KEYS + ["seed"]]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce")
    grouped = frame.groupby(_GROUP_KEYS, dropna=False, sort=False)
    table = grouped[numeric].mean()
    table["seeds"] = grouped["seed"].nunique()
    for key in STD_KEYS:
        table[f"{key}_std"] = grouped[key].std()
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
        seeds = " Mean ± standard deviation over seeds (sample std; none shown for a single seed)."
    return (f"Matched compute: {how}. Perplexity and bits per byte on held-out validation text by deployed "
            f"decoding; inference FLOPs per token measured.{seeds} Best mean per column marked.")


# ---------------------------------------------------------------------------------------------------
# tables


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    kind: str  # "text" | "params" | "flops" | "ppl" | "bpb" | "steps" | "score" | "count"
    ranked: bool  # mark the best value
    spread: bool = False  # print `mean ± std` over seeds (its `<key>_std` column)


_FIXED = {"match", "budget", "method", "variant", "label", "size", "seed", "params", "infer_flops_per_token",
          "val_ppl", "val_bits_per_byte", "val_loss", "train_flops", "train_tokens", "mean_extra_steps",
          "consistency_gap", "jacobi_gap", "seeds", *(f"{key}_std" for key in STD_KEYS)}


def _columns(part) -> list[Column]:
    columns = [Column("label", "Method", "text", False), Column("size", "Size", "text", False),
               Column("params", "Params", "params", False),
               Column("infer_flops_per_token", "Inference FLOPs/token", "flops", True, spread=True),
               Column("val_ppl", "Perplexity", "ppl", True, spread=True),
               Column("val_bits_per_byte", "Bits/byte", "bpb", True, spread=True)]
    if part["mean_extra_steps"].notna().any():
        columns.append(Column("mean_extra_steps", "Mean extra steps", "steps", False))
    for key in sorted(c for c in part.columns if c not in _FIXED and part[c].notna().any()):
        kind = "ppl" if lower_is_better(key) else "score"
        columns.append(Column(key, key, kind, True))
    columns.append(Column("seeds", "Seeds", "count", False))
    return columns


def _best(part, column: Column) -> set[int]:
    values = part[column.key]
    if not column.ranked or values.notna().sum() < 2 or values.dropna().nunique() < 2:
        return set()  # nothing to single out when every row ties
    target = values.min() if column.kind in ("flops", "ppl", "bpb") else values.max()
    return {i for i, v in values.items() if v == target}


def _si(x: float) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}"
    return f"{x:.3g}"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value: Any, column: Column, latex: bool = False) -> str:
    if _missing(value):
        return "--" if latex else "–"
    if column.kind == "text":
        return str(value)
    if column.kind in ("params", "flops"):
        return _si(float(value))
    if column.kind in ("ppl", "steps"):
        return f"{value:.2f}"
    if column.kind == "bpb":
        return f"{value:.3f}"
    if column.kind == "count":
        return str(int(value))
    return f"{100 * value:.1f}" if 0 <= value <= 1 else f"{value:.3g}"  # accuracies as percentages


def _spread(row, column: Column) -> float | None:
    """The std over seeds to print beside the mean, or None: one seed, or FLOPs identical across seeds."""
    if not column.spread or row["seeds"] < 2:
        return None
    std, mean = row.get(f"{column.key}_std"), row[column.key]
    if _missing(std) or _missing(mean):
        return None
    if column.kind == "flops" and std <= 1e-9 * abs(mean):
        return None  # a method of fixed compute: the same measured FLOPs every seed
    return float(std)


def _cell(row, column: Column, best: bool, latex: bool = False) -> str:
    text = _fmt(row[column.key], column, latex)
    if latex:
        text = _latex_escape(text)
    if best:
        text = rf"\textbf{{{text}}}" if latex else f"**{text}**"
    std = _spread(row, column)
    if std is not None:
        text += (r" $\pm$ " if latex else " ± ") + _fmt(std, column, latex)
    return text


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "{": r"\{",
                  "}": r"\}", "$": r"\$", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text).replace("±", r"$\pm$")


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
        out.append(f"*{_caption(match, budget, part)}*")
        out.append("")
        out.append("| " + " | ".join(c.header for c in columns) + " |")
        out.append("| " + " | ".join("---" if c.kind == "text" else "---:" for c in columns) + " |")
        for i, row in part.iterrows():
            out.append("| " + " | ".join(_cell(row, c, i in best[c.key]) for c in columns) + " |")
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
            out.append(" & ".join(_cell(row, c, i in best[c.key], latex=True) for c in columns) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_latex_escape(_caption(match, budget, part))}}}",
                r"\end{table}", ""]
    for line in _failed_lines(runs):
        out.append(f"% failed: {line}")
    return "\n".join(out) + "\n"


_CSV_FRONT = ["match", "budget", "method", "variant", "size", "params", "infer_flops_per_token",
              "infer_flops_per_token_std", "val_ppl", "val_ppl_std", "val_bits_per_byte", "val_bits_per_byte_std",
              "mean_extra_steps", "seeds", "best"]


def table_csv(runs: Runs) -> str:
    import io

    import pandas as pd

    table = aggregate(runs.ok)
    parts = []
    for _, part in _groups(table):
        columns = _columns(part)
        best = {c.key: _best(part, c) for c in columns}
        part = part.copy()
        part["best"] = [";".join(c.key for c in columns if i in best[c.key]) for i in part.index]
        parts.append(part)
    merged = pd.concat(parts, ignore_index=True)
    ordered = [c for c in _CSV_FRONT if c in merged.columns]
    ordered += [c for c in merged.columns if c not in _CSV_FRONT and c != "label"]
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


@dataclass(frozen=True)
class PlotSpec:
    """One figure: ``y`` against ``x`` (both means over seeds, log axes), one panel per (match, budget)."""

    x: str
    y: str
    xlabel: str
    ylabel: str
    title: str
    filename: str
    frontier: bool
    optional: bool = False  # skipped, not an error, when no run reports ``y``
    ylog: bool = True  # perplexity on a log axis (its log is the loss); bits per byte, a scaled loss, linear


_PPL_LABEL = "validation perplexity (deployed decoding)"
PLOTS = (
    PlotSpec("infer_flops_per_token", "val_ppl", "measured inference FLOPs per token", _PPL_LABEL,
             "Perplexity vs measured inference compute", PARETO_PNG, frontier=True),
    PlotSpec("train_flops", "val_ppl", "measured training FLOPs", _PPL_LABEL, "Perplexity vs training compute",
             TRAIN_PNG, frontier=False),
    PlotSpec("infer_flops_per_token", "val_bits_per_byte", "measured inference FLOPs per token",
             "validation bits per byte (deployed decoding)", "Bits per byte vs measured inference compute",
             BPB_PNG, frontier=True, optional=True, ylog=False),
)


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (lower is better for both), by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def plot_points(table, spec: PlotSpec) -> Any:
    """The points a figure draws: one per (match, budget, method, variant, size), the mean over its seeds.

    Columns ``x``, ``y`` (means), ``xerr``, ``yerr`` (std over seeds; 0 for one seed, and for an x that is
    the same every seed) besides the table's own; rows without a positive x and y (log axes) are dropped.
    """
    keep = table[spec.x].notna() & (table[spec.x] > 0) & table[spec.y].notna() & (table[spec.y] > 0)
    points = table[keep].copy()
    points["x"], points["y"] = points[spec.x], points[spec.y]
    for axis, key in (("xerr", spec.x), ("yerr", spec.y)):
        std = points[f"{key}_std"] if f"{key}_std" in points else 0.0 * points[key]
        std = std.where(points["seeds"] > 1, 0.0).fillna(0.0)
        points[axis] = std.where(std > 1e-9 * points[key].abs(), 0.0)  # equal every seed: no bar
    return points.reset_index(drop=True)


def method_frontiers(points) -> dict[str, list[tuple[float, float]]]:
    """Each method's Pareto frontier through its mean points (variants and sizes of a method together)."""
    return {method: pareto_front(zip(rows["x"], rows["y"])) for method, rows in points.groupby("method", sort=True)}


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


def _draw_points(ax, part, colours: dict[str, Any], markers: dict[str, str]) -> None:
    for _, row in part.iterrows():
        colour = colours[row["method"]]
        ax.scatter(row["x"], row["y"], color=colour, marker=markers[row["size"]], s=70, edgecolor="black",
                   linewidth=0.5, zorder=3)
        if row["xerr"] > 0 or row["yerr"] > 0:  # +- one std over seeds
            ax.errorbar(row["x"], row["y"], xerr=row["xerr"] or None, yerr=row["yerr"] or None, fmt="none",
                        ecolor=colour, elinewidth=1.2, capsize=3, zorder=2)
        label = row["size"] + (f" {row['variant']}" if row["variant"] else "")
        ax.annotate(label, (row["x"], row["y"]), textcoords="offset points", xytext=(5, 4), fontsize=7,
                    color=colour)


def _style_axes(ax, spec: PlotSpec, match: str, budget: float, left_out: int) -> None:
    from matplotlib import ticker

    ax.set_xscale("log")
    ax.set_yscale("log" if spec.ylog else "linear")
    # plain numbers (k, M, G) instead of 10^x labels: perplexities span well under a decade
    for axis in (ax.xaxis, ax.yaxis) if spec.ylog else (ax.xaxis,):
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _si(v)))
        axis.set_minor_formatter(ticker.FuncFormatter(lambda v, _, axis=axis: _minor_label(v, axis)))
    ax.grid(True, which="major", alpha=0.5)
    ax.grid(True, which="minor", alpha=0.2)
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel(spec.ylabel)
    note = f"; {left_out} point(s) lacking {spec.x} or {spec.y} left out" if left_out else ""
    ax.set_title(f"{spec.title}\nmatch: {match}, budget {budget:.3g} FLOPs per job{note}", fontsize=11)


def _legend(plt, ax, spec: PlotSpec, colours: dict[str, Any], markers: dict[str, str], bars: bool) -> None:
    handles = [plt.Line2D([], [], color=colour, marker="o", linestyle="-" if spec.frontier else "", label=m)
               for m, colour in colours.items()]
    handles += [plt.Line2D([], [], color="black", marker=markers[s], markerfacecolor="none", linestyle="", label=s)
                for s in markers]  # hollow black: no method's colour
    title = "method (line: Pareto frontier of means) / size" if spec.frontier else "method / size"
    if bars:
        title += "\npoints: mean over seeds; bars: ± 1 std"
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title=title, fontsize=8,
              title_fontsize=8)


def plot_figure(runs: Runs, spec: PlotSpec) -> Any:
    """The matplotlib Figure of ``spec`` (not saved): means over seeds, error bars, frontiers through means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    table = aggregate(runs.ok)
    points = plot_points(table, spec)
    if points.empty:
        raise ReportError(f"no finished job in {runs.folder} has both {spec.x} and {spec.y}; nothing to plot")
    groups = _groups(points)
    palette = _palette(sorted(table["method"].unique()))  # a method keeps its colour in every figure
    colours = {m: palette[m] for m in sorted(points["method"].unique())}
    sizes = sorted(points["size"].unique(), key=_size_rank)
    markers = {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(sizes)}
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(groups), figsize=(8.5 * len(groups), 6), squeeze=False)
    for ax, ((match, budget), part) in zip(axes[0], groups):
        _draw_points(ax, part, colours, markers)
        if spec.frontier:
            for method, front in method_frontiers(part).items():
                ax.plot([p[0] for p in front], [p[1] for p in front], color=colours[method], linewidth=1.6,
                        alpha=0.85, zorder=2, gid=f"frontier:{method}")
        in_panel = (table["match"] == match) & (table["budget"] == budget)
        _style_axes(ax, spec, match, budget, left_out=int(in_panel.sum()) - len(part))
    bars = bool(((points["xerr"] > 0) | (points["yerr"] > 0)).any())
    _legend(plt, axes[0][-1], spec, colours, markers, bars)
    fig.tight_layout()
    return fig


def _plot(runs: Runs, spec: PlotSpec, path: pathlib.Path) -> pathlib.Path:
    import matplotlib.pyplot as plt

    fig = plot_figure(runs, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _has(runs: Runs, key: str) -> bool:
    return any(not _missing(row.get(key)) for row in runs.ok)


def make_plots(folder: str | os.PathLike, out: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """The PNGs of ``PLOTS`` (the bits-per-byte one only when some run reports bits per byte)."""
    runs = load_runs(folder)
    target = pathlib.Path(out) if out else runs.folder
    return [_plot(runs, spec, target / spec.filename) for spec in PLOTS if not spec.optional or _has(runs, spec.y)]


def write_reports(folder: str | os.PathLike) -> list[pathlib.Path]:
    """Plots, all three table formats and the claims report into ``folder`` (what a sweep does at its end)."""
    runs = load_runs(folder)
    paths = make_plots(folder)
    for fmt, name in TABLE_FILES.items():
        path = runs.folder / name
        write_bytes_atomic(path, FORMATTERS[fmt](runs).encode("utf-8"))  # a reader never sees half a table
        paths.append(path)
    paths.append(write_claims(folder))
    return paths


__all__ = ["BPB_PNG", "PARETO_PNG", "PLOTS", "STD_KEYS", "TABLE_FILES", "TRAIN_PNG", "PlotSpec", "ReportError",
           "aggregate", "load_runs", "make_plots", "make_table", "method_frontiers", "pareto_front", "plot_figure",
           "plot_points", "table_csv", "table_latex", "table_markdown", "write_reports"]
