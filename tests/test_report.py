"""Reports from a runs.jsonl alone: Pareto plots, and tables with the best value of each column marked."""

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from harness import report
from harness.results import ResultsStore

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _record(method, size, seed, ppl, flops, params, *, steps=None, downstream=None, match="train-flops",
            budget=1e12, variant=None, job_id=None):
    tags = {"match": match, "sweep_budget": budget, **({"variant": variant} if variant else {})}
    record = {"job_id": job_id or f"{method}-{size}-{seed}-{match}-{variant}", "status": "ok", "method": method,
              "size": size, "seed": seed, "params": params, "val_ppl": ppl, "val_loss": 0.0,
              "infer_flops_per_token": flops, "train_flops": budget * 1.004, "train_tokens": 1000, "budget": budget,
              "tags": tags}
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
        _record("vanilla", "pico", 0, 52.0, 6.0e5, 5.6e5, downstream=scores(0.30, 0.10, 900.0)),
        _record("vanilla", "pico", 1, 50.0, 6.0e5, 5.6e5, downstream=scores(0.32, 0.12, 800.0)),
        _record("vanilla", "nano", 0, 45.0, 1.3e6, 1.2e6, downstream=scores(0.34, 0.15, 700.0)),
        _record("ponderlm3", "pico", 0, 41.5, 1.1e6, 5.7e5, steps=1.4, downstream=scores(0.36, 0.14, 650.0),
                variant="compute_penalty=0.01"),
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
    assert names == {report.PARETO_PNG, report.TRAIN_PNG, *report.TABLE_FILES.values()}
    for name in (report.PARETO_PNG, report.TRAIN_PNG):
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
