"""Fixed-compute baselines (looped, pause, pondering): decoding equals the training form, hand-built
references, analytic counts, training. Caching, padding, causality of decoding and ledger-versus-analytic
FLOPs for every declared variant are the contract tests' (tests/test_contract.py)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.core import compute, registry
from harness.core.config import ConfigError

V = 67
BASE = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64)
# (method, overrides): every method with extra compute switched on, plus the top-k and GQA variants
METHODS = [
    ("looped", dict(loops=2)),
    ("pause", dict(pause_tokens=2)),
    ("pause", dict(pause_tokens=2, pause_token="per_slot")),
    ("pondering", dict(ponder_steps=2)),
    ("pondering", dict(ponder_steps=2, ponder_reference="original")),
    ("pondering", dict(ponder_steps=1, ponder_top_k=7, n_heads=4, n_kv_heads=2)),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for m, o in METHODS]
DEGENERATE = [("looped", dict(loops=0)), ("pause", dict(pause_tokens=0)), ("pondering", dict(ponder_steps=0))]


def build(name, **overrides):
    return registry.build(name, overrides={**BASE, **overrides})


def ids_of(batch, length):
    return torch.randint(0, V, (batch, length))


@pytest.mark.parametrize("name,overrides", DEGENERATE, ids=[d[0] for d in DEGENERATE])
def test_degenerate_settings_equal_vanilla(name, overrides):
    vanilla = build("vanilla", ponder_init=True).eval()  # the methods' shared init, not the stock default
    model = build(name, **overrides, embed_scale_rule=vanilla.config.embed_scale_rule).eval()  # same backbone
    model.decoder.load_state_dict(vanilla.decoder.state_dict())
    ids = ids_of(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, ids).loss, vanilla(ids, ids).loss, rtol=0, atol=1e-6)
        caches = model.new_cache(2), vanilla.new_cache(2)
        for chunk in (ids[:, :5], ids[:, 5:6], ids[:, 6:]):
            ours, theirs = model.decode(chunk, caches[0]).logits, vanilla.decode(chunk, caches[1]).logits
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert model.analytic_flops_per_token(12) == vanilla.analytic_flops_per_token(12)
    assert model.train_flops_per_token(12) == vanilla.train_flops_per_token(12)


@pytest.mark.parametrize("name,overrides", METHODS, ids=IDS)
def test_cached_decoding_equals_the_training_form(name, overrides):
    """Decoding one by one or in chunks equals decoding at once (the contract); here it also equals
    the parallel training-form logits."""
    model = build(name, **overrides).eval()
    ids = ids_of(2, 13)
    with torch.no_grad():
        full = model.parallel_logits(ids)
        cache = model.new_cache(2)
        one_by_one = torch.cat([model.decode(ids[:, t:t + 1], cache).logits for t in range(13)], dim=1)
        scored = model.score(ids[:, :-1], ids[:, 1:]).logprobs
        parallel_loss = model(ids[:, :-1], ids[:, 1:]).lm_loss
    torch.testing.assert_close(one_by_one, full, atol=1e-5, rtol=1e-5)
    expected = torch.log_softmax(full[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(scored, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parallel_loss, -scored.mean(), atol=1e-5, rtol=1e-5)


def test_analytic_counts_relative_to_vanilla():
    """The analytic counts against vanilla's, written out by hand from docs/design.md, "Compute accounting"."""
    t, d = 10, BASE["d_model"]
    vanilla = build("vanilla")
    head = 2 * d * V  # per position whose logits are computed
    stack = vanilla.analytic_flops_per_token(t) - head  # one pass of the L blocks, per token
    assert build("looped", loops=3).analytic_flops_per_token(t) == pytest.approx(4 * stack + head)
    # pause: one pass over the 3x longer interleaved sequence, head at 1 of every 3 slots
    assert build("pause", pause_tokens=2).analytic_flops_per_token(t) == pytest.approx(
        3 * vanilla.analytic_flops_per_token(3 * t) - 2 * head)
    # pondering: P+1 passes with their heads, and P embedding mixtures of 2 d V (or 2 d k) each
    assert build("pondering", ponder_steps=3).analytic_flops_per_token(t) == pytest.approx(
        4 * (stack + head) + 3 * head)
    assert build("pondering", ponder_steps=2, ponder_top_k=5).analytic_flops_per_token(t) == pytest.approx(
        3 * (stack + head) + 2 * 2 * d * 5)


@pytest.mark.parametrize("name,overrides", METHODS, ids=IDS)
def test_flop_counter_mode_agrees_on_matmuls(name, overrides):
    """An independent counter sees the same weight matmuls (pondering's embedding mixtures included)."""
    model = build(name, **overrides).eval()
    ids = ids_of(2, 12)
    counter = FlopCounterMode(display=False)
    with compute.measure() as ledger, counter, torch.no_grad():
        model(ids, ids)
    theirs = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "attention" not in str(op))
    assert abs(theirs - ledger.totals.matmul_flops) / ledger.totals.matmul_flops < 0.02


@pytest.mark.parametrize("name,overrides", METHODS, ids=IDS)
def test_causality(name, overrides):
    model = build(name, **overrides).eval()
    ids = ids_of(2, 12)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1 + torch.randint(0, V - 1, changed[:, 7:].shape)) % V
    with torch.no_grad():  # the training form (deployed decoding: the contract, to rtol=0, atol=1e-6 here)
        a, b = model.parallel_logits(ids), model.parallel_logits(changed)
        decoded = [model.decode(x, model.new_cache(2)).logits for x in (ids, changed)]
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    torch.testing.assert_close(decoded[0][:, :7], decoded[1][:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().amax() > 1e-3  # the later tokens do matter


def test_pause_layout_matches_hand_built_interleaving():
    """x_t then its K pauses, all at RoPE position t, causal in slot order; predict from the K-th pause."""
    model = build("pause", pause_tokens=2, pause_token="per_slot").eval()  # vocabulary: test_reference_rules
    dec = model.decoder
    ids = ids_of(1, 5)
    slots, positions = [], []
    for t in range(5):  # a deliberately naive per-token construction
        slots.append(dec.embed(ids[:, t]))
        slots += [p[None] * model.config.embed_scale for p in model.pause_embeddings]
        positions += [t] * 3
    with torch.no_grad():
        h = dec.run_blocks(torch.stack(slots, 1), dec.plan(torch.tensor([positions])))
        expected = dec.head(dec.norm(h[:, 2::3]))
        torch.testing.assert_close(model.parallel_logits(ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [0, 4])
def test_pondering_follows_reference_recurrence(top_k):
    """E^{p+1} = E^p + softmax(logits^p) V, accumulated over every pass, as PonderingLM's code does."""
    steps = 3
    model = build("pondering", ponder_steps=steps, ponder_top_k=top_k, ponder_reference="original").eval()
    dec, scale = model.decoder, model.config.embed_scale
    ids = ids_of(2, 9)
    with torch.no_grad():
        plan = dec.plan(torch.arange(9).expand(2, 9))
        current = dec.embed(ids) * steps  # mutiply_pondering_steps
        for _ in range(steps):
            logits = dec.lm_head(dec.norm(dec.run_blocks(current, plan)))
            if top_k:
                kth = logits.topk(top_k, -1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            current = current + torch.softmax(logits, -1) @ (dec.embed_tokens.weight * scale)
        expected = dec.lm_head(dec.norm(dec.run_blocks(current, plan)))
        torch.testing.assert_close(model.parallel_logits(ids), expected, atol=1e-5, rtol=1e-5)


def test_pondering_top_k_equal_to_vocab_is_the_full_distribution():
    full = build("pondering", ponder_steps=2).eval()
    top = build("pondering", ponder_steps=2, ponder_top_k=V).eval()
    top.load_state_dict(full.state_dict())
    ids = ids_of(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(top.parallel_logits(ids), full.parallel_logits(ids), atol=1e-5, rtol=1e-5)


def test_looped_shares_weights_and_pause_adds_only_its_embeddings():
    vanilla = build("vanilla")
    assert build("looped", loops=3).num_params() == vanilla.num_params()
    assert build("pondering", ponder_steps=3).num_params() == vanilla.num_params()
    per_slot = build("pause", pause_tokens=3, pause_token="per_slot")
    assert per_slot.num_params() == vanilla.num_params() + 3 * BASE["d_model"]
    # the reference's one vocabulary token: an embedding row and a head row
    assert build("pause", pause_tokens=3).num_params() == vanilla.num_params() + 2 * BASE["d_model"]


@pytest.mark.parametrize("name,overrides", METHODS, ids=IDS)
def test_training_steps_reduce_the_loss(name, overrides):
    model = build(name, **overrides).train()
    ids = ids_of(4, 12)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        out = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        assert out.stats["mean_extra_steps"] == next(iter(overrides.values()))
    if name == "pause":
        assert model.pause_embeddings.grad.abs().sum() > 0
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("name,overrides,field", [
    ("looped", dict(loops=-1), "loops"),
    ("pause", dict(pause_tokens=-2), "pause_tokens"),
    ("pondering", dict(ponder_steps=-1), "ponder_steps"),
    ("pondering", dict(ponder_top_k=V + 1), "ponder_top_k"),
    ("pondering", dict(ponder_top_k=-3), "ponder_top_k"),
    ("looped", dict(loops="-1"), "loops"),  # as a CLI string
])
def test_bad_config_values_name_the_field(name, overrides, field):
    with pytest.raises(ConfigError, match=rf"\.{field}="):
        build(name, **overrides)


def test_registered_with_defaults():
    for name, field in (("looped", "loops"), ("pause", "pause_tokens"), ("pondering", "ponder_steps")):
        plugin = registry.get(name)
        assert plugin.source == "in-tree"
        assert plugin.describe()["config"][field]["default"] >= 1
