"""Reports from a runs.jsonl alone: Pareto plots, and tables with the best value of each column marked."""

import csv
import io
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from harness import report
from harness.claims import CLAIMS_FILE
from harness.results import ResultsStore

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _record(method, size, seed, ppl, flops, params, *, steps=None, downstream=None, match="train-flops",
            budget=1e12, variant=None, job_id=None, bpb=None, tokens=1000):
    tags = {"match": match, "sweep_budget": budget, **({"variant": variant} if variant else {})}
    record = {"job_id": job_id or f"{method}-{size}-{seed}-{match}-{variant}", "status": "ok", "method": method,
              "size": size, "seed": seed, "params": params, "val_ppl": ppl, "val_loss": 0.0,
              "infer_flops_per_token": flops, "train_flops": budget * 1.004, "train_tokens": tokens, "budget": budget,
              "tags": tags}
    if bpb is not None:
        record["val_bits_per_byte"] = bpb
    if method == "ponderlm3":  # what train.py records: the model config claims.md reads K and tau from
        record["config"] = {"latent_steps": 3, "prune_threshold": 0.05}
    if steps is not None:
        record["mean_extra_steps"] = steps
    if downstream is not None:
        record["downstream"] = downstream
    return record


@pytest.fixture
def runs_dir(tmp_path):
    """A results folder holding only runs.jsonl: two seeds of some jobs, downstream scores, a failure."""
    def scores(acc, lam_acc, word_ppl):
        return {"arc_easy": {"acc": acc - 0.02, "acc_norm": acc, "acc_stderr": 0.01, "n_docs": 50},
                "lambada": {"acc": lam_acc, "perplexity": 2 * word_ppl, "flops": 1e9},
                "corpus_ppl": {"word_perplexity": word_ppl, "bits_per_byte": 1.5}}

    records = [
        _record("vanilla", "pico", 0, 52.0, 6.0e5, 5.6e5, downstream=scores(0.30, 0.10, 900.0), bpb=1.30),
        _record("vanilla", "pico", 1, 50.0, 6.0e5, 5.6e5, downstream=scores(0.32, 0.12, 800.0), bpb=1.20),
        _record("vanilla", "nano", 0, 45.0, 1.3e6, 1.2e6, downstream=scores(0.34, 0.15, 700.0)),
        _record("ponderlm3", "pico", 0, 41.5, 1.1e6, 5.7e5, steps=1.4, downstream=scores(0.36, 0.14, 650.0),
                variant="compute_penalty=0.01", bpb=1.05),
        _record("ponderlm3", "pico", 0, 43.0, 0.8e6, 5.7e5, steps=0.6, downstream=scores(0.33, 0.13, 720.0),
                variant="compute_penalty=0.1"),
        _record("looped", "pico", 0, 47.0, 1.2e6, 5.6e5, downstream=scores(0.31, 0.11, 760.0)),
        _record("vanilla", "pico", 0, 49.0, 6.0e5, 5.6e5, match="tokens"),
        _record("pause", "pico", 0, 60.0, 1.2e6, 5.6e5, match="tokens"),
        {"job_id": "failed-one", "status": "failed", "method": "mor", "size": "pico", "seed": 0, "budget": 1e12,
         "tags": {"match": "train-flops", "sweep_budget": 1e12}, "error": "TrainingError: loss became nan"},
    ]
    store = ResultsStore(tmp_path)
    for r in records:
        assert store.append(r)
    with open(store.path, "ab") as handle:
        handle.write(b'{"job_id": "torn", "sta')  # a sweep killed mid-write
    return tmp_path


def test_pareto_front_keeps_only_undominated_points():
    points = [(1, 50), (2, 40), (3, 45), (4, 30), (5, 30), (0.5, 60)]
    assert report.pareto_front(points) == [(0.5, 60), (1, 50), (2, 40), (4, 30)]


def test_markdown_marks_the_best_of_each_column_and_separates_match_modes(runs_dir):
    text = report.make_table(runs_dir, "md")
    assert text.count("match: train-flops") == 1 and text.count("match: tokens") == 1
    train_part = text.split("match: tokens")[0]
    lines = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): line
             for line in train_part.splitlines() if line.startswith("| ") and "---" not in line}
    best_ppl = lines["ponderlm3 [compute_penalty=0.01]/pico"]
    assert "**41.50**" in best_ppl  # lowest perplexity
    assert "**36.0**" in best_ppl  # highest arc_easy acc_norm, shown as a percentage
    assert "**650.00**" in best_ppl  # lowest corpus word perplexity: lower is better for perplexities
    assert "**600k**" in lines["vanilla/pico"]  # lowest inference FLOPs
    assert "51.00" in lines["vanilla/pico"] and "| 2 |" in lines["vanilla/pico"]  # two seeds averaged
    assert "**15.0**" in lines["vanilla/nano"]  # highest lambada accuracy
    assert "Mean extra steps" in train_part and "1.40" in best_ppl
    assert "Failed jobs" in text and "mor/pico seed 0: TrainingError: loss became nan" in text
    header = next(line for line in train_part.splitlines() if line.startswith("| Method"))
    assert "arc_easy acc_norm" in header and "lambada acc" in header and "lambada perplexity" not in header
    assert "corpus_ppl word_perplexity" in header


def test_latex_and_csv_mark_the_best(runs_dir):
    latex = report.make_table(runs_dir, "latex")
    assert latex.count(r"\begin{table}") == 2 and r"\textbf{41.50}" in latex
    assert r"ponderlm3 [compute\_penalty=0.01]" in latex and r"\toprule" in latex and r"\caption{" in latex
    rows = list(csv.DictReader(io.StringIO(report.make_table(runs_dir, "csv"))))
    assert len(rows) == 7  # one per (match, method, variant, size); seeds averaged
    best = {(r["match"], r["method"], r["variant"], r["size"]): r["best"].split(";") for r in rows}
    assert "val_ppl" in best[("train-flops", "ponderlm3", "compute_penalty=0.01", "pico")]
    assert "val_ppl" in best[("tokens", "vanilla", "", "pico")]  # best within its own match mode
    vanilla = next(r for r in rows if r["method"] == "vanilla" and r["size"] == "pico" and r["match"] == "train-flops")
    assert float(vanilla["val_ppl"]) == pytest.approx(51.0) and vanilla["seeds"] == "2"


def test_plots_and_tables_are_written_from_runs_jsonl_alone(runs_dir):
    paths = report.write_reports(runs_dir)
    names = {p.name for p in paths}
    # changed by design: claims.md (harness.claims), as some runs report bits per byte its Pareto plot, and the page
    assert names == {report.PARETO_PNG, report.TRAIN_PNG, report.BPB_PNG, *report.TABLE_FILES.values(), CLAIMS_FILE,
                     report.REPORT_HTML}
    for name in (report.PARETO_PNG, report.TRAIN_PNG, report.BPB_PNG):
        data = (runs_dir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
    assert "**41.50**" in (runs_dir / "table.md").read_text()


def test_cli_commands_and_one_line_errors(runs_dir, tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    out = subprocess.run([sys.executable, "-m", "harness", "table", str(runs_dir), "--format", "csv"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("match,budget,method")
    plots = tmp_path / "plots"
    out = subprocess.run([sys.executable, "-m", "harness", "plot", str(runs_dir), "--out", str(plots)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (plots / report.PARETO_PNG).exists() and (plots / report.TRAIN_PNG).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run([sys.executable, "-m", "harness", "table", str(empty)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: no runs.jsonl in")
    assert len(out.stderr.strip().splitlines()) == 1


def test_only_failed_jobs_is_a_clear_error(tmp_path):
    ResultsStore(tmp_path).append({"job_id": "x", "status": "failed", "method": "vanilla", "error": "E: boom"})
    with pytest.raises(report.ReportError, match="no finished job.*1 failed"):
        report.make_table(tmp_path)
    json.loads((tmp_path / "runs.jsonl").read_text())  # the store itself is intact


# ---------------------------------------------------------------------------------------------------
# several seeds per arm: mean ± 95% half-width, bits per byte, error bars, frontiers through the means

PPL = {("vanilla", "pico"): [50.0, 52.0, 57.0], ("ponderlm3", "pico"): [40.0, 41.0, 48.0],
       ("ponderlm3", "nano"): [30.0, 50.0, 55.0]}
BPB = {("vanilla", "pico"): [1.20, 1.25, 1.30], ("ponderlm3", "pico"): [1.0, 1.1, 1.2],
       ("ponderlm3", "nano"): [0.8, 0.9, 1.3]}
FLOPS = {("vanilla", "pico"): [6.0e5] * 3, ("ponderlm3", "pico"): [1.0e6, 1.1e6, 1.2e6],
         ("ponderlm3", "nano"): [2.0e6] * 3}


@pytest.fixture
def seeds_dir(tmp_path):
    """Three seeds per arm, and one older single-seed record without val_bits_per_byte."""
    store = ResultsStore(tmp_path)
    for (method, size), ppls in PPL.items():
        for seed, (ppl, bpb, flops) in enumerate(zip(ppls, BPB[method, size], FLOPS[method, size])):
            assert store.append(_record(method, size, seed, ppl, flops, 5.6e5 if size == "pico" else 1.2e6,
                                        bpb=bpb, steps=1.0 if method == "ponderlm3" else None))
    assert store.append(_record("vanilla", "nano", 0, 45.0, 1.3e6, 1.2e6))  # recorded before bits per byte
    return tmp_path


T95_3 = 4.302653 / math.sqrt(3)  # t(0.975, 2) / sqrt(3): the 95% half-width of a 3-seed mean is T95_3 x sd


def _pm(values, digits):
    return f"{statistics.fmean(values):.{digits}f} ± {T95_3 * statistics.stdev(values):.{digits}f}"


def _md_rows(text):
    return {line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}


def test_markdown_shows_mean_and_95_half_width_over_seeds_bits_per_byte_and_seeds(seeds_dir):
    text = report.make_table(seeds_dir, "md")
    rows = _md_rows(text)
    header = rows.pop("Method/Size")
    assert header == ["Method", "Size", "Params", "Inference FLOPs/token", "Perplexity", "Bits/byte",
                      "Δ loss vs vanilla (paired)", "Mean extra steps", "Seeds"]
    cell = {name: dict(zip(header, cells)) for name, cells in rows.items()}
    assert cell["vanilla/pico"]["Perplexity"] == _pm(PPL["vanilla", "pico"], 2) == "53.00 ± 8.96"
    assert cell["vanilla/pico"]["Bits/byte"] == _pm(BPB["vanilla", "pico"], 3) == "1.250 ± 0.124"
    assert cell["vanilla/pico"]["Inference FLOPs/token"] == "**600k**"  # the same every seed: no ±, still best
    assert cell["vanilla/pico"]["Seeds"] == "3"
    # best marks the mean only; inference FLOPs of an adaptive method vary across seeds, so they get a std
    assert cell["ponderlm3/pico"]["Perplexity"] == "**43.00** ± 10.83"
    assert cell["ponderlm3/pico"]["Bits/byte"] == "1.100 ± 0.248"
    assert cell["ponderlm3/pico"]["Inference FLOPs/token"] == "1.1M ± 248k"
    assert cell["ponderlm3/nano"]["Bits/byte"] == "**1.000** ± 0.657"  # lowest mean bits per byte
    # paired with vanilla at the same size over their common seeds (every val_loss is 0 here)
    assert cell["ponderlm3/pico"]["Δ loss vs vanilla (paired)"] == "+0.000 ± 0.000 (n=3)"
    assert cell["ponderlm3/nano"]["Δ loss vs vanilla (paired)"] == "+0.000 (n=1)"  # one common seed: no ±
    # one seed: no std; no val_bits_per_byte in the record: "–"
    assert cell["vanilla/nano"]["Perplexity"] == "45.00" and cell["vanilla/nano"]["Bits/byte"] == "–"
    assert cell["vanilla/nano"]["Seeds"] == "1"
    assert "Mean ± half-width of its 95% Student-t interval over seeds" in text


def test_latex_and_csv_show_95_half_widths_over_seeds(seeds_dir):
    latex = report.make_table(seeds_dir, "latex")
    assert r"\textbf{43.00} $\pm$ 10.83" in latex and r"53.00 $\pm$ 8.96" in latex and "± " not in latex
    assert r"1.1M $\pm$ 248k" in latex and "Bits/byte" in latex
    rows = {(r["method"], r["size"]): r for r in csv.DictReader(io.StringIO(report.make_table(seeds_dir, "csv")))}
    vanilla, ponder, old = rows["vanilla", "pico"], rows["ponderlm3", "pico"], rows["vanilla", "nano"]
    assert float(vanilla["val_ppl"]) == pytest.approx(53.0)
    assert float(vanilla["val_ppl_ci95"]) == pytest.approx(T95_3 * statistics.stdev(PPL["vanilla", "pico"]), rel=1e-5)
    assert float(vanilla["val_bits_per_byte"]) == pytest.approx(1.25)
    assert float(vanilla["val_bits_per_byte_ci95"]) == pytest.approx(T95_3 * 0.05, rel=1e-5)
    assert float(ponder["infer_flops_per_token_ci95"]) == pytest.approx(T95_3 * 1e5, rel=1e-5)
    assert float(ponder["delta_loss_vs_vanilla"]) == 0.0 and ponder["delta_loss_vs_vanilla_n"] == "3"
    assert old["val_ppl_ci95"] == "" and old["val_bits_per_byte"] == "" and old["seeds"] == "1"
    assert "val_ppl" in ponder["best"].split(";") and "val_bits_per_byte" in rows["ponderlm3", "nano"]["best"]


def test_frontier_goes_through_the_means(seeds_dir):
    runs = report.load_runs(seeds_dir)
    points = report.plot_points(report.aggregate(runs.ok), report.PLOTS[0])
    assert len(points) == 4  # one per (method, variant, size), not one per seed
    ponder = points[(points["method"] == "ponderlm3") & (points["size"] == "pico")].iloc[0]
    assert ponder["y"] == pytest.approx(43.0) and ponder["x"] == pytest.approx(1.1e6)
    assert ponder["yerr"] == pytest.approx(T95_3 * statistics.stdev(PPL["ponderlm3", "pico"]))
    assert ponder["xerr"] == pytest.approx(T95_3 * 1e5)
    vanilla = points[(points["method"] == "vanilla") & (points["size"] == "pico")].iloc[0]
    assert vanilla["xerr"] == 0 and vanilla["yerr"] > 0  # FLOPs equal every seed: no x bar
    fronts = report.method_frontiers(points)
    # nano's best seed (30 at 2M FLOPs) would be on a frontier of single seeds; its mean (45) is dominated
    assert report.pareto_front([(2.0e6, 30.0), (1.0e6, 40.0)]) == [(1.0e6, 40.0), (2.0e6, 30.0)]
    assert fronts["ponderlm3"] == [pytest.approx((1.1e6, 43.0))]
    assert fronts["vanilla"] == [pytest.approx((6.0e5, 53.0)), pytest.approx((1.3e6, 45.0))]


def test_figures_draw_error_bars_and_frontiers_of_means(seeds_dir):
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    runs = report.load_runs(seeds_dir)
    fig = report.plot_figure(runs, report.PLOTS[0])
    try:
        ax = fig.axes[0]
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 3  # the three arms with three seeds; the single-seed one has none
        y_spans = sorted(tuple(sorted(seg[:, 1])) for c in bars if c.has_yerr for seg in c.lines[2][-1].get_segments())
        half = T95_3 * statistics.stdev(PPL["ponderlm3", "pico"])
        assert any(lo == pytest.approx(43.0 - half) and hi == pytest.approx(43.0 + half) for lo, hi in y_spans)
        assert sum(c.has_xerr for c in bars) == 1  # only ponderlm3/pico's FLOPs vary across seeds
        frontier = {line.get_gid(): list(zip(line.get_xdata(), line.get_ydata())) for line in ax.lines}
        assert frontier["frontier:ponderlm3"] == [pytest.approx((1.1e6, 43.0))]
    finally:
        plt.close(fig)
    bpb = report.plot_figure(runs, report.PLOTS[2])
    try:
        ax = bpb.axes[0]
        assert "bits per byte" in ax.get_ylabel() and "1 point(s) lacking" in ax.get_title()
        assert len([c for c in ax.containers if isinstance(c, ErrorbarContainer)]) == 3
    finally:
        plt.close(bpb)


def test_bits_per_byte_plot_only_when_some_run_has_it(seeds_dir, tmp_path):
    names = {p.name for p in report.make_plots(seeds_dir, tmp_path / "with")}
    assert names == {report.PARETO_PNG, report.TRAIN_PNG, report.BPB_PNG}
    old = tmp_path / "old"
    store = ResultsStore(old)
    assert store.append(_record("vanilla", "pico", 0, 50.0, 6.0e5, 5.6e5))
    assert {p.name for p in report.make_plots(old)} == {report.PARETO_PNG, report.TRAIN_PNG}
    text = report.make_table(old, "md")
    assert "| Bits/byte |" in text and "| 50.00 | – | 1 |" in text


def test_tokens_caption_says_same_tokens_and_gives_the_count(tmp_path):
    store = ResultsStore(tmp_path / "one")
    for method, size in (("vanilla", "pico"), ("pause", "pico"), ("vanilla", "nano")):
        assert store.append(_record(method, size, 0, 50.0, 6.0e5, 5.6e5, match="tokens", tokens=262_144_000))
    text = report.make_table(tmp_path / "one", "md")
    assert "every method trained on the same 262M tokens" in text and "reference rung" in text
    store = ResultsStore(tmp_path / "per_size")
    for method, size, tokens in (("vanilla", "pico", 1000), ("pause", "pico", 1000), ("vanilla", "nano", 4000)):
        assert store.append(_record(method, size, 0, 50.0, 6.0e5, 5.6e5, match="tokens", tokens=tokens))
    text = report.make_table(tmp_path / "per_size", "md")
    assert "at each size every method trained on the same tokens" in text and "1k at pico, 4k at nano" in text


def _probed(method, seed, acc, flops, variant=None, steps=None):
    record = _record(method, "pico", seed, 40.0 - seed, flops, 5.6e5, variant=variant)
    table = {"0": {"n": 900, "accuracy": 0.3, "nll": 4.0},
             **{str(h): {"n": 30, "accuracy": acc + 0.1 * (3 - h), "nll": 1.0} for h in (1, 2, 3)}}
    if steps is not None:
        for h in range(4):
            table[str(h)]["mean_steps"] = steps + 0.5 * h
    record.update(difficulty=table, difficulty_max_h=3, deepest_h_accuracy=acc)
    return record


def test_depth_probe_plot_only_when_runs_carry_difficulty_metrics(runs_dir, tmp_path):
    assert report.DEPTH_PROBE_PNG not in report.figures(report.load_runs(runs_dir))  # plain runs: none
    probe = tmp_path / "probe"
    store = ResultsStore(probe)
    for seed in range(3):
        assert store.append(_probed("vanilla", seed, 0.1 + 0.01 * seed, 1e6))
        assert store.append(_probed("ponderlm3", seed, 0.4 + 0.01 * seed, 5e6, "K=3", steps=0.5 + 0.1 * seed))
    paths = {p.name for p in report.make_plots(probe)}
    assert report.DEPTH_PROBE_PNG in paths
    assert (probe / report.DEPTH_PROBE_PNG).read_bytes().startswith(PNG_SIGNATURE)
