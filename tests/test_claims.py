"""The claims logic (harness/claims.py) on synthetic runs: every verdict of every claim and precondition is
reachable, comparisons are paired by seed, fewer than 3 seeds is only indicative, and a failed premise makes
a claim "not testable in this regime"."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from harness import claims
from harness.claims import NOT_IN_REGIME, NOT_TESTABLE
from harness.stats import CONTRADICTED, INCONCLUSIVE, INDICATIVE, SUPPORTED


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


# -- pairing and the seed rule ----------------------------------------------------------------------


def test_comparisons_pair_by_seed():
    # seed 1 is the worst seed of both arms: the unpaired spreads overlap, the paired difference does not
    a = seeds("ponderlm3", (5.05, 5.40, 5.10), 2e6, k=3)
    b = seeds("ponderlm2", (5.09, 5.46, 5.15), 3e6, k=3)
    arm_a, arm_b = claims.arms_of(a + b)
    comparison = claims.compare(arm_a, arm_b)
    assert comparison.interval.n == 3
    assert comparison.interval.mean == pytest.approx(-0.05)
    assert comparison.verdict == SUPPORTED


def test_unpaired_seeds_are_left_out():
    a = seeds("ponderlm3", (4.0, 4.1, 4.2, 9.9), 2e6, k=3)  # seed 3 has no partner
    b = seeds("ponderlm2", (4.1, 4.2, 4.3), 3e6, k=3)
    comparison = claims.compare(*claims.arms_of(a + b))
    assert comparison.interval.n == 3 and comparison.interval.mean == pytest.approx(-0.1)


def test_fewer_than_three_seeds_is_indicative_however_clear():
    records = p2((4.0, 4.0)) + seeds("ponderlm3", (3.0, 3.0), 8e6, k=3, variant="a")
    v = claims.claim_c1(claims.arms_of(records))
    assert v.verdict == INDICATIVE and v.display() == "indicative (2 seeds)"


def test_window_bootstrap_is_reported_beside_the_seed_interval():
    windows = [[4.0, 4.2, 3.8, 4.1]] * 3
    a = seeds("vanilla", (4.0, 4.1, 4.2), 1e6, size="nano", val_window_loss=windows[0])
    b = seeds("vanilla", (4.1, 4.2, 4.3), 1e6, size="pico", val_window_loss=[w + 0.1 for w in windows[0]])
    comparison = claims.compare(*claims.arms_of(a + b))
    low, high = comparison.windows
    assert low == pytest.approx(-0.1) and high == pytest.approx(-0.1)
    assert "[-0.1000, -0.1000]" in comparison.row()


# -- preconditions --------------------------------------------------------------------------------


def ladder(pico, nano, micro=None):
    records = seeds("vanilla", pico, 1e6, size="pico") + seeds("vanilla", nano, 2e6, size="nano")
    return records + (seeds("vanilla", micro, 4e6, size="micro") if micro else [])


@pytest.mark.parametrize("nano, expected", [
    ((3.90, 3.91, 3.89), SUPPORTED),       # the deeper rung is better every seed
    ((4.10, 4.11, 4.09), CONTRADICTED),
    ((3.95, 4.05, 4.00), INCONCLUSIVE),
])
def test_p1_dense_frontier(nano, expected):
    assert claims.precondition_p1(claims.arms_of(ladder((4.0, 4.01, 3.99), nano))).verdict == expected


def test_p2_and_p3():
    records = seeds("vanilla", (4.0, 4.01, 3.99), 1e6, size="pico") + \
        seeds("ponderlm2", (3.9, 3.91, 3.89), 2e6, k=1, size="pico", variant="K=1") + \
        seeds("ponderlm2", (3.95, 3.96, 3.94), 4e6, k=3, size="pico", variant="K=3")
    arms = claims.arms_of(records)
    assert claims.precondition_p2(arms).verdict == SUPPORTED
    assert claims.precondition_p3(arms).verdict == CONTRADICTED  # K=3 behind K=1
    assert claims.precondition_p3(claims.arms_of(records[:3])).verdict == NOT_TESTABLE


def test_a_failed_precondition_makes_the_claim_not_testable_in_this_regime():
    # PonderLM-3 well within 1% of PonderLM-2 at 80% of its FLOPs, but PonderLM-2 loses to vanilla (P2 fails)
    records = seeds("vanilla", (3.5, 3.51, 3.49), 1e6, size="micro") + p2() + \
        seeds("ponderlm3", (4.000, 4.002, 3.998), 8e6, k=3, variant="lambda=1")
    arms = claims.arms_of(records)
    assert claims.claim_c1(arms).verdict == SUPPORTED  # the comparison alone
    preconditions = claims.evaluate_preconditions(arms)
    assert {p.claim: p.verdict for p in preconditions}["P2"] == CONTRADICTED
    c1 = next(v for v in claims.evaluate_claims(arms, preconditions) if v.claim == "C1")
    assert c1.verdict == NOT_IN_REGIME
    assert "Premise P2 failed" in "\n".join(c1.evidence)


def test_an_unsettled_precondition_keeps_the_claim_from_a_verdict():
    records = seeds("vanilla", (3.99, 4.01, 4.00), 1e6, size="micro") + p2() + \
        seeds("ponderlm3", (4.000, 4.002, 3.998), 8e6, k=3, variant="lambda=1")
    c1 = next(v for v in claims.evaluate_claims(claims.arms_of(records)) if v.claim == "C1")
    assert c1.verdict.startswith(INCONCLUSIVE) and "P2" in c1.verdict


# -- C0 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p2_losses, expected", [
    ((3.80, 3.81, 3.79), SUPPORTED),      # pondering at pico beats vanilla at nano
    ((4.00, 4.01, 3.99), CONTRADICTED),
])
def test_c0_pondering_against_vanilla_one_rung_up(p2_losses, expected):
    records = ladder((4.0, 4.01, 3.99), (3.90, 3.91, 3.89)) + \
        seeds("ponderlm2", p2_losses, 2e6, k=1, size="pico", variant="K=1")
    assert claims.claim_c0(claims.arms_of(records)).verdict == expected


# -- C1 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p3_losses, p3_flops, expected", [
    ((4.000, 4.002, 3.998), 8e6, SUPPORTED),        # same loss, 80% of the FLOPs
    ((4.30, 4.31, 4.29), 8e6, CONTRADICTED),        # far worse loss
    ((4.00, 4.01, 3.99), 9.8e6, CONTRADICTED),      # no FLOPs saving
    ((4.00, 4.10, 3.90), 8e6, INCONCLUSIVE),        # the paired interval straddles the 1% bar
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
    records = seeds("ponderlm3", (4.0, 4.01, 4.02), 8e6, k=3, variant="a") + \
        seeds("looped", (base_loss, base_loss + 0.01, base_loss + 0.02), base_flops)
    assert verdict(claims.claim_c2, records) == expected


def test_c2_with_a_one_seed_baseline_is_indicative():
    records = seeds("ponderlm3", (4.0, 4.01, 4.02), 8e6, k=3, variant="a") + seeds("looped", (4.5,), 9e6)
    assert verdict(claims.claim_c2, records) == INDICATIVE


def test_c2_needs_a_baseline():
    assert verdict(claims.claim_c2, seeds("ponderlm3", (4.0,), 8e6, k=3)) == NOT_TESTABLE


# -- C3 -------------------------------------------------------------------------------------------


def analysed(rho, rare, frequent, seed=0):
    return run("ponderlm3", 4.0, 8e6, seed=seed, k=3, token_analysis={
        "spearman_steps_nll": rho, "rare_mean_steps": rare, "frequent_mean_steps": frequent})


@pytest.mark.parametrize("rows, expected", [
    ([(0.30, 2.0, 1.0), (0.25, 1.8, 1.1), (0.28, 1.9, 1.0)], SUPPORTED),
    ([(-0.30, 1.0, 2.0), (-0.25, 1.1, 1.8), (-0.28, 1.0, 1.9)], CONTRADICTED),
    ([(0.30, 2.0, 1.0), (-0.25, 1.1, 1.8), (0.01, 1.5, 1.5)], INCONCLUSIVE),
    ([(0.30, 2.0, 1.0), (0.25, 1.8, 1.1)], INDICATIVE),
    ([(None, None, None)], INCONCLUSIVE),  # constant steps: nothing to correlate
])
def test_c3_verdicts(rows, expected):
    records = [analysed(*row, seed=i) for i, row in enumerate(rows)]
    assert verdict(claims.claim_c3, records) == expected


def test_c3_without_ponderlm3_is_not_testable():
    assert verdict(claims.claim_c3, seeds("vanilla", (4.0,), 1e6)) == NOT_TESTABLE


# -- C4 -------------------------------------------------------------------------------------------


def ablation(losses, noise=(0.0, 0.01, 0.02)):
    return [r for method, loss in zip(claims.C4_ORDER, losses)
            for r in seeds(method, tuple(loss + n for n in noise), 1e6)]


@pytest.mark.parametrize("losses, expected", [
    ((3.0, 3.2, 3.4, 3.6), SUPPORTED),
    ((3.0, 3.4, 3.2, 3.6), CONTRADICTED),   # pause beats looped
])
def test_c4_verdicts(losses, expected):
    assert verdict(claims.claim_c4, ablation(losses)) == expected


def test_c4_within_the_seed_noise_is_inconclusive():
    records = ablation((3.0, 3.2, 3.4, 3.6))
    for r, shift in zip((r for r in records if r["method"] == "looped"), (-0.25, 0.1, 0.0)):
        r["val_loss"] = 3.0 + shift  # looped straddles pondering
    assert verdict(claims.claim_c4, records) == INCONCLUSIVE


def test_c4_needs_all_four_methods():
    assert verdict(claims.claim_c4, ablation((3.0, 3.2, 3.4, 3.6))[:-3]) == NOT_TESTABLE


# -- C5 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gaps, expected", [
    ((0.001, -0.002, 0.0015), SUPPORTED),
    ((0.4, 0.5, 0.45), CONTRADICTED),
    ((0.001, 0.1, 0.3), INCONCLUSIVE),
    ((0.001, -0.002), INDICATIVE),
])
def test_c5_verdicts(gaps, expected):
    records = [run("ponderlm2", 4.0, 1e7, seed=i, k=3, jacobi_gap=g) for i, g in enumerate(gaps)]
    assert verdict(claims.claim_c5, records) == expected


def test_c5_without_ponderlm_runs_is_not_testable():
    assert verdict(claims.claim_c5, seeds("vanilla", (4.0,), 1e6)) == NOT_TESTABLE


# -- learning curves ------------------------------------------------------------------------------


def curve(losses):
    return [{"step": 10 * (i + 1), "tokens": 1000 * (i + 1), "train_flops": 1e9 * (i + 1), "val_loss": x}
            for i, x in enumerate(losses)]


def test_curve_comparison_pairs_each_point_by_seed():
    a = [run("ponderlm2", 3.8, 2e6, seed=s, k=1, size="pico", variant="K=1",
             curve=curve((5.0 + s, 4.5 + s, 3.8 + s))) for s in range(3)]
    b = [run("vanilla", 3.9, 1e6, seed=s, size="pico", curve=curve((5.0 + s, 4.45 + s, 3.9 + s))) for s in range(3)]
    arms = claims.arms_of(a + b)
    points = claims.curve_comparison(arms[0], arms[1])
    assert [t for t, _ in points] == [1000, 2000, 3000]
    assert [round(iv.mean, 6) for _, iv in points] == [0.0, 0.05, -0.1]
    assert all(iv.n == 3 for _, iv in points)
    lines = claims.curve_lines(arms)
    assert len(lines) == 1 and lines[0].startswith("- P2, ponderlm2 [K=1] @pico − vanilla @pico (n=3)")


# -- the report and the command -------------------------------------------------------------------


def test_claims_command_writes_a_report_with_a_verdict_per_claim(tmp_path):
    records = p2() + seeds("ponderlm3", (4.000, 4.002, 3.998), 8e6, k=3, variant="lambda=1",
                           mean_extra_steps=1.5, consistency_gap=1e-4, jacobi_gap=1e-4)
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    done = subprocess.run([sys.executable, "-m", "harness", "claims", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "claims.md").read_text()
    for claim in ("C0", "C1", "C2", "C3", "C4", "C5"):
        assert f"| {claim} | **" in text
    for precondition in ("P1", "P2", "P3"):
        assert f"| {precondition} (precondition) | **" in text
    # P2 has no vanilla to beat here: C1's premise is not established, so the comparison cannot decide
    assert "| C1 | **inconclusive (premise P2 not established)** | 3 |" in text
    assert "1.500 [1.500, 1.500], n=3 extra steps of K=3" in text
    assert not text.startswith(claims.PIPELINE_CHECK_LINE)


def test_a_pipeline_check_study_says_so_first(tmp_path):
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in p2()))
    (tmp_path / "study.toml").write_text('pipeline_check = true\n[[arms]]\nmethod = "ponderlm2"\n')
    assert claims.report(tmp_path).startswith(claims.PIPELINE_CHECK_LINE)


def test_claims_on_a_folder_without_runs_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "harness", "claims", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


# -- the depth probe: D1-D3 (runs whose data carry difficulty labels) --------------------------------


def probed(method, accuracies, flops, k=None, variant="", steps=None, rho=None, size="pico", first=None):
    """Seeds of an arm with difficulty metrics: ``accuracies`` is the deepest-h (h=3) accuracy per seed,
    ``first`` the h=1 accuracy per seed (default: 0.2 above the deepest)."""
    out = []
    for seed, acc in enumerate(accuracies):
        table = {"0": {"n": 900, "accuracy": 0.3, "nll": 4.0},
                 **{str(h): {"n": 30, "accuracy": min(1.0, acc + 0.1 * (3 - h)), "nll": 1.0} for h in (1, 2, 3)}}
        if first is not None:
            table["1"]["accuracy"] = first[seed]
        extra = {"difficulty": table, "difficulty_max_h": 3, "deepest_h_accuracy": acc}
        if steps is not None:
            for h, s in steps.items():
                table[str(h)]["mean_steps"] = s
        if rho is not None:
            extra["spearman_steps_h"] = rho[seed]
        out.append(run(method, 4.0 - 0.01 * seed, flops, seed=seed, size=size, variant=variant, k=k, **extra))
    return out


def probe_arms(k1=(0.30, 0.32, 0.31), k3=(0.50, 0.52, 0.49), p3=(0.50, 0.52, 0.495), p3_flops=5e6,
               p3_steps=None, rho=(0.3, 0.35, 0.4)):
    steps = p3_steps if p3_steps is not None else {0: 0.5, 1: 1.0, 2: 1.5, 3: 2.0}
    return (probed("vanilla", (0.10, 0.12, 0.11), 1e6, first=(0.95, 0.97, 0.96))
            + probed("ponderlm2", k1, 3e6, k=1, variant="K=1")
            + probed("ponderlm2", k3, 10e6, k=3, variant="K=3")
            + probed("ponderlm3", p3, p3_flops, k=3, variant="K=3 penalty=0.03", steps=steps, rho=list(rho)))


@pytest.mark.parametrize("first, deepest, expected", [
    ((0.95, 0.97, 0.96), (0.10, 0.12, 0.11), SUPPORTED),
    ((0.40, 0.42, 0.41), (0.10, 0.12, 0.11), CONTRADICTED),     # h=1 not solved: the probe is too hard
    ((0.95, 0.97, 0.96), (0.90, 0.92, 0.91), CONTRADICTED),     # the deepest h solved: too easy
    ((0.95, 0.70, 0.96), (0.10, 0.12, 0.11), INCONCLUSIVE),     # h=1's interval reaches below 0.8
])
def test_d0_the_probe_discriminates(first, deepest, expected):
    arms = claims.arms_of(probed("vanilla", deepest, 1e6, first=first) + probed("vanilla", (0.5,) * 3, 2e6,
                                                                               size="nano"))
    v = claims.precondition_d0(arms)
    assert v.verdict == expected and v.n == 3
    assert "vanilla" in v.evidence[0] and "pico" in v.evidence[0]  # the smallest size is the one tested


def test_a_failed_d0_makes_d1_to_d3_not_testable_in_this_regime():
    arms = probe_arms()
    for r in arms:
        if r["method"] == "vanilla":
            r["difficulty"]["1"]["accuracy"] = 0.3
    probe = claims.evaluate_probe(claims.arms_of(arms))
    assert [v.claim for v in probe] == ["D0", "D1", "D2", "D3"]
    assert probe[0].verdict == CONTRADICTED
    assert all(v.verdict == claims.NOT_IN_REGIME for v in probe[1:])


@pytest.mark.parametrize("k1, k3, expected", [
    ((0.30, 0.32, 0.31), (0.50, 0.52, 0.49), SUPPORTED),
    ((0.05, 0.06, 0.07), (0.50, 0.52, 0.49), CONTRADICTED),     # K=1 below vanilla
    ((0.30, 0.10, 0.31), (0.50, 0.52, 0.49), INCONCLUSIVE),     # K=1 - vanilla straddles 0
])
def test_d1_verdicts(k1, k3, expected):
    assert verdict(claims.claim_d1, probe_arms(k1=k1, k3=k3)) == expected


def test_d1_headers_say_accuracy_and_need_the_arms():
    v = claims.claim_d1(claims.arms_of(probe_arms()))
    assert "deepest-h accuracy" in v.evidence[0]
    assert verdict(claims.claim_d1, probed("vanilla", (0.1, 0.1, 0.1), 1e6)) == NOT_TESTABLE


@pytest.mark.parametrize("steps, rho, expected", [
    ({0: 0.5, 1: 1.0, 2: 1.5, 3: 2.0}, (0.3, 0.35, 0.4), SUPPORTED),
    ({0: 2.0, 1: 1.0, 2: 1.0, 3: 1.0}, (0.3, 0.35, 0.4), CONTRADICTED),   # fewer steps on answers
    ({0: 0.5, 1: 1.0, 2: 1.5, 3: 2.0}, (-0.3, 0.35, 0.1), INCONCLUSIVE),
])
def test_d2_verdicts(steps, rho, expected):
    assert verdict(claims.claim_d2, probe_arms(p3_steps=steps, rho=rho)) == expected


def test_d2_without_ponderlm3_is_not_testable():
    assert verdict(claims.claim_d2, probed("vanilla", (0.1, 0.1, 0.1), 1e6)) == NOT_TESTABLE


@pytest.mark.parametrize("p3, p3_flops, expected", [
    ((0.50, 0.52, 0.495), 5e6, SUPPORTED),
    ((0.50, 0.52, 0.495), 9.8e6, CONTRADICTED),     # no cheaper
    ((0.30, 0.32, 0.29), 5e6, CONTRADICTED),         # 20 points below
    ((0.60, 0.40, 0.49), 5e6, INCONCLUSIVE),
])
def test_d3_verdicts(p3, p3_flops, expected):
    assert verdict(claims.claim_d3, probe_arms(p3=p3, p3_flops=p3_flops)) == expected


def test_depth_probe_appears_only_for_runs_with_difficulty_metrics():
    plain = claims.arms_of(p2() + seeds("vanilla", (4.1, 4.1, 4.1), 1e6))
    assert claims.evaluate_probe(plain) == []
    text = claims.markdown(plain, claims.evaluate_claims(plain), "plain")
    assert "D1" not in text and "probe of mechanisms" not in text
    probe = claims.arms_of(probe_arms())
    text = claims.markdown(probe, claims.evaluate_claims(probe), "probe")
    assert text.startswith(claims.PROBE_LINE)
    assert "## Depth probe" in text and "| D1 (depth probe) | **supported** | 3 |" in text
    assert "| D0 (depth probe, precondition) | **supported** | 3 |" in text
    assert "acc h=3" in text
