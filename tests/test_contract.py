"""The plugin contract, checked for every registered method -- including ones added later.

A new baseline gets these checks for free, for its defaults and for every config variant it declares
(``LanguageModel.test_variants``): deployed decoding with a cache equals recomputation, padding changes
nothing and costs nothing, no prediction depends on the future, the ledger's FLOPs equal the method's
analytic counts (inference: exactly for the steps taken, at most the maximum and equal to it when
forced there; training: exactly, where the method says its count is exact), its declarations are
consistent, and the method trains and evaluates end to end through the harness.

The checks themselves live in :mod:`harness.check` (shipped with the package, so plugin authors run
them as ``python -m harness check METHOD``); this file parametrizes them over every method.
"""

import math
import sys

import pytest

from harness import check
from harness.core import registry
from harness.data import DataConfig
from harness.job import Job, TrainConfig
from harness.train import train_job
from tests.plugin_support import EXAMPLE

TINY = check.TINY
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
    out = [pytest.param(c.method, c.overrides, id=str(c)) for c in check.cases()]
    return out + [pytest.param(EXAMPLE_METHOD, {}, id=EXAMPLE_METHOD)]


CASES = cases()
build = check.build
steps_of = check.steps_of


@pytest.mark.parametrize("name,overrides", CASES)
def test_cached_decoding_equals_recomputation(name, overrides):
    check.check_cached_decoding(name, overrides)


@pytest.mark.parametrize("name,overrides", CASES)
def test_no_prediction_depends_on_the_future(name, overrides):
    check.check_causality(name, overrides)


@pytest.mark.parametrize("name,overrides", CASES)
def test_padding_changes_nothing_and_costs_nothing(name, overrides):
    check.check_padding(name, overrides)


@pytest.mark.parametrize("name,overrides", CASES)
def test_measured_inference_flops_equal_the_analytic_count(name, overrides):
    """Fixed compute: the ledger equals analytic_flops_per_token exactly. Adaptive: at most that
    maximum, exactly :meth:`decode_flops` of the steps taken, and the maximum when forced there."""
    check.check_inference_flops(name, overrides)


def test_every_adaptive_method_is_checked_with_mixed_steps():
    """Lock-step decoding of rows that stop at different steps is the hard case of the checks above:
    some case (defaults or a declared variant) of every adaptive method must exercise it."""
    for name in registry.plugins():
        check.check_mixed_steps(name)


@pytest.mark.parametrize("name,overrides", CASES)
def test_training_step_is_finite_reaches_every_parameter_and_costs_the_analytic_count(name, overrides):
    check.check_training(name, overrides)


@pytest.mark.parametrize("name,overrides", CASES)
def test_declarations_are_consistent(name, overrides):
    check.check_declarations(name, overrides)


def test_every_check_is_run_here():
    """A check added to harness.check gets a test here too."""
    ran = {"cached_decoding", "causality", "padding", "inference_flops", "training", "declarations"}
    assert set(check.CHECKS) == ran and set(check.METHOD_CHECKS) == {"mixed_steps"}


@pytest.mark.parametrize("name", method_names())
def test_trains_and_evaluates_through_the_harness(name, tmp_path, small_corpus):
    train = TrainConfig(seq_len=32, batch_size=4, eval_tokens=512, checkpoint_every=1000, lr=1e-2)
    # the depth the method declares for tests (MoR's Middle-Cycle needs (n_layers - 2) / R whole)
    depth = {k: v for k, v in registry.get(name).cls.test_base.items() if k == "n_layers"}
    probe = registry.build(name, size="pico", overrides={"vocab_size": 512, **depth})
    budget = 30 * train.batch_size * train.seq_len * probe.train_flops_per_token(train.seq_len)
    job = Job(method=name, budget=budget, size="pico", model=depth,
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
