"""The claims logic (harness/claims.py) on synthetic runs: every verdict of every claim is reachable."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from harness import claims
from harness.claims import CONTRADICTED, INCONCLUSIVE, NOT_TESTABLE, SUPPORTED


def run(method, loss, flops, seed=0, size="micro", variant="", **extra):
    config = {"latent_steps": extra.pop("k", None), "prune_threshold": 1e-4}
    return {"status": "ok", "job_id": f"{method}-{variant}-{size}-{seed}", "method": method, "size": size,
            "seed": seed, "val_loss": loss, "val_ppl": math.exp(loss), "infer_flops_per_token": flops,
            "tags": {"variant": variant}, "config": config, **extra}


def seeds(method, losses, flops, **kw):
    return [run(method, loss, flops, seed=i, **kw) for i, loss in enumerate(losses)]


def verdict(claim, records):
    return claim(claims.arms_of(records)).verdict


def p2(losses=(4.000, 4.002, 3.998), flops=10e6):
    return seeds("ponderlm2", losses, flops, k=3, variant="K=3")


# -- the spread rule ------------------------------------------------------------------------------


def test_below_needs_one_std_of_room_on_each_side():
    assert claims.below(1.0, 0.1, 2.0, 0.1) == SUPPORTED
    assert claims.below(2.0, 0.1, 1.0, 0.1) == CONTRADICTED
    assert claims.below(1.0, 0.6, 2.0, 0.6) == INCONCLUSIVE
    assert claims.below(1.0, 0.0, 0.995, 0.0, margin=0.01) == SUPPORTED  # the margin moves the bar


# -- C1 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p3_losses, p3_flops, expected", [
    ((4.000, 4.002, 3.998), 8e6, SUPPORTED),        # same loss, 80% of the FLOPs
    ((4.30, 4.31, 4.29), 8e6, CONTRADICTED),        # far worse loss
    ((4.00, 4.01, 3.99), 9.8e6, CONTRADICTED),      # no FLOPs saving
    ((4.00, 4.10, 3.90), 8e6, INCONCLUSIVE),        # seed spread straddles the 1% bar
])
def test_c1_verdicts(p3_losses, p3_flops, expected):
    records = p2() + seeds("ponderlm3", p3_losses, p3_flops, k=3, variant="lambda=1")
    assert verdict(claims.claim_c1, records) == expected


def test_c1_without_ponderlm2_at_k3_is_not_testable():
    records = seeds("ponderlm3", (4.0,), 8e6, k=3) + seeds("ponderlm2", (4.0,), 5e6, k=1)
    assert verdict(claims.claim_c1, records) == NOT_TESTABLE


# -- C2 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_loss, base_flops, expected", [
    (4.5, 9e6, SUPPORTED),       # PonderLM-3 uses fewer FLOPs and has lower loss
    (3.5, 7e6, CONTRADICTED),    # the baseline is better with fewer FLOPs than PonderLM-3
    (3.5, 12e6, INCONCLUSIVE),   # better but costlier: they never meet at equal FLOPs
])
def test_c2_verdicts(base_loss, base_flops, expected):
    records = seeds("ponderlm3", (4.0, 4.01), 8e6, k=3, variant="a") + \
        seeds("looped", (base_loss, base_loss + 0.01), base_flops)
    assert verdict(claims.claim_c2, records) == expected


def test_c2_needs_a_baseline():
    assert verdict(claims.claim_c2, seeds("ponderlm3", (4.0,), 8e6, k=3)) == NOT_TESTABLE


# -- C3 -------------------------------------------------------------------------------------------


def analysed(rho, rare, frequent, seed=0):
    return run("ponderlm3", 4.0, 8e6, seed=seed, k=3, token_analysis={
        "spearman_steps_nll": rho, "rare_mean_steps": rare, "frequent_mean_steps": frequent})


@pytest.mark.parametrize("rows, expected", [
    ([(0.30, 2.0, 1.0), (0.25, 1.8, 1.1)], SUPPORTED),
    ([(-0.30, 1.0, 2.0), (-0.25, 1.1, 1.8)], CONTRADICTED),
    ([(0.30, 2.0, 1.0), (-0.25, 1.1, 1.8)], INCONCLUSIVE),
    ([(None, None, None)], INCONCLUSIVE),  # constant steps: nothing to correlate
])
def test_c3_verdicts(rows, expected):
    records = [analysed(*row, seed=i) for i, row in enumerate(rows)]
    assert verdict(claims.claim_c3, records) == expected


def test_c3_without_ponderlm3_is_not_testable():
    assert verdict(claims.claim_c3, seeds("vanilla", (4.0,), 1e6)) == NOT_TESTABLE


# -- C4 -------------------------------------------------------------------------------------------


def ablation(losses):
    return [r for method, loss in zip(claims.C4_ORDER, losses) for r in seeds(method, (loss, loss + 0.01), 1e6)]


@pytest.mark.parametrize("losses, expected", [
    ((3.0, 3.2, 3.4, 3.6), SUPPORTED),
    ((3.0, 3.4, 3.2, 3.6), CONTRADICTED),   # pause beats looped
    ((3.0, 3.001, 3.4, 3.6), INCONCLUSIVE),  # pondering and looped within their spread
])
def test_c4_verdicts(losses, expected):
    assert verdict(claims.claim_c4, ablation(losses)) == expected


def test_c4_needs_all_four_methods():
    assert verdict(claims.claim_c4, ablation((3.0, 3.2, 3.4, 3.6))[:-2]) == NOT_TESTABLE


# -- C5 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gaps, expected", [
    ((0.001, -0.002), SUPPORTED),
    ((0.4, 0.5), CONTRADICTED),
    ((0.001, 0.1), INCONCLUSIVE),
])
def test_c5_verdicts(gaps, expected):
    records = [run("ponderlm2", 4.0, 1e7, seed=i, k=3, jacobi_gap=g) for i, g in enumerate(gaps)]
    assert verdict(claims.claim_c5, records) == expected


def test_c5_without_ponderlm_runs_is_not_testable():
    assert verdict(claims.claim_c5, seeds("vanilla", (4.0,), 1e6)) == NOT_TESTABLE


# -- the report and the command -------------------------------------------------------------------


def test_claims_command_writes_a_report_with_a_verdict_per_claim(tmp_path):
    records = p2() + seeds("ponderlm3", (4.000, 4.002, 3.998), 8e6, k=3, variant="lambda=1",
                           mean_extra_steps=1.5, consistency_gap=1e-4, jacobi_gap=1e-4)
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    done = subprocess.run([sys.executable, "-m", "harness", "claims", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "claims.md").read_text()
    for claim in ("C1", "C2", "C3", "C4", "C5"):
        assert f"| {claim} | **" in text
    assert "| C1 | **supported** |" in text
    assert "1.500 ± 0.000 extra steps of K=3" in text


def test_claims_on_a_folder_without_runs_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "harness", "claims", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
