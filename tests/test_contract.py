"""The plugin contract, checked for every registered method -- including ones added later.

A new baseline gets these checks for free: deployed decoding with a cache equals recomputation,
padding changes nothing, no prediction depends on the future, measured compute is positive and
finite, and the method trains and evaluates end to end through the harness.
"""

import math
import sys

import pytest
import torch

from harness.core import compute, registry
from models.base import IGNORE_INDEX
from tests.plugin_support import EXAMPLE

TINY = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_ff=64)


@pytest.fixture(scope="module", autouse=True)
def example_plugin():
    """The third-party example package, registered the way its own import would do it."""
    sys.path.insert(0, str(EXAMPLE / "src"))
    import harness_example_plugin.wide_head  # noqa: F401  (registers "wide_head")

    yield
    registry._PLUGINS.pop("wide_head", None)
    sys.path.remove(str(EXAMPLE / "src"))


def method_names():
    return sorted(registry.plugins()) + ["wide_head"]


def build(name):
    torch.manual_seed(0)
    model = registry.build(name, overrides=TINY).eval()
    with torch.no_grad():  # routers and gates start neutral; random weights make decisions vary
        for pname, p in model.named_parameters():
            if "router" in pname or "gate" in pname:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("name", method_names())
def test_cached_decoding_equals_recomputation(name):
    model = build(name)
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        whole = model.decode(ids, model.new_cache(2)).logits
        cache = model.new_cache(2)
        pieces = [model.decode(ids[:, :4], cache).logits]
        pieces += [model.decode(ids[:, t:t + 1], cache).logits for t in range(4, 11)]
        stepwise = torch.cat(pieces, dim=1)
        # recomputation: a fresh cache for every prefix, keeping only its last prediction
        recomputed = torch.stack([model.decode(ids[:, :t + 1], model.new_cache(2)).logits[:, -1]
                                  for t in range(11)], dim=1)
    torch.testing.assert_close(stepwise, whole, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(recomputed, whole, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", method_names())
def test_no_prediction_depends_on_the_future(name):
    model = build(name)
    ids = torch.randint(0, 64, (1, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1 + torch.randint(0, 60, (1, 5))) % 64
    with torch.no_grad():
        a = model.score(ids, ids.roll(-1, 1)).logprobs
        b = model.score(changed, ids.roll(-1, 1)).logprobs
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("name", method_names())
def test_padding_changes_nothing_and_costs_nothing(name):
    model = build(name)
    rows = [torch.randint(0, 64, (1, n)) for n in (9, 5)]
    single, flops = [], 0.0
    with torch.no_grad():
        for row in rows:
            with compute.measure() as ledger:
                single.append(model.score(row[:, :-1], row[:, 1:]).logprobs)
            flops += ledger.totals.forward_flops
        inputs = torch.zeros(2, 8, dtype=torch.long)
        targets = torch.full((2, 8), IGNORE_INDEX)
        for i, row in enumerate(rows):
            inputs[i, :row.shape[1] - 1] = row[0, :-1]
            targets[i, :row.shape[1] - 1] = row[0, 1:]
        with compute.measure() as ledger:
            batched = model.score(inputs, targets).logprobs
    torch.testing.assert_close(batched[0, :8], single[0][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(batched[1, :4], single[1][0], atol=2e-5, rtol=1e-4)
    assert ledger.totals.forward_flops == pytest.approx(flops, rel=1e-9)
    assert ledger.totals.tokens == 12


@pytest.mark.parametrize("name", method_names())
def test_training_step_is_finite_and_reaches_every_parameter(name):
    model = build(name).train()
    ids = torch.randint(0, 64, (2, 10))
    with compute.measure() as ledger:
        out = model(ids, ids.roll(-1, 1))
        out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.lm_loss)
    assert 0 < ledger.totals.train_flops < float("inf")
    assert all(isinstance(v, float) for v in out.stats.values())
    untouched = [n for n, p in model.named_parameters() if p.grad is None]
    assert not untouched, f"parameters without gradient: {untouched}"
    per_token = model.train_flops_per_token(10)
    assert 0 < per_token < float("inf")


@pytest.mark.parametrize("name", method_names())
def test_trains_and_evaluates_through_the_harness(name, tmp_path, small_corpus):
    from harness.data import DataConfig
    from harness.job import Job, TrainConfig
    from harness.train import train_job

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
