"""report.html: one self-contained page per study, checked as text and in a real browser (headless Chromium);
and the plots' layout rules (ticks, labels, coincident points, frontiers, colours)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from harness import report
from harness.report import plots, style
from harness.results import ResultsStore
from tests.browser import Browser, find_chromium

ROOT = pathlib.Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "results" / "calibration" / "lr3e-3"
REFERENCE = ROOT / "results" / "reference"
STUDY = """# a synthetic study: every section of the page has something to show
description = "Synthetic sweep: vanilla at two sizes, PonderLM-2 and PonderLM-3 (two penalties) at pico, three seeds."
protocol = "tokens"
tokens = 10_240
seeds = 3
pipeline_check = true
set = ["train.batch_size=8"]

[[arms]]
method = "vanilla"
sizes = ["pico", "nano"]

[[arms]]
method = "ponderlm3"
vary = { compute_penalty = [0.01, 0.1] }
"""
# (method, variant, size) -> per-seed (val_loss, inference FLOPs/token, extra steps)
ARMS = {
    ("vanilla", "", "pico"): ([3.90, 3.95, 3.92], [1.8e6] * 3, None),
    ("vanilla", "", "nano"): ([3.80, 3.86, 3.83], [3.1e6] * 3, None),
    ("ponderlm2", "K=3", "pico"): ([3.70, 3.74, 3.72], [5.2e6] * 3, 3.0),
    # exactly on PonderLM-2's point (same loss, same FLOPs): the plots must keep both visible
    ("ponderlm3", "compute_penalty=0.01", "pico"): ([3.70, 3.74, 3.72], [5.2e6] * 3, 2.9),
    ("ponderlm3", "compute_penalty=0.1", "pico"): ([3.78, 3.80, 3.79], [2.9e6, 3.0e6, 3.1e6], 1.2),
}


def _curve(final: float) -> list[dict[str, float]]:
    return [{"step": s, "tokens": 1024 * s, "train_flops": 1e9 * s, "val_loss": final + 2.0 / s} for s in (1, 2, 5, 10)]


def make_sweep(folder: pathlib.Path) -> pathlib.Path:
    """A sweep folder as `harness sweep` leaves it, without training: runs.jsonl, study.toml, job folders."""
    import math

    store = ResultsStore(folder)
    for (method, variant, size), (losses, flops, steps) in ARMS.items():
        for seed, (loss, f) in enumerate(zip(losses, flops)):
            job_id = f"{method}-{size}-{seed}-{abs(hash(variant)) % 1000:03d}"
            record = {"job_id": job_id, "status": "ok", "method": method, "size": size, "seed": seed,
                      "params": 1.1e6 if size == "pico" else 1.7e6, "val_loss": loss, "val_ppl": math.exp(loss),
                      "val_bits_per_byte": loss / 2.4, "infer_flops_per_token": f, "train_flops": 1e10,
                      "train_tokens": 10_240, "budget": 1e10, "wall_seconds": 12.0, "curve": _curve(loss),
                      "val_window_loss": [loss + 0.01 * i for i in range(4)],
                      "config": {"latent_steps": 3, "prune_threshold": 1e-4} if method.startswith("ponderlm") else {},
                      "tags": {"match": "tokens", "sweep_budget": 1e10, **({"variant": variant} if variant else {})}}
            if steps is not None:
                record["mean_extra_steps"] = steps
                record["jacobi_gap"] = 1e-5
            if method == "ponderlm3":
                record["token_analysis"] = {"spearman_steps_nll": 0.21 + 0.01 * seed, "spearman_steps_nll_pvalue": 1e-5,
                                            "rare_mean_steps": steps + 0.3, "frequent_mean_steps": steps - 0.2,
                                            "rare_vs_frequent_pvalue": 0.002,
                                            "step_histogram": {"0": 100, "1": 300, "2": 250, "3": 350}}
            assert store.append(record)
            job_dir = store.job_dir(job_id)
            job_dir.mkdir(parents=True)
            (job_dir / "result.json").write_text(json.dumps(record))
            (job_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 7.0}) + "\n")
    assert store.append({"job_id": "mor-pico-0", "status": "failed", "method": "mor", "size": "pico", "seed": 0,
                         "budget": 1e10, "tags": {"match": "tokens", "sweep_budget": 1e10},
                         "error": "TrainingError: loss became nan at step 3 <script>alert(1)</script>"})
    (folder / "study.toml").write_text(STUDY)
    return folder


@pytest.fixture
def sweep_dir(tmp_path):
    return make_sweep(tmp_path / "synthetic")


@pytest.fixture(params=["calibration", "reference"])
def calibration_dir(tmp_path, request):
    """A copy of a committed sweep (results/calibration/lr3e-3, with learning curves; results/reference, the
    `paper` study), without checkpoints, plots or page."""
    source = {"calibration": CALIBRATION, "reference": REFERENCE}[request.param]
    if not (source / "runs.jsonl").exists():
        pytest.skip(f"{source} is not in this checkout")
    target = tmp_path / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("jobs", "checkpoint", "*.png", "report.html"))
    return target


# ---------------------------------------------------------------------------------------------------
# the page as text


def test_page_is_self_contained_and_holds_every_section(sweep_dir):
    paths = report.write_reports(sweep_dir)
    page = (sweep_dir / report.REPORT_HTML).read_text(encoding="utf-8")
    assert sweep_dir / report.REPORT_HTML in paths
    # no network: every image is inline PNG data, no stylesheet or script is loaded, links go to job files only
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert len(sources) == 5 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'<(link|script)[^>]+(href|src)=', page) and "http://" not in page and "https://" not in page
    hrefs = [h for h in re.findall(r'href="([^"#][^"]*)"', page)]
    assert hrefs and all(h.startswith("jobs/") and (sweep_dir / h).exists() for h in hrefs)
    # the study and its protocol, the pipeline-check banner, the verdicts with their intervals
    assert "Synthetic sweep: vanilla at two sizes" in page and "10,240" in page and 'id="pipeline-check"' in page
    for claim in ("P1", "P2", "P3", "C0", "C1", "C2", "C3", "C4", "C5"):
        assert f'id="{claim}"' in page
    assert "mean [95% t interval], n seeds" in page and "window bootstrap 95%" in page  # claims' evidence tables
    assert "ponderlm3 [compute_penalty=0.01] @pico − ponderlm2 [K=3] @pico" in page
    # the table (one row per arm), the per-token analysis (one row per PonderLM-3 job), one row per job
    assert page.count('<table class="sortable results"') == 1
    assert len(re.findall(r"<tr><td data-sort=\"[^\"]*\" class=\"\"><span class=\"swatch\"", page)) == len(ARMS)
    tokens = page.split('id="token-analysis"')[1].split("</table>")[0]
    assert tokens.count("<tr>") == 1 + 6 and "0.210" in tokens and "&lt; 0.001" in tokens
    jobs = page.split('id="job-table"')[1].split("</table>")[0]
    assert jobs.count("<tr>") == 1 + 3 * len(ARMS) + 1 and "result.json" in jobs and "metrics.jsonl" in jobs
    # autoescaped: an error message is text, never markup
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page


def test_report_command_writes_the_page(sweep_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness", "report", str(sweep_dir), "--out",
                          str(tmp_path / "elsewhere" / "page.html")], capture_output=True, text=True,
                         env={**os.environ, "MPLBACKEND": "Agg"}, timeout=300)
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "elsewhere" / "page.html").read_text(encoding="utf-8")
    assert "wrote" in out.stdout and 'href="../synthetic/jobs/' in page  # links relative to where the page is
    out = subprocess.run([sys.executable, "-m", "harness", "report", str(tmp_path / "nothing")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("error: no runs.jsonl in")


# ---------------------------------------------------------------------------------------------------
# the page in a real browser

CHROMIUM = find_chromium()
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (apt-get install chromium, as .ci/run does, or set "
    "HARNESS_CHROMIUM): the real-browser check of report.html is skipped")


def _check_in_browser(folder: pathlib.Path, screenshot: pathlib.Path) -> dict:
    """Open folder/report.html in headless Chromium: no console errors, every image decoded, no request that leaves
    the file system; a full-page screenshot. Returns what the page's tables hold."""
    with Browser(CHROMIUM) as browser:
        browser.open((folder / report.REPORT_HTML).resolve().as_uri())
        assert browser.errors() == []
        leaving = [u for u in browser.requests() if not u.startswith(("file:", "data:"))]
        assert leaving == []
        images = browser.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        assert images and all(complete and width > 0 for complete, width, _ in images), images
        tables = browser.evaluate("""(() => {
            const rows = sel => Array.from(document.querySelectorAll(sel)).map(r => r.cells[0].textContent.trim());
            return {results: rows("table.results tbody tr"), jobs: rows("#job-table tbody tr"),
                    verdicts: rows("#verdicts tbody tr"), tokens: rows("#token-analysis tbody tr")};
        })()""")
        # sorting: a click on "Perplexity" orders the rows by their mean, a second click reverses them
        order = browser.evaluate("""(() => {
            const table = document.querySelector("table.results");
            const column = Array.from(table.tHead.rows[0].cells).findIndex(th => th.textContent === "Perplexity");
            const values = () => Array.from(table.tBodies[0].rows).map(r => parseFloat(r.cells[column].dataset.sort));
            table.tHead.rows[0].cells[column].click();
            const up = values();
            table.tHead.rows[0].cells[column].click();
            return [up, values()];
        })()""")
        assert order[0] == sorted(order[0]) and order[1] == sorted(order[1], reverse=True)
        png = browser.screenshot()
        assert browser.errors() == []
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 50_000
    screenshot.write_bytes(png)
    return tables


@needs_browser
def test_synthetic_sweep_report_opens_in_chromium(sweep_dir):
    report.write_reports(sweep_dir)
    tables = _check_in_browser(sweep_dir, sweep_dir / "report.png")
    assert sorted(tables["results"]) == sorted(style.display_name(m, v) for m, v, _ in ARMS)
    assert len(tables["jobs"]) == 3 * len(ARMS) + 1 and len(tables["tokens"]) == 6
    assert [v.split()[0] for v in tables["verdicts"]] == ["P1", "P2", "P3", "C0", "C1", "C2", "C3", "C4", "C5"]


@needs_browser
def test_calibration_report_opens_in_chromium(calibration_dir):
    """A real sweep's folder (copied); the screenshot goes to HARNESS_REPORT_SCREENSHOT_<NAME> when set (how
    results/reference/report.png is made: HARNESS_REPORT_SCREENSHOT_REFERENCE), else beside the copy."""
    report.write_reports(calibration_dir)
    name = f"HARNESS_REPORT_SCREENSHOT_{calibration_dir.name.upper().replace('-', '_')}"
    shot = pathlib.Path(os.environ.get(name) or calibration_dir / "report.png")
    tables = _check_in_browser(calibration_dir, shot)
    records = list(ResultsStore(calibration_dir).latest().values())
    arms = {(r["method"], r["tags"].get("variant"), r["size"]) for r in records}  # a row per arm, seeds together
    assert sorted(tables["results"]) == sorted(style.display_name(method, variant) for method, variant, _ in arms)
    assert sorted(tables["jobs"]) == sorted(r["job_id"] for r in records)


# ---------------------------------------------------------------------------------------------------
# plot layout


def _boxes(texts, renderer):
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text()]


def _no_overlap(boxes) -> list[tuple[str, str]]:
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_pareto_plots_have_no_colliding_text_and_keep_coincident_points_visible(sweep_dir, which):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection

    runs = report.load_runs(sweep_dir)
    fig = report.plot_figure(runs, report.PLOTS[which])
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                labels = _boxes(axis.get_ticklabels(which="both"), renderer)
                assert _no_overlap(labels) == [], [t for t, _ in labels]
            annotations = _boxes([t for t in ax.texts], renderer)
            assert _no_overlap(annotations) == []
            # every marker drawn once, and no two markers at the same place on screen (dodged)
            centres = [tuple(c.get_offset_transform().transform(c.get_offsets())[0].round(1))
                       for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets()) == 1
                       and c.get_sizes()[0] > 0]
            assert len(centres) == len(ARMS) and len(set(centres)) == len(centres)
            legend = ax.get_legend()
            if legend is not None:
                lines = {t.get_text(): h.get_linestyle() for t, h in zip(legend.get_texts(), legend.legend_handles)}
                # a frontier line only where one is drawn: vanilla has two points, ponderlm2 one
                if report.PLOTS[which].frontier:
                    assert lines["vanilla"] == "-" and lines["ponderlm2"] == "None"
                    assert any(line.get_gid() == "frontier:all" for line in ax.lines)
                else:
                    assert all(style != "-" for name, style in lines.items() if name in ("vanilla", "ponderlm2"))
    finally:
        plt.close(fig)


def test_log_ticks_never_collide_on_a_narrow_axis():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    try:
        ax.set_xscale("log")
        ax.set_xlim(6.5e5, 1.3e6)  # the span that printed "700k800k900k1M" before
        ticks = plots.fit_log_ticks(fig, ax, "x")
        fig.canvas.draw()
        labels = _boxes(ax.xaxis.get_ticklabels(which="both"), fig.canvas.get_renderer())
        assert len(ticks) >= 2 and _no_overlap(labels) == []
    finally:
        plt.close(fig)


def test_one_colour_and_one_name_per_method_everywhere(sweep_dir):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    runs = report.load_runs(sweep_dir)
    seen: dict[str, set[str]] = {}
    for fig in (report.plot_figure(runs, report.PLOTS[0]), report.plot_curves(runs)):
        try:
            for ax in fig.axes:
                for line in ax.lines:
                    label = line.get_label()
                    method = label.split(" ")[0].split("[")[0]
                    if method in {m for m, _, _ in ARMS}:
                        seen.setdefault(method, set()).add(to_hex(line.get_color()))
        finally:
            plt.close(fig)
    assert seen and all(colours == {style.method_colour(m).lower()} for m, colours in seen.items())
    assert style.method_colour("ponderlm3") != style.method_colour("ponderlm2")
    table = report.make_table(sweep_dir, "md")
    assert "ponderlm3 [compute_penalty=0.1]" in table  # the table's name is the plots' name
