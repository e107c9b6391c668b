"""Adaptive baselines (Mixture-of-Recursions, AdaPonderLM-style gating): what is specific to them.

Cached decoding, causality, padding and the ledger's FLOPs of the depths actually taken (forced to every
depth, via ``force_steps``) are the contract tests' for every declared variant (tests/test_contract.py);
here: degenerate settings, routing-rule causality, per-recursion caches, KV reuse, training relaxations,
gradients and config validation."""

import pytest
import torch

from harness.core import compute, registry
from harness.core.config import ConfigError

V = 61
BASE = dict(vocab_size=V, d_model=32, n_layers=3, n_heads=2, d_ff=64)
# Every adaptive variant, with routers/gates left as initialised so depths are mixed.
METHODS = [
    ("mor", dict(recursions=3, n_layers=5)),  # MoR: n_layers - 2 must split into the recursions
    ("mor", dict(recursions=3, n_layers=5, routing="token")),
    ("mor", dict(recursions=2, n_layers=3, unshared_last=0, n_heads=4, n_kv_heads=2, capacity=(0.5,))),
    ("adaponder", dict(max_iterations=3, gate_init_bias=0.0)),
    ("adaponder", dict(max_iterations=2, n_layers=2, gate_init_bias=0.0, ponder_scale_token=False)),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for m, o in METHODS]


def build(name, **overrides):
    return registry.build(name, overrides={**BASE, **overrides})


def ids_of(batch, length):
    return torch.randint(0, V, (batch, length))


def decode_whole(model, ids, valid=None):
    with torch.no_grad():
        return model.decode(ids, model.new_cache(ids.shape[0]), valid=valid)


# -- degenerate settings -------------------------------------------------------------------------

@pytest.mark.parametrize("name,overrides", [("mor", dict(recursions=1)), ("mor", dict(recursions=1, routing="token")),
                                            ("adaponder", dict(max_iterations=1))],
                         ids=["mor-expert", "mor-token", "adaponder"])
def test_one_recursion_or_iteration_equals_vanilla(name, overrides):
    model = build(name, **overrides).eval()
    # the same backbone: the method's init and embedding scale, not vanilla's stock defaults
    vanilla = build("vanilla", ponder_init=True, embed_scale_rule=model.config.embed_scale_rule).eval()
    model.decoder.load_state_dict(vanilla.decoder.state_dict())
    ids = ids_of(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, ids).lm_loss, vanilla(ids, ids).loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(ids, ids).loss, vanilla(ids, ids).loss, rtol=0, atol=1e-6)
        caches = model.new_cache(2), vanilla.new_cache(2)
        for chunk in (ids[:, :5], ids[:, 5:6], ids[:, 6:]):
            out = model.decode(chunk, caches[0])
            torch.testing.assert_close(out.logits, vanilla.decode(chunk, caches[1]).logits, rtol=0, atol=1e-5)
            assert int(out.steps.max()) == 0
    assert model.analytic_flops_per_token(12) == vanilla.analytic_flops_per_token(12)
    assert model.train_flops_per_token(12) == vanilla.train_flops_per_token(12)


# -- deployed inference --------------------------------------------------------------------------

def test_expert_choice_training_top_k_sees_the_future_but_inference_does_not():
    """Why inference uses the threshold: top-k membership of token t depends on later tokens."""
    model = build("mor", recursions=2, n_layers=4, capacity=(0.25,)).eval()
    captured = []
    model.routers[1].register_forward_hook(lambda mod, inp, out: captured.append(out[..., 0].detach()))
    a = ids_of(1, 16)
    with torch.no_grad():
        model(a, a)
    score = captured[-1][0]
    k = model.config.tokens_at(2, 16)
    first_selected = int(score.topk(k).indices.min())
    b = a.clone()
    changed = False
    for _ in range(20):  # resample the suffix until a later token outranks it; the prefix stays the same
        b[0, first_selected + 1:] = torch.randint(0, V, (16 - first_selected - 1,))
        with torch.no_grad():
            model(b, b)
        if first_selected not in captured[-1][0].topk(k).indices.tolist():
            changed = True
            break
    assert changed, "training top-k should depend on future tokens"
    depths_a = decode_whole(model, a).steps[0, :first_selected + 1]
    depths_b = decode_whole(model, b).steps[0, :first_selected + 1]
    assert torch.equal(depths_a, depths_b)


@pytest.mark.parametrize("routing", ["expert", "token"])
def test_mor_exited_tokens_write_no_kv_at_later_recursions(routing):
    model = build("mor", recursions=3, n_layers=5, routing=routing).eval()
    ids = ids_of(1, 12)
    with torch.no_grad():
        cache = model.new_cache(1)
        depth = torch.cat([model.decode(ids[:, t:t + 1], cache).steps for t in range(12)], 1) + 1
    assert cache.main.length == 12
    for r in (2, 3):  # recursion r's cache holds exactly the tokens that took it, nothing else
        assert cache.recursions[r - 2].length == int((depth >= r).sum())
        assert bool(cache.recursions[r - 2].key_valid[:, :cache.recursions[r - 2].length].all())


def test_adaponder_reuses_halted_tokens_kv():
    model = build("adaponder", max_iterations=3, gate_init_bias=0.0).eval()
    ids = ids_of(2, 12)
    with torch.no_grad():
        cache = model.new_cache(2)
        depth = model.decode(ids, cache).steps + 1
    assert {1, 2, 3} <= set(depth.flatten().tolist())
    for i in (1, 2):  # 0-based iteration i >= 1
        for layer in range(model.config.n_layers):
            now, before = cache.iterations[i].keys[layer][:, :, :12], cache.iterations[i - 1].keys[layer][:, :, :12]
            same = (now == before).all(-1).all(1)  # [B, T]: the key is the previous iteration's
            assert torch.equal(same, depth <= i)  # halted before iteration i+1 <=> reused, else fresh


# -- measured compute ----------------------------------------------------------------------------

def test_token_choice_training_is_its_inference_and_measures_its_routing():
    model = build("mor", recursions=3, n_layers=5, routing="token")
    ids = ids_of(2, 12)
    with compute.measure() as ledger:
        out = model(ids, ids)
        out.loss.backward()
    model.eval()
    deployed = model.score(ids, ids)
    depths = deployed.steps + 1
    # depth is chosen per token from its own state: training does exactly the deployed computation
    assert ledger.totals.train_flops == 3 * model.analytic_flops_for_depths(depths)
    assert out.lm_loss.item() == pytest.approx(-deployed.logprobs.mean().item(), abs=1e-5)
    assert out.stats["mean_extra_steps"] == pytest.approx(deployed.steps.float().mean().item())


def test_adaponder_relaxation_is_exact_at_hard_gates():
    """With saturated gates (q in {0, 1}) the training relaxation is the deployed computation."""
    model = build("adaponder", max_iterations=3, gate_init_bias=0.0, compute_penalty=0.0).eval()
    with torch.no_grad():
        for gate in model.gates:
            gate[2].weight.mul_(1e4)
    ids = ids_of(2, 12)
    deployed = model.score(ids, ids)
    assert int(deployed.steps.min()) < int(deployed.steps.max())
    with torch.no_grad():
        out = model(ids, ids)
    assert out.lm_loss.item() == pytest.approx(-deployed.logprobs.mean().item(), abs=1e-5)
    assert out.stats["mean_extra_steps"] == pytest.approx(deployed.steps.float().mean().item(), abs=1e-6)


def test_adaponder_without_halting_equals_pondering():
    """Gates that never fire leave PonderLM v1 with N-1 pondering steps (same weights)."""
    try:
        pondering = build("pondering", ponder_steps=2, ponder_top_k=0, ponder_reference="original",  # accumulating
                          embed_scale_rule=registry.get("adaponder").make_config().embed_scale_rule).eval()
    except Exception as exc:  # the pondering plugin is another file; skip only if it is absent
        pytest.skip(f"pondering plugin unavailable: {exc}")
    model = build("adaponder", max_iterations=3).eval()
    model.decoder.load_state_dict(pondering.decoder.state_dict())
    model.force_steps(2)  # every token takes all 3 iterations
    ids = ids_of(2, 12)
    out = decode_whole(model, ids)
    torch.testing.assert_close(out.logits, decode_whole(pondering, ids).logits, atol=1e-5, rtol=1e-5)
    # the same passes, heads and mixtures, plus the N-1 = 2 gates every token runs at full depth
    assert model.analytic_flops_per_token(12) == pytest.approx(
        pondering.analytic_flops_per_token(12) + 2 * model.gate_flops())


# -- training signal -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,overrides", METHODS, ids=IDS)
def test_gradients_reach_routers_and_gates(name, overrides):
    model = build(name, **overrides).train()
    ids = ids_of(2, 12)
    out = model(ids, ids)
    out.loss.backward()
    routing = list(model.routers if name == "mor" else model.gates)
    assert routing
    for module in routing:
        for p in module.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert torch.isfinite(out.loss) and all(isinstance(v, float) for v in out.stats.values())
    assert out.loss.item() > out.lm_loss.item()  # the auxiliary loss / compute penalty is in the objective


def test_compute_penalty_trains_gates_towards_halting():
    # every gate feels the expected-iterations penalty; the default bottom-K loss only the gate values it
    # picks (tests/test_adaponder.py)
    model = build("adaponder", max_iterations=3, compute_penalty=1.0, ponder_loss="expected_iterations")
    ids = ids_of(2, 12)
    out = model(ids, ids)
    (out.loss - out.lm_loss).backward()  # the penalty alone
    for gate in model.gates:
        assert gate[2].bias.grad.item() < 0  # raising the halting bias lowers the penalty


# -- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,overrides,field", [
    ("mor", dict(recursions=0), "recursions"),
    ("mor", dict(routing="random"), "routing"),
    ("mor", dict(capacity=(1.0, 0.5)), "capacity"),  # needs 0, 1 or R=3 values
    ("mor", dict(capacity=(0.9, 0.5, 0.2)), "capacity"),  # recursion 1 is dense
    ("mor", dict(capacity=(1.0, 0.2, 0.5)), "capacity"),  # not nested
    ("mor", dict(capacity=(1.5,)), "capacity"),
    ("mor", dict(n_layers=2), "unshared_last"),  # default 1 + 1 unshared leave no middle block
    ("mor", dict(unshared_first=-1), "unshared_first"),
    ("mor", dict(router_aux_weight=-0.1), "router_aux_weight"),
    ("mor", dict(balance_weight=-1.0), "balance_weight"),
    ("adaponder", dict(max_iterations=0), "max_iterations"),
    ("adaponder", dict(compute_penalty=-0.5), "compute_penalty"),
    ("adaponder", dict(halt_threshold=1.0), "halt_threshold"),
    ("adaponder", dict(gate_hidden=0), "gate_hidden"),
])
def test_bad_config_values_name_the_field(name, overrides, field):
    with pytest.raises(ConfigError, match=field):
        build(name, **overrides)


def test_cli_strings_parse():
    model = registry.build("mor", overrides={**{k: str(v) for k, v in BASE.items()}, "recursions": "3",
                                             "n_layers": "5", "capacity": "1.0,0.5,0.25", "routing": "expert"})
    assert model.config.capacity_schedule == (1.0, 0.5, 0.25)
    assert build("mor", recursions=3, n_layers=5).config.capacity_schedule == (1.0, 2 / 3, 1 / 3)
    assert build("mor", recursions=3, n_layers=5, capacity=(0.5,)).config.capacity_schedule == (1.0, 0.5, 0.25)
