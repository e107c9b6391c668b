"""Mixture-of-Recursions against its reference code (the authors' mixture_of_recursions repository).

Each test pins one reference behaviour on a tiny config against a value computed here by hand from the
reference's formulas (model/sharing_strategy/llama.py, model/mor_model/expert_choice_router.py and
token_choice_router.py, util/trainer_pt.py): Middle-Cycle sharing of (L-2)/R layers, the expert-choice
update H + alpha sigmoid(s) f(H) at every recursion (the first one routed), the BCE summed over recursions,
the token-choice update H^1 + g F_i(H^1), its balancing and z-losses, and the routers in the ledger. Cached
decoding, causality and padding are the contract tests' (tests/test_contract.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from harness.core import compute, registry
from harness.core.config import SIZES, ConfigError

V = 61
BASE = dict(vocab_size=V, d_model=32, n_heads=2, d_ff=64)


def build(**overrides):
    torch.manual_seed(0)
    return registry.build("mor", overrides={**BASE, **overrides})



def ids_of(batch, length, seed=1):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise_routers(model, std=0.5):
    with torch.no_grad():
        for router in model.routers:
            router.weight.normal_(0.0, std)


def block(model, x, positions):
    """The shared block f (its residual included) over the tokens ``positions`` [n] of row 0 only, which
    see only each other at their own RoPE positions."""
    dec = model.decoder
    return dec.run_blocks(x, dec.plan(positions[None]), layers=model.middle)


def head_loss(model, x, targets):
    dec = model.decoder
    return dec.head_loss(dec.norm(dec.run_blocks(x, dec.plan(torch.arange(x.shape[1])[None]), layers=model.last)),
                         targets)


def first_layers(model, ids):
    dec = model.decoder
    return dec.run_blocks(dec.embed(ids), dec.plan(torch.arange(ids.shape[1])[None]), layers=model.first)


# -- parameter sharing (sharing_strategy/llama.py, middle_cycle) ------------------------------------

@pytest.mark.parametrize("size", ["pico", "nano", "micro", "tiny"])
def test_shared_block_holds_a_third_of_the_middle_layers(size):
    """At R = 3 MoR keeps 1 + (L-2)/3 + 1 distinct layers; its block parameters are <= 0.6x vanilla's, and
    every other parameter is the backbone's plus R routers of d weights."""
    layers = SIZES[size].n_layers
    vanilla = registry.build("vanilla", size=size, overrides={"vocab_size": 512})
    model = registry.build("mor", size=size, overrides={"vocab_size": 512, "recursions": 3})
    kept = 2 + (layers - 2) // 3
    assert len(model.decoder.layers) == kept
    per_layer = sum(p.numel() for p in vanilla.decoder.layers[0].parameters())
    d = model.config.d_model
    dropped = (layers - kept) * per_layer
    assert model.num_params(non_embedding=True) == vanilla.num_params(non_embedding=True) - dropped + 3 * d
    block_ratio = kept / layers  # 3/5 at pico, 4/8 at nano, micro, tiny
    assert block_ratio <= 0.6
    mor_blocks = sum(p.numel() for p in model.decoder.layers.parameters())
    assert mor_blocks == block_ratio * sum(p.numel() for p in vanilla.decoder.layers.parameters())


def test_a_token_at_full_depth_runs_the_backbones_depth_through_the_shared_block():
    model = build(n_layers=8, recursions=3).eval()  # 1 + 2 shared + 1 layers; 1 + 3 x 2 + 1 = 8 applied
    calls = []
    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_hook(lambda mod, inp, out, i=i: calls.append(i))
    model.force_steps(2)
    with torch.no_grad():
        model.decode(ids_of(1, 1), model.new_cache(1))
    assert calls == [0, 1, 2, 1, 2, 1, 2, 3]


@pytest.mark.parametrize("layers,recursions", [(6, 3), (3, 2), (8, 4)])
def test_middle_layers_that_do_not_split_into_the_recursions_are_a_one_line_config_error(layers, recursions):
    with pytest.raises(ConfigError) as info:
        build(n_layers=layers, recursions=recursions)
    assert type(info.value) is ConfigError
    message = str(info.value)
    assert "\n" not in message
    assert "n_layers" in message and f"recursions={recursions}" in message
    fix = int(message.split("(e.g. ")[1].split(")")[0])  # the fix it names is a valid config
    assert build(n_layers=fix, recursions=recursions).config.n_shared >= 1


def test_one_recursion_keeps_every_layer_and_no_router():
    model = build(n_layers=4, recursions=1)
    assert len(model.decoder.layers) == 4 and len(model.routers) == 0


# -- expert-choice (expert_choice_router.py) --------------------------------------------------------

def expert_by_hand(model, ids):
    """Training forward of expert-choice MoR for one row, from the reference's STEP 1-5: g = alpha sigmoid(s),
    top-k_r of the candidates in causal order, H <- H + g f(H) for them. Returns (lm_loss, [(score, target)])."""
    cfg = model.config
    t = ids.shape[1]
    x = first_layers(model, ids)
    candidates = torch.arange(t)
    routed = []
    for r in range(1, cfg.recursions + 1):
        w = model.routers[r - 1].weight[0]
        score = x[0, candidates] @ w  # the router reads the candidates only
        k = max(1, int(cfg.capacity_schedule[r - 1] * t))
        chosen = candidates[score.topk(k).indices].sort().values
        target = torch.isin(candidates, chosen).float()
        routed.append((score, target))
        g = cfg.expert_alpha * torch.sigmoid(x[0, chosen] @ w)
        x = x.clone()
        x[0, chosen] = x[0, chosen] + g[:, None] * block(model, x[:, chosen], chosen)[0]
        candidates = chosen
    return head_loss(model, x, ids), routed


@pytest.mark.parametrize("capacity", [(1.0, 1.0, 1.0), (), (1.0, 0.5, 0.2)])
def test_expert_choice_adds_the_gated_block_output_at_every_recursion(capacity):
    model = build(n_layers=5, recursions=3, capacity=capacity)
    randomise_routers(model)
    ids = ids_of(1, 12)
    with torch.no_grad():
        out = model(ids, ids)
        expected, _ = expert_by_hand(model, ids)
    torch.testing.assert_close(out.lm_loss, expected, rtol=0, atol=1e-5)


def test_expert_choice_update_is_not_a_convex_mix():
    """H + g f(H) with f's residual included: at g = alpha sigmoid(s) the state grows by g H + g Delta,
    not H + g (f(H) - H). One recursion of one token, read off the hidden state."""
    mor = build(n_layers=4, recursions=2, capacity=(1.0, 1.0))
    with torch.no_grad():
        mor.routers[0].weight.zero_()  # g = 0.1 x sigmoid(0) = 0.05 at both recursions
        mor.routers[1].weight.zero_()
    ids = ids_of(1, 1)
    with torch.no_grad():
        h = first_layers(mor, ids)
        f1 = block(mor, h, torch.arange(1))
        h1 = h + 0.05 * f1
        h2 = h1 + 0.05 * block(mor, h1, torch.arange(1))
        captured = []
        mor.decoder.layers[2].register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
        mor(ids, ids)
    torch.testing.assert_close(captured[0], h2, rtol=0, atol=1e-6)
    assert not torch.allclose(captured[0], h + 0.05 * (f1 - h), atol=1e-3)


def test_the_first_recursion_is_routed():
    """One router per recursion, the first included: its weight scales recursion 1's update, and its BCE
    (target 1 for every token, as capacity 1.0 keeps them all) is part of the auxiliary loss."""
    model = build(n_layers=5, recursions=3)
    assert len(model.routers) == 3
    randomise_routers(model)
    ids = ids_of(1, 12)
    with torch.no_grad():
        before = model(ids, ids)
        model.routers[0].weight.mul_(3.0)
        after = model(ids, ids)
    assert abs(before.lm_loss.item() - after.lm_loss.item()) > 1e-4


def test_router_bce_is_summed_over_recursions_with_weight_0_001():
    model = build(n_layers=5, recursions=3)
    assert model.config.router_aux_weight == 0.001 and model.config.expert_alpha == 0.1
    randomise_routers(model)
    ids = ids_of(1, 12)
    with torch.no_grad():
        out = model(ids, ids)
        _, routed = expert_by_hand(model, ids)
    assert routed[0][1].eq(1).all()  # recursion 1: every token selected
    bce = [F.binary_cross_entropy_with_logits(s, target) for s, target in routed]  # mean over candidates
    assert out.stats["router_bce"] == pytest.approx(sum(b.item() for b in bce), rel=1e-5)
    # loss - lm_loss in float32 at a loss of ~4 resolves ~5e-7
    assert (out.loss - out.lm_loss).item() == pytest.approx(0.001 * sum(b.item() for b in bce), abs=1e-6)
    assert "router_z_loss" in out.stats  # reported, but off by default for expert-choice (released config)


def test_expert_choice_z_loss_when_asked_for():
    model = build(n_layers=5, recursions=3, router_z_weight=0.01)
    randomise_routers(model)
    ids = ids_of(1, 12)
    with torch.no_grad():
        out = model(ids, ids)
        _, routed = expert_by_hand(model, ids)
    bce = sum(F.binary_cross_entropy_with_logits(s, target).item() for s, target in routed)
    z = sum(s.square().mean().item() for s, _ in routed)  # logsumexp of one logit is the logit
    assert (out.loss - out.lm_loss).item() == pytest.approx(0.001 * bce + 0.01 * z, abs=1e-6)
    assert out.stats["router_z_loss"] == pytest.approx(z, rel=1e-5)


def test_recursions_that_keep_every_token_keep_them_at_inference_too():
    """Capacity 1.0 keeps every candidate in training (top-k of all) and so at inference: with capacity 1.0
    at every recursion the deployed computation is the training one."""
    model = build(n_layers=5, recursions=3, capacity=(1.0, 1.0, 1.0)).eval()
    randomise_routers(model, std=2.0)
    ids = ids_of(2, 12)
    with torch.no_grad():
        out = model(ids, ids)
    deployed = model.score(ids, ids)
    assert deployed.steps.eq(2).all()
    assert out.lm_loss.item() == pytest.approx(-deployed.logprobs.mean().item(), abs=1e-5)


def test_force_steps_overrides_decisions_not_weights():
    model = build(n_layers=5, recursions=3)
    randomise_routers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.force_steps(1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert model.decode(ids_of(2, 9), model.new_cache(2)).steps.eq(1).all()


# -- token-choice (token_choice_router.py) ----------------------------------------------------------

def token_by_hand(model, ids):
    """Training forward of token-choice MoR for one row: depth i = argmax softmax(W H^1) + 1, recursion r over
    the tokens of depth >= r only, output H^1 + g F_i(H^1). Returns (lm_loss, logits, depth)."""
    cfg = model.config
    t = ids.shape[1]
    h1 = first_layers(model, ids)
    logits = h1[0] @ model.routers[0].weight.T
    probs = logits.softmax(-1)
    depth = probs.argmax(-1) + 1
    g = probs.gather(-1, (depth - 1)[:, None])
    x = block(model, h1, torch.arange(t))
    for r in range(2, cfg.recursions + 1):
        idx = torch.nonzero(depth >= r)[:, 0]
        if len(idx):
            x = x.clone()
            x[0, idx] = block(model, x[:, idx], idx)[0]
    return head_loss(model, h1 + g[None] * x, ids), logits, depth


def test_token_choice_adds_the_weighted_recursion_output_to_its_input():
    model = build(n_layers=5, recursions=3, routing="token")
    randomise_routers(model, std=1.0)
    ids = ids_of(1, 16)
    with torch.no_grad():
        out = model(ids, ids)
        expected, _, depth = token_by_hand(model, ids)
    assert len(set(depth.tolist())) > 1  # mixed depths: the subsets matter
    torch.testing.assert_close(out.lm_loss, expected, rtol=0, atol=1e-5)


def token_losses_by_hand(model, ids):
    """R sum_i f_i P_i (f_i = R x fraction of depth i, P_i = mean probability) and mean logsumexp(logits)^2."""
    _, logits, depth = token_by_hand(model, ids)
    r = model.config.recursions
    p_i = logits.softmax(-1).mean(0)  # P_i = sum(router_probs) / (B T)
    f_i = r * torch.bincount(depth - 1, minlength=r).float() / depth.numel()
    return (p_i * f_i).sum().item(), (torch.logsumexp(logits, -1) ** 2).mean().item()


def test_token_choice_balance_and_z_losses_have_the_reference_form():
    model = build(n_layers=5, recursions=3, routing="token")
    assert model.config.balance_weight == 0.1 and model.config.z_weight == 1e-5
    randomise_routers(model, std=1.0)
    ids = ids_of(1, 16)
    with torch.no_grad():
        out = model(ids, ids)
        balance, z = token_losses_by_hand(model, ids)
    assert out.stats["balance_loss"] == pytest.approx(balance, rel=1e-5)
    assert out.stats["router_z_loss"] == pytest.approx(z, rel=1e-5)
    assert (out.loss - out.lm_loss).item() == pytest.approx(0.1 * balance + 1e-5 * z, abs=1e-6)
    # a weight large enough to resolve: the z-loss enters with router_z_weight
    model = build(n_layers=5, recursions=3, routing="token", router_z_weight=0.01, balance_weight=0.0)
    randomise_routers(model, std=1.0)
    with torch.no_grad():
        out = model(ids, ids)
        _, z = token_losses_by_hand(model, ids)
    assert (out.loss - out.lm_loss).item() == pytest.approx(0.01 * z, abs=1e-6)


# -- compute: the routers are in the ledger ---------------------------------------------------------

@pytest.mark.parametrize("routing", ["expert", "token"])
def test_router_matmuls_are_counted(routing):
    model = build(n_layers=5, recursions=3, routing=routing)
    randomise_routers(model)
    b, t, d = 2, 12, model.config.d_model
    ids = ids_of(b, t)
    with compute.measure() as ledger, torch.no_grad():
        model(ids, ids)
    if routing == "expert":  # recursion r's router scores the k_{r-1} tokens of recursion r-1 (all at r = 1)
        candidates = [t] + [model.config.tokens_at(r, t) for r in (1, 2)]
        assert ledger.totals.other_flops == 2 * d * b * sum(candidates)
    else:  # one Linear(d, R) over every token
        assert ledger.totals.other_flops == 2 * d * 3 * b * t
    model.eval()
    with compute.measure() as ledger:
        out = model.score(ids, ids)
    depth = out.steps + 1
    expected = 2 * d * sum(int((depth >= r - 1).sum()) for r in (1, 2, 3)) if routing == "expert" else 2 * d * 3 * b * t
    assert ledger.totals.other_flops == expected
    assert ledger.totals.forward_flops == pytest.approx(model.analytic_flops_for_depths(depth), rel=1e-12)


def test_full_depth_costs_at_most_the_backbone_plus_routers():
    """Middle-Cycle: every token at R recursions runs L layers, the vanilla depth (plus R router dot products)."""
    vanilla = registry.build("vanilla", overrides={**BASE, "n_layers": 8})
    model = build(n_layers=8, recursions=3)
    t, d = 16, model.config.d_model
    assert model.analytic_flops_per_token(t) == pytest.approx(vanilla.analytic_flops_per_token(t) + 3 * 2 * d)
    assert model.analytic_flops_per_token(t, training=True) < vanilla.analytic_flops_per_token(t, training=True)


def test_reference_defaults():
    cfg = build(n_layers=5).config
    assert (cfg.recursions, cfg.routing, cfg.unshared_first, cfg.unshared_last) == (3, "expert", 1, 1)
    assert cfg.capacity_schedule == (1.0, 2 / 3, 1 / 3)  # util/config.py: (R - i) / R
    assert (cfg.expert_alpha, cfg.router_aux_weight, cfg.balance_weight) == (0.1, 0.001, 0.1)
    assert cfg.z_weight == 0.0 and build(n_layers=5, routing="token").config.z_weight == 1e-5
    assert cfg.tokens_at(2, 10) == math.floor(2 / 3 * 10)
