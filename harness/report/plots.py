"""The figures of a report: Pareto plots, learning curves and the preconditions along training.

Every figure keeps to the same rules (issue "A sweep report a researcher opens"): tick labels of log axes are
chosen so that they never collide (:func:`fit_log_ticks`, measured with the renderer's font metrics); a point's
label is drawn only where it overlaps no marker, error bar, line or other label, and otherwise the point gets a
number keyed in the legend (:func:`place_labels`); points that would coincide on screen are set side by side
(:func:`dodge`) with a black outline; a frontier line is promised in the legend only for a method whose frontier
has two points or more (plus the dashed frontier of every mean); colours and names come from
:mod:`harness.report.style`.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from harness import stats
from harness.claims import Arm, arms_of, curve_comparison, has_difficulty, precondition_pairs
from harness.core.errors import ReportError
from harness.core.io import write_bytes_atomic
from harness.report.runs import Runs, _groups, _missing, _si, _size_rank, aggregate, load_runs
from harness.report.style import LINE_STYLES, MARKERS, display_name, method_colour

PARETO_PNG = "pareto_inference_flops.png"
TRAIN_PNG = "ppl_vs_train_flops.png"
BPB_PNG = "pareto_bits_per_byte.png"
CURVES_PNG = "learning_curves.png"
PRECONDITIONS_PNG = "preconditions.png"
DPI = 110




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

    Columns ``x``, ``y`` (means), ``xerr``, ``yerr`` (95% t half-widths over seeds; 0 for one seed, and for an
    x that is the same every seed) besides the table's own; rows without a positive x and y (log axes) are
    dropped.
    """
    keep = table[spec.x].notna() & (table[spec.x] > 0) & table[spec.y].notna() & (table[spec.y] > 0)
    points = table[keep].copy()
    points["x"], points["y"] = points[spec.x], points[spec.y]
    for axis, key in (("xerr", spec.x), ("yerr", spec.y)):
        std = points[f"{key}_ci95"] if f"{key}_ci95" in points else 0.0 * points[key]
        std = std.where(points["seeds"] > 1, 0.0).fillna(0.0)
        points[axis] = std.where(std > 1e-9 * points[key].abs(), 0.0)  # equal every seed: no bar
    return points.reset_index(drop=True)


def method_frontiers(points) -> dict[str, list[tuple[float, float]]]:
    """Each method's Pareto frontier through its mean points (variants and sizes of a method together)."""
    return {method: pareto_front(zip(rows["x"], rows["y"])) for method, rows in points.groupby("method", sort=True)}


# ---------------------------------------------------------------------------------------------------
# layout helpers: ticks that never collide, labels that overlap nothing, coincident points side by side

_LOG_SUBS = ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 5, 7), (1, 2, 5), (1, 3), (1,))
_GAP = 0.6  # the least gap between two tick labels, in font sizes


def _tick_candidates(low: float, high: float) -> list[list[float]]:
    """Tick sets for a log axis over [low, high], densest first: nice linear steps inside one decade, then
    leading digits per decade, then every k-th decade."""
    from matplotlib import ticker

    out: list[list[float]] = []
    if high / low < 10:
        for bins in (10, 8, 6, 5, 4, 3, 2):
            ticks = [t for t in ticker.MaxNLocator(nbins=bins, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
                     if low <= t <= high and t > 0]
            if len(ticks) >= 2 and ticks not in out:
                out.append(ticks)
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for subs in _LOG_SUBS:
        ticks = [s * 10.0 ** d for d in range(first, last + 1) for s in subs if low <= s * 10.0 ** d <= high]
        if ticks and ticks not in out:
            out.append(ticks)
    for step in (2, 3, 5, 10):
        ticks = [10.0 ** d for d in range(first, last + 1) if d % step == 0 and low <= 10.0 ** d <= high]
        if ticks and ticks not in out:
            out.append(ticks)
    return out


def _text_size(fig, text: str, fontsize: float) -> tuple[float, float]:
    """Width and height in display pixels of ``text`` at ``fontsize`` points (the renderer's metrics)."""
    from matplotlib.font_manager import FontProperties

    renderer = fig.canvas.get_renderer()
    width, height, _ = renderer.get_text_width_height_descent(text, FontProperties(size=fontsize), ismath=False)
    return width, height


def _fits(fig, ax, which: str, ticks: list[float], fontsize: float) -> bool:
    """No two labels of ``ticks`` on axis ``which`` overlap (with a gap of _GAP font sizes)."""
    gap = _GAP * fontsize * fig.dpi / 72
    spans = []
    for t in ticks:
        width, height = _text_size(fig, _si(t), fontsize)
        x, y = ax.transData.transform((t, ax.get_ylim()[0]) if which == "x" else (ax.get_xlim()[0], t))
        centre, half = (x, width / 2) if which == "x" else (y, height / 2)
        spans.append((centre - half, centre + half))
    spans.sort()
    return all(b[0] - a[1] >= gap for a, b in zip(spans, spans[1:]))


def tick_fontsize(ax, which: str) -> float:
    import matplotlib as mpl
    from matplotlib.font_manager import FontProperties

    return FontProperties(size=mpl.rcParams[f"{which}tick.labelsize"]).get_size_in_points()


def fit_log_ticks(fig, ax, which: str) -> list[float]:
    """Label the log axis ``which`` ("x" or "y") of ``ax`` with the densest nice tick set whose labels do not
    collide at the axes' current size; minor ticks stay unlabelled. Returns the labelled ticks."""
    from matplotlib import ticker

    axis = ax.xaxis if which == "x" else ax.yaxis
    low, high = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    fontsize = tick_fontsize(ax, which)
    candidates = _tick_candidates(low, high)
    chosen = next((t for t in candidates if _fits(fig, ax, which, t, fontsize)), candidates[-1] if candidates else [])
    axis.set_major_locator(ticker.FixedLocator(chosen))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _si(v)))
    axis.set_minor_locator(ticker.LogLocator(base=10, subs="all"))
    axis.set_minor_formatter(ticker.NullFormatter())
    return chosen


def _fit_all_ticks(fig, axes, ylog: bool) -> None:
    for ax in axes:
        fit_log_ticks(fig, ax, "x")
        if ylog:
            fit_log_ticks(fig, ax, "y")


_DODGE_PX = 9.0  # points closer than this on screen (pixels at 100 dpi) are set side by side


def dodge(fig, ax, xs: list[float], ys: list[float], errors: list[float] | None = None) -> list[float]:
    """Horizontal offsets in points for each (x, y) so that points that would coincide on screen, or whose error
    bars (``errors``: y half-widths) would run over each other, sit side by side (the group centred on the true x)."""
    scale = fig.dpi / 100
    radius = _DODGE_PX * scale
    errors = errors or [0.0] * len(xs)
    screen = []
    for x, y, e in zip(xs, ys, errors):
        px, py = ax.transData.transform((x, y))
        low, high = ax.transData.transform((x, y - e))[1] if y - e > 0 else -1e9, ax.transData.transform((x, y + e))[1]
        screen.append((px, min(low, py) - radius, max(high, py) + radius))
    groups: list[list[int]] = []
    for i, (px, low, high) in enumerate(screen):
        near = [g for g in groups if any(abs(px - screen[j][0]) < radius and low < screen[j][2] and screen[j][1] < high
                                         for j in g)]
        for g in near[1:]:  # i joins groups that were apart until now
            near[0].extend(g)
            groups.remove(g)
        if near:
            near[0].append(i)
        else:
            groups.append([i])
    offsets = [0.0] * len(xs)
    for group in groups:
        for k, i in enumerate(sorted(group)):
            offsets[i] = (k - (len(group) - 1) / 2) * 8.0  # points: a marker's width apart
    return offsets


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _segment_hits(box: tuple[float, float, float, float], p: tuple[float, float], q: tuple[float, float]) -> bool:
    """Whether segment p-q crosses the rectangle ``box`` (x0, y0, x1, y1), by Liang-Barsky clipping."""
    (x0, y0, x1, y1), (px, py), (qx, qy) = box, p, q
    t0, t1, dx, dy = 0.0, 1.0, qx - px, qy - py
    for edge_p, edge_q in ((-dx, px - x0), (dx, x1 - px), (-dy, py - y0), (dy, y1 - py)):
        if edge_p == 0:
            if edge_q < 0:
                return False
            continue
        t = edge_q / edge_p
        if edge_p < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 > t1:
            return False
    return True


@dataclass
class Obstacles:
    """What a label must not cover, in display pixels: boxes (markers, labels) and segments (lines, bars)."""

    boxes: list[tuple[float, float, float, float]]
    segments: list[tuple[tuple[float, float], tuple[float, float]]]

    def free(self, box: tuple[float, float, float, float]) -> bool:
        return not any(_overlaps(box, b) for b in self.boxes) and \
            not any(_segment_hits(box, p, q) for p, q in self.segments)


def line_obstacles(ax) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The segments of every line and line collection (error bars) drawn on ``ax``, in display pixels."""
    segments = []
    for line in ax.lines:
        path = line.get_transform().transform(list(zip(line.get_xdata(), line.get_ydata())))
        segments += [(tuple(a), tuple(b)) for a, b in zip(path, path[1:])]
    for collection in ax.collections:
        if hasattr(collection, "get_segments"):
            transform = collection.get_transform()
            for seg in collection.get_segments():
                path = transform.transform(seg)
                segments += [(tuple(a), tuple(b)) for a, b in zip(path, path[1:])]
    return segments


_LABEL_FONT = 7.5
_OFFSETS = ((6, 4), (6, -4), (-6, 4), (-6, -4), (9, 0), (-9, 0), (0, 8), (0, -8))  # points, from the marker


def place_labels(fig, ax, points: list[dict[str, Any]], obstacles: Obstacles) -> list[dict[str, Any]]:
    """Annotate every point whose label fits somewhere around it without covering anything; the others get a
    number key where the number fits. ``points``: dicts with x, y, dx (dodge, points), label, colour. Returns the
    points that carry a key (each with its ``key``), for the legend."""
    scale = fig.dpi / 72
    frame = ax.get_window_extent()
    inside = (frame.x0 + 2, frame.y0 + 2, frame.x1 - 2, frame.y1 - 2)
    keyed = []

    def attempt(point: dict[str, Any], text: str) -> bool:
        px, py = ax.transData.transform((point["x"], point["y"]))
        px += point["dx"] * scale
        width, height = _text_size(fig, text, _LABEL_FONT)
        for ox, oy in _OFFSETS:
            ax_ = px + ox * scale - (width if ox < 0 else width / 2 if ox == 0 else 0)
            ay = py + oy * scale - (height if oy < 0 else height / 2 if oy == 0 else 0)
            box = (ax_, ay, ax_ + width, ay + height)
            if not (inside[0] <= box[0] and box[2] <= inside[2] and inside[1] <= box[1] and box[3] <= inside[3]):
                continue
            if obstacles.free(box):
                obstacles.boxes.append(box)
                ha = "right" if ox < 0 else "center" if ox == 0 else "left"
                va = "top" if oy < 0 else "center" if oy == 0 else "bottom"
                ax.annotate(text, (point["x"], point["y"]), textcoords="offset points",
                            xytext=(ox + point["dx"], oy), fontsize=_LABEL_FONT, color=point["colour"], ha=ha, va=va)
                return True
        return False

    for point in points:
        if point["label"] and not attempt(point, point["label"]):
            point["key"] = str(len(keyed) + 1 + point.get("key_base", 0))
            attempt(point, point["key"])  # the number next to the marker where it fits; the legend says what it is
            keyed.append(point)
    return keyed


# ---------------------------------------------------------------------------------------------------
# Pareto plots


def _point_boxes(fig, ax, points: list[dict[str, Any]], size_pt: float) -> list[tuple[float, float, float, float]]:
    scale = fig.dpi / 72
    half = size_pt * scale / 2 + 1
    boxes = []
    for p in points:
        px, py = ax.transData.transform((p["x"], p["y"]))
        px += p["dx"] * scale
        boxes.append((px - half, py - half, px + half, py + half))
    return boxes


_MARKER_AREA = 60  # scatter's s (points squared)


def _draw_points(ax, fig, part, markers: dict[str, str]) -> list[dict[str, Any]]:
    """Error bars and markers of one panel, points that coincide on screen side by side; the drawn points."""
    from matplotlib import transforms

    xs, ys = list(part["x"]), list(part["y"])
    offsets = dodge(fig, ax, xs, ys, list(part["yerr"]))
    drawn = []
    for (_, row), dx in zip(part.iterrows(), offsets):
        colour = method_colour(row["method"])
        shift = transforms.offset_copy(ax.transData, fig=fig, x=dx, y=0, units="points")
        if row["xerr"] > 0 or row["yerr"] > 0:  # the 95% t interval over seeds
            ax.errorbar(row["x"], row["y"], xerr=row["xerr"] or None, yerr=row["yerr"] or None, fmt="none",
                        ecolor=colour, elinewidth=1.2, capsize=3, zorder=2, transform=shift)
        ax.scatter(row["x"], row["y"], color=colour, marker=markers[row["size"]], s=_MARKER_AREA, edgecolor="black",
                   linewidth=0.7, zorder=3, transform=shift)
        drawn.append({"x": row["x"], "y": row["y"], "dx": dx, "colour": colour, "method": row["method"],
                      "label": row["size"] + (f" {row['variant']}" if row["variant"] else ""),
                      "name": f"{display_name(row['method'], row['variant'])} @{row['size']}"})
    return drawn


def _freeze_limits(ax, part) -> None:
    """Fix the panel's limits to the points and their error bars before anything is placed on screen."""
    xs = [v for x, e in zip(part["x"], part["xerr"]) for v in (x - e, x + e) if v > 0]
    ys = [v for y, e in zip(part["y"], part["yerr"]) for v in (y - e, y + e) if v > 0]
    ax.scatter(xs, [ys[0]] * len(xs), s=0, alpha=0)
    ax.scatter([xs[0]] * len(ys), ys, s=0, alpha=0)
    ax.autoscale_view()
    low, high = ax.get_xlim()
    if max(xs) / min(xs) < 1.5:  # one x value (methods of equal FLOPs): a readable span around it, not decades
        low, high = min(xs) / 1.3, max(xs) * 1.3
    ax.set_xlim(low, high)
    ax.set_ylim(*ax.get_ylim())


def _style_axes(ax, spec: PlotSpec, match: str, budget: float, left_out: int) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log" if spec.ylog else "linear")
    ax.grid(True, which="major", alpha=0.5)
    ax.grid(True, which="minor", alpha=0.15)
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel(spec.ylabel)
    note = f"; {left_out} point(s) lacking {spec.x} or {spec.y} left out" if left_out else ""
    ax.set_title(f"{spec.title}\nmatch: {match}, budget {budget:.3g} FLOPs per job{note}", fontsize=11)


def _legend(ax, spec: PlotSpec, methods: list[str], lined: set[str], markers: dict[str, str], bars: bool,
            dodged: bool, keyed: list[dict[str, Any]]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=method_colour(m), marker="o", markeredgecolor="black",
                      linestyle="-" if m in lined else "", label=m) for m in methods]
    if spec.frontier:
        handles.append(Line2D([], [], color="0.45", linestyle="--", linewidth=1.0, label="frontier of all means"))
    handles += [Line2D([], [], color="black", marker=markers[s], markerfacecolor="none", linestyle="", label=s)
                for s in markers]  # hollow black: no method's colour
    handles += [Line2D([], [], color=p["colour"], marker=f"${p['key']}$", markersize=7, linestyle="",
                       label=p["name"]) for p in keyed]
    title = "method / size"
    if spec.frontier and lined:
        title = "method (line: its Pareto frontier of means) / size"
    notes = []
    if bars:
        notes.append("points: mean over seeds; bars: 95% t interval")
    if dodged:
        notes.append("coinciding points set side by side")
    if keyed:
        notes.append("numbers: points whose label did not fit")
    title += "".join(f"\n{n}" for n in notes)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title=title, fontsize=8,
              title_fontsize=8, alignment="left")


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
    methods = sorted(points["method"].unique())
    sizes = sorted(points["size"].unique(), key=_size_rank)
    markers = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(sizes)}
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(groups), figsize=(8.5 * len(groups), 6), squeeze=False)
    lined: set[str] = set()
    for ax, ((match, budget), part) in zip(axes[0], groups):
        _style_axes(ax, spec, match, budget, left_out=int(((table["match"] == match)
                                                           & (table["budget"] == budget)).sum()) - len(part))
        if spec.frontier:
            for method, front in method_frontiers(part).items():
                ax.plot([p[0] for p in front], [p[1] for p in front], color=method_colour(method), linewidth=1.6,
                        alpha=0.85, zorder=2, gid=f"frontier:{method}", marker="none")
                if len(front) >= 2:
                    lined.add(method)
            front = pareto_front(zip(part["x"], part["y"]))
            ax.plot([p[0] for p in front], [p[1] for p in front], color="0.45", linestyle="--", linewidth=1.0,
                    zorder=1, gid="frontier:all")
        _freeze_limits(ax, part)
    fig.tight_layout()
    _fit_all_ticks(fig, axes[0], spec.ylog)
    fig.tight_layout()
    keyed: list[dict[str, Any]] = []
    dodged = False
    for ax, (_, part) in zip(axes[0], groups):
        drawn = _draw_points(ax, fig, part, markers)
        dodged = dodged or any(p["dx"] for p in drawn)
        obstacles = Obstacles(_point_boxes(fig, ax, drawn, math.sqrt(_MARKER_AREA)), line_obstacles(ax))
        for p in drawn:
            p["key_base"] = len(keyed)
        keyed += place_labels(fig, ax, sorted(drawn, key=lambda p: (p["x"], p["y"])), obstacles)
    bars = bool(((points["xerr"] > 0) | (points["yerr"] > 0)).any())
    _legend(axes[0][-1], spec, methods, lined, markers, bars, dodged, keyed)
    return fig


# ---------------------------------------------------------------------------------------------------
# learning curves and the preconditions along training


def _band(ax, xs: list[float], intervals: list[stats.Interval], colour, style: str, label: str,
          bounds: tuple[float, float] | None = None) -> None:
    """A mean line with its 95% band (where the seeds give one); ``bounds`` clips the band to a quantity's
    range (an accuracy's t interval can reach past 1, where nothing lies)."""
    means = [iv.mean for iv in intervals]
    ax.plot(xs, means, color=colour, linestyle=style, linewidth=1.5, label=label)
    shown = [(x, iv) for x, iv in zip(xs, intervals) if iv.n >= 2]
    if shown:
        low, high = [iv.low for _, iv in shown], [iv.high for _, iv in shown]
        if bounds is not None:
            low, high = [max(v, bounds[0]) for v in low], [min(v, bounds[1]) for v in high]
        ax.fill_between([x for x, _ in shown], low, high, color=colour, alpha=0.12, linewidth=0)


def _arm_curve(arm: Arm, x_key: str) -> tuple[list[float], list[stats.Interval]]:
    """Mean and 95% t interval over seeds of an arm's curve, at the points every seed has; x = the mean of
    ``x_key`` (tokens are the same for every seed; measured training FLOPs nearly so)."""
    points: dict[int, list[tuple[float, float]]] = {}
    for run in arm.runs:
        for p in run.get("curve") or []:
            points.setdefault(int(p["step"]), []).append((float(p[x_key]), float(p["val_loss"])))
    seeds = len([r for r in arm.runs if r.get("curve")])
    steps = sorted(s for s, values in points.items() if len(values) == seeds)
    xs = [stats.t_interval([x for x, _ in points[s]]).mean for s in steps]
    return xs, [stats.t_interval([y for _, y in points[s]]) for s in steps]


def _arm_label(arm: Arm) -> str:
    return f"{display_name(arm.method, arm.variant)} @{arm.size}"


def plot_curves(runs: Runs) -> Any:
    """Learning curves: parallel validation loss against training tokens and training FLOPs, per arm (colour: the
    method, line style: its variant and size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted((a for a in arms_of(runs.records) if any(r.get("curve") for r in a.runs)),
                  key=lambda a: (a.method, a.variant, _size_rank(a.size)))
    if not arms:
        raise ReportError(f"no finished job in {runs.folder} recorded a learning curve (train.curve_points)")
    styles: dict[str, dict[str, str]] = {}
    fig, axes = plt.subplots(1, 2, figsize=(15, 6), squeeze=False)
    for arm in arms:
        within = styles.setdefault(arm.method, {})
        style = within.setdefault(f"{arm.variant}@{arm.size}", LINE_STYLES[len(within) % len(LINE_STYLES)])
        for ax, key in zip(axes[0], ("tokens", "train_flops")):
            xs, intervals = _arm_curve(arm, key)
            n = intervals[-1].n if intervals else 0
            _band(ax, xs, intervals, method_colour(arm.method), style, f"{_arm_label(arm)} (n={n})")
    for ax, xlabel in zip(axes[0], ("training tokens", "measured training FLOPs")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats, parallel form)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_title("Learning curves: mean over seeds, band: 95% t interval")
    axes[0][1].set_title("against training compute")
    axes[0][1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=7)
    fig.tight_layout()
    _fit_all_ticks(fig, axes[0], ylog=False)
    return fig


def plot_preconditions(runs: Runs) -> Any:
    """The preconditions' paired differences along training (negative: the precondition holds there); a pair's
    colour is its first arm's method, its line style tells pairs of one method apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(name, a, b, curve_comparison(a, b)) for name, a, b in precondition_pairs(arms_of(runs.records))]
    pairs = [p for p in pairs if len(p[3]) >= 2]
    if not pairs:
        raise ReportError(f"no precondition pair in {runs.folder} has learning curves on both sides")
    names = sorted({p[0] for p in pairs})
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names):
        used: dict[str, int] = {}
        for _, a, b, curve in (p for p in pairs if p[0] == name):
            label = f"{_arm_label(a)} − {_arm_label(b)}"
            style = LINE_STYLES[used.get(a.method, 0) % len(LINE_STYLES)]
            used[a.method] = used.get(a.method, 0) + 1
            _band(ax, [t for t, _ in curve], [iv for _, iv in curve], method_colour(a.method), style,
                  f"{label} (n={curve[-1][1].n})")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("paired loss difference (nats)")
        ax.set_title(f"{name}: below 0 = holds (band: 95% t over seeds)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    fig.tight_layout()
    _fit_all_ticks(fig, axes[0], ylog=False)
    return fig


# ---------------------------------------------------------------------------------------------------
# the depth probe (runs with metrics by difficulty: harness.data.synthetic, harness.evaluate)

DEPTH_PROBE_PNG = "depth_probe.png"


def _by_h(arm: Arm, key: str) -> tuple[list[int], list[stats.Interval]]:
    """Per h > 0, the 95% t interval over seeds of ``difficulty[h][key]`` (at the h every seed has)."""
    runs = [r for r in arm.runs if isinstance(r.get("difficulty"), dict)]
    levels = sorted({int(h) for r in runs for h in r["difficulty"] if h != "0"})
    hs, intervals = [], []
    for h in levels:
        values = [r["difficulty"][str(h)][key] for r in runs if key in r["difficulty"].get(str(h), {})]
        if values and len(values) == len(runs):
            hs.append(h)
            intervals.append(stats.t_interval(values))
    return hs, intervals


def plot_depth_probe(runs: Runs) -> Any:
    """Three panels: accuracy against h per arm (band: 95% t over seeds); mean deployed extra steps against h
    for the methods that report steps (h = 0 is the filler); deepest-h accuracy against measured inference
    FLOPs per token (error bars: 95% t over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted((a for a in arms_of(runs.records) if any(isinstance(r.get("difficulty"), dict) for r in a.runs)),
                  key=lambda a: (a.method, a.variant, _size_rank(a.size)))
    if not arms:
        raise ReportError(f"no finished job in {runs.folder} has metrics by difficulty (a synthetic: source)")
    legend_rows = math.ceil(len(arms) / 3)
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.0 + 0.22 * legend_rows), squeeze=False)
    acc_ax, steps_ax, flops_ax = axes[0]
    styles: dict[str, dict[str, str]] = {}
    offsets = [0.24 * (i / (len(arms) - 1) - 0.5) if len(arms) > 1 else 0.0 for i in range(len(arms))]
    for arm, offset in zip(arms, offsets):
        within = styles.setdefault(arm.method, {})
        style = within.setdefault(f"{arm.variant}@{arm.size}", LINE_STYLES[len(within) % len(LINE_STYLES)])
        colour, label = method_colour(arm.method), _arm_label(arm)
        hs, intervals = _by_h(arm, "accuracy")
        if hs:
            _band(acc_ax, hs, intervals, colour, style, f"{label} (n={intervals[-1].n})", bounds=(0.0, 1.0))
            # every seed as a dot, set a little apart per arm: these tasks are learned in jumps whose timing
            # varies by seed, and a mean of 0.3 and 1.0 is neither
            for run in arm.runs:
                table = run.get("difficulty") or {}
                seen = [(h, table[str(h)]["accuracy"]) for h in hs if "accuracy" in table.get(str(h), {})]
                acc_ax.scatter([h + offset for h, _ in seen], [a for _, a in seen], s=16, color=colour, alpha=0.7,
                               linewidths=0)
        if any("mean_steps" in row for r in arm.runs for row in (r.get("difficulty") or {}).values()):
            zero = [r["difficulty"]["0"]["mean_steps"] for r in arm.runs
                    if "mean_steps" in (r.get("difficulty") or {}).get("0", {})]
            hs, intervals = _by_h(arm, "mean_steps")
            if zero and len(zero) == len(arm.runs):
                hs, intervals = [0, *hs], [stats.t_interval(zero), *intervals]
            if hs:
                _band(steps_ax, hs, intervals, colour, style, label)
        accuracy, flops = stats.t_interval(arm.values("deepest_h_accuracy")), arm.values("infer_flops_per_token")
        if accuracy.n and flops:
            flops_iv = stats.t_interval(flops)
            if accuracy.n >= 2:  # the seeds themselves, behind their mean
                paired = [(r["infer_flops_per_token"], r["deepest_h_accuracy"]) for r in arm.runs
                          if isinstance(r.get("deepest_h_accuracy"), (int, float))
                          and isinstance(r.get("infer_flops_per_token"), (int, float))]
                flops_ax.scatter([f for f, _ in paired], [a for _, a in paired], s=16, color=colour, alpha=0.6,
                                 linewidths=0)
            flops_ax.errorbar([flops_iv.mean], [accuracy.mean],
                              yerr=[[accuracy.half_width if accuracy.n >= 2 else 0.0]] * 2,
                              xerr=[[flops_iv.half_width if flops_iv.n >= 2 else 0.0]] * 2,
                              fmt=MARKERS[_size_rank(arm.size) % len(MARKERS)], color=colour, capsize=3,
                              label=label)
    levels = sorted({int(h) for a in arms for r in a.runs for h in (r.get("difficulty") or {})})
    acc_ax.set_xlabel("difficulty h (hops or terms)")
    acc_ax.set_xticks([h for h in levels if h > 0])
    acc_ax.set_ylim(0.0, 1.03)
    acc_ax.set_ylabel("accuracy (greedy next token = answer)")
    acc_ax.set_title("Accuracy by difficulty: mean, 95% t band, dots: seeds")
    steps_ax.set_xlabel("difficulty h (0 = every other token)")
    steps_ax.set_xticks(levels)
    steps_ax.set_ylabel("mean deployed extra steps")
    steps_ax.set_title("Where the adaptive methods spend steps")
    if not steps_ax.lines:
        steps_ax.text(0.5, 0.5, "no method of this study reports steps", ha="center", va="center",
                      transform=steps_ax.transAxes, color="0.4")
    flops_ax.set_xscale("log")
    flops_ax.set_ylim(0.0, 1.03)
    flops_ax.set_xlabel("measured inference FLOPs per token")
    flops_ax.set_ylabel("accuracy at the deepest h")
    flops_ax.set_title("Deepest-h accuracy against inference FLOPs (dots: seeds)")
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
    # one key for all three panels (an arm has one colour and line style everywhere), below them
    handles, labels = acc_ax.get_legend_handles_labels()
    bottom = (0.22 * legend_rows + 0.3) / (5.0 + 0.22 * legend_rows)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


# ---------------------------------------------------------------------------------------------------
# files


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (closed afterwards): what the files and the HTML page hold."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, figure_png(fig))
    return path


def _has(runs: Runs, key: str) -> bool:
    return any(not _missing(row.get(key)) for row in runs.ok)


def figures(runs: Runs) -> dict[str, Any]:
    """Every figure a folder's runs give, by file name, in report order: the Pareto plots of ``PLOTS`` (bits per
    byte only when some run reports it), then the learning curves and the preconditions along them."""
    out = {spec.filename: (lambda spec=spec: plot_figure(runs, spec)) for spec in PLOTS
           if not spec.optional or _has(runs, spec.y)}
    if any(r.get("curve") for r in runs.records):
        out[CURVES_PNG] = lambda: plot_curves(runs)
        pairs = precondition_pairs(arms_of(runs.records))
        if any(len(curve_comparison(a, b)) >= 2 for _, a, b in pairs):
            out[PRECONDITIONS_PNG] = lambda: plot_preconditions(runs)
    if has_difficulty(arms_of(runs.records)):
        out[DEPTH_PROBE_PNG] = lambda: plot_depth_probe(runs)
    return out


def render_pngs(runs: Runs) -> dict[str, bytes]:
    """The PNG bytes of every figure of :func:`figures`, by file name (each figure drawn once)."""
    return {name: figure_png(make()) for name, make in figures(runs).items()}


def make_plots(folder: str | os.PathLike, out: str | os.PathLike | None = None,
               pngs: dict[str, bytes] | None = None) -> list[pathlib.Path]:
    """The PNGs of :func:`figures` written into ``out`` (default: the folder); ``pngs``: already rendered."""
    runs = load_runs(folder)
    target = pathlib.Path(out) if out else runs.folder
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in (pngs if pngs is not None else render_pngs(runs)).items():
        write_bytes_atomic(target / name, data)
        paths.append(target / name)
    return paths
