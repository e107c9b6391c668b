"""The PonderLM-3 paper's claims C1-C5, tested on a study's runs: ``python -m harness claims DIR``.

Every verdict is computed from ``DIR/runs.jsonl`` (means and spread over seeds), never typed in, and a
contradicted claim is a result like any other (docs/design.md, "Studies and claims"). Comparisons
use the validation loss (nats per token) and the *measured* inference FLOPs per token; perplexity
within 1% is loss within ln(1.01).

Verdicts
    supported      the claim's inequalities hold with room to spare: mean +- one standard deviation
                   over seeds of each side stays on the claimed side;
    contradicted   the opposite inequality holds with that same room;
    inconclusive   the seed spreads overlap, or no arm pair is comparable;
    not testable   the runs lack an arm the claim needs (the report names it).
With one seed an arm's spread is 0, so its comparison is decided by the means; the report gives the
number of seeds beside every figure.

Decisions where the paper gives no number (each printed with its claim):
* C2 compares at equal measured FLOPs by dominance: PonderLM-3 wins against a baseline if one of its
  arms uses no more inference FLOPs (2% tolerance) and has lower loss; it loses if one of its arms uses
  at least as many FLOPs and has higher loss. Otherwise the two do not meet at equal FLOPs.
* C3 pools every PonderLM-3 run whose steps vary: Spearman's rho between a token's extra steps and its
  NLL, and mean steps of the rarest tenth of token occurrences minus the most frequent tenth
  (:func:`harness.analyze.frequency_groups`).
* C4 uses, per method, the arm at the size PonderLM-1 ran at with the most inference FLOPs (the
  paper's step count when a study also holds a cheaper variant).
* C5 calls the Jacobi gap small when |gap| <= 1% of the loss in every PonderLM-2/3 run, and large
  when its mean exceeds 5%.
"""

from __future__ import annotations

import math
import pathlib
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from harness.core.errors import ReportError
from harness.core.io import write_bytes_atomic
from harness.results import OK, ResultsStore

CLAIMS_FILE = "claims.md"
PPL_TOLERANCE = math.log(1.01)  # C1: "within 1%" of perplexity, in loss
C1_FLOPS_RATIO = 0.9
C2_FLOPS_TOLERANCE = 0.02
C5_SMALL, C5_LARGE = 0.01, 0.05
SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_TESTABLE = "supported", "contradicted", "inconclusive", "not testable"


@dataclass
class Arm:
    """The seeds of one (method, variant, size): means and standard deviations of what claims use."""

    method: str
    variant: str
    size: str
    runs: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return f"{self.method}" + (f" [{self.variant}]" if self.variant else "") + f" @{self.size}"

    @property
    def seeds(self) -> int:
        return len(self.runs)

    def values(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.runs if isinstance(r.get(key), (int, float))]

    def mean(self, key: str) -> float:
        values = self.values(key)
        return statistics.fmean(values) if values else float("nan")

    def std(self, key: str) -> float:
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def config(self, key: str) -> Any:
        return (self.runs[0].get("config") or {}).get(key)

    def loss(self) -> str:
        return _pm(self.mean("val_loss"), self.std("val_loss"), 4) + f" (ppl {math.exp(self.mean('val_loss')):.2f})"

    def flops(self) -> str:
        return _si(self.mean("infer_flops_per_token"))


@dataclass
class Verdict:
    claim: str
    statement: str
    verdict: str
    evidence: list[str] = field(default_factory=list)  # markdown lines: the numbers behind the verdict
    decision: str = ""  # how the claim was operationalised, where the paper gives no number


def arms_of(records: Iterable[dict[str, Any]]) -> list[Arm]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == OK and isinstance(r.get("val_loss"), (int, float)):
            key = (r.get("method"), (r.get("tags") or {}).get("variant") or "", r.get("size"))
            groups.setdefault(key, []).append(r)
    return [Arm(m, v, s, runs) for (m, v, s), runs in groups.items()]


def load_arms(folder: str | pathlib.Path) -> list[Arm]:
    store = ResultsStore(folder)
    if not store.path.exists():
        raise ReportError(f"no {store.path.name} in {folder}: give a folder written by `python -m harness sweep`")
    arms = arms_of(store.latest().values())
    if not arms:
        raise ReportError(f"{store.path} holds no finished job; nothing to test")
    return arms


# ---------------------------------------------------------------------------------------------------
# comparisons with spread


def below(a: float, sa: float, b: float, sb: float, margin: float = 0.0) -> str:
    """Is a < b + margin? SUPPORTED / CONTRADICTED with one std of room on each side, else INCONCLUSIVE."""
    if a + sa < b + margin - sb:
        return SUPPORTED
    if a - sa > b + margin + sb:
        return CONTRADICTED
    return INCONCLUSIVE


def combine(verdicts: list[str]) -> str:
    """All parts supported -> supported; any contradicted -> contradicted; else inconclusive."""
    if not verdicts:
        return NOT_TESTABLE
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    if any(v == CONTRADICTED for v in verdicts):
        return CONTRADICTED
    return INCONCLUSIVE


def _pick(arms: list[Arm], test: Callable[[Arm], bool]) -> list[Arm]:
    return [a for a in arms if test(a)]


def _pm(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _si(x: float) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}"
    return f"{x:.3g}"


def _ponderlm3(arms: list[Arm]) -> list[Arm]:
    return _pick(arms, lambda a: a.method == "ponderlm3")


def _ponderlm2_k(arms: list[Arm], k: int) -> list[Arm]:
    return _pick(arms, lambda a: a.method == "ponderlm2" and a.config("latent_steps") == k)


# ---------------------------------------------------------------------------------------------------
# the claims


def claim_c1(arms: list[Arm]) -> Verdict:
    v = Verdict("C1", "PonderLM-3 reaches PonderLM-2 (K=3)'s perplexity, within 1%, at no more than 90% of its "
                "measured inference FLOPs (paper: 46.4 average accuracy at 8.86 GFLOPs vs 46.0 at 9.84).",
                NOT_TESTABLE, decision="loss within ln(1.01) of PonderLM-2's, mean inference FLOPs <= 0.9x; "
                "supported if some PonderLM-3 arm at the same size meets both, contradicted if none can")
    parts: list[str] = []
    for p2 in _ponderlm2_k(arms, 3):
        for p3 in _pick(_ponderlm3(arms), lambda a, size=p2.size: a.size == size):
            ratio = p3.mean("infer_flops_per_token") / p2.mean("infer_flops_per_token")
            quality = below(p3.mean("val_loss"), p3.std("val_loss"), p2.mean("val_loss"), p2.std("val_loss"),
                            PPL_TOLERANCE)
            cost = SUPPORTED if ratio <= C1_FLOPS_RATIO else CONTRADICTED
            parts.append(combine([quality, cost]))
            v.evidence.append(f"| {p3.name} ({p3.seeds} seeds) | {p3.loss()} | {p3.flops()} | {ratio:.3f} | "
                              f"{p2.name} ({p2.seeds} seeds): {p2.loss()}, {p2.flops()} | {quality} | {cost} |")
    if parts:
        v.evidence.insert(0, "| PonderLM-3 arm | loss | inference FLOPs/token | FLOPs / PonderLM-2's | "
                             "PonderLM-2 (K=3) | loss within 1% | FLOPs <= 90% |")
        v.evidence.insert(1, "| --- | --- | ---: | ---: | --- | --- | --- |")
        v.verdict = SUPPORTED if SUPPORTED in parts else (CONTRADICTED if all(p == CONTRADICTED for p in parts)
                                                           else INCONCLUSIVE)
    else:
        v.evidence.append("needs PonderLM-2 with latent_steps=3 and PonderLM-3 at the same size")
    return v


def _dominance(p3s: list[Arm], base: Arm) -> tuple[str, str]:
    flops_b = base.mean("infer_flops_per_token")
    wins, losses = [], []
    for p in p3s:
        flops_p = p.mean("infer_flops_per_token")
        quality = below(p.mean("val_loss"), p.std("val_loss"), base.mean("val_loss"), base.std("val_loss"))
        if flops_p <= flops_b * (1 + C2_FLOPS_TOLERANCE) and quality == SUPPORTED:
            wins.append(p.name)
        if flops_p >= flops_b * (1 - C2_FLOPS_TOLERANCE) and quality == CONTRADICTED:
            losses.append(p.name)
    if wins and not losses:
        return SUPPORTED, f"dominated by {', '.join(wins)}"
    if losses and not wins:
        return CONTRADICTED, f"beats {', '.join(losses)} with no more FLOPs"
    return INCONCLUSIVE, "no PonderLM-3 arm meets it at equal FLOPs with a clear loss difference"


def claim_c2(arms: list[Arm]) -> Verdict:
    v = Verdict("C2", "At equal measured inference FLOPs, PonderLM-3 has lower perplexity than the recursive and "
                "adaptive baselines (looped, MoR, gated adaptive depth).", NOT_TESTABLE,
                decision=f"dominance at equal FLOPs ({C2_FLOPS_TOLERANCE:.0%} tolerance), same size")
    parts = []
    for base in _pick(arms, lambda a: a.method in ("looped", "mor", "adaponder")):
        p3s = _pick(_ponderlm3(arms), lambda a, size=base.size: a.size == size)
        if not p3s:
            continue
        verdict, why = _dominance(p3s, base)
        parts.append(verdict)
        v.evidence.append(f"| {base.name} ({base.seeds} seeds) | {base.loss()} | {base.flops()} | {verdict}: {why} |")
    if parts:
        v.evidence.insert(0, "| baseline | loss | inference FLOPs/token | against PonderLM-3 |")
        v.evidence.insert(1, "| --- | --- | ---: | --- |")
        v.evidence.append("")
        v.evidence.extend(f"- {p.name} ({p.seeds} seeds): loss {p.loss()}, {p.flops()} FLOPs/token"
                          for p in _ponderlm3(arms))
    else:
        v.evidence.append("needs PonderLM-3 and at least one of looped, mor, adaponder at the same size")
    v.verdict = combine(parts)
    return v


def claim_c3(arms: list[Arm]) -> Verdict:
    v = Verdict("C3", "The tokens that take more steps are the harder ones: Spearman(extra steps, token NLL) > 0, "
                "and rare tokens take more steps than frequent ones.", NOT_TESTABLE,
                decision="pooled over PonderLM-3 runs whose steps vary; rare/frequent = the rarest and most "
                "frequent tenth of token occurrences in the validation text")
    rhos, diffs, constant = [], [], 0
    for arm in _ponderlm3(arms):
        for run in arm.runs:
            analysis = run.get("token_analysis") or {}
            rho = analysis.get("spearman_steps_nll")
            if rho is None:
                constant += 1
                continue
            rhos.append(float(rho))
            rare, frequent = analysis.get("rare_mean_steps"), analysis.get("frequent_mean_steps")
            if rare is not None and frequent is not None:
                diffs.append(float(rare) - float(frequent))
    if constant:
        v.evidence.append(f"{constant} PonderLM-3 run(s) took the same number of steps for every token "
                          "(nothing to correlate)")
    if not rhos:
        v.verdict = INCONCLUSIVE if constant else NOT_TESTABLE
        return v
    rho_m, rho_s = statistics.fmean(rhos), (statistics.stdev(rhos) if len(rhos) > 1 else 0.0)
    v.evidence.append(f"- Spearman(steps, NLL) over {len(rhos)} run(s): {_pm(rho_m, rho_s, 3)}")
    parts = [below(0.0, 0.0, rho_m, rho_s)]
    if diffs:
        d_m, d_s = statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0)
        v.evidence.append(f"- mean steps, rare minus frequent tokens, over {len(diffs)} run(s): {_pm(d_m, d_s, 3)}")
        parts.append(below(0.0, 0.0, d_m, d_s))
    v.verdict = combine(parts)
    return v


C4_ORDER = ("pondering", "looped", "pause", "vanilla")


def claim_c4(arms: list[Arm]) -> Verdict:
    v = Verdict("C4", "PonderLM-1's ablation order at matched tokens holds: pondering < looped < pause < vanilla in "
                "perplexity (paper: 14.16 < 15.33 < 16.53 < 16.95).", NOT_TESTABLE,
                decision="per method, the arm at PonderLM-1's size with the most inference FLOPs")
    chosen: list[Arm] = []
    for size in sorted({a.size for a in arms if a.method == "pondering"}):
        at_size = []
        for method in C4_ORDER:
            candidates = _pick(arms, lambda a, m=method, s=size: a.method == m and a.size == s)
            if candidates:
                at_size.append(max(candidates, key=lambda a: a.mean("infer_flops_per_token")))
        if len(at_size) == len(C4_ORDER):
            chosen = at_size
            break
    if not chosen:
        v.evidence.append("needs pondering, looped, pause and vanilla at one size")
        return v
    parts = []
    for better, worse in zip(chosen, chosen[1:]):
        verdict = below(better.mean("val_loss"), better.std("val_loss"), worse.mean("val_loss"), worse.std("val_loss"))
        parts.append(verdict)
        v.evidence.append(f"- {better.name} < {worse.name}: {verdict}")
    v.evidence.extend(f"- {a.name} ({a.seeds} seeds): loss {a.loss()}, {a.flops()} FLOPs/token" for a in chosen)
    v.verdict = combine(parts)
    return v


def claim_c5(arms: list[Arm]) -> Verdict:
    v = Verdict("C5", "The Jacobi gap (parallel training loss minus exact sequential decoding) is small relative to "
                "the loss.", NOT_TESTABLE,
                decision=f"small: |gap| <= {C5_SMALL:.0%} of the loss in every run; large: mean above {C5_LARGE:.0%}")
    relative = []
    for arm in _pick(arms, lambda a: a.method in ("ponderlm2", "ponderlm3")):
        gaps = [abs(r["jacobi_gap"]) / r["val_loss"] for r in arm.runs if isinstance(r.get("jacobi_gap"), (int, float))]
        if gaps:
            relative.extend(gaps)
            v.evidence.append(f"- {arm.name}: Jacobi gap {_pm(arm.mean('jacobi_gap'), arm.std('jacobi_gap'), 5)} nats, "
                              f"{max(gaps):.3%} of the loss at most")
    if relative:
        v.verdict = SUPPORTED if max(relative) <= C5_SMALL else (
            CONTRADICTED if statistics.fmean(relative) > C5_LARGE else INCONCLUSIVE)
    else:
        v.evidence.append("needs PonderLM-2 or PonderLM-3 runs")
    return v


CLAIMS: tuple[Callable[[list[Arm]], Verdict], ...] = (claim_c1, claim_c2, claim_c3, claim_c4, claim_c5)


def evaluate_claims(arms: list[Arm]) -> list[Verdict]:
    return [claim(arms) for claim in CLAIMS]



# ---------------------------------------------------------------------------------------------------
# the report


def pruning_lines(arms: list[Arm]) -> list[str]:
    """Deployed pruning of every PonderLM-3 arm: extra steps against K, and the train/inference gap."""
    lines = []
    for arm in _ponderlm3(arms):
        tau = arm.config("prune_threshold")
        steps = _pm(arm.mean("mean_extra_steps"), arm.std("mean_extra_steps"), 3)
        gap = _pm(arm.mean("consistency_gap"), arm.std("consistency_gap"), 5)
        lines.append(f"- {arm.name} ({arm.seeds} seeds): {steps} extra steps of K={arm.config('latent_steps')} at "
                     f"tau={'?' if tau is None else f'{tau:g}'}; consistency gap {gap} nats")
    return lines


def markdown(arms: list[Arm], verdicts: list[Verdict], title: str) -> str:
    out = [f"# Claims report: {title}", "",
           "Computed by `python -m harness claims` from runs.jsonl (mean ± std over seeds; see "
           "harness/claims.py for the verdict rules). A contradicted claim is a result, not an error.", "",
           "| claim | verdict |", "| --- | --- |"]
    out += [f"| {v.claim} | **{v.verdict}** |" for v in verdicts]
    pruning = pruning_lines(arms)
    if pruning:
        out += ["", "## PonderLM-3 deployed pruning", "", *pruning]
    for v in verdicts:
        out += ["", f"## {v.claim}: {v.verdict}", "", v.statement, ""]
        if v.decision:
            out += [f"*Test:* {v.decision}.", ""]
        out += v.evidence
    return "\n".join(out) + "\n"


def write_claims(folder: str | pathlib.Path) -> pathlib.Path:
    folder = pathlib.Path(folder)
    arms = load_arms(folder)
    path = folder / CLAIMS_FILE
    write_bytes_atomic(path, markdown(arms, evaluate_claims(arms), folder.resolve().name).encode("utf-8"))
    return path


__all__ = ["CLAIMS", "CLAIMS_FILE", "Arm", "Verdict", "arms_of", "below", "combine", "load_arms", "markdown",
           "evaluate_claims", "write_claims"]
