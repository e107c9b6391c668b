"""Mixture-of-Depths (baselines/mod.py) against the paper's rules (Raposo et al. 2024, eq. 1 and Sec. 3.5).

Each test pins one rule on a tiny config against values written out here: top-k membership and the capacity
count, the update x + r f(x) of the chosen tokens (f the block's residual branch, r the raw router weight),
the skipped tokens passing unchanged, chosen tokens attending only to each other, the causal decision rule
(predictor or router logit >= 0), the auxiliary losses (and the predictor's stop-gradient), and the part of
the plugin contract this method needs: FLOPs follow *which* routed blocks a token ran (``participation``),
not only how many. Cached decoding, causality and padding for every variant are the contract tests'
(tests/test_contract.py, ``python -m harness check mod``).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.mod import MixtureOfDepths, top_k_membership
from harness import check
from harness.core import compute, registry
from harness.core.config import SIZES, ConfigError

V = 61
BASE = dict(vocab_size=V, d_model=32, n_layers=3, n_heads=2, d_ff=64)


def build(**overrides):
    torch.manual_seed(0)
    return registry.build("mod", overrides={**BASE, **overrides}).eval()


def randomise_routing(model, std=0.5):
    """Routers and predictors start near neutral; larger weights make decisions differ from token to token."""
    with torch.no_grad():
        for p in [*model.routers.parameters(), *model.predictors.parameters()]:
            p.normal_(0.0, std)


def ids_of(batch, length, seed=1):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def block_input(model, ids, layer=1):
    """The residual stream entering block ``layer`` of a model whose earlier blocks are all unrouted."""
    dec = model.decoder
    plan = dec.plan(torch.arange(ids.shape[1]).expand(ids.shape[0], -1))
    return dec.run_blocks(dec.embed(ids), plan, layers=range(0, layer))


def route(model, x, layer=1, training_form=True):
    """One routed block on x [B, n, d] without a cache; returns (output, chosen, auxiliary terms)."""
    b, n, _ = x.shape
    terms = {k: [] for k in ("router_bce", "predictor_bce", "causal_agreement", "causal_fraction")}
    out, chosen = model._route(x, layer, torch.arange(n).expand(b, n), torch.ones(b, n, dtype=torch.bool), None,
                               training_form, terms)
    return out, chosen, terms


# -- configuration ---------------------------------------------------------------------------------------------

def test_every_other_block_is_routed_on_the_cpu_ladder():
    """Block 0 stays full; then every other block (the paper's best), or every block at route_every = 1."""
    routed = {s: registry.get("mod").make_config(s).routed_layers for s in ("pico", "nano")}
    assert routed == {"pico": (1,), "nano": (1, 3, 5)} and SIZES["pico"].n_layers == 3
    assert build(route_every=1).config.routed_layers == (0, 1, 2)
    assert build(route_every=3).config.routed_layers == (2,)
    model = build()
    assert model.max_extra_steps() == 1 and type(model).adaptive


@pytest.mark.parametrize("field,value,words", [
    ("capacity", 0.0, "(0, 1]"), ("capacity", 1.5, "(0, 1]"), ("route_every", 0, "1..n_layers=3"),
    ("route_every", 4, "1..n_layers=3"), ("causal_rule", "topk", "predictor, aux_loss"),
    ("router_aux_weight", -0.1, "non-negative"), ("predictor_weight", 0.0, "positive"),
    ("predictor_hidden", 0, "positive integer")])
def test_bad_values_are_one_line_errors_naming_the_field(field, value, words):
    with pytest.raises(ConfigError) as info:
        build(**{field: value})
    message = str(info.value)
    assert message.startswith(f"MoDConfig.{field}=") and words in message and "\n" not in message


def test_the_aux_loss_rule_needs_its_loss():
    with pytest.raises(ConfigError, match=r"MoDConfig.router_aux_weight=0.0: must be positive with causal_rule"):
        build(causal_rule="aux_loss", router_aux_weight=0.0)
    assert build(causal_rule="aux_loss").config.aux_weight == 0.01 and build().config.aux_weight == 0.0


# -- routing (eq. 1) -------------------------------------------------------------------------------------------

def test_top_k_membership_and_capacity_by_hand():
    scores = torch.tensor([[0.3, -1.0, 2.0, 0.1, 1.5, -0.2, 0.0, 0.9],
                           [5.0, 4.0, -3.0, 0.0, 0.0, 1.0, 2.0, -1.0]])
    assert top_k_membership(scores, 2).nonzero().tolist() == [[0, 2], [0, 4], [1, 0], [1, 1]]
    assert top_k_membership(scores, 3)[0].nonzero().flatten().tolist() == [2, 4, 7]
    cfg = build().config  # capacity 12.5%: k = max(1, int(0.125 T))
    assert [cfg.tokens_per_block(t) for t in (128, 100, 10, 4)] == [16, 12, 1, 1]
    assert build(capacity=0.5).config.tokens_per_block(11) == 5


def test_training_runs_exactly_k_tokens_through_each_routed_block():
    """4 layers, blocks 1 and 3 routed, capacity 1/4 of 16 tokens: k = 4 queries per row there, which see
    only each other (4 x 5 / 2 = 10 pairs); the unrouted blocks run all 16 (136 pairs)."""
    model = build(n_layers=4, capacity=0.25)
    with compute.measure() as ledger:
        out = model(ids_of(2, 16), ids_of(2, 16, seed=2))
    t = ledger.totals
    assert t.block_queries == 2 * 2 * 16 + 2 * 2 * 4
    assert t.key_pairs == 2 * 2 * 136 + 2 * 2 * 10
    assert out.stats["mean_extra_steps"] == 2 * 4 / 16
    d, h = 32, 16  # router 2d and predictor 2h(d + 1) on every token at both routed blocks
    assert t.other_flops == 2 * 2 * 16 * (2 * d + 2 * h * (d + 1))
    assert t.forward_flops == 2 * 16 * model.analytic_flops_per_token(16, training=True)


def test_chosen_tokens_get_x_plus_r_times_the_block_update_and_the_others_pass_unchanged():
    """x + r_i f(x) with f(x) = Block(x) - x over the chosen tokens alone, at their own RoPE positions; r_i the
    raw router weight w^T x_i; doubling w doubles every update; w = 0 leaves every token as it was."""
    model = build(capacity=0.5)  # k = 3 of 6
    dec, layer = model.decoder, model.decoder.layers[1]
    torch.manual_seed(3)
    x = torch.randn(1, 6, 32)
    w = torch.randn(32)
    with torch.no_grad():
        model.routers[0].weight.copy_(w[None])
        out, chosen, _ = route(model, x)
        r = x[0] @ w
        picked = r.topk(3).indices.sort().values
        assert chosen[0].nonzero().flatten().tolist() == picked.tolist()
        skipped = ~chosen[0]
        assert torch.equal(out[0, skipped], x[0, skipped])  # exactly: they never entered the block
        xs = x[:, picked]
        plan = dec.plan(picked[None])  # causal among the chosen, at their positions
        h = xs + layer.self_attn(layer.input_layernorm(xs), plan, 1)
        block = h + layer.mlp(layer.post_attention_layernorm(h))
        torch.testing.assert_close(out[0, picked], xs[0] + r[picked, None] * (block[0] - xs[0]))

        model.routers[0].weight.mul_(2.0)
        doubled, _, _ = route(model, x)
        torch.testing.assert_close(doubled - x, 2 * (out - x))
        model.routers[0].weight.zero_()
        assert torch.equal(route(model, x)[0], x)


def test_chosen_tokens_attend_only_to_chosen_tokens():
    """Changing the skipped tokens (without changing their router weights) changes no chosen token's output."""
    model = build(capacity=0.5)
    randomise_routing(model)
    torch.manual_seed(4)
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        out, chosen, _ = route(model, x)
        w = model.routers[0].weight[0]
        noise = torch.randn_like(x)
        noise -= (noise @ w)[..., None] * w / (w @ w)  # orthogonal to w: the router weights stay as they were
        changed = torch.where(chosen[..., None], x, x + noise)
        out2, chosen2, _ = route(model, changed)
    assert torch.equal(chosen, chosen2)
    torch.testing.assert_close(out2[chosen], out[chosen])
    assert torch.equal(out2[~chosen], changed[~chosen])


# -- the causal rule (Sec. 3.5) --------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["predictor", "aux_loss"])
def test_deployed_decoding_takes_a_block_iff_the_rule_logit_is_non_negative(rule):
    """sigmoid(logit) >= 0.5: the predictor's logit (default) or the router's own (aux_loss), per token."""
    model = build(causal_rule=rule)
    randomise_routing(model)
    ids = ids_of(2, 12)
    with torch.no_grad():
        out = model.decode(ids, model.new_cache(2))
        x = block_input(model, ids)
        scorer = model.predictors[0] if rule == "predictor" else model.routers[0]
        expected = scorer(x)[..., 0] >= 0
    assert torch.equal(out.participation[..., 0], expected) and torch.equal(out.steps, expected.long())
    assert expected.any() and not expected.all()  # a real mix of decisions
    assert len(model.predictors) == (rule == "predictor")


def test_forced_steps_take_the_first_routed_blocks():
    model = build(route_every=1)
    randomise_routing(model)
    ids = ids_of(2, 7)
    for s in range(4):
        model.force_steps(s)
        with torch.no_grad():
            part = model.decode(ids, model.new_cache(2)).participation
        assert torch.equal(part, (torch.arange(3) < s).expand(2, 7, 3))
    with pytest.raises(ValueError, match="cannot force 4 routed blocks"):
        model.force_steps(4)


# -- auxiliary losses ------------------------------------------------------------------------------------------

def test_router_bce_by_hand_under_the_aux_loss_rule():
    """BCE of the router logits against top-k membership: -mean(y log s(r) + (1 - y) log(1 - s(r))),
    added to the LM loss with weight 0.01."""
    model = build(causal_rule="aux_loss", capacity=0.25).train()  # k = 2 of 8
    randomise_routing(model)
    ids, targets = ids_of(2, 8), ids_of(2, 8, seed=2)
    out = model(ids, targets)
    with torch.no_grad():
        r = model.routers[0](block_input(model, ids))[..., 0]
        y = torch.zeros_like(r)
        for row in range(2):
            y[row, r[row].argsort(descending=True)[:2]] = 1.0
        bce = -(y * torch.sigmoid(r).log() + (1 - y) * (1 - torch.sigmoid(r)).log()).mean()
    assert out.stats["router_bce"] == pytest.approx(bce.item(), rel=1e-5)
    assert out.stats["causal_agreement"] == pytest.approx(((r >= 0) == y.bool()).float().mean().item())
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + 0.01 * bce.item(), rel=1e-6)
    assert "predictor_bce" not in out.stats


def test_predictor_bce_trains_the_predictor_alone():
    """Stop-gradient: the predictor's BCE reaches its own weights and nothing else; the LM loss is untouched
    (loss = lm_loss + predictor BCE, the router's BCE weighted 0)."""
    model = build(capacity=0.25).train()
    randomise_routing(model)
    ids, targets = ids_of(2, 8), ids_of(2, 8, seed=2)
    _, _, terms = model._run(ids, None, None, training_form=True)
    others = [p for n, p in model.named_parameters() if not n.startswith("predictors.")]
    assert all(g is None for g in torch.autograd.grad(terms["predictor_bce"], others, allow_unused=True))
    assert all(g is not None and g.abs().sum() > 0 for g in
               torch.autograd.grad(terms["predictor_bce"], list(model.predictors.parameters())))
    with torch.no_grad():
        x = block_input(model, ids)
        y = top_k_membership(model.routers[0](x)[..., 0], 2).float()
        expected = F.binary_cross_entropy_with_logits(model.predictors[0](x)[..., 0], y)
    out = model(ids, targets)
    assert "router_bce" not in out.stats  # weighted 0 under the predictor rule: not computed
    assert out.stats["predictor_bce"] == pytest.approx(expected.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + expected.item(), rel=1e-6)


# -- the contract's participation: FLOPs follow which blocks a token ran -----------------------------------------

def test_equal_steps_in_other_blocks_cost_other_flops():
    """4 tokens, 2 routed blocks, one block each. All in block 0: its pairs 1+2+3+4 = 10. Two and two: 3 + 3.
    Each of the 4 pairs between costs 2 x 2 x (n_heads x head_dim) FLOPs (QK^T and AV); the steps are equal."""
    model = build(route_every=2, n_layers=4)
    together = torch.tensor([[[1, 0], [1, 0], [1, 0], [1, 0]]], dtype=torch.bool)
    split = torch.tensor([[[1, 0], [1, 0], [0, 1], [0, 1]]], dtype=torch.bool)
    steps = together.sum(-1)
    assert torch.equal(steps, split.sum(-1))
    difference = model.decode_flops(steps, None, together) - model.decode_flops(steps, None, split)
    assert difference == 2 * 2 * 32 * (10 - 6)
    with pytest.raises(ValueError, match="needs the participation"):
        model.decode_flops(steps)


class StepsOnly(MixtureOfDepths):
    """A broken plugin: decode_flops assumes a token of s steps ran the first s routed blocks."""

    def decode_flops(self, steps, valid=None, participation=None):
        guessed = torch.arange(len(self.routed)) < steps.cpu()[..., None]
        return super().decode_flops(steps, valid, guessed)


@pytest.fixture
def steps_only():
    registry.register("mod_steps_only")(StepsOnly)
    yield "mod_steps_only"
    registry._PLUGINS.pop("mod_steps_only", None)


def test_a_decode_flops_that_ignores_participation_fails_the_contract(steps_only):
    """With 3 routed blocks the steps do not say which blocks ran: the ledger disagrees and the check says so.
    (With one routed block, as at the pico rung, steps and participation carry the same information.)"""
    overrides = {"route_every": 1}
    check.check_inference_flops("mod", overrides)
    with pytest.raises(check.ContractViolation, match="ledger FLOPs differ from decode_flops"):
        check.check_inference_flops(steps_only, overrides)
    with pytest.raises(check.ContractViolation, match="ledger FLOPs differ from decode_flops"):
        check.check_padding(steps_only, overrides)


def test_deployed_flops_are_at_most_the_analytic_maximum_at_the_pico_shape():
    """The maximum (every token in every routed block) is the vanilla decoder plus the routing matmuls."""
    model = build()
    vanilla = registry.build("vanilla", overrides=BASE)
    extra = 2 * 16 * 33 + 2 * 32  # predictor on every token, router on every participant
    assert model.analytic_flops_per_token(10) == pytest.approx(vanilla.analytic_flops_per_token(10) + extra)
    assert math.isclose(model.analytic_flops_per_token(10) * 10,
                        model.decode_flops(None, None, torch.ones(1, 10, 1, dtype=torch.bool)))
