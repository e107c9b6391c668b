"""PonderLM-2 and PonderLM-3: Jacobi training equals exact decoding, measured FLOPs, router, pruning."""

import pytest
import torch
import torch.nn.functional as F

from harness.core import compute, registry
from harness.core.config import ConfigError
from models.base import IGNORE_INDEX

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=96)
METHODS = ["ponderlm2", "ponderlm3"]


def build(name, **overrides):
    # the hand-set router logits below are on the plain softmax's scale (T = 1); the temperature is
    # the training recipe's choice and has its own test
    own = {"router_temperature": 1.0} if name == "ponderlm3" else {}
    return registry.build(name, overrides={**BASE, **own, **overrides})


def copy_backbone(dst, src):
    dst.decoder.load_state_dict(src.decoder.state_dict())
    return dst


@torch.no_grad()
def set_router(model, std=0.3, bias=None):
    """A random router (the default is zero-initialised = uniform); ``bias`` sets its logits' offset."""
    model.router.weight.normal_(0.0, std)
    model.router.bias.copy_(torch.zeros(model.config.latent_steps + 1) if bias is None else torch.tensor(bias))
    return model


def pruning_ponderlm3(**overrides):
    """K=3 with a router whose tail masses straddle tau=1e-4: tokens take 0..3 steps."""
    return set_router(build("ponderlm3", latent_steps=3, **overrides).eval(), bias=[0.0, -8.0, -8.5, -9.0])


def parallel_logprobs(model, ids, targets, jacobi_passes):
    outs, log_s = model.latent_passes(ids, jacobi_passes)
    logprobs = torch.log_softmax(model.readout(outs, log_s).float(), -1)
    return logprobs.gather(-1, targets.clamp_min(0)[..., None])[..., 0].masked_fill(targets == IGNORE_INDEX, 0.0)


pytestmark = pytest.mark.usefixtures("single_thread")


# -- config ---------------------------------------------------------------------------------------

def test_config_validation_and_cli_values():
    cfg = registry.get("ponderlm3").make_config("pico", {"jacobi_passes": "1,4", "latent_steps": "2"})
    assert cfg.jacobi_passes == (1, 4) and cfg.latent_steps == 2 and cfg.prune_threshold == 1e-4
    assert registry.get("ponderlm2").make_config().ponder_init
    for name, bad in [("ponderlm2", {"latent_steps": -1}), ("ponderlm2", {"jacobi_passes": ()}),
                      ("ponderlm2", {"eval_jacobi_passes": -2}), ("ponderlm3", {"prune_threshold": 2.0}),
                      ("ponderlm3", {"compute_penalty": -0.1})]:
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build(name, **bad)


def test_eval_mode_is_deterministic_and_training_samples_j():
    model = build("ponderlm2", jacobi_passes=(1, 2), eval_jacobi_passes=2)
    ids = torch.randint(0, 64, (2, 6))
    seen = {model(ids, ids).stats["jacobi_passes"] for _ in range(12)}
    assert seen == {1.0, 2.0}
    model.eval()
    with torch.no_grad():
        a, b = model(ids, ids), model(ids, ids)
    assert a.stats["jacobi_passes"] == 2.0 and a.loss.item() == b.loss.item()


# -- K = 0 is the vanilla decoder -------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_zero_latent_steps_equals_vanilla(name):
    vanilla = build("vanilla", ponder_init=True)  # the methods' shared init, not the stock default
    model = copy_backbone(build(name, latent_steps=0), vanilla)
    ids = torch.randint(0, 64, (2, 10))
    targets = ids.roll(-1, 1)
    out_v, out_m = vanilla(ids, targets), model(ids, targets)
    torch.testing.assert_close(out_m.loss, out_v.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_m.lm_loss, out_v.lm_loss, atol=1e-6, rtol=1e-6)
    out_v.loss.backward()
    out_m.loss.backward()
    for (k, p), q in zip(vanilla.decoder.named_parameters(), model.decoder.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=k)
    assert model.train_flops_per_token(10) == vanilla.train_flops_per_token(10)
    vanilla.eval(), model.eval()
    with torch.no_grad(), compute.measure() as lv:
        logits_v = vanilla.decode(ids, vanilla.new_cache(2)).logits
    with torch.no_grad(), compute.measure() as lm:
        dec = model.decode(ids, model.new_cache(2))
    torch.testing.assert_close(dec.logits, logits_v, atol=1e-5, rtol=1e-5)
    assert dec.steps.eq(0).all()
    assert lm.totals.forward_flops == lv.totals.forward_flops


# -- Jacobi passes converge to exact sequential decoding -------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_enough_jacobi_passes_reproduce_sequential_decoding(name):
    K, T = 2, 8
    overrides = dict(latent_steps=K)
    if name == "ponderlm3":
        overrides.update(prune_threshold=0.0, compute_penalty=0.0)
    model = build(name, **overrides).eval()
    decisions = []
    if name == "ponderlm3":
        set_router(model, std=0.5, bias=[0.5, -0.5, 0.0])
        route = model.route
        model.route = lambda h0, counted=None: decisions.append(route(h0, counted)) or decisions[-1]
    ids = torch.randint(0, 64, (2, T))
    targets = ids.roll(-1, 1)
    with torch.no_grad():
        scored = model.score(ids, targets)
        decode_log_s = torch.stack(decisions, 1) if decisions else None
        if decisions:
            model.route = route
        assert scored.steps.eq(K).all()  # tau = 0: nothing pruned
        exact = parallel_logprobs(model, ids, targets, (K + 1) * T)
        assert (exact - scored.logprobs).abs().max().item() < 1e-5
        loss = model(ids, targets, jacobi_passes=(K + 1) * T).lm_loss
        torch.testing.assert_close(loss, -scored.logprobs.mean(), atol=1e-5, rtol=1e-5)
        if name == "ponderlm3":  # the router decisions of the final pass are decode's decisions
            _, log_s = model.latent_passes(ids, (K + 1) * T)
            assert (log_s - decode_log_s).abs().max().item() < 1e-5
            assert log_s.exp().std(dim=(0, 1)).min() > 1e-3  # decisions differ between tokens
        # Jacobi is needed: without refinement passes the parallel forward is not yet exact
        rough = parallel_logprobs(model, ids, targets, 0)
        assert (rough - scored.logprobs).abs().max().item() > 1e-3


# -- PonderLM-2 is PonderLM-3 with s_K = 1 ---------------------------------------------------------

def test_ponderlm3_forced_to_k_equals_ponderlm2():
    K, T = 2, 8
    p2 = build("ponderlm2", latent_steps=K, jacobi_passes=(2,))
    p3 = set_router(copy_backbone(build("ponderlm3", latent_steps=K, jacobi_passes=(2,), compute_penalty=0.0), p2),
                    std=0.3, bias=[0.0, 0.0, 1e4])
    ids = torch.randint(0, 64, (2, T))
    targets = ids.roll(-1, 1)
    out2, out3 = p2(ids, targets), p3(ids, targets)
    torch.testing.assert_close(out3.lm_loss, out2.lm_loss, atol=1e-6, rtol=1e-6)
    assert out3.stats["mean_extra_steps"] == pytest.approx(K)
    out2.loss.backward()
    out3.loss.backward()
    for p, q in zip(p2.decoder.parameters(), p3.decoder.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4)
    p2.eval(), p3.eval()
    with compute.measure() as l2:
        s2 = p2.score(ids, targets)
    with compute.measure() as l3:
        s3 = p3.score(ids, targets)
    torch.testing.assert_close(s3.logprobs, s2.logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(s3.steps, s2.steps) and s2.steps.eq(K).all()
    # same blocks and head; PonderLM-3 also pays for its router's Linear(d, K+1), once per token
    assert l3.totals.block_flops == l2.totals.block_flops and l3.totals.head_flops == l2.totals.head_flops
    assert l3.totals.other_flops == p3.router_flops() * ids.numel() == 2 * 32 * (K + 1) * ids.numel()


# -- measured FLOPs ---------------------------------------------------------------------------------

def test_measured_inference_flops_equal_analytic_and_pruning_saves():
    T, B = 12, 3
    ids = torch.randint(0, 64, (B, T))
    p2 = build("ponderlm2", latent_steps=3).eval()
    with compute.measure() as l2:
        s2 = p2.score(ids, ids)
    assert s2.steps.eq(3).all()
    assert l2.totals.forward_flops == p2.analytic_flops_per_token(T) * B * T
    assert l2.totals.forward_flops == p2.decode_flops(s2.steps)
    assert l2.totals.block_queries == 2 * B * T * 4  # L x (K+1) positions per token

    p3 = pruning_ponderlm3()
    with compute.measure() as l3:
        s3 = p3.score(ids, ids)
    assert l3.totals.forward_flops == p3.decode_flops(s3.steps)
    assert l3.totals.block_queries == 2 * (T * B + s3.steps.sum().item())
    assert l3.totals.per_token() < l2.totals.per_token()
    # the maximum (K steps for every token) is PonderLM-2's cost plus the router
    assert p3.analytic_flops_per_token(T) == p2.analytic_flops_per_token(T) + p3.router_flops()
    assert l3.totals.other_flops == p3.router_flops() * B * T
    assert 0 < s3.steps.float().mean() < 3


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("init_no_grad", [False, True])
def test_training_passes_run_the_staged_layouts(name, init_no_grad):
    """The ledger's FLOPs equal the analytic counts (tests/test_contract.py, variants K2_J2*); here: the
    positions the passes run."""
    B, T = 2, 8
    model = build(name, latent_steps=2, jacobi_passes=(2,), init_no_grad=init_no_grad)
    ids = torch.randint(0, 64, (B, T))
    with compute.measure() as ledger:
        model(ids, ids).loss.backward()
    # passes: vanilla (T), one init stage (2T), J=2 Jacobi + final (3T each) -> 14 T positions per layer
    assert ledger.totals.block_queries == 2 * B * T * (1 + 2 + 3 * 3)


def test_k1_training_costs_3_plus_2j_vanilla_passes():
    """PonderLM-2 at K=1, J passes = (3 + 2J) x vanilla's 3x forward, matmul part exact.

    See docs/design.md, "Compute accounting".
    """
    T, J = 16, 3
    vanilla = build("vanilla")
    p2 = build("ponderlm2", latent_steps=1, jacobi_passes=(J,))
    with compute.measure() as lv:
        vanilla(torch.zeros(1, T, dtype=torch.long), torch.zeros(1, T, dtype=torch.long)).loss.backward()
    with compute.measure() as lp:
        p2(torch.zeros(1, T, dtype=torch.long), torch.zeros(1, T, dtype=torch.long)).loss.backward()
    block_matmuls = lambda t: t.matmul_flops - t.head_flops  # noqa: E731
    assert block_matmuls(lp.totals) == (3 + 2 * J) * block_matmuls(lv.totals)
    assert lp.totals.train_flops > (3 + 2 * J) * lv.totals.train_flops * 0.9


# -- router gradients and training ------------------------------------------------------------------

def test_router_gradients_flow_through_mask_and_mixture():
    model = set_router(build("ponderlm3", latent_steps=2, compute_penalty=0.0))
    ids = torch.randint(0, 64, (2, 8))
    targets = ids.roll(-1, 1)

    outs, _ = model.latent_passes(ids, 2)  # mask path only: readout from slot K, no mixture weights
    F.cross_entropy(model.decoder.head(outs[:, :, -1]).flatten(0, 1), targets.flatten()).backward()
    mask_grad = model.router.weight.grad.clone()
    assert mask_grad.abs().sum() > 0

    model.zero_grad()
    outs, log_s = model.latent_passes(ids, 2)  # mixture path only: slot outputs detached from the mask
    F.cross_entropy(model.readout(outs.detach(), log_s).flatten(0, 1), targets.flatten()).backward()
    mix_grad = model.router.weight.grad.clone()
    assert mix_grad.abs().sum() > 0

    model.zero_grad()
    model(ids, targets).loss.backward()  # the full loss gets both
    assert model.router.weight.grad.abs().sum() > 0


def test_short_training_run_learns_to_skip_steps():
    K, B, T, P = 2, 4, 8, 12
    model = build("ponderlm3", latent_steps=K, compute_penalty=0.02, jacobi_passes=(1,)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    pattern = torch.randint(0, 64, (P,))  # a repeating stream: extra steps do not pay off

    def batch():
        seq = pattern[(torch.randint(0, P, (B,))[:, None] + torch.arange(T + 1)) % P]
        return seq[:, :-1], seq[:, 1:]

    first = model(*batch())
    for _ in range(80):
        out = model(*batch())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    ids, targets = batch()
    with torch.no_grad(), compute.measure() as ledger:
        scored = model.score(ids, targets)
    model.config.prune_threshold = 0.05  # a coarser tau: the learned tail masses now prune
    with torch.no_grad(), compute.measure() as coarse:
        pruned = model.score(ids, targets)
    assert first.stats["mean_extra_steps"] == pytest.approx(K / 2, rel=1e-5)  # uniform router at init
    final = out.stats["mean_extra_steps"]
    assert 0.02 < final < 0.75 * first.stats["mean_extra_steps"] and 0 < final < K
    assert out.stats["compute_penalty"] == pytest.approx(0.02 * final)
    assert out.lm_loss.item() < 0.5 * first.lm_loss.item()
    # After 80 steps the tail masses are ~1e-3..1e-2, still above tau = 1e-4: the deployed model takes
    # all K steps (hard pruning needs a confident router); the ledger reports exactly that.
    assert ledger.totals.forward_flops == model.decode_flops(scored.steps)
    assert pruned.steps.float().mean() < K
    assert coarse.totals.forward_flops == model.decode_flops(pruned.steps) < ledger.totals.forward_flops


# -- causality of the parallel passes -------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_later_tokens_do_not_change_earlier_parallel_predictions(name):
    model = pruning_ponderlm3() if name == "ponderlm3" else build(name, latent_steps=2).eval()
    ids = torch.randint(0, 64, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1 + torch.randint(0, 62, (2, 4))) % 64
    with torch.no_grad():  # the parallel passes (deployed decoding: tests/test_contract.py)
        a, b = model.latent_passes(ids, 3), model.latent_passes(changed, 3)
        la, lb = model.readout(*a), model.readout(*b)
    torch.testing.assert_close(lb[:, :6], la[:, :6], atol=1e-6, rtol=1e-6)
    assert (lb[:, 6:] - la[:, 6:]).abs().amax(-1).min() > 1e-4


def test_router_temperature_divides_the_router_logits():
    model = set_router(build("ponderlm3", latent_steps=3, router_temperature=0.1), std=0.3, bias=[0.0, -1.0, 0.5, 0.2])
    h0 = torch.randn(2, 5, model.config.d_model)
    with torch.no_grad():
        expected = torch.log_softmax(model.router(h0) / 0.1, dim=-1)
        torch.testing.assert_close(model.route(h0), expected)
        for steps in range(4):  # forcing a step count holds at any temperature
            model.force_steps(steps)
            w = model.route(h0).exp().flip(-1).cumsum(-1).flip(-1)
            assert (w[..., steps] >= 1 / 4).all() and (w[..., steps + 1:] < 1e-12).all()
