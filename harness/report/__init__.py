"""Reports of a sweep folder: Pareto plots, the comparison table a paper prints, and one HTML page.

The package has one module per kind of output (docs/design.md, "Reports and tracking"): :mod:`.runs` loads
``runs.jsonl`` and aggregates seeds, :mod:`.tables` prints tables, :mod:`.plots` draws figures, :mod:`.html`
writes ``report.html``, :mod:`.style` gives every method one display name and one colour.

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
error bars of the 95% Student-t interval of that mean on the y axis, and on the x axis too where the x
value varies across seeds (measured inference FLOPs of adaptive methods). Frontiers go through these
means, never through single seeds.

* ``learning_curves.png``: the parallel validation loss recorded during training (result.json ``curve``)
  against training tokens and against measured training FLOPs, per arm: the mean over seeds and a 95%
  t band;
* ``preconditions.png``: the preconditions' paired differences (:func:`harness.claims.precondition_pairs`)
  along the same curves, mean and 95% band over the common seeds, with 0 marked: below it the
  precondition holds at that point. Both are written when some run has a curve.
* ``depth_probe.png``: only when runs carry metrics by difficulty (a ``synthetic:`` source, the study
  ``depth-probe``): accuracy against hops h per arm with 95% seed bands, mean deployed extra steps against h
  for the methods that report steps (h = 0 the filler), deepest-h accuracy against measured inference FLOPs.

``python -m harness table DIR [--format md|latex|csv] [--out FILE]`` prints (or writes) the table:
method, size, parameters, inference FLOPs/token (measured), perplexity, bits per byte ("–" for runs
recorded before it existed), mean extra steps where a method reports them, downstream scores where
present (one metric per task: acc_norm, else acc, else the first reported), and the number of seeds.
Values are means over seeds; perplexity, bits per byte and (where it varies across seeds) inference
FLOPs are printed as ``mean ± h`` (``$\\pm$`` in LaTeX), h the half-width of the mean's 95% Student-t
interval over seeds, left out for a single seed. The column "Δ loss vs vanilla" is the paired difference
with vanilla of the same size over their common seeds (:mod:`harness.stats`): mean ± 95% half-width and n.
The csv has the means in the plain columns and the half-widths in ``<column>_ci95`` columns (empty for a
single seed). The best mean of every quality column is marked: bold in md and
latex (the mean only, not its std), a ``best`` column naming the columns in csv. "Best" means lowest
for FLOPs, perplexities and bits per byte, highest for accuracies.

``python -m harness report DIR`` (and every sweep at its end) writes ``DIR/report.html``: one self-contained page
(plots as PNG data, CSS and a few lines of JavaScript inline, no network) with the study and its protocol
(``DIR/study.toml``), the preconditions and claims with their intervals (:mod:`harness.claims`), the figures, the
table with sortable columns, the per-token step analysis of the adaptive jobs and one row per job linking its
folder's files (:mod:`harness.report.html`).

All read only ``DIR/runs.jsonl`` (:mod:`harness.results`), so they work on a results folder without
checkpoints. Jobs of different match modes or budgets are never mixed: each gets its own table and
its own panel. Failed jobs are listed under the md and latex tables with their error.
"""

from __future__ import annotations

import os
import pathlib

from harness.claims import write_claims
from harness.core.errors import ReportError
from harness.core.io import write_bytes_atomic
from harness.report.html import REPORT_HTML, render_html, write_html
from harness.report.plots import (
    BPB_PNG,
    CURVES_PNG,
    DEPTH_PROBE_PNG,
    PARETO_PNG,
    PLOTS,
    PRECONDITIONS_PNG,
    TRAIN_PNG,
    PlotSpec,
    figures,
    make_plots,
    method_frontiers,
    pareto_front,
    plot_curves,
    plot_depth_probe,
    plot_figure,
    plot_points,
    plot_preconditions,
    render_pngs,
)
from harness.report.runs import CI_KEYS, Runs, aggregate, load_runs
from harness.report.style import display_name, method_colour
from harness.report.tables import FORMATTERS, TABLE_FILES, make_table, table_csv, table_latex, table_markdown


def write_reports(folder: str | os.PathLike) -> list[pathlib.Path]:
    """Plots, all three table formats, the claims report and report.html into ``folder`` (what a sweep does at
    its end); each figure is drawn once, for its PNG file and the page."""
    runs = load_runs(folder)
    pngs = render_pngs(runs)
    paths = make_plots(folder, pngs=pngs)
    for fmt, name in TABLE_FILES.items():
        path = runs.folder / name
        write_bytes_atomic(path, FORMATTERS[fmt](runs).encode("utf-8"))  # a reader never sees half a table
        paths.append(path)
    paths.append(write_claims(folder))
    paths.append(write_html(folder, runs=runs, pngs=pngs))
    return paths


__all__ = ["BPB_PNG", "CI_KEYS", "CURVES_PNG", "DEPTH_PROBE_PNG", "FORMATTERS", "PARETO_PNG", "PLOTS",
           "PRECONDITIONS_PNG", "REPORT_HTML", "TABLE_FILES", "TRAIN_PNG", "PlotSpec", "ReportError", "Runs",
           "aggregate", "display_name", "figures", "load_runs", "make_plots", "make_table", "method_colour",
           "method_frontiers", "pareto_front", "plot_curves", "plot_depth_probe", "plot_figure", "plot_points",
           "plot_preconditions", "render_html", "render_pngs", "table_csv", "table_latex", "table_markdown",
           "write_html", "write_reports"]
