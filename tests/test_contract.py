"""The plugin contract, checked for every registered method -- including ones added later.

A new baseline gets these checks for free, for its defaults and for every config variant it declares
(``LanguageModel.test_variants``): deployed decoding with a cache equals recomputation, padding changes
nothing and costs nothing, no prediction depends on the future, the ledger's FLOPs equal the method's
analytic counts (inference: exactly for the steps taken, at most the maximum and equal to it when
forced there; training: exactly, where the method says its count is exact), its declarations are
consistent, and the method trains and evaluates end to end through the harness.
"""

import dataclasses
import math
import sys

import pytest
import torch

from harness.core import compute, registry
from harness.data import DataConfig
from harness.job import Job, TrainConfig
from harness.train import train_job
from models.base import BENCH_ROLES, IGNORE_INDEX, JACOBI_TRAINING, PRUNED_DECODING, EvalSpec
from tests.plugin_support import EXAMPLE

TINY = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_ff=64)
EXAMPLE_METHOD = "wide_head"  # registered by the fixture below, after collection: defaults only


@pytest.fixture(scope="module", autouse=True)
def example_plugin():
    """The third-party example package, registered the way its own import would do it."""
    sys.path.insert(0, str(EXAMPLE / "src"))
    import harness_example_plugin.wide_head  # noqa: F401  (registers "wide_head")

    yield
    registry._PLUGINS.pop(EXAMPLE_METHOD, None)
    sys.path.remove(str(EXAMPLE / "src"))


def method_names():
    return sorted(registry.plugins()) + [EXAMPLE_METHOD]


def cases():
    """(method, overrides) for every method's defaults and every variant it declares."""
    out = []
    for name in method_names():
        out.append(pytest.param(name, {}, id=name))
        plugin = registry.plugins().get(name)
        for variant, overrides in (plugin.cls.test_variants.items() if plugin else ()):
            out.append(pytest.param(name, overrides, id=f"{name}-{variant}"))
    return out


CASES = cases()


def build(name, overrides=None):
    torch.manual_seed(0)
    model = registry.build(name, overrides={**TINY, **(overrides or {})}).eval()
    with torch.no_grad():  # routers and gates start neutral; random weights make decisions vary
        for pname, p in model.named_parameters():
            if "router" in pname or "gate" in pname:
                p.normal_(0, 0.5)
    return model


def steps_of(out, like):
    """The extra steps per token a decode/score output reports (0 for a method that reports none)."""
    return out.steps if out.steps is not None else torch.zeros(like.shape, dtype=torch.long)


@pytest.mark.parametrize("name,overrides", CASES)
def test_cached_decoding_equals_recomputation(name, overrides):
    model = build(name, overrides)
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        whole = model.decode(ids, model.new_cache(2))
        cache = model.new_cache(2)
        pieces = [model.decode(ids[:, :4], cache)]
        pieces += [model.decode(ids[:, t:t + 1], cache) for t in range(4, 9)]
        pieces.append(model.decode(ids[:, 9:], cache))
        stepwise = torch.cat([p.logits for p in pieces], dim=1)
        # recomputation: a fresh cache for every prefix, keeping only its last prediction
        fresh = [model.decode(ids[:, :t + 1], model.new_cache(2)) for t in range(11)]
        recomputed = torch.stack([f.logits[:, -1] for f in fresh], dim=1)
        scored = model.score(ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(stepwise, whole.logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(recomputed, whole.logits, atol=2e-5, rtol=1e-4)
    steps = steps_of(whole, ids)
    assert torch.equal(torch.cat([steps_of(p, p.logits[..., 0]) for p in pieces], dim=1), steps)
    assert torch.equal(torch.stack([steps_of(f, f.logits[..., 0])[:, -1] for f in fresh], dim=1), steps)
    # score is decode: its log-probabilities are those of the decoded logits
    expected = torch.log_softmax(whole.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(scored.logprobs, expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(steps_of(scored, ids[:, 1:]), steps[:, :-1])
    assert 0 <= int(steps.min()) <= int(steps.max()) <= model.max_extra_steps()


@pytest.mark.parametrize("name,overrides", CASES)
def test_no_prediction_depends_on_the_future(name, overrides):
    model = build(name, overrides)
    ids = torch.randint(0, 64, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1 + torch.randint(0, 62, (2, 5))) % 64  # every later token differs
    with torch.no_grad():
        a = model.score(ids, ids.roll(-1, 1))
        b = model.score(changed, ids.roll(-1, 1))
        decoded = [model.decode(x, model.new_cache(2)).logits for x in (ids, changed)]
    torch.testing.assert_close(decoded[0][:, :7], decoded[1][:, :7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.logprobs[:, :7], b.logprobs[:, :7], atol=1e-5, rtol=1e-5)
    assert torch.equal(steps_of(a, ids)[:, :7], steps_of(b, ids)[:, :7])
    assert (a.logprobs[:, 7:] - b.logprobs[:, 7:]).abs().amax() > 1e-4  # the later tokens do matter


@pytest.mark.parametrize("name,overrides", CASES)
def test_padding_changes_nothing_and_costs_nothing(name, overrides):
    model = build(name, overrides)
    lengths = [11, 6, 3]
    inputs = torch.randint(0, 64, (3, 11))  # whatever sits in padding must not matter
    targets = torch.randint(0, 64, (3, 11))
    for i, n in enumerate(lengths):
        targets[i, n:] = IGNORE_INDEX
    flops = 0.0
    with torch.no_grad():
        with compute.measure() as ledger:
            batched = model.score(inputs, targets)
        for i, n in enumerate(lengths):
            with compute.measure() as alone:
                single = model.score(inputs[i:i + 1, :n], targets[i:i + 1, :n])
            flops += alone.totals.forward_flops
            torch.testing.assert_close(batched.logprobs[i, :n], single.logprobs[0], atol=2e-5, rtol=1e-4)
            assert torch.equal(steps_of(batched, targets)[i, :n], steps_of(single, targets[i:i + 1, :n])[0])
            assert batched.logprobs[i, n:].eq(0).all() and steps_of(batched, targets)[i, n:].eq(0).all()
    # padding is neither key, query nor head position: the batch costs exactly its rows, and exactly
    # what the method's analytic count says for the steps its tokens took
    assert ledger.totals.forward_flops == pytest.approx(flops, rel=1e-12)
    assert ledger.totals.forward_flops == pytest.approx(
        model.decode_flops(steps_of(batched, targets), targets != IGNORE_INDEX), rel=1e-12)
    assert ledger.totals.tokens == sum(lengths)


@pytest.mark.parametrize("name,overrides", CASES)
def test_measured_inference_flops_equal_the_analytic_count(name, overrides):
    """Fixed compute: the ledger equals analytic_flops_per_token exactly. Adaptive: at most that
    maximum, exactly :meth:`decode_flops` of the steps taken, and the maximum when forced there."""
    model = build(name, overrides)
    b, t = 2, 10
    ids = torch.randint(0, 64, (b, t + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    maximum = b * t * model.analytic_flops_per_token(t)

    def measured():
        with compute.measure() as ledger:
            out = model.score(inputs, targets)
        assert ledger.totals.train_flops == ledger.totals.forward_flops  # score runs under no_grad
        assert ledger.totals.tokens == b * t
        steps = steps_of(out, targets)
        assert ledger.totals.forward_flops == pytest.approx(model.decode_flops(steps), rel=1e-12)
        return ledger.totals.forward_flops, steps

    flops, steps_taken = measured()
    steps = steps_taken
    # cached token-by-token decoding does the same work as one call
    with compute.measure() as ledger, torch.no_grad():
        cache = model.new_cache(b)
        for i in range(t):
            model.decode(inputs[:, i:i + 1], cache)
    assert ledger.totals.forward_flops == pytest.approx(flops, rel=1e-12)
    if not model.adaptive:
        assert flops == pytest.approx(maximum, rel=1e-12)
        assert steps.eq(model.max_extra_steps()).all() or steps.eq(0).all()  # constant (0: not reported)
        return
    assert flops <= maximum * (1 + 1e-12)
    forced = {}
    for s in range(model.max_extra_steps() + 1):
        try:
            model.force_steps(s)
        except (NotImplementedError, ValueError):  # e.g. PonderLM-3 at tau = 0 prunes nothing
            continue
        forced[s], steps = measured()
        assert steps.eq(s).all()
    assert list(forced.values()) == sorted(forced.values())  # every extra step costs
    if model.max_extra_steps() in forced:
        assert forced[model.max_extra_steps()] == pytest.approx(maximum, rel=1e-12)
    low, high = int(steps_taken.min()), int(steps_taken.max())
    if low < high and {low, high} <= set(forced):  # mixed steps cost strictly between the extremes
        assert forced[low] < flops < forced[high]


def test_every_adaptive_method_is_checked_with_mixed_steps():
    """Lock-step decoding of rows that stop at different steps is the hard case of the checks above:
    some case (defaults or a declared variant) of every adaptive method must exercise it."""
    for name, plugin in registry.plugins().items():
        if not plugin.cls.adaptive:
            continue
        mixed = []
        for overrides in ({}, *plugin.cls.test_variants.values()):
            model = build(name, overrides)
            with torch.no_grad():
                steps = model.decode(torch.randint(0, 64, (2, 11)), model.new_cache(2)).steps
            mixed.append(int(steps.min()) < int(steps.max()))
        assert any(mixed), f"{name}: no case decodes tokens with different numbers of steps"


@pytest.mark.parametrize("name,overrides", CASES)
def test_training_step_is_finite_reaches_every_parameter_and_costs_the_analytic_count(name, overrides):
    model = build(name, overrides).train()
    b, t = 2, 10
    ids = torch.randint(0, 64, (b, t))
    with compute.measure() as ledger:
        out = model(ids, ids.roll(-1, 1))
        out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.lm_loss)
    assert 0 < ledger.totals.train_flops < float("inf")
    assert all(isinstance(v, float) for v in out.stats.values())
    untouched = [n for n, p in model.named_parameters() if p.grad is None]
    assert not untouched, f"parameters without gradient: {untouched}"
    per_token = model.train_flops_per_token(t)
    assert 0 < per_token < float("inf")
    if model.training_flops_exact():
        assert ledger.totals.forward_flops == pytest.approx(
            b * t * model.analytic_flops_per_token(t, training=True), rel=1e-12)
        assert ledger.totals.train_flops == pytest.approx(b * t * per_token, rel=1e-12)
        with compute.measure() as ledger, torch.no_grad():  # without gradients: every pass counted once
            model(ids, ids.roll(-1, 1))
        assert ledger.totals.train_flops == pytest.approx(
            b * t * model.analytic_flops_per_token(t, training=True), rel=1e-12)


@pytest.mark.parametrize("name,overrides", CASES)
def test_declarations_are_consistent(name, overrides):
    model = build(name, overrides)
    cls, fields = type(model), {f.name for f in dataclasses.fields(model.config)}
    assert cls.bench_roles <= BENCH_ROLES
    spec = model.evaluation_spec()
    assert isinstance(spec, EvalSpec) and set(spec.exact_overrides) <= fields
    assert not spec.exact_overrides or spec.jacobi
    assert model.max_extra_steps() >= 0
    if JACOBI_TRAINING in cls.bench_roles:
        assert "jacobi_passes" in fields
    if PRUNED_DECODING in cls.bench_roles:
        assert cls.adaptive and cls.steps_field in fields
        twin = registry.get(cls.fixed_twin)
        assert not twin.cls.adaptive and cls.steps_field in {f.name for f in dataclasses.fields(twin.config_class)}


@pytest.mark.parametrize("name", method_names())
def test_trains_and_evaluates_through_the_harness(name, tmp_path, small_corpus):
    train = TrainConfig(seq_len=32, batch_size=4, eval_tokens=512, checkpoint_every=1000, lr=1e-2)
    probe = registry.build(name, size="pico", overrides={"vocab_size": 512})
    budget = 30 * train.batch_size * train.seq_len * probe.train_flops_per_token(train.seq_len)
    job = Job(method=name, budget=budget, size="pico",
              data=DataConfig(source=small_corpus, vocab_size=512), train=train)
    result = train_job(job, tmp_path / name, progress=False)
    assert result["train_steps"] == 30
    # exact in expectation; a method whose step cost is random (PonderLM's sampled number of Jacobi
    # passes) drifts by a few percent over only 30 steps
    assert abs(result["train_flops"] - job.budget) / job.budget < 0.05
    assert result["val_loss"] < math.log(512)  # learned something: better than a uniform guess
    assert result["infer_flops_per_token"] > 0
    spec = probe.evaluation_spec()  # the metrics the method declared, and only those
    assert ("jacobi_gap" in result) == spec.jacobi
    assert ("exact_val_loss" in result) == ("consistency_gap" in result) == bool(spec.exact_overrides)
