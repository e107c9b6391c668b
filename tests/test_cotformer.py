"""CoTFormer and adaptive CoTFormer against their reference code (epfml/CoTFormer).

The oracle below is the reference's forward written out in its own layout (``GPTBase.forward`` of
``models/adaptive_cotformer_mod_efficient_sigmoid_crw_lnmid_de_random_factor_single_final.py``; without routers,
of ``cotformer_full_depth[_lnmid_depthemb].py``, where every token takes every repeat): per chain layer one key buffer
over the repeats with each key's token index, the mask ``k_indices <= indices``, the active tokens gathered in the
router's top-k order (not causal order), x_in (1 - w) + y w, and the final states picked by ``is_final`` and sorted
back by index.
Attention is computed here by hand (textbook rotate-half RoPE, softmax); only the block's weights are the model's.
Cached decoding, causality, padding and the ledger against decode_flops for every variant are the contract tests'
(tests/test_contract.py)."""

import math

import pytest
import torch

from baselines.cotformer import ChainKV, capacities, expected_training_counts
from harness.core import compute, registry
from harness.core.config import ConfigError
from models.backbone import apply_rotary

V = 61
BASE = dict(vocab_size=V, d_model=32, n_heads=2, d_ff=64, n_layers=3)


def build(name="cotformer", **overrides):
    torch.manual_seed(0)
    model = registry.build(name, overrides={**BASE, **overrides})
    with torch.no_grad():  # norms away from 1, routers decisive: a mis-wired piece cannot hide
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for router in getattr(model, "routers", []):
            router.weight.normal_(0.0, 0.5)
    return model


def ids_of(batch, length, seed=1):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- the oracle: the reference's forward, by hand ----------------------------------------------------

def attention_by_hand(model, i, h, idx, store):
    """Layer i's attention of queries h [B, n, d] at token indices idx [B, n]; ``store`` holds the layer's keys,
    values and key indices of the repeats so far (the reference's all_keys / all_values / all_indices)."""
    cfg, a = model.config, model.decoder.layers[i].self_attn
    b, n, _ = h.shape
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = (h @ a.q_proj.weight.T).view(b, n, H, D).transpose(1, 2)
    k = (h @ a.k_proj.weight.T).view(b, n, Hkv, D).transpose(1, 2)
    v = (h @ a.v_proj.weight.T).view(b, n, Hkv, D).transpose(1, 2)
    cos, sin = model.decoder.rotary(idx)
    sin = torch.cat((-sin[..., :D // 2], sin[..., D // 2:]), -1)  # the table folds rotate-half's sign in
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    keys, values, key_idx = store.get(i, (k[:, :, :0], v[:, :, :0], idx[:, :0]))
    keys, values, key_idx = torch.cat((keys, k), 2), torch.cat((values, v), 2), torch.cat((key_idx, idx), 1)
    store[i] = (keys, values, key_idx)
    keys, values = keys.repeat_interleave(H // Hkv, 1), values.repeat_interleave(H // Hkv, 1)
    logits = (q @ keys.transpose(-1, -2)) / math.sqrt(D)
    logits = logits.masked_fill(~(key_idx[:, None, :] <= idx[:, :, None])[:, None], float("-inf"))
    out = logits.softmax(-1) @ values
    return out.transpose(1, 2).reshape(b, n, H * D) @ a.o_proj.weight.T


def block_by_hand(model, i, x, idx, store):
    layer = model.decoder.layers[i]
    x = x + attention_by_hand(model, i, layer.input_layernorm(x), idx, store)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def reference_forward(model, ids, select):
    """The reference's forward; ``select(r, score [B, m])`` -> positions [B, k] within the current tokens that take
    repeat r + 1. Returns (final normalised hidden states [B, T, d], repeats taken [B, T])."""
    dec, cfg = model.decoder, model.config
    b, t = ids.shape
    idx = torch.arange(t).expand(b, t)
    x = dec.embed(ids)
    for i in model.first:
        x = block_by_hand(model, i, x, idx, {})
    store, active, weights = {}, idx, None
    outputs, indices, finals = [], [], []
    for r in range(1, cfg.repeats + 1):
        x_in = x
        depth = model._depth_vector(r)
        h = x if depth is None else x + depth
        for i in model.middle:
            h = block_by_hand(model, i, h, active, store)
        x = h if model.mid_norm is None else model.mid_norm(h)
        if weights is not None:
            x = x_in * (1 - weights) + x * weights
        if r < cfg.repeats and hasattr(model, "routers"):
            score = x @ model.routers[r - 1].weight[0]
            chosen = select(r, score)
            weights = torch.sigmoid(score.gather(1, chosen))[..., None]
        else:  # the last repeat: nobody goes on; the fixed CoTFormer before it: everybody does
            chosen = active if r < cfg.repeats else idx[:, :0]
            chosen = torch.arange(chosen.shape[1]).expand_as(chosen)
        outputs.append(x)
        indices.append(active)
        finals.append(torch.ones_like(active, dtype=torch.bool).scatter(1, chosen, False))  # is_final
        x, active = x.gather(1, chosen[..., None].expand(-1, -1, x.shape[-1])), active.gather(1, chosen)
    final = torch.cat(finals, 1)
    rows = [torch.cat(outputs, 1)[j][final[j]][torch.cat(indices, 1)[j][final[j]].argsort()] for j in range(b)]
    x = torch.stack(rows)
    for i in model.last:
        x = block_by_hand(model, i, x, idx, {})
    every = torch.cat(indices, 1)
    return dec.norm(x), torch.stack([torch.bincount(every[j], minlength=t) for j in range(b)])


def every_token(r, score):
    return torch.arange(score.shape[1]).expand_as(score)


def with_factors(model, factors):
    model.length_factors = lambda: list(factors)
    return model


# -- which keys a repeat's token sees -------------------------------------------------------------

def visible(plan):
    """[n, S] bool: the keys each query of row 0 attends to."""
    return plan.mask[0, 0] > torch.finfo(torch.float32).min


def test_a_token_sees_every_earlier_repeat_of_itself_and_of_earlier_tokens():
    """Keys [repeat 1: t0 t1 t2 | repeat 2: t0 t1 t2 | ...]: query (t, r) sees (t', r') iff t' <= t and r' <= r
    (the reference's causal T x T mask repeated over the repeats run so far)."""
    dec = build(repeats=3).decoder
    chain, pos, ok = ChainKV(), torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool)
    plans = [chain.add(dec, pos, ok, r) for r in (1, 2, 3)]
    assert visible(plans[0]).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert visible(plans[1]).int().tolist() == [[1, 0, 0, 1, 0, 0], [1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert visible(plans[2]).int().tolist() == [[1, 0, 0] * 3, [1, 1, 0] * 3, [1, 1, 1] * 3]
    assert [p.key_pairs for p in plans] == [6, 12, 18]  # query t at repeat r: r (t + 1) keys
    # Decoding token 3 later: it sees repeat <= r of every token, never the later repeats of earlier ones.
    later = [chain.add(dec, torch.tensor([[3]]), torch.ones(1, 1, dtype=torch.bool), r) for r in (1, 2, 3)]
    assert visible(later[0]).int().tolist() == [[1, 1, 1, 0, 0, 0, 0, 0, 0, 1]]
    assert visible(later[1]).int().tolist() == [[1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1]]
    assert visible(later[2]).int().tolist() == [[1] * 12]
    assert [p.key_pairs for p in later] == [4, 8, 12]


def test_stopped_tokens_keys_stay_visible_and_routed_out_ones_are_no_keys():
    """Only tokens taking repeat r add keys there; a token that stopped keeps its earlier repeats' keys."""
    dec = build(repeats=2).decoder
    chain = ChainKV()
    chain.add(dec, torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool), 1)
    plan = chain.add(dec, torch.tensor([[2]]), torch.ones(1, 1, dtype=torch.bool), 2)  # only token 2 goes on
    assert visible(plan).int().tolist() == [[1, 1, 1, 1]]  # tokens 0, 1 at repeat 1, token 2 at repeats 1, 2
    filler = chain.add(dec, torch.tensor([[0]]), torch.zeros(1, 1, dtype=torch.bool), 2)  # a compaction filler
    assert filler.key_pairs == 0 and filler.queries == 0


# -- the fixed CoTFormer --------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {"repeats": 3},  # cotformer_full_depth
    {"repeats": 2, "prefix_layers": 1, "suffix_layers": 1, "mid_norm": True, "depth_embedding": "linear_learned"},
    {"repeats": 3, "mid_norm": True, "depth_embedding": "learned", "n_heads": 4, "n_kv_heads": 2},
])
def test_cotformer_forward_is_the_references(overrides):
    model = build(**overrides)
    if model.depth_embedding is not None:
        torch.nn.init.normal_(model.depth_embedding.weight, std=0.3)
    ids = ids_of(2, 9)
    with torch.no_grad():
        h, taken = reference_forward(model, ids, every_token)
        out = model(ids, ids)
        deployed = model.score(ids, ids)
    expected = model.decoder.head_loss(h, ids)
    torch.testing.assert_close(out.lm_loss, expected, rtol=0, atol=1e-5)
    assert taken.eq(model.config.repeats).all() and deployed.steps.eq(model.config.repeats - 1).all()
    assert -deployed.logprobs.mean().item() == pytest.approx(expected.item(), abs=1e-5)


def test_layers_run_prefix_then_chain_repeats_then_suffix():
    model = build(n_layers=4, repeats=3, prefix_layers=1, suffix_layers=1).eval()
    calls = []
    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_hook(lambda mod, inp, out, i=i: calls.append(i))
    with torch.no_grad():
        model.decode(ids_of(1, 2), model.new_cache(1))
    assert calls == [0, 1, 2, 1, 2, 1, 2, 3]
    assert model.num_params() == registry.build("vanilla", overrides={**BASE, "n_layers": 4}).num_params()


def test_depth_embedding_is_added_before_each_repeat_counting_down():
    """linear_learned: e (R - r), zero at the last repeat; learned: row R - r of a table of R."""
    model = build(repeats=3, depth_embedding="linear_learned")
    e = model.depth_embedding.weight[0]
    assert [torch.equal(model._depth_vector(r), e * (3 - r)) for r in (1, 2, 3)] == [True] * 3
    model = build(repeats=3, depth_embedding="learned")
    assert model.depth_embedding.weight.shape == (3, BASE["d_model"])
    assert torch.equal(model._depth_vector(1), model.depth_embedding.weight[2])


def test_fixed_compute_is_r_chain_passes_over_a_growing_key_set():
    model = build(n_layers=4, repeats=3, prefix_layers=1, suffix_layers=1)
    vanilla = registry.build("vanilla", overrides={**BASE, "n_layers": 1})
    t, b = 10, 2
    block = vanilla.analytic_flops_per_token(t) * t - 2 * BASE["d_model"] * V * t  # one causal layer
    attention = 4 * BASE["d_model"] * t * (t + 1) / 2
    chain = sum(block - attention + r * attention for r in (1, 2, 3))  # repeat r: r x the causal keys
    expected = 2 * block + 2 * chain + 2 * BASE["d_model"] * V * t
    assert model.analytic_flops_per_token(t) * t == pytest.approx(expected, rel=1e-12)
    with compute.measure() as ledger:
        model.score(ids_of(b, t), ids_of(b, t, seed=2))
    assert ledger.totals.forward_flops == pytest.approx(b * expected, rel=1e-12)


# -- the adaptive CoTFormer: routing, capacity, repeat count ----------------------------------------

def top_k_at(factors):
    """The reference's MoDBlock: top-int(cap x current) of the scores per row, in score order (not causal)."""
    caps = capacities(factors)

    def select(r, score):
        return score.topk(int(caps[r - 1] * score.shape[1]), dim=1).indices

    return select


@pytest.mark.parametrize("factors", [(1.0, 1.0, 1.0, 1.0), (0.8, 0.5, 0.5, 0.2), (0.6, 0.0, 0.0, 0.0)])
@pytest.mark.parametrize("overrides", [{}, {"n_layers": 4, "prefix_layers": 1, "suffix_layers": 1,
                                           "depth_embedding": "linear_learned"}])
def test_adaptive_training_forward_is_the_references(factors, overrides):
    model = with_factors(build("cotformer_adaptive", **overrides), factors).train()
    ids = ids_of(2, 12)
    out = model(ids, ids)
    with torch.no_grad():
        h, taken = reference_forward(model, ids, top_k_at(factors))
    torch.testing.assert_close(out.lm_loss.detach(), model.decoder.head_loss(h, ids), rtol=0, atol=1e-5)
    assert out.stats["mean_extra_steps"] == pytest.approx(taken.float().mean().item() - 1)
    out.loss.backward()  # every router gets a gradient, a router whose repeat took no token included
    assert all(r.weight.grad is not None for r in model.routers)


def test_capacity_is_nested_and_truncated_as_the_reference():
    """k_1 = T, k_{r+1} = int(f_r / f_{r-1} k_r): at T = 10 and factors .75, .5, .2, .2 that is 10, 7, 4, 1, 1
    tokens per row (int(0.5/0.75 x 7) = 4, not int(0.5 x 10) = 5), and the chain's ledger says so."""
    assert capacities([0.75, 0.5, 0.2, 0.2]) == [0.75, 0.5 / 0.75, 0.2 / 0.5, 1.0]
    assert capacities([0.5, 0.0, 0.0]) == [0.5, 0.0, 0.0]
    model = with_factors(build("cotformer_adaptive"), (0.75, 0.5, 0.2, 0.2))
    b, t, layers = 2, 10, BASE["n_layers"]
    with compute.measure() as ledger, torch.no_grad():
        out = model(ids_of(b, t), ids_of(b, t))
    assert ledger.totals.block_queries == b * layers * (10 + 7 + 4 + 1 + 1)
    assert ledger.totals.other_flops == 2 * BASE["d_model"] * b * (10 + 7 + 4 + 1)  # routers 1..4
    assert out.stats["mean_extra_steps"] == pytest.approx((7 + 4 + 1 + 1) / 10)


def test_training_factors_are_the_references_sorted_clamped_draws():
    model = build("cotformer_adaptive", repeats=5).train()
    torch.manual_seed(3)
    factors = model.length_factors()
    torch.manual_seed(3)
    expected = torch.clamp(torch.rand((4,)) * 1.05, max=1).sort(descending=True).values.tolist()
    assert factors == expected
    model.eval()
    assert model.length_factors() == [1.0] * 4  # eval: every token continues (--eval_length_factor unset)
    model = build("cotformer_adaptive", repeats=3, eval_length_factors=(0.5, 0.25)).eval()
    assert model.length_factors() == [0.5, 0.25]


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_deployed_decoding_continues_while_the_router_weight_reaches_the_threshold(threshold):
    """Per token: repeat r + 1 iff sigmoid(router_r) >= continue_threshold, nested; the oracle applies the rule
    to the whole row at once (it needs no future token), decoding runs token by token with the cache."""
    model = build("cotformer_adaptive", continue_threshold=threshold).eval()
    ids = ids_of(1, 14)

    def select(r, score):
        return torch.nonzero(torch.sigmoid(score[0]) >= threshold)[:, 0][None]

    with torch.no_grad():
        h, taken = reference_forward(model, ids, select)
        cache = model.new_cache(1)
        steps = [model.decode(ids[:, i:i + 1], cache) for i in range(ids.shape[1])]
    logits = torch.cat([s.logits for s in steps], 1)
    torch.testing.assert_close(logits, model.decoder.head(h), rtol=0, atol=1e-4)
    assert torch.equal(torch.cat([s.steps for s in steps], 1), taken - 1)
    assert len(set(taken.flatten().tolist())) > 1  # mixed depths: the key sets matter


def test_every_token_continuing_is_the_references_default_evaluation():
    """continue_threshold 0 deploys every repeat for every token, mixed by w: the reference's eval (capacity 1),
    which is also this forward in eval mode (parallel_val_loss)."""
    model = build("cotformer_adaptive", continue_threshold=0.0).eval()
    ids = ids_of(2, 10)
    with torch.no_grad():
        h, _ = reference_forward(model, ids, every_token)
        out = model(ids, ids)
    deployed = model.score(ids, ids)
    assert deployed.steps.eq(4).all()
    assert out.lm_loss.item() == pytest.approx(model.decoder.head_loss(h, ids).item(), abs=1e-5)
    assert -deployed.logprobs.mean().item() == pytest.approx(out.lm_loss.item(), abs=1e-5)


def test_force_steps_sets_the_repeat_count_of_every_token():
    model = build("cotformer_adaptive", repeats=4).eval()
    calls = []
    model.decoder.layers[0].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[1]))
    for steps in range(4):
        model.force_steps(steps)
        calls.clear()
        with torch.no_grad():
            out = model.decode(ids_of(2, 5), model.new_cache(2))
        assert out.steps.eq(steps).all() and calls == [5] * (steps + 1)
    with pytest.raises(ValueError):
        model.force_steps(4)


def test_one_repeat_is_the_fixed_twin_at_one_repeat_plus_one_router():
    """Forced to one repeat, the adaptive model is LN-CoTFormer at R = 1 on the same decoder weights (router 1
    still scores every token: 2d FLOPs each)."""
    model = build("cotformer_adaptive", repeats=3).eval()
    model.force_steps(0)
    twin = registry.build("cotformer", overrides={**BASE, "repeats": 1, "mid_norm": True}).eval()
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("routers")})
    ids = ids_of(2, 8)
    with compute.measure() as ours:
        a = model.score(ids, ids)
    with compute.measure() as theirs:
        b = twin.score(ids, ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-6)
    assert ours.totals.forward_flops == theirs.totals.forward_flops + 2 * BASE["d_model"] * ids.numel()


def test_training_flops_are_the_expectation_over_the_length_factors():
    """The ledger's mean over many training forwards meets the analytic expectation (random factors)."""
    model = build("cotformer_adaptive")
    b, t = 2, 32
    torch.manual_seed(0)
    ids = ids_of(b, t)
    with compute.measure() as ledger, torch.no_grad():
        for _ in range(200):
            model(ids, ids)
    measured = ledger.totals.forward_flops / (200 * b * t)
    assert measured == pytest.approx(model.analytic_flops_per_token(t, training=True), rel=0.02)
    assert not model.training_flops_exact() and build("cotformer_adaptive", repeats=1).training_flops_exact()
    queries, pairs, routed = expected_training_counts(2, 10)  # R = 2: a_2 = int(min(1, 1.05 u) 10)
    assert queries == pytest.approx(10 + sum(min(10, int(1.05 * u * 10)) for u in torch.linspace(0, 1, 100001).tolist())
                                    / 100001, abs=0.05)
    assert routed == 10.0


# -- configuration ------------------------------------------------------------------------------

def test_reference_defaults():
    fixed, adaptive = build().config, build("cotformer_adaptive").config
    assert (fixed.repeats, fixed.prefix_layers, fixed.suffix_layers, fixed.mid_norm) == (5, 0, 0, False)
    assert fixed.depth_embedding == adaptive.depth_embedding == "none"
    assert (adaptive.repeats, adaptive.mid_norm, adaptive.continue_threshold) == (5, True, 0.5)
    assert adaptive.eval_length_factors == ()
    assert len(build("cotformer_adaptive").routers) == 4  # R - 1: the reference's last router is never used
    assert registry.get("cotformer_adaptive").cls.fixed_twin == "cotformer"


@pytest.mark.parametrize("name,overrides,field", [
    ("cotformer", {"repeats": 0}, "repeats"),
    ("cotformer", {"prefix_layers": 2, "suffix_layers": 1}, "suffix_layers"),
    ("cotformer", {"prefix_layers": -1}, "prefix_layers"),
    ("cotformer", {"depth_embedding": "sinusoidal"}, "depth_embedding"),
    ("cotformer_adaptive", {"continue_threshold": 1.5}, "continue_threshold"),
    ("cotformer_adaptive", {"eval_length_factors": (0.5,)}, "eval_length_factors"),
    ("cotformer_adaptive", {"eval_length_factors": (0.5, 0.6, 0.1, 0.0)}, "eval_length_factors"),
])
def test_bad_values_are_one_line_config_errors(name, overrides, field):
    with pytest.raises(ConfigError) as info:
        build(name, **overrides)
    message = str(info.value)
    assert "\n" not in message and f".{field}=" in message
