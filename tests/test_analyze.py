"""``python -m harness analyze``: steps against NLL, frequent tokens, rare vs frequent, errors."""

import json

import numpy as np
import pytest
from scipy import stats

from harness.analyze import (
    PLOT_FILE,
    SUMMARY_FILE,
    TABLE_FILE,
    TokenRecords,
    analyze,
    frequency_groups,
    load_records,
    nll_bins,
)
from harness.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_records(folder, token, nll, steps):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / "tokens.npz", token=np.asarray(token, np.int32),
                        nll=np.asarray(nll, np.float32), steps=np.asarray(steps, np.int16))
    return folder


def zipf_records(n=20000, vocab=400, seed=0, direction=1.0, noise=0.5):
    """Zipf-distributed tokens whose NLL grows with rarity; steps rise with NLL (or fall: direction<0)."""
    rng = np.random.default_rng(seed)
    probs = 1.0 / np.arange(1, vocab + 1)
    probs /= probs.sum()
    token = rng.choice(vocab, size=n, p=probs)
    nll = -np.log(probs[token]) + rng.normal(0.0, noise, n)
    quantile = stats.rankdata(direction * nll) / n
    steps = np.minimum((quantile * 4).astype(int), 3)  # 0..3, monotone in NLL
    return token, nll, steps


@pytest.fixture(scope="module")
def ponderlm3_job(tmp_path_factory, small_corpus):
    """A tiny trained PonderLM-3 job (K=2) with its evaluation records."""
    from harness.data import DataConfig
    from harness.job import Job, TrainConfig
    from harness.train import train_job

    folder = tmp_path_factory.mktemp("ponderlm3_job")
    job = Job(method="ponderlm3", budget=5e9, size="pico", model={"latent_steps": 2, "compute_penalty": 0.05},
              train=TrainConfig(seq_len=32, batch_size=4, eval_tokens=2048),
              data=DataConfig(source=small_corpus, vocab_size=512))
    train_job(job, folder, progress=False)
    return folder


def test_tiny_ponderlm3_job_end_to_end(ponderlm3_job, capsys):
    assert main(["analyze", str(ponderlm3_job), "--top", "8"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((ponderlm3_job / SUMMARY_FILE).read_text())
    records = load_records(ponderlm3_job)
    assert summary["n_tokens"] == len(records) == 2016  # 63 windows of 32 targets in 2048 eval tokens
    assert summary["method"] == "ponderlm3" and summary["latent_steps"] == 2
    assert summary["mean_steps"] == pytest.approx(records.steps.mean())
    assert 0 <= summary["max_steps"] <= 2
    rho = summary["spearman_steps_nll"]
    if records.steps.min() == records.steps.max():  # a short run keeps every step (see models/ponderlm3.py)
        assert rho["rho"] is None and "same value" in rho["reason"]
        assert "undefined" in printed and "nan" not in printed.lower()
        assert "did not adapt" in summary["note"]
    else:
        assert -1 <= rho["rho"] <= 1
    # the table: decoded text, counts in order, the frequent tokens' stats recomputed from the records
    top = summary["top_tokens"]
    assert len(top) == 8 and summary["tokens_decoded"]
    assert [r["count"] for r in top] == sorted((r["count"] for r in top), reverse=True)
    first = records.token == top[0]["token"]
    assert top[0]["count"] == first.sum()
    assert top[0]["nll_mean"] == pytest.approx(records.nll[first].mean())
    assert top[0]["text"] in printed and "Rare against frequent" in printed
    comparison = summary["rare_vs_frequent"]
    assert comparison["rare"]["max_count"] <= comparison["frequent"]["min_count"]
    assert (ponderlm3_job / TABLE_FILE).read_text().startswith("# Token analysis")
    assert (ponderlm3_job / PLOT_FILE).read_bytes()[:8] == PNG_MAGIC


def test_known_positive_negative_and_null_correlations(tmp_path):
    token, nll, steps = zipf_records()
    up = analyze(write_records(tmp_path / "up", token, nll, steps), bins=8)
    expected = stats.spearmanr(steps, nll.astype(np.float32)).statistic
    assert up["spearman_steps_nll"]["rho"] == pytest.approx(expected, abs=1e-9)
    assert up["spearman_steps_nll"]["rho"] > 0.9 and up["spearman_steps_nll"]["pvalue"] < 1e-10
    means = [b["steps_mean"] for b in up["nll_bins"]]
    assert means == sorted(means) and means[0] < 0.5 and means[-1] > 2.5
    assert all(b["steps_ci95"] <= b["steps_std"] for b in up["nll_bins"])
    # rare tokens cost more nats, so they get more steps; frequency correlates negatively with steps
    comparison = up["rare_vs_frequent"]
    assert comparison["steps_difference"] > 1.0 and comparison["nll_difference"] > 0
    assert comparison["pvalue"] < 1e-10
    assert up["spearman_steps_frequency"]["rho"] < -0.5

    down = analyze(write_records(tmp_path / "down", *zipf_records(direction=-1.0)))
    assert down["spearman_steps_nll"]["rho"] < -0.9
    assert down["rare_vs_frequent"]["steps_difference"] < -1.0

    rng = np.random.default_rng(1)
    null = analyze(write_records(tmp_path / "null", token, nll, rng.integers(0, 4, len(token))))
    assert abs(null["spearman_steps_nll"]["rho"]) < 0.05
    assert null["spearman_steps_nll"]["pvalue"] > 1e-4
    # without a tokenizer the tokens are shown by id
    assert up["top_tokens"][0]["text"] == f"<id {up['top_tokens'][0]['token']}>"
    assert not up["tokens_decoded"]


def test_constant_steps_are_reported_not_nan(tmp_path, capsys):
    token, nll, _ = zipf_records(n=3000)  # every token at K=3: a PonderLM-3 that pruned nothing
    folder = write_records(tmp_path / "unpruned", token, nll, np.full(len(token), 3))
    assert main(["analyze", str(folder), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("spearman_steps_nll", "spearman_steps_frequency"):
        assert summary[key]["rho"] is None and summary[key]["pvalue"] is None
        assert "same value (3)" in summary[key]["reason"]
    assert summary["rare_vs_frequent"]["pvalue"] is None
    assert "constant" in summary["rare_vs_frequent"]["reason"]
    assert summary["step_histogram"] == {"3": 3000}
    assert "NaN" not in (folder / SUMMARY_FILE).read_text()
    assert (folder / PLOT_FILE).read_bytes()[:8] == PNG_MAGIC


def test_frequency_groups_keep_whole_types_and_balance_occurrences():
    token = np.repeat(np.arange(6), [1, 1, 2, 4, 8, 16])  # 32 occurrences
    records = TokenRecords(token, np.arange(32, dtype=float), np.zeros(32, dtype=np.int64))
    group, rows = frequency_groups(records, 2)
    for t in range(6):
        assert len(set(group[token == t])) == 1  # a type never straddles two groups
    assert [r["occurrences"] for r in rows] == [16, 16] and [r["types"] for r in rows] == [5, 1]
    bins = nll_bins(records, 4)
    assert [b["steps_count"] for b in bins] == [8, 8, 8, 8]
    assert bins[0]["nll_max"] < bins[1]["nll_min"]


@pytest.mark.parametrize("damage", ["missing", "garbage", "no_steps", "lengths", "nan"])
def test_bad_records_give_one_line_errors(tmp_path, capsys, damage):
    folder = tmp_path / damage
    token, nll, steps = zipf_records(n=100)
    if damage == "missing":
        folder.mkdir()
    elif damage == "garbage":
        folder.mkdir()
        (folder / "tokens.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    elif damage == "no_steps":
        folder.mkdir()
        np.savez(folder / "tokens.npz", token=token, nll=nll)
    elif damage == "lengths":
        write_records(folder, token, nll, steps[:50])
    else:
        nll[3] = np.nan
        write_records(folder, token, nll, steps)
    assert main(["analyze", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert "tokens.npz" in err
    expected = {"missing": "not found", "garbage": "corrupt", "no_steps": "lacks the array(s) steps",
                "lengths": "different lengths", "nan": "not finite"}[damage]
    assert expected in err


def test_missing_folder_and_bad_options(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nowhere")]) == 2
    assert "job folder not found" in capsys.readouterr().err
    folder = write_records(tmp_path / "job", *zipf_records(n=100))
    assert main(["analyze", str(folder), "--groups", "1"]) == 2
    assert "--groups=1" in capsys.readouterr().err
