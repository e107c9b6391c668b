"""The plugin contract's checks (docs/design.md, "The plugin contract"), shipped for plugin authors.

``python -m harness check METHOD`` runs them on a registered method, for its defaults and every config
variant it declares (``LanguageModel.test_variants``); ``tests/test_contract.py`` runs the same functions
under pytest for every registered method. A plugin's own test suite can do the same::

    from harness.check import CHECKS, cases
    @pytest.mark.parametrize("case", cases(["my_method"]), ids=str)
    @pytest.mark.parametrize("check", list(CHECKS))
    def test_contract(case, check):
        CHECKS[check](case.method, case.overrides)

The checks: deployed decoding with a cache equals a full forward and recomputation, no prediction
depends on the future, padding changes nothing and costs nothing, the ledger's FLOPs equal the
method's analytic counts (inference: exactly for the steps taken, at most the maximum and equal to it
when forced there; training: exactly, where the method says its count is exact), every parameter gets
a gradient, and the declarations are consistent. A failed check raises :class:`ContractViolation`
(an ``AssertionError``) whose message says what broke and how to fix it. A check that crashes instead is
reported with its exception and the innermost frame of the traceback in the plugin's own code
(:func:`crash_site`); ``HARNESS_DEBUG=1`` also prints the full traceback.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.core import compute, registry
from models import backbone
from models.base import BENCH_ROLES, IGNORE_INDEX, JACOBI_TRAINING, PRUNED_DECODING, EvalSpec, LanguageModel

TINY: dict[str, Any] = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_ff=64)
VOCAB = TINY["vocab_size"]
ATOL, RTOL = 2e-5, 1e-4  # float32 drift between equal computations in another order
EXACT = 1e-12  # FLOPs counts are exact: a relative tolerance for float sums only


class ContractViolation(AssertionError):
    """A broken rule of the plugin contract; the message names it and how to fix it."""


@dataclass(frozen=True)
class Case:
    """One configuration the checks run on: a method's defaults or one of its declared test variants."""

    method: str
    variant: str = ""  # "" for the defaults
    overrides: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __str__(self) -> str:
        return f"{self.method}-{self.variant}" if self.variant else self.method


def cases(methods: Iterable[str] | None = None) -> list[Case]:
    """The defaults and every declared variant of ``methods`` (default: every registered method)."""
    out = []
    for name in sorted(registry.plugins()) if methods is None else methods:
        out.append(Case(name))
        for variant, overrides in registry.get(name).cls.test_variants.items():
            out.append(Case(name, variant, dict(overrides)))
    return out


def build(name: str, overrides: dict[str, Any] | None = None):
    """A tiny model of ``name`` in eval mode; routers and gates get random weights so decisions vary."""
    torch.manual_seed(0)
    base = {**TINY, **registry.get(name).cls.test_base}
    model = registry.build(name, overrides={**base, **(overrides or {})}).eval()
    with torch.no_grad():  # routers and gates start neutral; random weights make decisions vary
        for pname, p in model.named_parameters():
            if "router" in pname or "gate" in pname:
                p.normal_(0, 0.5)
    return model


def steps_of(out, like: torch.Tensor) -> torch.Tensor:
    """The extra steps per token a decode/score output reports (0 for a method that reports none)."""
    return out.steps if out.steps is not None else torch.zeros(like.shape, dtype=torch.long)


def same_participation(a, b) -> bool:
    """Two outputs report the same routed units per token (or both report none)."""
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# assertions with messages


def require(condition: Any, what: str, fix: str) -> None:
    if not condition:
        raise ContractViolation(f"{what}; fix: {fix}")


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, fix: str, atol: float = ATOL,
          rtol: float = RTOL) -> None:
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    except AssertionError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[:3] if line.strip())
        raise ContractViolation(f"{what} ({detail}); fix: {fix}") from None


def same_flops(actual: float, expected: float, what: str, fix: str, rel: float = EXACT) -> None:
    if not abs(actual - expected) <= rel * max(abs(expected), 1e-300):
        raise ContractViolation(f"{what}: measured {actual:.6g} FLOPs, expected {expected:.6g}; fix: {fix}")


# ---------------------------------------------------------------------------------------------------
# the checks: each takes (method, overrides) and raises ContractViolation


def check_cached_decoding(name: str, overrides: dict[str, Any]) -> None:
    """Decoding in pieces with a cache equals one call and a fresh cache per prefix; score is decode."""
    model = build(name, overrides)
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        whole = model.decode(ids, model.new_cache(2))
        cache = model.new_cache(2)
        pieces = [model.decode(ids[:, :4], cache)]
        pieces += [model.decode(ids[:, t:t + 1], cache) for t in range(4, 9)]
        pieces.append(model.decode(ids[:, 9:], cache))
        stepwise = torch.cat([p.logits for p in pieces], dim=1)
        fresh = [model.decode(ids[:, :t + 1], model.new_cache(2)) for t in range(11)]
        recomputed = torch.stack([f.logits[:, -1] for f in fresh], dim=1)
        scored = model.score(ids[:, :-1], ids[:, 1:])
    cache_fix = ("decode must append every given token's keys/values to the cache and use the cache's length as "
                 "the position offset (decoder.positions_after(cache.length, ...))")
    close(stepwise, whole.logits, "decoding 4 tokens, 5 single tokens, then 2 with one cache differs from decoding "
          "all 11 at once", cache_fix)
    close(recomputed, whole.logits, "the last logits of each prefix decoded with a fresh cache differ from one "
          "decode of the whole sequence (a full forward)", cache_fix)
    steps = steps_of(whole, ids)
    require(torch.equal(torch.cat([steps_of(p, p.logits[..., 0]) for p in pieces], dim=1), steps),
            "the extra steps per token differ between cached pieces and one decode",
            "a token's routing/halting decision must depend on its prefix only, not on how it was fed")
    require(torch.equal(torch.stack([steps_of(f, f.logits[..., 0])[:, -1] for f in fresh], dim=1), steps),
            "the extra steps per token differ between recomputed prefixes and one decode",
            "a token's routing/halting decision must depend on its prefix only")
    if whole.participation is not None:
        routing_fix = "a token's per-layer routing must depend on its prefix only, not on how it was fed"
        require(all(p.participation is not None for p in pieces + fresh)
                and torch.equal(torch.cat([p.participation for p in pieces], dim=1), whole.participation),
                "the routed units per token (participation) differ between cached pieces and one decode", routing_fix)
        require(torch.equal(torch.stack([f.participation[:, -1] for f in fresh], dim=1), whole.participation),
                "the routed units per token (participation) differ between recomputed prefixes and one decode",
                routing_fix)
        require(same_participation(scored.participation, whole.participation[:, :-1]),
                "score reports other participation than decode", "do not override score")
    expected = torch.log_softmax(whole.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    close(scored.logprobs, expected, "score's log-probabilities are not those of decode's logits",
          "do not override score, or make it return log_softmax of decode's logits at the targets")
    require(torch.equal(steps_of(scored, ids[:, 1:]), steps[:, :-1]), "score reports other steps than decode",
            "score must report decode's steps (masked to 0 at padding)")
    require(0 <= int(steps.min()) <= int(steps.max()) <= model.max_extra_steps(),
            f"steps range {int(steps.min())}..{int(steps.max())} leaves 0..max_extra_steps()={model.max_extra_steps()}",
            "max_extra_steps must return the most extra steps decode may report")


def check_causality(name: str, overrides: dict[str, Any]) -> None:
    """Changing tokens 7.. changes no prediction, log-probability or step count before position 7."""
    model = build(name, overrides)
    ids = torch.randint(0, VOCAB, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1 + torch.randint(0, VOCAB - 2, (2, 5))) % VOCAB  # every later token differs
    with torch.no_grad():
        a = model.score(ids, ids.roll(-1, 1))
        b = model.score(changed, ids.roll(-1, 1))
        decoded = [model.decode(x, model.new_cache(2)).logits for x in (ids, changed)]
    fix = "mask attention causally (decoder.plan builds the causal mask) and pool nothing across later positions"
    close(decoded[0][:, :7], decoded[1][:, :7], "logits of positions 0-6 change when tokens 7-11 change", fix,
          atol=1e-5, rtol=1e-5)
    close(a.logprobs[:, :7], b.logprobs[:, :7], "scores of positions 0-6 change when tokens 7-11 change", fix,
          atol=1e-5, rtol=1e-5)
    require(torch.equal(steps_of(a, ids)[:, :7], steps_of(b, ids)[:, :7]),
            "steps of positions 0-6 change when tokens 7-11 change", fix)
    if a.participation is not None:
        require(b.participation is not None and torch.equal(a.participation[:, :7], b.participation[:, :7]),
                "the routed units (participation) of positions 0-6 change when tokens 7-11 change", fix)
    require((a.logprobs[:, 7:] - b.logprobs[:, 7:]).abs().amax() > 1e-4,
            "changing tokens 7-11 changes none of their own scores: the model ignores its input",
            "decode must compute logits from the given tokens")


def check_padding(name: str, overrides: dict[str, Any]) -> None:
    """Right padding (targets IGNORE_INDEX) changes no real token's score or steps and costs no FLOPs."""
    model = build(name, overrides)
    lengths = [11, 6, 3]
    inputs = torch.randint(0, VOCAB, (3, 11))  # whatever sits in padding must not matter
    targets = torch.randint(0, VOCAB, (3, 11))
    for i, n in enumerate(lengths):
        targets[i, n:] = IGNORE_INDEX
    fix = ("pass `valid` to decoder.plan(key_valid=valid) and decoder.head(h, valid) so padding is neither key, "
           "query nor head position, and report 0 steps there")
    flops = 0.0
    with torch.no_grad():
        with compute.measure() as ledger:
            batched = model.score(inputs, targets)
        for i, n in enumerate(lengths):
            with compute.measure() as alone:
                single = model.score(inputs[i:i + 1, :n], targets[i:i + 1, :n])
            flops += alone.totals.forward_flops
            close(batched.logprobs[i, :n], single.logprobs[0],
                  f"row {i} ({n} real tokens) scores differently padded in a batch than alone", fix)
            require(torch.equal(steps_of(batched, targets)[i, :n], steps_of(single, targets[i:i + 1, :n])[0]),
                    f"row {i} takes other steps padded in a batch than alone", fix)
            require(batched.logprobs[i, n:].eq(0).all() and steps_of(batched, targets)[i, n:].eq(0).all(),
                    f"row {i} reports non-zero scores or steps at padding", fix)
            if batched.participation is not None:
                require(same_participation(batched.participation[i, :n], single.participation[0]),
                        f"row {i} runs other routed units padded in a batch than alone", fix)
    same_flops(ledger.totals.forward_flops, flops, "a padded batch costs more than its rows scored alone", fix)
    same_flops(ledger.totals.forward_flops,
               model.decode_flops(steps_of(batched, targets), targets != IGNORE_INDEX, batched.participation),
               "a padded batch's ledger FLOPs differ from decode_flops(steps, valid)",
               "make decode_flops count only the real tokens of each row at the steps they took")
    require(ledger.totals.tokens == sum(lengths),
            f"the ledger counted {ledger.totals.tokens} tokens, not the {sum(lengths)} real ones",
            "do not override score, or call compute.record_tokens with the number of real targets")


def check_inference_flops(name: str, overrides: dict[str, Any]) -> None:
    """Fixed compute: the ledger equals analytic_flops_per_token exactly. Adaptive: at most that maximum,
    exactly decode_flops of the steps taken, and the maximum when forced there."""
    model = build(name, overrides)
    b, t = 2, 10
    ids = torch.randint(0, VOCAB, (b, t + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    maximum = b * t * model.analytic_flops_per_token(t)
    flops_fix = ("make analytic_flops_per_token (and decode_flops for adaptive methods) count every matmul that "
                 "decode runs through the backbone's counted calls, no more and no less")

    def measured():
        with compute.measure() as ledger:
            out = model.score(inputs, targets)
        require(ledger.totals.train_flops == ledger.totals.forward_flops,
                "score counted backward FLOPs", "score must run under torch.no_grad()")
        require(ledger.totals.tokens == b * t, f"the ledger counted {ledger.totals.tokens} tokens, not {b * t}",
                "do not override score, or call compute.record_tokens with the number of targets")
        steps = steps_of(out, targets)
        same_flops(ledger.totals.forward_flops, model.decode_flops(steps, None, out.participation),
                   "score's ledger FLOPs differ from decode_flops(steps)", flops_fix)
        return ledger.totals.forward_flops, steps

    flops, steps_taken = measured()
    steps = steps_taken
    with compute.measure() as ledger, torch.no_grad():  # cached token-by-token decoding does the same work
        cache = model.new_cache(b)
        for i in range(t):
            model.decode(inputs[:, i:i + 1], cache)
    same_flops(ledger.totals.forward_flops, flops, "decoding token by token costs other FLOPs than one decode",
               "each token must cost the same whether decoded alone with the cache or with its neighbours")
    if not model.adaptive:
        same_flops(flops, maximum, "a fixed-compute method's inference FLOPs differ from analytic_flops_per_token",
                   flops_fix + "; or declare adaptive = True if tokens take varying steps")
        require(steps.eq(model.max_extra_steps()).all() or steps.eq(0).all(),
                "a fixed-compute method reports varying steps", "declare adaptive = True, or report constant steps")
        return
    require(flops <= maximum * (1 + EXACT),
            f"inference cost {flops:.6g} FLOPs, above the analytic maximum {maximum:.6g}",
            "analytic_flops_per_token must return the cost of every token taking max_extra_steps()")
    forced = {}
    for s in range(model.max_extra_steps() + 1):
        try:
            model.force_steps(s)
        except (NotImplementedError, ValueError):  # e.g. PonderLM-3 at tau = 0 prunes nothing
            continue
        forced[s], steps = measured()
        require(steps.eq(s).all(), f"force_steps({s}) left tokens at other step counts",
                "force_steps must make every token take exactly that many extra steps")
    require(list(forced.values()) == sorted(forced.values()), f"more forced steps cost fewer FLOPs: {forced}",
            "every extra step must be counted by the ledger")
    if model.max_extra_steps() in forced:
        same_flops(forced[model.max_extra_steps()], maximum,
                   "forcing max_extra_steps() does not cost analytic_flops_per_token", flops_fix)
    low, high = int(steps_taken.min()), int(steps_taken.max())
    if low < high and {low, high} <= set(forced):  # mixed steps cost strictly between the extremes
        require(forced[low] < flops < forced[high],
                f"mixed steps ({low}..{high}) do not cost strictly between forcing {low} and {high}",
                "tokens that stop early must not be computed (or counted) for later steps")


def check_mixed_steps(name: str, overrides: dict[str, Any] | None = None) -> None:
    """Lock-step decoding of rows that stop at different steps is the hard case of the checks: some case
    (defaults or a declared variant) of every adaptive method must exercise it."""
    cls = registry.get(name).cls
    if not cls.adaptive:
        return
    mixed = []
    for case_overrides in ({}, *cls.test_variants.values()):
        model = build(name, case_overrides)
        with torch.no_grad():
            steps = model.decode(torch.randint(0, VOCAB, (2, 11)), model.new_cache(2)).steps
        mixed.append(steps is not None and int(steps.min()) < int(steps.max()))
    require(any(mixed), f"{name}: no case decodes tokens with different numbers of steps",
            "report steps from decode, and declare a test_variants entry whose tokens take different steps")


def check_training(name: str, overrides: dict[str, Any]) -> None:
    """A training step is finite, reaches every parameter and costs the analytic count."""
    model = build(name, overrides).train()
    b, t = 2, 10
    ids = torch.randint(0, VOCAB, (b, t))
    with compute.measure() as ledger:
        out = model(ids, ids.roll(-1, 1))
        out.loss.backward()
    require(torch.isfinite(out.loss) and torch.isfinite(out.lm_loss), "the training loss is not finite",
            "check forward's loss for divisions by zero or log of 0")
    require(0 < ledger.totals.train_flops < float("inf"), "the ledger measured no training FLOPs",
            "run the model through the backbone's counted calls (decoder.run_blocks, decoder.head...)")
    require(all(isinstance(v, float) for v in out.stats.values()), "TrainOutput.stats holds non-float values",
            "store plain floats in stats (tensor.item())")
    untouched = [n for n, p in model.named_parameters() if p.grad is None]
    require(not untouched, f"parameters without gradient: {untouched}",
            "use every parameter in forward, or remove the unused ones")
    per_token = model.train_flops_per_token(t)
    require(0 < per_token < float("inf"), f"train_flops_per_token({t}) = {per_token}",
            "return a positive finite count")
    if model.training_flops_exact():
        fix = ("make analytic_flops_per_token(seq_len, training=True) count every pass of forward, or declare "
               "training_flops_exact() False if the count is an expectation")
        same_flops(ledger.totals.forward_flops, b * t * model.analytic_flops_per_token(t, training=True),
                   "the training forward's ledger FLOPs differ from analytic_flops_per_token(training=True)", fix)
        same_flops(ledger.totals.train_flops, b * t * per_token,
                   "the training step's ledger FLOPs differ from train_flops_per_token",
                   "override train_flops_per_token to count passes under no_grad once")
        with compute.measure() as ledger, torch.no_grad():  # without gradients: every pass counted once
            model(ids, ids.roll(-1, 1))
        same_flops(ledger.totals.train_flops, b * t * model.analytic_flops_per_token(t, training=True),
                   "a training forward without gradients costs other than analytic_flops_per_token(training=True)",
                   fix)


def check_declarations(name: str, overrides: dict[str, Any]) -> None:
    """bench_roles, evaluation_spec, max_extra_steps and fixed_twin agree with the config."""
    model = build(name, overrides)
    cls, fields = type(model), {f.name for f in dataclasses.fields(model.config)}
    require(cls.bench_roles <= BENCH_ROLES, f"unknown bench_roles {set(cls.bench_roles - BENCH_ROLES)}",
            f"choose from {sorted(BENCH_ROLES)}")
    spec = model.evaluation_spec()
    require(isinstance(spec, EvalSpec), "evaluation_spec() does not return an EvalSpec", "return models.base.EvalSpec")
    require(set(spec.exact_overrides) <= fields, f"EvalSpec.exact_overrides names no config field: "
            f"{set(spec.exact_overrides) - fields}", "name fields of the method's Config")
    require(not spec.exact_overrides or spec.jacobi, "EvalSpec.exact_overrides without jacobi=True",
            "exact overrides only make sense for a Jacobi method: set jacobi=True or drop them")
    require(model.max_extra_steps() >= 0, "max_extra_steps() is negative", "return 0 or more")
    if JACOBI_TRAINING in cls.bench_roles:
        require("jacobi_passes" in fields, "bench role jacobi_training without a jacobi_passes config field",
                "add Config.jacobi_passes or drop the role")
    if PRUNED_DECODING in cls.bench_roles:
        require(cls.adaptive and cls.steps_field in fields,
                "bench role pruned_decoding needs adaptive = True and steps_field naming a config field",
                "declare both, or drop the role")
        twin = registry.get(cls.fixed_twin)
        require(not twin.cls.adaptive and cls.steps_field in {f.name for f in dataclasses.fields(twin.config_class)},
                f"fixed_twin {cls.fixed_twin!r} is adaptive or lacks the field {cls.steps_field!r}",
                "name a fixed-compute method with the same steps field")


# check name -> function(method, overrides); check_mixed_steps runs once per method (METHOD_CHECKS)
CHECKS: dict[str, Callable[[str, dict[str, Any]], None]] = {
    "cached_decoding": check_cached_decoding,
    "causality": check_causality,
    "padding": check_padding,
    "inference_flops": check_inference_flops,
    "training": check_training,
    "declarations": check_declarations,
}
METHOD_CHECKS: dict[str, Callable[..., None]] = {"mixed_steps": check_mixed_steps}


def run_checks(method: str) -> list[str]:
    """Every check on ``method``'s defaults and declared variants: one line per failed check (none: all pass)."""
    failures = []
    for check, fn in METHOD_CHECKS.items():
        failures += _attempt(f"{method}: {check}", fn, method, {})
    for case in cases([method]):
        for check, fn in CHECKS.items():
            failures += _attempt(f"{case}: {check}", fn, case.method, case.overrides)
    return failures


def plugin_files(method: str) -> set[str]:
    """The source files of ``method``'s own code: the modules of its class and config and of the classes they
    derive from, less the harness's (models/base.py, the backbone) and torch's."""
    plugin = registry.get(method)
    classes = [*plugin.cls.__mro__, *plugin.config_class.__mro__]
    shared = {inspect.getsourcefile(LanguageModel), inspect.getsourcefile(backbone)}
    files = set()
    for cls in classes:
        module = sys.modules.get(cls.__module__)
        path = getattr(module, "__file__", None)  # builtins (object) have no file
        if path and not cls.__module__.startswith(("torch", "harness.")):
            files.add(os.path.realpath(path))
    return files - {os.path.realpath(f) for f in shared if f}


def crash_site(exc: BaseException, method: str) -> str:
    """``file:line in function: source`` of the innermost frame of ``exc``'s traceback in the plugin's own code
    (:func:`plugin_files`), else of the innermost frame of all: where an author looks first."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = plugin_files(method)
    frame = next((f for f in reversed(frames) if os.path.realpath(f.filename) in own), frames[-1] if frames else None)
    if frame is None:
        return "no traceback"
    return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


def _attempt(label: str, fn: Callable[..., None], method: str, overrides: dict[str, Any]) -> list[str]:
    try:
        fn(method, overrides)
    except AssertionError as exc:
        return [f"{label}: " + " ".join(str(exc).split())]
    except Exception as exc:  # a crash is a failed check too, named with its type and where it happened
        if os.environ.get("HARNESS_DEBUG"):  # the whole story, before the one line
            traceback.print_exception(exc, file=sys.stderr)
        return [f"{label}: raised {type(exc).__name__}: " + " ".join(str(exc).split())[:300]
                + f" (at {crash_site(exc, method)}; HARNESS_DEBUG=1 prints the traceback)"]
    return []


__all__ = ["CHECKS", "METHOD_CHECKS", "TINY", "Case", "ContractViolation", "build", "cases", "run_checks",
           "steps_of"]
