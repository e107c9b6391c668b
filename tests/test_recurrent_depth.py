"""Recurrent depth (baselines/recurrent_depth.py): the mechanism against hand computations.

Cached decoding equal to recomputation, causality, padding and ledger-equals-analytic are the contract tests'
(tests/test_contract.py, ``python -m harness check recurrent_depth``); parity with the reference code is
scripts/parity_recurrent_depth.py. Here: the layer split and the loop count, the injection A([s; e]) and the
final norm used twice on a model whose blocks are identities (the recurrence is then a linear map to compute by
hand), truncated backpropagation and its ledger count, the r sampler (distribution, mean, stratified draws), the
exit rules on a hand-built case, the exited tokens' reused keys, the deployed initial state, the init and the
config's errors.
"""

import math

import pytest
import torch

from baselines.recurrent_depth import _expected_iterations, poisson_lognormal_pmf
from harness.core import compute, registry
from harness.core.config import ConfigError

V, D, T, B = 61, 32, 6, 2
BASE = dict(vocab_size=V, d_model=D, n_layers=3, n_heads=2, d_ff=64, mean_recurrence=4)


def build(name="recurrent_depth", **overrides):
    torch.manual_seed(0)
    return registry.build(name, overrides={**BASE, **overrides})


def identity_blocks(model):
    """Zero every block's output projections: each block returns its input, so only the adapter, the norms and
    the head act; the norm weight is made non-trivial so that applying it twice differs from once."""
    with torch.no_grad():
        for block in model.decoder.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.decoder.norm.weight.uniform_(0.5, 1.5)
    return model


def hand_states(model, ids, iterations):
    """s_0..s_r of the identity-block model: e = scaled embedding, s_i = W_s s_{i-1} + W_e e."""
    cfg = model.config
    e = model.decoder.embed_tokens.weight[ids] * cfg.embed_scale
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    states = [model.initial_state(e, positions)]
    w_s, w_e = model.adapter.weight[:, :D], model.adapter.weight[:, D:]
    for _ in range(iterations):
        states.append(states[-1] @ w_s.T + e @ w_e.T)
    return states


def hand_logits(model, state):
    norm = model.decoder.norm
    return model.decoder.lm_head(norm(norm(state)))  # prelude/coda identities: norm, coda, norm, head


# -- layout, loop count, injection -------------------------------------------------------------------------------

def test_prelude_core_and_coda_split_the_stored_layers():
    model = build(n_layers=5, prelude_layers=1, coda_layers=2)
    assert (list(model.prelude), list(model.core), list(model.coda)) == ([0], [1, 2], [3, 4])
    assert model.config.core_layers == 2 and model.config.effective_depth == 1 + 2 * 4 + 2
    pico = registry.build("recurrent_depth", size="pico", overrides={"vocab_size": 512})
    assert (pico.config.prelude_layers, pico.config.core_layers, pico.config.coda_layers) == (1, 1, 1)


@pytest.mark.parametrize("training", [False, True], ids=["deployed", "training"])
def test_the_core_block_runs_once_per_iteration(training):
    model = build(mean_recurrence=5, backprop_depth=2, sampling="fixed")
    calls = {i: 0 for i in range(3)}
    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(0, V, (B, T))
    if training:
        model.train().loss_with(ids, ids, iterations=(2, 3))
        assert calls == {0: 1, 1: 5, 2: 1}
    else:
        with compute.measure() as ledger, torch.no_grad():
            model.eval().decode(ids, model.new_cache(B))
        assert calls == {0: 1, 1: 5, 2: 1}
        assert ledger.totals.block_queries == B * T * (1 + 5 + 1)
        assert ledger.totals.other_flops == B * T * 5 * 2 * (2 * D) * D  # the adapter, Linear(2d, d), per iteration


def test_injection_is_the_adapter_on_state_then_embedding_and_the_final_norm_is_applied_twice():
    model = identity_blocks(build(mean_recurrence=4)).eval()
    ids = torch.randint(0, V, (B, T))
    with torch.no_grad():
        got = model.decode(ids, model.new_cache(B)).logits
        states = hand_states(model, ids, 4)
        torch.testing.assert_close(got, hand_logits(model, states[4]), atol=1e-5, rtol=1e-5)
        assert (got - hand_logits(model, states[3])).abs().max() > 1e-3  # the count matters
        norm = model.decoder.norm
        assert (got - model.decoder.lm_head(norm(states[4]))).abs().max() > 1e-3  # so does the second norm
        w_s, w_e = model.adapter.weight[:, :D], model.adapter.weight[:, D:]
        assert (states[1] - (states[0] @ w_e.T + model.decoder.embed(ids) @ w_s.T)).abs().max() > 1e-3  # order


@pytest.mark.parametrize("name,overrides", [("recurrent_depth", {}),
                                            ("recurrent_depth_adaptive", {"exit_threshold": 0.0})])
def test_eval_mode_forward_is_the_deployed_fixed_r_loss(name, overrides):
    """The fixed model's parallel (eval-mode) loss is its deployed loss; the adaptive one's is the fixed-r loss,
    which its decoding equals when no token exits (threshold 0)."""
    model = build(name, **overrides).eval()
    ids = torch.randint(0, V, (B, T + 1))
    with torch.no_grad():
        parallel = model(ids[:, :-1], ids[:, 1:]).lm_loss
        deployed = -model.score(ids[:, :-1], ids[:, 1:]).logprobs.mean()
    assert parallel.item() == pytest.approx(deployed.item(), abs=1e-5)


# -- truncated backpropagation -----------------------------------------------------------------------------------

def test_truncated_backprop_cuts_the_gradient_before_the_last_k_iterations():
    model = build(mean_recurrence=6).train()
    ids = torch.randint(0, V, (B, T))
    s0 = torch.randn(B, T, D, requires_grad=True)
    out = model.loss_with(ids, ids, iterations=(3, 2), state=s0)
    out.loss.backward()
    assert s0.grad is None  # nothing before the graded iterations gets a gradient
    truncated = {n: p.grad.clone() for n, p in model.named_parameters()}
    # the same three iterations run by hand without gradients, then the two graded ones from their output
    model.zero_grad(set_to_none=True)
    dec = model.decoder
    plan = dec.plan(torch.arange(T).expand(B, T))
    with torch.no_grad():
        e = dec.run_blocks(dec.embed(ids), plan, layers=model.prelude)
        x = s0.detach()
        for i in range(3):
            x = model.iterate(x, e, plan, i)
    again = model.loss_with(ids, ids, iterations=(0, 2), state=x)
    again.loss.backward()
    assert again.loss.item() == pytest.approx(out.loss.item(), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, truncated[name], atol=1e-6, rtol=1e-5)
    # backpropagating through all five reaches the state and changes the adapter's gradient
    model.zero_grad(set_to_none=True)
    s0.grad = None
    model.loss_with(ids, ids, iterations=(0, 5), state=s0).loss.backward()
    assert s0.grad is not None and (model.adapter.weight.grad - truncated["adapter.weight"]).abs().max() > 1e-6


def test_the_ledger_counts_no_grad_iterations_once_and_graded_ones_three_times():
    model = build().train()
    ids = torch.randint(0, V, (B, T))
    outer, iteration = model._training_parts(T)  # forward FLOPs of one sequence
    with compute.measure() as ledger:
        model.loss_with(ids, ids, iterations=(3, 2)).loss.backward()
    assert ledger.totals.forward_flops == pytest.approx(B * (outer + 5 * iteration), rel=1e-12)
    assert ledger.totals.train_flops == pytest.approx(B * (3 * (outer + 2 * iteration) + 3 * iteration), rel=1e-12)


def test_train_flops_per_token_is_the_expectation_over_the_sampled_iterations():
    model = build(mean_recurrence=8, backprop_depth=2)
    outer, iteration = model._training_parts(T)
    pmf = poisson_lognormal_pmf(8, 2)
    expected = sum(q * (3 * (outer + min(2, p) * iteration) + max(p - 2, 0) * iteration)
                   for p, q in enumerate(pmf, start=1))
    assert model.train_flops_per_token(T) * T == pytest.approx(expected, rel=1e-9)
    assert not model.training_flops_exact() and build(sampling="fixed").training_flops_exact()


# -- the r sampler -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mean,depth", [(8, 2), (32, 8), (3, 5)])
def test_the_pmf_is_a_distribution_with_the_references_mean(mean, depth):
    pmf = poisson_lognormal_pmf(mean, depth)
    assert sum(pmf) == pytest.approx(1.0, abs=1e-9)
    # E[p] = E[tau] + 1 and E[tau] = t + s = max(mean, s): mu = log(t + s) - sigma^2 / 2
    assert sum(p * q for p, q in enumerate(pmf, start=1)) == pytest.approx(max(mean, depth) + 1, abs=1e-6)


def test_expected_iterations_by_hand():
    assert _expected_iterations(8, 1, "poisson-lognormal-filling") == pytest.approx((8.0, 1.0))  # k = 1 always
    assert _expected_iterations(8, 2, "fixed") == (6.0, 2.0)
    # k = min(2, p): E[k] = 1 P(p = 1) + 2 (1 - P(p = 1)), P(p = 1) = E[exp(-tau)], here by the trapezoid rule
    z = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    tau = torch.exp(math.log(8) - 0.125 + 0.5 * z)
    p1 = torch.trapezoid(torch.exp(-tau - z * z / 2), z).item() / math.sqrt(2 * math.pi)
    n, k = _expected_iterations(8, 2, "poisson-lognormal-filling")
    assert k == pytest.approx(p1 + 2 * (1 - p1), abs=1e-9) and n + k == pytest.approx(9.0, abs=1e-9)


def test_iid_draws_are_the_references_distribution():
    model = build(mean_recurrence=8, backprop_depth=2, stratified=False).train()
    torch.manual_seed(0)
    draws = [model.sample_iterations() for _ in range(4000)]
    p = torch.tensor([n + k for n, k in draws], dtype=torch.float64)
    assert all(k == min(2, n + k) and n == max(n + k - 2, 0) for n, k in draws)
    assert abs(p.mean().item() - 9.0) < 4 * p.std().item() / math.sqrt(len(p))
    pmf = torch.tensor(poisson_lognormal_pmf(8, 2)[:30], dtype=torch.float64)
    freq = torch.bincount(p.long(), minlength=31)[1:31].double() / len(p)
    assert (freq - pmf).abs().max() < 0.015


def test_stratified_draws_have_the_distribution_land_on_the_mean_and_resume():
    model = build(mean_recurrence=8, backprop_depth=2).train()
    draws = [model.sample_iterations() for _ in range(2000)]
    p = torch.tensor([n + k for n, k in draws])
    pmf = torch.tensor(poisson_lognormal_pmf(8, 2)[:30], dtype=torch.float64)
    freq = torch.bincount(p, minlength=31)[1:31].double() / len(p)
    assert (freq - pmf).abs().max() < 2e-3  # a Weyl sequence fills the CDF evenly
    outer, iteration = model._training_parts(128)
    cost = [3 * (outer + k * iteration) + n * iteration for n, k in draws[:30]]
    assert sum(cost) / 30 == pytest.approx(model.train_flops_per_token(128) * 128, rel=0.03)  # iid: sd 5%
    # the draw count is saved with the weights: a resumed model goes on with the sequence
    resumed = build(mean_recurrence=8, backprop_depth=2).train()
    resumed.load_state_dict(model.state_dict())
    assert int(resumed.sampler_draws) == 2000 and resumed.sample_iterations() == model.sample_iterations()


def test_eval_mode_takes_the_deployed_recurrence_without_gradients():
    model = build(mean_recurrence=8, recurrence=3).eval()
    assert model.sample_iterations() == (3, 0) and model.max_extra_steps() == 2
    assert build(mean_recurrence=8).max_extra_steps() == 7


# -- the exit rules on a hand-built case -------------------------------------------------------------------------

def hand_exits(model, ids, criterion, threshold, r):
    """Per token: the iteration it exits at and its logits, by the rule computed by hand on s_0..s_r."""
    states = hand_states(model, ids, r)
    logits = [hand_logits(model, s) for s in states]
    exits = torch.full(ids.shape, r)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            previous = torch.full((V,), -math.log(V))
            for i in range(1, r + 1):
                if criterion == "kl":
                    log_q = torch.log_softmax(logits[i][b, t], -1)
                    change = (previous.exp() * (previous - log_q)).sum()  # KL(q_{i-1} || q_i), q_0 uniform
                    previous = log_q
                else:
                    change = (states[i][b, t] - states[i - 1][b, t]).norm() / states[i][b, t].norm()
                if change < threshold:
                    exits[b, t] = i
                    break
    chosen = torch.stack([logits[i] for i in range(r + 1)])  # [r+1, B, T, V]
    return exits, chosen.gather(0, exits[None, ..., None].expand(1, *ids.shape, V))[0]


@pytest.mark.parametrize("criterion,threshold", [("kl", 0.02), ("latent-diff", 0.05)])
def test_exit_rule_on_a_contracting_linear_recurrence(criterion, threshold):
    """Identity blocks and W_s = 0.5 I: s_i - s_{i-1} = 0.5^(i-1) (s_1 - s_0), so tokens converge at different
    speeds; the iteration each exits at and its prediction are computed by hand."""
    r = 8
    model = identity_blocks(build("recurrent_depth_adaptive", mean_recurrence=r, exit_criterion=criterion,
                                  exit_threshold=threshold)).eval()
    with torch.no_grad():
        model.adapter.weight[:, :D] = 0.5 * torch.eye(D)
        ids = torch.randint(0, V, (B, 8))
        out = model.decode(ids, model.new_cache(B))
        exits, logits = hand_exits(model, ids, criterion, threshold, r)
    assert exits.min() < exits.max() < r  # mixed exits, before the last iteration
    assert torch.equal(out.steps + 1, exits)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)


def test_forced_steps_override_the_decision_and_take_that_iterations_prediction():
    model = identity_blocks(build("recurrent_depth_adaptive", mean_recurrence=5)).eval()
    ids = torch.randint(0, V, (B, T))
    model.force_steps(2)
    with torch.no_grad():
        out = model.decode(ids, model.new_cache(B))
        states = hand_states(model, ids, 3)
    assert out.steps.eq(2).all()
    torch.testing.assert_close(out.logits, hand_logits(model, states[3]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        model.force_steps(5)


def test_kl_checks_run_the_coda_and_head_after_every_iteration_and_are_counted():
    model = build("recurrent_depth_adaptive", mean_recurrence=5).eval()
    model.force_steps(2)
    ids = torch.randint(0, V, (B, T))
    with compute.measure() as ledger, torch.no_grad():
        model.decode(ids, model.new_cache(B))
    assert ledger.totals.head_positions == B * T * 3
    assert ledger.totals.block_queries == B * T * (1 + 3 + 3)  # prelude once; core and coda per iteration
    latent = build("recurrent_depth_adaptive", mean_recurrence=5, exit_criterion="latent-diff").eval()
    latent.force_steps(2)
    with compute.measure() as ledger, torch.no_grad():
        latent.decode(ids, latent.new_cache(B))
    assert ledger.totals.head_positions == B * T and ledger.totals.block_queries == B * T * (1 + 3 + 1)


def test_an_exited_tokens_keys_at_later_iterations_are_those_of_its_last_iteration():
    """The reference's latest-m4 lookup: later tokens at iteration i see an exited token's latest keys."""
    r = 6
    model = build("recurrent_depth_adaptive", mean_recurrence=r, exit_threshold=0.05, n_layers=4).eval()
    cfg = model.config
    ids = torch.randint(0, V, (B, 10))
    cache = model.new_cache(B)
    with torch.no_grad():
        iterations = model.decode(ids, cache).steps + 1
    assert iterations.min() < iterations.max()
    for b in range(B):
        for t in range(10):
            last = int(iterations[b, t]) - 1
            for j in range(cfg.core_layers):
                own = cache.keys[cfg.prelude_layers + last * cfg.core_layers + j][b, :, t]
                for i in range(last + 1, r):
                    layer = cfg.prelude_layers + i * cfg.core_layers + j
                    assert torch.equal(cache.keys[layer][b, :, t], own)
                    assert torch.equal(cache.values[layer][b, :, t],
                                       cache.values[cfg.prelude_layers + last * cfg.core_layers + j][b, :, t])
                if last > 0:  # iterations it ran have keys of their own
                    earlier = cache.keys[cfg.prelude_layers + (last - 1) * cfg.core_layers + j][b, :, t]
                    assert not torch.equal(earlier, own)


# -- the initial state, the init, the config ---------------------------------------------------------------------

def test_deployed_initial_state_is_a_fixed_like_init_draw_per_position():
    model = build(d_model=64, n_heads=2).eval()
    few = model._deployed_state_table(10)[:10].clone()
    many = model._deployed_state_table(600)
    assert torch.equal(many[:10], few)  # growing the table changes no row
    positions = torch.tensor([[3, 300]])
    got = model.initial_state(torch.zeros(1, 2, 64), positions)
    assert torch.equal(got[0], many[[3, 300]])
    # TruncNormal(0, sigma^2) at +-3 sigma has std 0.9866 sigma; sigma = sqrt(2 / (5d)) x sqrt(d) = sqrt(0.4)
    assert many.std().item() == pytest.approx(0.9866 * math.sqrt(0.4), rel=0.03)
    assert many.abs().max().item() <= 3 * math.sqrt(0.4) + 1e-6
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model.initial_state(torch.zeros(1, 2, 64), positions)[0], got[0])  # training: fresh
    assert build(state_init="zero").eval().initial_state(torch.ones(1, 2, D), positions).eq(0).all()


def test_output_projections_are_scaled_to_the_effective_depth():
    model = build(mean_recurrence=4)
    torch.manual_seed(0)
    plain = registry.build("vanilla", overrides={k: v for k, v in BASE.items() if k != "mean_recurrence"})
    scale = math.sqrt(3 / (1 + 1 * 4 + 1))  # sqrt(n_layers / effective depth)
    for ours, theirs in zip(model.decoder.layers, plain.decoder.layers):
        torch.testing.assert_close(ours.self_attn.o_proj.weight, theirs.self_attn.o_proj.weight * scale)
        torch.testing.assert_close(ours.mlp.down_proj.weight, theirs.mlp.down_proj.weight * scale)
        torch.testing.assert_close(ours.self_attn.q_proj.weight, theirs.self_attn.q_proj.weight)
    assert model.adapter.weight.shape == (D, 2 * D)


@pytest.mark.parametrize("overrides,field", [
    ({"prelude_layers": 2, "coda_layers": 1}, "n_layers"), ({"backprop_depth": 0}, "backprop_depth"),
    ({"mean_recurrence": 0}, "mean_recurrence"), ({"sampling": "uniform"}, "sampling"),
    ({"recurrence": 0}, "recurrence"), ({"state_init": "normal"}, "state_init"),
    ({"exit_criterion": "entropy"}, "exit_criterion"), ({"exit_threshold": -1.0}, "exit_threshold")])
def test_bad_values_are_one_line_errors_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field) as error:
        registry.get("recurrent_depth_adaptive").make_config(overrides={**BASE, **overrides})
    assert "\n" not in str(error.value)


def test_declarations():
    fixed, adaptive = registry.get("recurrent_depth").cls, registry.get("recurrent_depth_adaptive").cls
    assert not fixed.adaptive and adaptive.adaptive and adaptive.fixed_twin == "recurrent_depth"
    assert fixed.depth_baseline and adaptive.depth_baseline  # claim C2's recursive-depth baselines
    assert adaptive.steps_field == "recurrence" and not adaptive.bench_roles
    config = adaptive.Config()
    assert (config.exit_criterion, config.threshold) == ("kl", 5e-4)
    assert adaptive.Config(exit_criterion="latent-diff").threshold == 0.03
