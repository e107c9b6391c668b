"""The preconditions P1-P3 and the claims C0-C5, tested on a study's runs: ``python -m harness claims DIR``.

Every verdict is computed from ``DIR/runs.jsonl``, never typed in, and a contradicted claim is a result
like any other (docs/design.md, "Evidence: statistics and regime"). Comparisons use the validation loss
(nats per token) and the *measured* inference FLOPs per token; perplexity within 1% is loss within ln(1.01).

Every comparison of two arms is a paired difference over their common seeds (:mod:`harness.stats`): seed
s gives both the same batches, validation windows and shared initial values. It is reported as its mean,
95% Student-t interval and n, beside the evaluation's own noise (a paired bootstrap over validation windows).

Verdicts
    supported       the 95% interval of every comparison the claim rests on lies wholly on the claimed side
                    of its threshold, with at least 3 paired seeds;
    contradicted    it lies wholly on the other side (one such comparison suffices where the claim needs all);
    inconclusive    an interval straddles its threshold; the half-width printed beside it is the smallest
                    difference the study could have detected;
    indicative (n seeds)  fewer than 3 paired seeds: a direction, never a verdict;
    not testable    the runs lack an arm the claim needs, or the claim's premise failed in this regime.

Preconditions: the claims rest on conditions of the regime, computed with the same intervals and listed
first. A claim whose premise is contradicted is "not testable in this regime", with the premise's
numbers; a claim whose premise is not established (inconclusive or indicative) keeps its comparisons but
cannot be supported or contradicted (it reads "inconclusive (premise ... not established)").

* P1, the dense frontier: each larger vanilla rung beats the next smaller one at matched tokens (at the
  same width that is depth paying: pondering adds depth-like compute).
* P2, pondering pays: PonderLM-2 beats vanilla of the same size at matched tokens (each K).
* P3, more steps pay: PonderLM-2 with K=3 beats K=1 at the same size.

Claims and the decisions taken where the papers give no number (each printed with its claim):
* C0 (premise P1), PonderLM-2's headline (its 1.4B beats vanilla 2.8B on the same tokens): PonderLM-2 at
  rung s beats vanilla at the next rung of the ladder (about twice the non-embedding parameters).
  Supported if some PonderLM-2 arm is, contradicted if every arm is.
* C1 (premise P2: it compares two pondering models): PonderLM-3 minus PonderLM-2 K=3 in loss below ln(1.01)
  and PonderLM-3's FLOPs at most 0.9 of PonderLM-2's (per-seed ratio); supported if some arm meets both.
* C2 (premise P2): at equal FLOPs (PonderLM-3 within 2% of the baseline's, or below) PonderLM-3's loss is
  lower than every recursive or adaptive-depth baseline's (methods declaring ``depth_baseline``: looped, MoR,
  gated adaptive depth, recurrent depth, CoTFormer, Mixture-of-Depths); a baseline is beaten when some such PonderLM-3
  arm's interval is wholly below it, and wins when an arm with at least its FLOPs is wholly above.
* C3: Spearman's rho between a token's extra steps and its NLL > 0 over the PonderLM-3 runs whose steps
  vary, and mean steps of the rarest tenth of token occurrences above the most frequent tenth
  (:func:`harness.analyze.frequency_groups`); the interval is over runs.
* C4 (premise P2): PonderLM-1's order pondering < looped < pause < vanilla, each neighbour pair paired;
  per method, the arm at PonderLM-1's size with the most inference FLOPs.
* C5: the Jacobi gap |parallel - exact| / loss: small when its interval over PonderLM-2/3 runs lies below
  1%, large when it lies above 5%.

The depth probe (only for runs whose data carry difficulty labels, a ``synthetic:`` source; claims.md then
says first that the study is a probe of mechanisms, not the paper's claim):
* D0, the probe's precondition (premise of D1-D3): vanilla at the smallest size solves h = 1 (accuracy interval
  above 0.8) and fails the deepest h (interval below 0.6); otherwise the probe cannot tell methods apart.
* D1: deepest-h accuracy rises vanilla -> PonderLM-2 K=1 -> K=3 at one size (each step paired, > 0).
* D2: over PonderLM-3 runs, Spearman(extra steps, h) on answer tokens > 0 and mean steps on answers minus
  filler > 0, each by its 95% interval over runs.
* D3: PonderLM-3 minus PonderLM-2 K=3 in deepest-h accuracy > -0.01 and the per-seed inference FLOPs ratio
  < 0.9; supported if some PonderLM-3 arm meets both.
"""

from __future__ import annotations

import math
import pathlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from harness import stats
from harness.core import registry
from harness.core.config import SIZES
from harness.core.errors import ReportError, UnknownMethodError
from harness.core.io import write_bytes_atomic
from harness.results import OK, ResultsStore
from harness.stats import CONTRADICTED, INCONCLUSIVE, INDICATIVE, SUPPORTED, Interval

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CLAIMS_FILE = "claims.md"
PPL_TOLERANCE = math.log(1.01)  # C1: "within 1%" of perplexity, in loss
C1_FLOPS_RATIO = 0.9
C2_FLOPS_TOLERANCE = 0.02
C5_SMALL, C5_LARGE = 0.01, 0.05
NOT_TESTABLE = "not testable"
NOT_IN_REGIME = "not testable in this regime"


@dataclass
class Arm:
    """The seeds of one (method, variant, size)."""

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

    def by_seed(self, key: str) -> dict[int, float]:
        """``{seed: value}`` of a numeric result field."""
        return {int(r.get("seed", 0)): float(r[key]) for r in self.runs if isinstance(r.get(key), (int, float))}

    def values(self, key: str) -> list[float]:
        return list(self.by_seed(key).values())

    def mean(self, key: str) -> float:
        return stats.t_interval(self.values(key)).mean

    def config(self, key: str) -> Any:
        return (self.runs[0].get("config") or {}).get(key)

    def loss(self) -> str:
        interval = stats.t_interval(self.values("val_loss"))
        hw = f" ± {interval.half_width:.4f}" if interval.n >= 2 else ""
        return f"{interval.mean:.4f}{hw} (n={interval.n}, ppl {math.exp(interval.mean):.2f})"

    def flops(self) -> str:
        return _si(self.mean("infer_flops_per_token"))


@dataclass
class Comparison:
    """Arm ``a`` minus arm ``b`` in ``key``, paired by seed, tested against ``threshold`` on side ``side``."""

    a: Arm
    b: Arm
    interval: Interval
    threshold: float
    side: str  # "below": the claim is a - b < threshold; "above": a - b > threshold
    windows: tuple[float, float] | None  # the paired window bootstrap's 95% interval of the mean difference

    @property
    def verdict(self) -> str:
        test = stats.verdict_below if self.side == "below" else stats.verdict_above
        return test(self.interval, self.threshold)

    def row(self) -> str:
        """A markdown table row: comparison | mean [95% CI], n | windows | detectable | verdict."""
        bound = "<" if self.side == "below" else ">"
        windows = f"[{self.windows[0]:+.4f}, {self.windows[1]:+.4f}]" if self.windows else "–"
        detectable = f"{self.interval.half_width:.4f}" if self.interval.n >= 2 else "–"
        return (f"| {self.a.name} − {self.b.name} {bound} {self.threshold:+.4f} | {self.interval.text()} | "
                f"{windows} | {detectable} | {stats.indicative_text(self.verdict, self.interval.n)} |")


COMPARISON_HEADER = ["| comparison (loss, nats) | mean [95% t interval], n seeds | window bootstrap 95% | "
                     "detectable (half-width) | verdict |", "| --- | --- | --- | ---: | --- |"]


def compare(a: Arm, b: Arm, threshold: float = 0.0, side: str = "below", key: str = "val_loss") -> Comparison:
    """The paired comparison of ``a`` with ``b`` (per-seed ``key`` differences, and window bootstrap)."""
    interval = stats.paired(a.by_seed(key), b.by_seed(key))
    windows = None
    if key == "val_loss":
        wa = {int(r.get("seed", 0)): r["val_window_loss"] for r in a.runs if r.get("val_window_loss")}
        wb = {int(r.get("seed", 0)): r["val_window_loss"] for r in b.runs if r.get("val_window_loss")}
        windows = stats.window_bootstrap(wa, wb)
    return Comparison(a, b, interval, threshold, side, windows)


@dataclass
class Verdict:
    claim: str
    statement: str
    verdict: str
    evidence: list[str] = field(default_factory=list)  # markdown lines: the numbers behind the verdict
    decision: str = ""  # how the claim was operationalised, where the paper gives no number
    n: int = 0  # the fewest paired seeds among the comparisons the verdict rests on

    def display(self) -> str:
        return stats.indicative_text(self.verdict, self.n)


def arms_of(records: Iterable[dict[str, Any]]) -> list[Arm]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == OK and isinstance(r.get("val_loss"), (int, float)):
            key = (r.get("method"), (r.get("tags") or {}).get("variant") or "", r.get("size"))
            groups.setdefault(key, []).append(r)
    return [Arm(m, v, s, sorted(runs, key=lambda r: r.get("seed", 0))) for (m, v, s), runs in groups.items()]


def load_arms(folder: str | pathlib.Path) -> list[Arm]:
    store = ResultsStore(folder)
    if not store.path.exists():
        raise ReportError(f"no {store.path.name} in {folder}: give a folder written by `python -m harness sweep`")
    arms = arms_of(store.latest().values())
    if not arms:
        raise ReportError(f"{store.path} holds no finished job; nothing to test")
    return arms


# ---------------------------------------------------------------------------------------------------
# combining comparisons


def combine(verdicts: list[str]) -> str:
    """Every part must hold: all supported -> supported; any contradicted -> contradicted; otherwise indicative
    when some part is (and none straddles), else inconclusive; no part -> not testable."""
    if not verdicts:
        return NOT_TESTABLE
    if any(v == CONTRADICTED for v in verdicts):
        return CONTRADICTED
    if all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    if INCONCLUSIVE in verdicts:
        return INCONCLUSIVE
    return INDICATIVE


def any_of(verdicts: list[str]) -> str:
    """Some part must hold: any supported -> supported; all contradicted -> contradicted; else as combine."""
    if not verdicts:
        return NOT_TESTABLE
    if SUPPORTED in verdicts:
        return SUPPORTED
    if all(v == CONTRADICTED for v in verdicts):
        return CONTRADICTED
    return INCONCLUSIVE if INCONCLUSIVE in verdicts else INDICATIVE


def _finish(v: Verdict, comparisons: list[Comparison], verdict: str) -> Verdict:
    v.verdict = verdict
    v.n = min((c.interval.n for c in comparisons), default=0)
    if comparisons:
        v.evidence = COMPARISON_HEADER + [c.row() for c in comparisons] + v.evidence
    return v


def _pick(arms: list[Arm], test: Callable[[Arm], bool]) -> list[Arm]:
    return [a for a in arms if test(a)]


def _si(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}"
    return f"{x:.3g}"


def _rank(size: str) -> int:
    return list(SIZES).index(size) if size in SIZES else len(SIZES)


def _vanilla(arms: list[Arm]) -> dict[str, Arm]:
    """Vanilla's arm per size (its plain variant)."""
    return {a.size: a for a in arms if a.method == "vanilla" and not a.variant}


def _ponderlm3(arms: list[Arm]) -> list[Arm]:
    return _pick(arms, lambda a: a.method == "ponderlm3")


def _ponderlm2_k(arms: list[Arm], k: int) -> list[Arm]:
    return _pick(arms, lambda a: a.method == "ponderlm2" and a.config("latent_steps") == k)


# ---------------------------------------------------------------------------------------------------
# preconditions


PRECONDITION_TEXT: dict[str, tuple[str, str, str]] = {  # statement, test, what a study must run
    "P1": ("The dense frontier: each larger vanilla rung beats the next smaller one at matched tokens (at the same "
           "width, the deeper one: depth pays).",
           "larger rung minus smaller rung < 0 for every pair of neighbouring vanilla rungs",
           "needs vanilla at two sizes"),
    "P2": ("Pondering pays: PonderLM-2 beats vanilla of the same size at matched tokens.",
           "PonderLM-2 minus vanilla at the same size < 0, for every K the study ran",
           "needs PonderLM-2 and vanilla at one size"),
    "P3": ("More steps pay: PonderLM-2 with K=3 beats K=1 at the same size.",
           "PonderLM-2 K=3 minus K=1 at the same size < 0",
           "needs PonderLM-2 with K=1 and K=3 at one size"),
}


def precondition(name: str, arms: list[Arm]) -> Verdict:
    """P1, P2 or P3: every pair :func:`precondition_pairs` gives it must hold (a - b < 0)."""
    statement, test, missing = PRECONDITION_TEXT[name]
    v = Verdict(name, statement, NOT_TESTABLE, decision=test)
    comparisons = [compare(a, b) for pair, a, b in precondition_pairs(arms) if pair == name]
    if not comparisons:
        v.evidence.append(missing)
    return _finish(v, comparisons, combine([c.verdict for c in comparisons]))


def precondition_p1(arms: list[Arm]) -> Verdict:
    return precondition("P1", arms)


def precondition_p2(arms: list[Arm]) -> Verdict:
    return precondition("P2", arms)


def precondition_p3(arms: list[Arm]) -> Verdict:
    return precondition("P3", arms)


def precondition_pairs(arms: list[Arm]) -> list[tuple[str, Arm, Arm]]:
    """(precondition, a, b) for every comparison P1-P3 make (a - b < 0 is the precondition holding)."""
    vanilla = _vanilla(arms)
    ladder = sorted(vanilla.values(), key=lambda a: _rank(a.size))
    pairs = [("P1", larger, smaller) for smaller, larger in zip(ladder, ladder[1:])]
    pairs += [("P2", p2, vanilla[p2.size]) for p2 in _pick(arms, lambda a: a.method == "ponderlm2")
              if p2.size in vanilla]
    k1 = {a.size: a for a in _ponderlm2_k(arms, 1)}
    pairs += [("P3", k3, k1[k3.size]) for k3 in _ponderlm2_k(arms, 3) if k3.size in k1]
    return pairs


# ---------------------------------------------------------------------------------------------------
# the claims


def claim_c0(arms: list[Arm]) -> Verdict:
    v = Verdict("C0", "PonderLM-2's headline: pondering at rung s beats vanilla one rung up on the same tokens "
                "(paper: PonderLM-2-Pythia-1.4B beats vanilla Pythia-2.8B on 300B tokens).", NOT_TESTABLE,
                decision="PonderLM-2 at rung s minus vanilla at the next rung of the ladder < 0; supported if some "
                "PonderLM-2 arm is, contradicted if every arm is")
    vanilla = _vanilla(arms)
    ladder = sorted(vanilla, key=_rank)
    comparisons = []
    for p2 in _pick(arms, lambda a: a.method == "ponderlm2"):
        up = [s for s in ladder if _rank(s) > _rank(p2.size)]
        if up:
            comparisons.append(compare(p2, vanilla[up[0]]))
    if not comparisons:
        v.evidence.append("needs PonderLM-2 at a rung and vanilla at a larger one")
    return _finish(v, comparisons, any_of([c.verdict for c in comparisons]))


def _flops_ratio(p3: Arm, p2: Arm) -> Interval:
    a, b = p3.by_seed("infer_flops_per_token"), p2.by_seed("infer_flops_per_token")
    return stats.t_interval([a[s] / b[s] for s in sorted(set(a) & set(b)) if b[s] > 0])


def claim_c1(arms: list[Arm]) -> Verdict:
    v = Verdict("C1", "PonderLM-3 reaches PonderLM-2 (K=3)'s perplexity, within 1%, at no more than 90% of its "
                "measured inference FLOPs (paper: 46.4 average accuracy at 8.86 GFLOPs vs 46.0 at 9.84).",
                NOT_TESTABLE, decision="PonderLM-3 minus PonderLM-2 K=3 in loss < ln(1.01) and the per-seed "
                "FLOPs ratio < 0.9, both by their 95% intervals; supported if some PonderLM-3 arm at the same "
                "size meets both, contradicted if every arm fails one")
    comparisons, parts, ratio_lines = [], [], []
    for p2 in _ponderlm2_k(arms, 3):
        for p3 in _pick(_ponderlm3(arms), lambda a, size=p2.size: a.size == size):
            quality = compare(p3, p2, PPL_TOLERANCE)
            ratio = _flops_ratio(p3, p2)
            cost = stats.verdict_below(ratio, C1_FLOPS_RATIO)
            comparisons.append(quality)
            parts.append(combine([quality.verdict, cost]))
            ratio_lines.append(f"- {p3.name}: inference FLOPs / {p2.name}'s = {ratio.text(3, signed=False)} "
                               f"({p3.flops()} vs {p2.flops()}): {stats.indicative_text(cost, ratio.n)} "
                               f"(< {C1_FLOPS_RATIO})")
    v.evidence = ["", *ratio_lines] if ratio_lines else ["needs PonderLM-2 with K=3 and PonderLM-3 at one size"]
    return _finish(v, comparisons, any_of(parts))


def _against(p3s: list[Arm], base: Arm) -> tuple[str, list[Comparison]]:
    """One baseline against the PonderLM-3 arms at its size: beaten when an arm with at most its FLOPs is
    wholly below it, winning when an arm with at least its FLOPs is wholly above."""
    flops_b = base.mean("infer_flops_per_token")
    comparisons, outcomes = [], []
    for p in p3s:
        flops_p, c = p.mean("infer_flops_per_token"), compare(p, base)
        comparisons.append(c)
        if c.verdict == SUPPORTED and flops_p <= flops_b * (1 + C2_FLOPS_TOLERANCE):
            outcomes.append(SUPPORTED)
        elif c.verdict == CONTRADICTED and flops_p >= flops_b * (1 - C2_FLOPS_TOLERANCE):
            outcomes.append(CONTRADICTED)
        else:  # a loss at fewer FLOPs, or a win at more, says nothing about equal FLOPs
            outcomes.append(INDICATIVE if c.verdict == INDICATIVE else INCONCLUSIVE)
    if SUPPORTED in outcomes and CONTRADICTED not in outcomes:
        return SUPPORTED, comparisons
    if CONTRADICTED in outcomes and SUPPORTED not in outcomes:
        return CONTRADICTED, comparisons
    return (INDICATIVE if outcomes and all(o == INDICATIVE for o in outcomes) else INCONCLUSIVE), comparisons


def is_depth_baseline(arm: Arm) -> bool:
    """The arm's method declares itself a recursive or adaptive-depth baseline (``depth_baseline`` in
    models/base.py); a method no longer installed counts as none."""
    try:
        return bool(registry.get(arm.method).cls.depth_baseline)
    except UnknownMethodError:
        return False


def claim_c2(arms: list[Arm]) -> Verdict:
    v = Verdict("C2", "At equal measured inference FLOPs, PonderLM-3 has lower perplexity than the recursive and "
                "adaptive-depth baselines (every arm whose method declares ``depth_baseline``: looped, MoR, gated "
                "adaptive depth, recurrent depth, CoTFormer, Mixture-of-Depths).", NOT_TESTABLE,
                decision=f"per baseline, every PonderLM-3 arm at its size: beaten if an arm with at most its FLOPs "
                f"(+{C2_FLOPS_TOLERANCE:.0%}) is wholly below it, winning if an arm with at least its FLOPs "
                f"(-{C2_FLOPS_TOLERANCE:.0%}) is wholly above; every baseline must be beaten")
    comparisons, parts = [], []
    for base in _pick(arms, is_depth_baseline):
        p3s = _pick(_ponderlm3(arms), lambda a, size=base.size: a.size == size)
        if not p3s:
            continue
        verdict, here = _against(p3s, base)
        comparisons += here
        parts.append(verdict)
        v.evidence.append(f"- {base.name}: {base.flops()} FLOPs/token, loss {base.loss()}: "
                          f"{stats.indicative_text(verdict, min(c.interval.n for c in here))}")
    if parts:
        v.evidence = ["", *v.evidence, *(f"- {p.name}: {p.flops()} FLOPs/token, loss {p.loss()}"
                                         for p in _ponderlm3(arms))]
    else:
        v.evidence.append("needs PonderLM-3 and at least one of looped, mor, adaponder at the same size")
    return _finish(v, comparisons, combine(parts))


def claim_c3(arms: list[Arm]) -> Verdict:
    v = Verdict("C3", "The tokens that take more steps are the harder ones: Spearman(extra steps, token NLL) > 0, "
                "and rare tokens take more steps than frequent ones.", NOT_TESTABLE,
                decision="over PonderLM-3 runs whose steps vary (every penalty and seed): the 95% t interval of "
                "each statistic over runs lies above 0; rare/frequent = the rarest and most frequent tenth of "
                "token occurrences in the validation text")
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
        v.evidence.append(f"- {constant} PonderLM-3 run(s) took the same number of steps for every token "
                          "(nothing to correlate)")
    if not rhos:
        v.verdict = INCONCLUSIVE if constant else NOT_TESTABLE
        return v
    rho = stats.t_interval(rhos)
    parts = [stats.verdict_above(rho, 0.0)]
    v.evidence.append(f"- Spearman(steps, NLL): {rho.text(3)} runs: {stats.indicative_text(parts[0], rho.n)}")
    if diffs:
        diff = stats.t_interval(diffs)
        parts.append(stats.verdict_above(diff, 0.0))
        v.evidence.append(f"- mean steps, rare minus frequent tokens: {diff.text(3)} runs: "
                          f"{stats.indicative_text(parts[1], diff.n)}")
    v.verdict, v.n = combine(parts), rho.n
    return v


C4_ORDER = ("pondering", "looped", "pause", "vanilla")


def claim_c4(arms: list[Arm]) -> Verdict:
    v = Verdict("C4", "PonderLM-1's ablation order at matched tokens holds: pondering < looped < pause < vanilla in "
                "perplexity (paper: 14.16 < 15.33 < 16.53 < 16.95).", NOT_TESTABLE,
                decision="each neighbour pair paired (better minus worse < 0); per method, the arm at PonderLM-1's "
                "size with the most inference FLOPs")
    chosen: list[Arm] = []
    for size in sorted({a.size for a in arms if a.method == "pondering"}, key=_rank):
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
    comparisons = [compare(better, worse) for better, worse in zip(chosen, chosen[1:])]
    return _finish(v, comparisons, combine([c.verdict for c in comparisons]))


def claim_c5(arms: list[Arm]) -> Verdict:
    v = Verdict("C5", "The Jacobi gap (parallel training loss minus exact sequential decoding) is small relative to "
                "the loss.", NOT_TESTABLE,
                decision=f"|gap| / loss over every PonderLM-2/3 run: small when its 95% interval lies below "
                f"{C5_SMALL:.0%}, large when it lies above {C5_LARGE:.0%}")
    relative = []
    for arm in _pick(arms, lambda a: a.method in ("ponderlm2", "ponderlm3")):
        gaps = [abs(r["jacobi_gap"]) / r["val_loss"] for r in arm.runs if isinstance(r.get("jacobi_gap"), (int, float))]
        if gaps:
            relative.extend(gaps)
            v.evidence.append(f"- {arm.name}: Jacobi gap {stats.t_interval(arm.values('jacobi_gap')).text(6)} nats, "
                              f"{max(gaps):.4%} of the loss at most")
    if not relative:
        v.evidence.append("needs PonderLM-2 or PonderLM-3 runs")
        return v
    interval = stats.t_interval(relative)
    small, large = stats.verdict_below(interval, C5_SMALL), stats.verdict_above(interval, C5_LARGE)
    v.verdict = small if small in (SUPPORTED, INDICATIVE) else (CONTRADICTED if large == SUPPORTED else INCONCLUSIVE)
    v.n = interval.n
    v.evidence.insert(0, f"- |gap| / loss over {interval.n} run(s): {interval.text(6)}")
    return v


# ---------------------------------------------------------------------------------------------------
# the depth probe (synthetic sources with known difficulty: harness.data.synthetic): D0-D3


D0_SOLVED = 0.8   # D0: vanilla "solves" h = 1 when its accuracy interval lies above this
D0_FAILS = 0.6    # and "fails" the deepest h when that interval lies below this
D3_ACCURACY_TOLERANCE = 0.01  # "within 1 point" of accuracy
D3_FLOPS_RATIO = 0.9
PROBE_LINE = ("**This study is a probe of mechanisms, not the paper's claim**: its data are synthetic items "
              "(p-hop induction or running modular sums) among filler (harness/data/synthetic.py), whose "
              "difficulty h is known by construction; D0 checks that the probe discriminates, and D1-D3 read off "
              "whether extra steps solve deeper items and whether the adaptive method spends them there. "
              "The preconditions and C0-C5 are computed on its loss like any study's.")
ACCURACY_HEADER = ["| comparison (deepest-h accuracy) | mean [95% t interval], n seeds | window bootstrap 95% | "
                   "detectable (half-width) | verdict |", "| --- | --- | --- | ---: | --- |"]


def has_difficulty(arms: list[Arm]) -> bool:
    """Some run carries metrics by difficulty (``harness.evaluate.difficulty_metrics``)."""
    return any(isinstance(r.get("difficulty"), dict) for a in arms for r in a.runs)


def _accuracy_finish(v: Verdict, comparisons: list[Comparison], verdict: str) -> Verdict:
    v = _finish(v, comparisons, verdict)
    if comparisons:
        v.evidence[:len(COMPARISON_HEADER)] = ACCURACY_HEADER
    return v


def _accuracy_at(run: dict[str, Any], h: int) -> float | None:
    row = (run.get("difficulty") or {}).get(str(h))
    return float(row["accuracy"]) if isinstance(row, dict) and "accuracy" in row else None


def precondition_d0(arms: list[Arm]) -> Verdict:
    """The probe's own precondition: without it, D1-D3 read nothing (every arm at chance, or every arm solved)."""
    v = Verdict("D0", "The probe discriminates: vanilla at the smallest size the study ran solves h=1 and fails the "
                "deepest h.", NOT_TESTABLE,
                decision=f"over vanilla's seeds at its smallest size, the 95% t interval of accuracy at h=1 lies above "
                f"{D0_SOLVED:g} and that at the deepest h below {D0_FAILS:g}")
    vanilla = sorted((a for a in _vanilla(arms).values() if a.values("deepest_h_accuracy")),
                     key=lambda a: _rank(a.size))
    if not vanilla:
        v.evidence.append("needs vanilla with difficulty metrics")
        return v
    arm = vanilla[0]
    first = stats.t_interval([x for x in (_accuracy_at(r, 1) for r in arm.runs) if x is not None])
    deepest = stats.t_interval(arm.values("deepest_h_accuracy"))
    parts = [stats.verdict_above(first, D0_SOLVED), stats.verdict_below(deepest, D0_FAILS)]
    v.verdict, v.n = combine(parts), min(first.n, deepest.n)
    v.evidence += [f"- {arm.name}, accuracy at h=1: {first.text(3, signed=False)}: "
                   f"{stats.indicative_text(parts[0], first.n)} (> {D0_SOLVED:g})",
                   f"- {arm.name}, accuracy at the deepest h: {deepest.text(3, signed=False)}: "
                   f"{stats.indicative_text(parts[1], deepest.n)} (< {D0_FAILS:g})"]
    return v


def claim_d1(arms: list[Arm]) -> Verdict:
    v = Verdict("D1", "Extra steps solve deeper items: accuracy at the deepest h rises from vanilla to PonderLM-2 K=1 "
                "to PonderLM-2 K=3.", NOT_TESTABLE,
                decision="per size, PonderLM-2 K=1 minus vanilla and K=3 minus K=1 in deepest-h accuracy > 0, "
                "paired by seed; every comparison must hold")
    vanilla = {a.size: a for a in _vanilla(arms).values() if a.values("deepest_h_accuracy")}
    k1 = {a.size: a for a in _ponderlm2_k(arms, 1)}
    comparisons = []
    for k3 in _ponderlm2_k(arms, 3):
        if k3.size in vanilla and k3.size in k1:
            comparisons += [compare(k1[k3.size], vanilla[k3.size], 0.0, "above", "deepest_h_accuracy"),
                            compare(k3, k1[k3.size], 0.0, "above", "deepest_h_accuracy")]
    if not comparisons:
        v.evidence.append("needs vanilla and PonderLM-2 with K=1 and K=3 at one size, with difficulty metrics")
    return _accuracy_finish(v, comparisons, combine([c.verdict for c in comparisons]))


def _answer_minus_filler_steps(run: dict[str, Any]) -> float | None:
    """Mean steps on answers (every h > 0, weighted by count) minus mean steps on filler (h = 0)."""
    table = run.get("difficulty") or {}
    filler = table.get("0", {}).get("mean_steps")
    answers = [(row["n"], row["mean_steps"]) for h, row in table.items() if h != "0" and "mean_steps" in row]
    total = sum(n for n, _ in answers)
    if filler is None or not total:
        return None
    return sum(n * m for n, m in answers) / total - float(filler)


def claim_d2(arms: list[Arm]) -> Verdict:
    v = Verdict("D2", "PonderLM-3 spends its steps where the difficulty is: Spearman(extra steps, h) over answer "
                "tokens > 0, and more mean steps on answer tokens than on filler.", NOT_TESTABLE,
                decision="over PonderLM-3 runs whose steps vary on answers (every penalty and seed): the 95% t "
                "interval of each statistic over runs lies above 0")
    rhos, diffs, constant = [], [], 0
    for arm in _ponderlm3(arms):
        for run in arm.runs:
            if not isinstance(run.get("difficulty"), dict):
                continue
            diff = _answer_minus_filler_steps(run)
            if diff is not None:
                diffs.append(diff)
            if isinstance(run.get("spearman_steps_h"), (int, float)):
                rhos.append(float(run["spearman_steps_h"]))
            else:
                constant += 1
    if constant:
        v.evidence.append(f"- {constant} PonderLM-3 run(s) took the same number of steps on every answer "
                          "(nothing to correlate)")
    if not rhos and not diffs:
        v.verdict = INCONCLUSIVE if constant else NOT_TESTABLE
        if not constant:
            v.evidence.append("needs PonderLM-3 runs with difficulty metrics")
        return v
    parts, ns = [], []
    for label, values in (("Spearman(steps, h) on answers", rhos), ("mean steps, answers minus filler", diffs)):
        if values:
            interval = stats.t_interval(values)
            parts.append(stats.verdict_above(interval, 0.0))
            ns.append(interval.n)
            v.evidence.append(f"- {label}: {interval.text(3)} runs: {stats.indicative_text(parts[-1], interval.n)}")
        else:
            parts.append(INCONCLUSIVE)
    v.verdict, v.n = combine(parts), min(ns)
    return v


def claim_d3(arms: list[Arm]) -> Verdict:
    v = Verdict("D3", "PonderLM-3 comes within 1 point of PonderLM-2 (K=3)'s deepest-h accuracy at no more than 90% "
                "of its measured inference FLOPs.", NOT_TESTABLE,
                decision=f"PonderLM-3 minus PonderLM-2 K=3 in deepest-h accuracy > -{D3_ACCURACY_TOLERANCE:g} and the "
                f"per-seed FLOPs ratio < {D3_FLOPS_RATIO}, both by their 95% intervals; supported if some PonderLM-3 "
                "arm at the same size meets both, contradicted if every arm fails one")
    comparisons, parts, ratio_lines = [], [], []
    for p2 in _ponderlm2_k(arms, 3):
        if not p2.values("deepest_h_accuracy"):
            continue
        for p3 in _pick(_ponderlm3(arms), lambda a, size=p2.size: a.size == size):
            quality = compare(p3, p2, -D3_ACCURACY_TOLERANCE, "above", "deepest_h_accuracy")
            ratio = _flops_ratio(p3, p2)
            cost = stats.verdict_below(ratio, D3_FLOPS_RATIO)
            comparisons.append(quality)
            parts.append(combine([quality.verdict, cost]))
            ratio_lines.append(f"- {p3.name}: inference FLOPs / {p2.name}'s = {ratio.text(3, signed=False)} "
                               f"({p3.flops()} vs {p2.flops()}): {stats.indicative_text(cost, ratio.n)} "
                               f"(< {D3_FLOPS_RATIO})")
    v.evidence = ["", *ratio_lines] if ratio_lines else ["needs PonderLM-2 with K=3 and PonderLM-3 at one size, with "
                                                         "difficulty metrics"]
    return _accuracy_finish(v, comparisons, any_of(parts))


PROBE_CLAIMS: tuple[Callable[[list[Arm]], Verdict], ...] = (claim_d1, claim_d2, claim_d3)


def evaluate_probe(arms: list[Arm]) -> list[Verdict]:
    """D0 and D1-D3 (gated by D0) where the runs carry difficulty metrics, else nothing."""
    if not has_difficulty(arms):
        return []
    d0 = precondition_d0(arms)
    return [d0, *(gate(claim(arms), {"D0": d0}) for claim in PROBE_CLAIMS)]


def probe_lines(arms: list[Arm]) -> list[str]:
    """Accuracy by h per arm (mean over seeds), the table under D1-D3."""
    levels = sorted({int(h) for a in arms for r in a.runs for h in (r.get("difficulty") or {}) if h != "0"})
    if not levels:
        return []
    out = ["| arm | n | " + " | ".join(f"acc h={h}" for h in levels) + " | inference FLOPs/token |",
           "| --- | ---: | " + " | ".join("---:" for _ in levels) + " | ---: |"]
    for arm in arms:
        runs = [r for r in arm.runs if isinstance(r.get("difficulty"), dict)]
        if not runs:
            continue
        cells = []
        for h in levels:
            values = [r["difficulty"][str(h)]["accuracy"] for r in runs if str(h) in r["difficulty"]]
            cells.append(f"{stats.t_interval(values).mean:.3f}" if values else "–")
        out.append(f"| {arm.name} | {len(runs)} | " + " | ".join(cells) + f" | {arm.flops()} |")
    return out


PRECONDITIONS: tuple[Callable[[list[Arm]], Verdict], ...] = (precondition_p1, precondition_p2, precondition_p3)
CLAIMS: tuple[Callable[[list[Arm]], Verdict], ...] = (claim_c0, claim_c1, claim_c2, claim_c3, claim_c4, claim_c5)
#: the preconditions each claim rests on (module docstring)
PREMISES: dict[str, tuple[str, ...]] = {"C0": ("P1",), "C1": ("P2",), "C2": ("P2",), "C4": ("P2",),
                                        "D1": ("D0",), "D2": ("D0",), "D3": ("D0",)}


def gate(claim: Verdict, preconditions: dict[str, Verdict]) -> Verdict:
    """Apply the claim's premises: contradicted -> not testable in this regime; not established -> the claim's
    comparisons stay, but it cannot be supported or contradicted."""
    premises = [preconditions[p] for p in PREMISES.get(claim.claim, ()) if p in preconditions]
    failed = [p for p in premises if p.verdict == CONTRADICTED]
    unsettled = [p for p in premises if p.verdict != SUPPORTED]
    if claim.verdict == NOT_TESTABLE:
        return claim
    if failed:
        names = ", ".join(p.claim for p in failed)
        claim.evidence = [f"*Premise {names} failed in this regime* (its comparisons above): the claim's own "
                          "comparisons follow, for the record.", "", *claim.evidence]
        claim.verdict = NOT_IN_REGIME
    elif unsettled and claim.verdict in (SUPPORTED, CONTRADICTED):
        names = ", ".join(f"{p.claim} {p.display()}" for p in unsettled)
        claim.evidence = [f"*Premise not established* ({names}): the comparisons alone would read "
                          f"{claim.verdict}.", "", *claim.evidence]
        claim.verdict = f"{INCONCLUSIVE} (premise {', '.join(p.claim for p in unsettled)} not established)"
    return claim


def evaluate_preconditions(arms: list[Arm]) -> list[Verdict]:
    return [p(arms) for p in PRECONDITIONS]


def evaluate_claims(arms: list[Arm], preconditions: list[Verdict] | None = None) -> list[Verdict]:
    """Every claim, gated by its premises (computed here unless given)."""
    by_name = {p.claim: p for p in (preconditions if preconditions is not None else evaluate_preconditions(arms))}
    return [gate(claim(arms), by_name) for claim in CLAIMS]


# ---------------------------------------------------------------------------------------------------
# learning curves: the preconditions along training


def curve_by_seed(arm: Arm) -> dict[int, dict[int, float]]:
    """``{seed: {training tokens: val_loss}}`` of an arm's learning curves (result.json ``curve``)."""
    return {int(r.get("seed", 0)): {int(p["tokens"]): float(p["val_loss"]) for p in r.get("curve") or []}
            for r in arm.runs if r.get("curve")}


def curve_comparison(a: Arm, b: Arm) -> list[tuple[int, Interval]]:
    """The paired difference a - b at every training-token count both arms' curves share."""
    ca, cb = curve_by_seed(a), curve_by_seed(b)
    seeds = sorted(set(ca) & set(cb))
    points = sorted(set.intersection(*(set(ca[s]) & set(cb[s]) for s in seeds))) if seeds else []
    return [(t, stats.paired({s: ca[s][t] for s in seeds}, {s: cb[s][t] for s in seeds})) for t in points]


def curve_lines(arms: list[Arm], points: int = 5) -> list[str]:
    """The preconditions' paired differences along training, at up to ``points`` curve points."""
    rows = []
    for name, a, b in precondition_pairs(arms):
        curve = curve_comparison(a, b)
        if len(curve) < 2:
            continue
        step = max(1, math.ceil(len(curve) / points))
        shown = curve[::-1][::step][::-1]  # the last point always shown
        cells = "; ".join(f"{_si(t)}: {iv.mean:+.3f}" + (f" ± {iv.half_width:.3f}" if iv.n >= 2 else "")
                          for t, iv in shown)
        rows.append(f"- {name}, {a.name} − {b.name} (n={shown[-1][1].n}) at training tokens: {cells}")
    return rows


# ---------------------------------------------------------------------------------------------------
# the report


def pruning_lines(arms: list[Arm]) -> list[str]:
    """Deployed pruning of every PonderLM-3 arm: extra steps against K, and the train/inference gap."""
    lines = []
    for arm in _ponderlm3(arms):
        tau = arm.config("prune_threshold")
        steps = stats.t_interval(arm.values("mean_extra_steps")).text(3, signed=False)
        gap = stats.t_interval(arm.values("consistency_gap")).text(5)
        lines.append(f"- {arm.name}: {steps} extra steps of K={arm.config('latent_steps')} at "
                     f"tau={'?' if tau is None else f'{tau:g}'}; consistency gap {gap} nats")
    return lines


PIPELINE_CHECK_LINE = ("**This study is a pipeline check, not evidence**: it runs every method end to end in "
                       "minutes, too short and with too few seeds for any verdict below to mean anything.")


def markdown(arms: list[Arm], verdicts: list[Verdict], title: str, preconditions: list[Verdict] | None = None,
             pipeline_check: bool = False) -> str:
    preconditions = preconditions if preconditions is not None else evaluate_preconditions(arms)
    out = [PIPELINE_CHECK_LINE, ""] if pipeline_check else []
    probe = evaluate_probe(arms)
    if probe:
        out += [PROBE_LINE, ""]
    out += [f"# Claims report: {title}", "",
            "Computed by `python -m harness claims` from runs.jsonl (harness/claims.py gives the rules). Every "
            "comparison is a paired difference over the seeds both arms ran (seed s gives every method the same "
            "batches, validation windows and shared initial values): its mean, 95% Student-t interval and n, "
            "beside a paired bootstrap over validation windows (the evaluation's own noise). A verdict needs the "
            "whole interval on one side of the threshold and at least 3 seeds; the half-width is the smallest "
            "difference the study could have detected. A contradicted claim is a result, not an error.", "",
            "| | verdict | n (fewest paired seeds) |", "| --- | --- | ---: |"]
    out += [f"| {v.claim} (precondition) | **{v.display()}** | {v.n} |" for v in preconditions]
    out += [f"| {v.claim} | **{v.display()}** | {v.n} |" for v in verdicts]
    out += [f"| {v.claim} (depth probe{', precondition' if v.claim == 'D0' else ''}) | **{v.display()}** | {v.n} |"
            for v in probe]
    out += ["", "## Preconditions", ""]
    for v in preconditions:
        out += [f"### {v.claim}: {v.display()}", "", v.statement, "", f"*Test:* {v.decision}.", "", *v.evidence, ""]
    along = curve_lines(arms)
    if along:
        out += ["### Along training", "",
                "Paired differences (nats, mean ± 95% half-width) of the parallel validation loss on the learning "
                "curves; negative means the precondition holds at that point:", "", *along, ""]
    pruning = pruning_lines(arms)
    if pruning:
        out += ["## PonderLM-3 deployed pruning", "", *pruning, ""]
    out += ["## Claims"]
    for v in verdicts:
        premises = PREMISES.get(v.claim)
        out += ["", f"### {v.claim}: {v.display()}", "", v.statement, ""]
        if premises:
            out += [f"*Premise:* {', '.join(premises)}.", ""]
        if v.decision:
            out += [f"*Test:* {v.decision}.", ""]
        out += v.evidence
    if probe:
        out += ["", "## Depth probe", "", "Accuracy (greedy next token = the answer) by difficulty h, mean over "
                "seeds:", "", *probe_lines(arms)]
        for v in probe:
            premises = PREMISES.get(v.claim)
            out += ["", f"### {v.claim}: {v.display()}", "", v.statement, ""]
            if premises:
                out += [f"*Premise:* {', '.join(premises)}.", ""]
            out += [f"*Test:* {v.decision}.", "", *v.evidence]
    return "\n".join(out) + "\n"


def is_pipeline_check(folder: str | pathlib.Path) -> bool:
    """The study the folder's sweep ran (its copy, study.toml) declares ``pipeline_check = true``."""
    path = pathlib.Path(folder) / "study.toml"
    try:
        return bool(tomllib.loads(path.read_text(encoding="utf-8")).get("pipeline_check", False))
    except (OSError, tomllib.TOMLDecodeError):
        return False


def report(folder: str | pathlib.Path) -> str:
    """claims.md's text for a sweep folder."""
    folder = pathlib.Path(folder)
    arms = load_arms(folder)
    preconditions = evaluate_preconditions(arms)
    return markdown(arms, evaluate_claims(arms, preconditions), folder.resolve().name, preconditions,
                    is_pipeline_check(folder))


def write_claims(folder: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(folder) / CLAIMS_FILE
    write_bytes_atomic(path, report(folder).encode("utf-8"))
    return path


__all__ = ["CLAIMS", "CLAIMS_FILE", "NOT_IN_REGIME", "NOT_TESTABLE", "PRECONDITIONS", "PREMISES", "PROBE_CLAIMS",
           "Arm", "Comparison", "Verdict", "any_of", "arms_of", "combine", "compare", "curve_comparison",
           "evaluate_claims", "evaluate_preconditions", "evaluate_probe", "gate", "has_difficulty", "load_arms",
           "markdown", "precondition_pairs", "report", "write_claims"]
