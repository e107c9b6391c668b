"""Mixture-of-Recursions against its reference code (the authors' mixture_of_recursions repository).

Each test pins one reference behaviour on a tiny config against a value computed here by hand from the
reference's formulas (model/sharing_strategy/llama.py, model/mor_model/expert_choice_router.py and
token_choice_router.py, util/trainer_pt.py): Middle-Cycle sharing of (L-2)/R layers, the expert-choice
update H + alpha sigmoid(s) f(H) at every recursion (the first one routed), the BCE summed over recursions,
the token-choice update H^1 + g F_i(H^1), its balancing and z-losses, and the routers in the ledger;
expert-choice's attention per recursion (expert_choice_router.py, MoRLlamaDecoderLayer.__init__) with the
reference's parameter counts, recursive KV sharing (kv_caches/cache_utils.py, RecursiveDynamicCache) and the
auxiliary weights under gradient accumulation. Cached decoding, causality and padding for every variant are
the contract tests' (tests/test_contract.py); KV sharing's cached decoding is also pinned here."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.core import compute, registry
from harness.core.config import SIZES, ConfigError
from models.backbone import rotate

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


def attention_at(model, r, j):
    """Recursion r's attention in layer j of the shared block: the block's own at r = 1 or when shared,
    else the r-th copy (``MoRLlamaAttention`` per recursion in the reference)."""
    if r == 1 or len(model.attentions) == 0:
        return model.decoder.layers[model.middle[j]].self_attn
    return model.attentions[(r - 2) * model.config.n_shared + j]


def block(model, x, positions, r=1):
    """The shared block f at recursion r (its residual included), written out: recursion r's attention, the
    shared norms and MLP, over the tokens ``positions`` [n] of row 0 only, which see only each other at their
    own RoPE positions."""
    dec = model.decoder
    plan = dec.plan(positions[None])
    for j, i in enumerate(model.middle):
        layer = dec.layers[i]
        x = x + attention_at(model, r, j)(layer.input_layernorm(x), plan, i)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x


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
    """At R = 3 MoR keeps its unshared layers and a third of the others (Middle-Cycle where (L-2)/3 is whole,
    else Cycle: every layer shared); every other parameter is the backbone's plus R routers of d weights
    (fully shared attention), plus (R-1) x M/3 attentions for expert-choice's per-recursion attention."""
    layers = SIZES[size].n_layers
    ends = 1 if (layers - 2) % 3 == 0 else 0
    shape = {"vocab_size": 512, "recursions": 3, "unshared_first": ends, "unshared_last": ends}
    vanilla = registry.build("vanilla", size=size, overrides={"vocab_size": 512})
    model = registry.build("mor", size=size, overrides={**shape, "share_attention": True})
    kept = 2 * ends + (layers - 2 * ends) // 3
    assert len(model.decoder.layers) == kept
    per_layer = sum(p.numel() for p in vanilla.decoder.layers[0].parameters())
    d = model.config.d_model
    dropped = (layers - kept) * per_layer
    assert model.num_params(non_embedding=True) == vanilla.num_params(non_embedding=True) - dropped + 3 * d
    block_ratio = kept / layers
    assert block_ratio <= 0.6
    mor_blocks = sum(p.numel() for p in model.decoder.layers.parameters())
    assert mor_blocks == pytest.approx(block_ratio * sum(p.numel() for p in vanilla.decoder.layers.parameters()))
    per_recursion = registry.build("mor", size=size, overrides=shape)
    attention = sum(p.numel() for p in vanilla.decoder.layers[0].self_attn.parameters())
    assert per_recursion.num_params() == model.num_params() + 2 * (kept - 2 * ends) * attention


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


# The reference's unique parameter counts at its test shape (d 64, 4 heads, d_ff 176, vocabulary 256, R = 3),
# counted on the authors' model (issue 23): expert-choice with a fresh attention per recursion, token-choice
# fully shared. KV sharing drops the never-used k/v projections of recursions >= 2 (2 x 64 x 64 each).
REFERENCE_SHAPE = dict(vocab_size=256, d_model=64, n_heads=4, d_ff=176)


@pytest.mark.parametrize("layers,overrides,params", [
    (8, {}, 299_776), (5, {}, 216_704),  # the reference's expert-choice
    (8, {"routing": "token"}, 234_240), (5, {"routing": "token"}, 183_936),  # the reference's token-choice
    (8, {"share_attention": True}, 234_240), (5, {"share_attention": True}, 183_936),
    (8, {"kv_sharing": True}, 299_776 - 4 * 2 * 64 * 64), (5, {"kv_sharing": True}, 216_704 - 2 * 2 * 64 * 64),
])
def test_parameter_counts_are_the_references(layers, overrides, params):
    model = registry.build("mor", overrides={**REFERENCE_SHAPE, "n_layers": layers, **overrides})
    assert model.num_params() == params


def test_expert_choice_attention_is_per_recursion_and_the_rest_is_shared():
    model = build(n_layers=8, recursions=3)
    assert model.config.share_attention is None and not model.config.attention_shared
    assert len(model.attentions) == 2 * 2  # recursions 2, 3 x the block's 2 layers
    block_attention = {id(p) for i in model.middle for p in model.decoder.layers[i].self_attn.parameters()}
    copies = [{id(p) for p in a.parameters()} for a in model.attentions]
    assert all(not (c & block_attention) for c in copies)
    assert len(set().union(*copies)) == sum(len(c) for c in copies)  # no two recursions share a weight
    # every recursion's attention starts where the L-layer backbone's did: independent draws
    assert not torch.equal(model.attentions[0].q_proj.weight, model.decoder.layers[1].self_attn.q_proj.weight)
    assert build(n_layers=8, routing="token").config.attention_shared
    assert len(build(n_layers=8, routing="token").attentions) == 0


@pytest.mark.parametrize("routing", ["expert", "token"])
def test_each_recursion_runs_its_own_attention(routing):
    """Changing recursion 3's attention changes the loss of a model that routes tokens there; with the
    attention shared there is no recursion-3 attention to change."""
    model = build(n_layers=5, recursions=3, routing=routing, share_attention=False)
    randomise_routers(model)
    ids = ids_of(1, 12)
    with torch.no_grad():
        before = model(ids, ids).lm_loss
        model.attentions[-1].o_proj.weight.mul_(3.0)
        after = model(ids, ids).lm_loss
    assert abs(before.item() - after.item()) > 1e-5


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
        x[0, chosen] = x[0, chosen] + g[:, None] * block(model, x[:, chosen], chosen, r)[0]
        candidates = chosen
    return head_loss(model, x, ids), routed


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("capacity", [(1.0, 1.0, 1.0), (), (1.0, 0.5, 0.2)])
def test_expert_choice_adds_the_gated_block_output_at_every_recursion(capacity, shared):
    model = build(n_layers=5, recursions=3, capacity=capacity, share_attention=shared)
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
        h2 = h1 + 0.05 * block(mor, h1, torch.arange(1), r=2)
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
            x[0, idx] = block(model, x[:, idx], idx, r)[0]
    return head_loss(model, h1 + g[None] * x, ids), logits, depth


@pytest.mark.parametrize("shared", [None, False])
def test_token_choice_adds_the_weighted_recursion_output_to_its_input(shared):
    model = build(n_layers=5, recursions=3, routing="token", share_attention=shared)
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
    assert (cfg.share_attention, cfg.attention_shared, cfg.kv_sharing) == (None, False, False)
    assert cfg.capacity_schedule == (1.0, 2 / 3, 1 / 3)  # util/config.py: (R - i) / R
    assert (cfg.expert_alpha, cfg.router_aux_weight, cfg.balance_weight) == (0.1, 0.001, 0.1)
    assert cfg.z_weight == 0.0 and build(n_layers=5, routing="token").config.z_weight == 1e-5
    assert cfg.tokens_at(2, 10) == math.floor(2 / 3 * 10)


def test_kv_sharing_needs_a_second_recursion():
    with pytest.raises(ConfigError) as info:
        build(n_layers=3, recursions=1, kv_sharing=True)
    assert "kv_sharing" in str(info.value) and "recursions >= 2" in str(info.value)
    with pytest.raises(ConfigError) as info:
        build(n_layers=5, share_attention="sometimes")
    assert "share_attention" in str(info.value)


# -- recursive KV sharing (kv_caches/cache_utils.py RecursiveDynamicCache, expert_choice_router.py STEP 4) --

def attend_by_hand(model, attention, h, q_pos, k, v):
    """Causal attention, written out: queries h [n, d] at RoPE positions q_pos [n] of ``attention``'s q/o
    projections over keys k and values v [H, S, D] at positions 0..S-1 (already rotated)."""
    cfg = model.config
    q = (h @ attention.q_proj.weight.T).view(len(q_pos), cfg.n_heads, cfg.head_dim).transpose(0, 1)
    cos, sin = model.decoder.rotary(q_pos[None])
    q = rotate(q[None], cos, sin)[0]
    logits = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
    logits = logits.masked_fill(torch.arange(k.shape[1])[None, :] > q_pos[:, None], float("-inf"))
    out = logits.softmax(-1) @ v
    return out.transpose(0, 1).reshape(len(q_pos), -1) @ attention.o_proj.weight.T


def kv_shared_expert_by_hand(model, ids):
    """Expert-choice training forward of one row under KV sharing (n_shared = 1): recursion 1 over every token
    keeps its keys and values; a token chosen at r >= 2 attends with recursion r's queries to recursion 1's
    keys and values of every token at or before it. Returns lm_loss."""
    cfg, dec = model.config, model.decoder
    assert cfg.n_shared == 1 and cfg.n_heads == cfg.n_kv_heads
    t = ids.shape[1]
    layer = dec.layers[model.middle[0]]
    x = first_layers(model, ids)
    candidates = torch.arange(t)
    for r in range(1, cfg.recursions + 1):
        w = model.routers[r - 1].weight[0]
        score = x[0, candidates] @ w
        chosen = candidates[score.topk(max(1, int(cfg.capacity_schedule[r - 1] * t))).indices].sort().values
        g = cfg.expert_alpha * torch.sigmoid(x[0, chosen] @ w)
        h = layer.input_layernorm(x[0, chosen])
        if r == 1:
            a = layer.self_attn
            cos, sin = dec.rotary(chosen[None])
            k = rotate((h @ a.k_proj.weight.T).view(t, cfg.n_heads, -1).transpose(0, 1)[None], cos, sin)[0]
            v = (h @ a.v_proj.weight.T).view(t, cfg.n_heads, -1).transpose(0, 1)
        y = x[0, chosen] + attend_by_hand(model, attention_at(model, r, 0), h, chosen, k, v)
        y = y + layer.mlp(layer.post_attention_layernorm(y))
        x = x.clone()
        x[0, chosen] = x[0, chosen] + g[:, None] * y
        candidates = chosen
    return head_loss(model, x, ids)


@pytest.mark.parametrize("shared", [False, True])
def test_kv_sharing_attends_to_the_first_recursions_keys_and_values(shared):
    model = build(n_layers=5, recursions=3, kv_sharing=True, share_attention=shared, capacity=(1.0, 0.5, 0.25))
    randomise_routers(model)
    ids = ids_of(1, 12)
    with torch.no_grad():
        out = model(ids, ids)
        expected = kv_shared_expert_by_hand(model, ids)
        plain = build(n_layers=5, recursions=3, share_attention=shared, capacity=(1.0, 0.5, 0.25))
        plain.load_state_dict(model.state_dict(), strict=False)  # the same weights, recursion-wise KV
        randomise_routers(plain)
    torch.testing.assert_close(out.lm_loss, expected, rtol=0, atol=1e-5)
    assert abs(plain(ids, ids).lm_loss.item() - out.lm_loss.item()) > 1e-5  # the keys differ: it matters


@pytest.mark.parametrize("routing", ["expert", "token"])
@pytest.mark.parametrize("shared", [False, True])
def test_kv_sharing_cached_decoding_equals_recomputation(routing, shared):
    """Token by token through the cache = the whole sequence in one call (deployed rule), and with every
    recursion keeping every token the deployed loss is the training forward's."""
    model = build(n_layers=5, recursions=3, routing=routing, kv_sharing=True, share_attention=shared,
                  n_heads=4, n_kv_heads=2).eval()
    randomise_routers(model, std=1.0)
    ids = ids_of(2, 10)
    with torch.no_grad():
        whole = model.decode(ids, model.new_cache(2))
        cache = model.new_cache(2)
        steps = [model.decode(ids[:, i:i + 1], cache) for i in range(ids.shape[1])]
    assert len(cache.recursions) == 0 and cache.main.length == ids.shape[1]  # no per-recursion cache
    assert len(set(whole.steps.flatten().tolist())) > 1  # mixed depths: the key sets matter
    torch.testing.assert_close(torch.cat([s.logits for s in steps], 1), whole.logits, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([s.steps for s in steps], 1), whole.steps)
    if routing == "expert":
        full = build(n_layers=5, recursions=3, kv_sharing=True, share_attention=shared,
                     capacity=(1.0, 1.0, 1.0)).eval()
        randomise_routers(full)
        with torch.no_grad():
            trained = full(ids, ids).lm_loss
        assert trained.item() == pytest.approx(-full.score(ids, ids).logprobs.mean().item(), abs=1e-5)


def test_kv_sharing_ledger_skips_the_later_recursions_key_value_projections():
    """Recursion r >= 2 runs q and o projections only and sees every real token at or before each query."""
    model = build(n_layers=5, recursions=3, kv_sharing=True).eval()
    randomise_routers(model)
    ids = ids_of(2, 12)
    with compute.measure() as ledger:
        out = model.score(ids, ids)
    depth = out.steps + 1
    assert ledger.totals.forward_flops == pytest.approx(model.analytic_flops_for_depths(depth), rel=1e-12)
    cfg = model.config
    kv = 2 * cfg.d_model * cfg.n_kv_heads * cfg.head_dim
    later = sum(int((depth >= r).sum()) for r in (2, 3))
    plain = build(n_layers=5, recursions=3).eval()
    keys_plain = sum(float((a.long().cumsum(1) * a).sum()) for a in (depth >= 2, depth >= 3))
    keys_shared = sum(float((torch.arange(1, 13)[None] * (depth >= r)).sum()) for r in (2, 3))
    difference = plain.analytic_flops_for_depths(depth) - model.analytic_flops_for_depths(depth)
    assert difference == pytest.approx(2.0 * kv * later - 4.0 * cfg.d_model * (keys_shared - keys_plain))


# -- auxiliary losses under gradient accumulation (util/trainer_pt.py, training_step) ----------------

def test_router_bce_weight_does_not_grow_with_gradient_accumulation():
    """The harness's trainer divides each micro-batch's whole loss by A, so the BCE's effective weight is
    router_aux_weight for any A; the reference adds coeff x BCE per micro-batch undivided (0.001 x A)."""
    from harness.job import Job, TrainConfig
    from harness.train import Placement, _accumulate

    tokens = np.random.default_rng(0).integers(0, V, 4000).astype(np.int64)
    job = Job("mor", 1e9, train=TrainConfig(seq_len=12, batch_size=2, grad_accum=2))
    model = build(n_layers=5, recursions=3, router_aux_weight=0.5)  # large: the BCE dominates the router grads
    randomise_routers(model)
    model.train()
    _accumulate(job, tokens, 0, None, model, torch.device("cpu"), Placement())
    got = torch.cat([r.weight.grad.flatten() for r in model.routers])

    from harness.data.batches import batch_at

    def router_grad(aux_scale):
        model.zero_grad()
        for micro in range(2):
            inputs, targets = batch_at(tokens, micro, 2, 12, job.seed)
            out = model(inputs, targets)
            (out.lm_loss / 2 + aux_scale * (out.loss - out.lm_loss)).backward()
        return torch.cat([r.weight.grad.flatten() for r in model.routers])

    torch.testing.assert_close(got, router_grad(0.5), rtol=1e-5, atol=1e-7)  # weight x mean over micro-batches
    assert not torch.allclose(got, router_grad(1.0), rtol=1e-3, atol=1e-6)  # the reference's: weight x A
