"""Every fast path of the speed work computes what its textbook form computes.

* RoPE applied in the projections' own [B, n, H, D] memory layout (``Attention.project``) against the
  rotation through the [B, H, n, D] views: bit-identical values, strides and gradients, with and
  without PonderLM-3's key-bias channel, because the same float32 operations run on the same numbers
  (at one thread, where every kernel's summation order is fixed).
* The compiled one-slot decoding step (``Decoder.compile_slot_steps``) against eager decoding: the same
  tokens, steps and ledger counts, and logits within 1e-5 -- inductor fuses the elementwise ops and
  reductions between the matmuls (RMSNorm's mean in another summation order), so the last bits may
  differ; the tokens must not. Without a compiler, or when compiling fails, decoding falls back to the
  eager path and is exactly it.
* The compiled training blocks (``Decoder.compile_training_blocks``) against eager training: loss within
  1e-5 and every gradient within 1e-4 relative (inductor reorders reductions), the ledger exactly; without
  a compiler, when compiling fails or a region reaches its recompile limit, training is exactly eager (a
  failure warns once); evaluation and cached decoding never take the compiled step.

No test here asserts a wall-clock time.
"""

import pytest
import torch

import models.backbone as backbone
from harness.bench import generate_cached
from harness.core import compute, registry
from harness.core.config import ModelConfig
from models.backbone import Attention, Block, Decoder, rotate

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64)


pytestmark = pytest.mark.usefixtures("single_thread")


# -- RoPE in the projections' memory layout ---------------------------------------------------------

def _textbook_project(self, x, plan):
    """Rotation through the [B, H, n, D] views, as Attention.project computed it before."""
    q, k, v = self.qkv(x)
    return rotate(q, plan.cos, plan.sin_signed), rotate(k, plan.cos, plan.sin_signed), v


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("key_bias", [False, True])  # PonderLM-3's passes: the key-bias channel
def test_rotation_in_the_projection_layout_equals_the_textbook_form(n_kv_heads, key_bias, monkeypatch):
    torch.manual_seed(0)
    decoder = Decoder(ModelConfig(**{**TINY, "n_kv_heads": n_kv_heads}))
    x = torch.randn(2, 12, 32)
    positions = torch.arange(4).repeat_interleave(3).expand(2, -1)  # slots share positions, as PonderLM's
    bias = -torch.rand(2, 12) * 9
    grad = torch.randn(2, 12, 32)
    results = []
    for textbook in (False, True):
        if textbook:
            monkeypatch.setattr(Attention, "project", _textbook_project)
        decoder.zero_grad()
        xx, bb = x.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        plan = decoder.plan(positions, key_bias=bb if key_bias else None)
        q, k, _ = decoder.layers[0].self_attn.project(xx, plan)
        out = decoder.run_blocks(xx, plan)
        out.backward(grad)
        grads = [p.grad.clone() for p in decoder.parameters() if p.grad is not None]
        results.append([q.detach(), k.detach(), q.stride(), out.detach(), xx.grad, *([bb.grad] if key_bias else []),
                        *grads])
    for fast, textbook in zip(*results):
        assert fast == textbook if isinstance(fast, tuple) else torch.equal(fast, textbook)


def test_ponderlm3_training_step_is_unchanged_by_the_layout(monkeypatch):
    torch.manual_seed(0)
    model = registry.build("ponderlm3", overrides={**TINY, "latent_steps": 3, "jacobi_passes": (2,)})
    with torch.no_grad():
        model.router.weight.normal_(0.0, 0.3)  # a real soft mask (zero init gives a uniform one)
    ids = torch.randint(0, 64, (2, 7))

    def step():
        model.zero_grad()
        out = model(ids, ids.roll(-1, 1))
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    fast_loss, fast_grads = step()
    monkeypatch.setattr(Attention, "project", _textbook_project)
    loss, grads = step()
    assert torch.equal(fast_loss, loss)
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, grads))


# -- the compiled decoding step ----------------------------------------------------------------------

needs_compiler = pytest.mark.skipif(not backbone.compiled_steps_available("cpu"),
                                    reason="no C++ compiler for torch.compile (the eager fallback is tested)")


def _decode(model, ids, compiled: bool):
    model.decoder.compile_slot_steps(compiled)
    with torch.no_grad(), compute.measure() as ledger:
        out = model.decode(ids, model.new_cache(ids.shape[0]))
    model.decoder.compile_slot_steps(False)
    return out, ledger.totals


def _count_compiled_steps(monkeypatch) -> list[int]:
    """Count the decoding steps that ran compiled (the eager fallback returns None)."""
    ran = [0]
    original = Decoder._compiled_slot

    def spy(self, x, plan):
        out = original(self, x, plan)
        ran[0] += out is not None
        return out

    monkeypatch.setattr(Decoder, "_compiled_slot", spy)
    return ran


@needs_compiler
def test_compiled_greedy_decoding_gives_the_eager_tokens(monkeypatch):
    torch.manual_seed(0)
    model = registry.build("vanilla", overrides=TINY).eval()
    prompt = torch.randint(0, 64, (1, 5))
    with torch.inference_mode():
        eager = generate_cached(model, prompt, 24)
    ran = _count_compiled_steps(monkeypatch)
    assert model.decoder.compile_slot_steps(True)
    with torch.inference_mode():
        compiled = generate_cached(model, prompt, 24)
    assert ran[0] == 23  # every decoding step after the prompt (slots 0 and 1 are in the prompt)
    assert torch.equal(compiled, eager)


@needs_compiler
def test_compiled_pruned_ponderlm3_decoding_equals_eager(monkeypatch):
    """PonderLM-3 with a router that prunes at a coarse tau: masks with per-key bias and invalid slots,
    rows taking different numbers of steps, two rows in lock-step."""
    torch.manual_seed(0)
    model = registry.build("ponderlm3", overrides={**TINY, "latent_steps": 2, "prune_threshold": 0.2,
                                                  "router_temperature": 1.0}).eval()
    with torch.no_grad():
        model.router.weight.normal_(0.0, 1.0)
    ids = torch.randint(0, 64, (2, 9))
    eager, eager_flops = _decode(model, ids, compiled=False)
    ran = _count_compiled_steps(monkeypatch)
    compiled, compiled_flops = _decode(model, ids, compiled=True)
    assert ran[0] > 0
    assert 0 < eager.steps.float().mean() < 2 and torch.equal(compiled.steps, eager.steps)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(compiled.logits.argmax(-1), eager.logits.argmax(-1))
    assert compiled_flops == eager_flops  # the ledger counts the compiled step like the eager blocks


def test_without_a_compiler_decoding_stays_eager(monkeypatch):
    torch.manual_seed(0)
    model = registry.build("ponderlm2", overrides={**TINY, "latent_steps": 2}).eval()
    ids = torch.randint(0, 64, (2, 6))
    eager, eager_flops = _decode(model, ids, compiled=False)
    monkeypatch.setattr(backbone, "compiled_steps_available", lambda device: False)
    assert not model.decoder.compile_slot_steps(True)
    fallback, fallback_flops = _decode(model, ids, compiled=True)
    assert torch.equal(fallback.logits, eager.logits) and fallback_flops == eager_flops


def test_a_failing_compiler_falls_back_to_eager_once(monkeypatch):
    torch.manual_seed(0)
    model = registry.build("vanilla", overrides=TINY).eval()
    ids = torch.randint(0, 64, (1, 6))
    cache = model.new_cache(1)
    with torch.no_grad():
        eager = torch.cat([model.decode(ids[:, i:i + 1], cache).logits for i in range(6)], dim=1)

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler today")
        return run

    monkeypatch.setattr(backbone, "compiled_steps_available", lambda device: True)
    monkeypatch.setattr(torch, "compile", broken_compile)
    backbone._COMPILED_STEPS.pop(model.decoder, None)
    assert model.decoder.compile_slot_steps(True)
    cache = model.new_cache(1)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no compiler today"), compute.measure() as ledger:
        fallback = torch.cat([model.decode(ids[:, i:i + 1], cache).logits for i in range(6)], dim=1)
    assert not model.decoder._compile_slot_steps  # eager from then on
    assert torch.equal(fallback, eager)
    with torch.no_grad(), compute.measure() as reference:
        model.decode(ids, model.new_cache(1))
    assert ledger.totals.forward_flops == reference.totals.forward_flops  # nothing counted twice


# -- the compiled training blocks --------------------------------------------------------------------

def _spy_blocks(monkeypatch) -> list[tuple[bool, bool]]:
    """Record (ran compiled, with a key bias) for every block call."""
    calls = []
    original = Block.forward

    def spy(self, x, plan, layer, step=None):
        calls.append((step is not None, plan.key_bias is not None))
        return original(self, x, plan, layer, step)

    monkeypatch.setattr(Block, "forward", spy)
    return calls


def _train_step(model, ids, compiled: bool):
    """One training forward and backward: (loss, gradients by name, ledger totals)."""
    model.decoder.compile_training_blocks(compiled)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same Jacobi pass count in both runs
    with compute.measure() as ledger:
        out = model(ids, ids.roll(-1, 1))
        out.loss.backward()
    model.decoder.compile_training_blocks(False)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, ledger.totals


def _model(method, **overrides):
    torch.manual_seed(0)
    model = registry.build(method, overrides={**TINY, **overrides}).train()
    if method == "ponderlm3":
        with torch.no_grad():
            model.router.weight.normal_(0.0, 0.3)  # a real soft mask: key biases far from 0
    return model


@needs_compiler
@pytest.mark.parametrize("method,overrides", [
    ("vanilla", {}),
    ("ponderlm3", {"latent_steps": 2, "jacobi_passes": (2,)}),  # the key-bias channel in every latent pass
    ("vanilla", {"n_kv_heads": 2}),  # GQA (the key-bias channel takes it through the same enable_gqa)
])
def test_compiled_training_blocks_equal_eager(method, overrides, monkeypatch):
    model = _model(method, **overrides)
    ids = torch.randint(0, 64, (2, 7))
    eager_loss, eager_grads, eager_totals = _train_step(model, ids, compiled=False)
    calls = _spy_blocks(monkeypatch)
    loss, grads, totals = _train_step(model, ids, compiled=True)
    assert calls and all(compiled for compiled, _ in calls)  # every block of every pass ran compiled
    if method == "ponderlm3":
        assert any(bias for _, bias in calls) and not all(bias for _, bias in calls)
    # inductor fuses the elementwise ops and reorders reductions: equal up to float32 summation order
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert totals == eager_totals  # the ledger counts the compiled blocks as the eager ones


@needs_compiler
def test_the_recompile_limit_warns_and_trains_eagerly(monkeypatch):
    """A compiled region that reaches its recompile limit raises (fullgraph) instead of falling back to
    eager silently inside dynamo: one warning, then eager, exactly."""
    model = _model("vanilla")
    monkeypatch.setattr(backbone, "_TRAINING_STEPS", {})
    monkeypatch.setattr(backbone, "TRAINING_RECOMPILE_LIMIT", 1)
    _train_step(model, torch.randint(0, 64, (2, 7)), compiled=True)  # one graph: the limit
    ids = torch.randint(0, 64, (2, 5))  # another length: a second graph
    eager_loss, eager_grads, _ = _train_step(model, ids, compiled=False)
    assert model.decoder.compile_training_blocks(True)
    with pytest.warns(RuntimeWarning, match="compiled training blocks unavailable"):
        model.zero_grad(set_to_none=True)
        model(ids, ids.roll(-1, 1)).loss.backward()
    assert not model.decoder._compile_training_blocks
    assert all(torch.equal(p.grad, eager_grads[n]) for n, p in model.named_parameters() if p.grad is not None)


def test_without_a_compiler_training_stays_eager(monkeypatch):
    model = _model("ponderlm3", latent_steps=2, jacobi_passes=(2,))
    ids = torch.randint(0, 64, (2, 7))
    eager_loss, eager_grads, eager_totals = _train_step(model, ids, compiled=False)
    monkeypatch.setattr(backbone, "compiled_steps_available", lambda device: False)
    assert not model.decoder.compile_training_blocks(True)
    calls = _spy_blocks(monkeypatch)
    loss, grads, totals = _train_step(model, ids, compiled=True)
    assert calls and not any(compiled for compiled, _ in calls)
    assert torch.equal(loss, eager_loss) and totals == eager_totals
    assert all(torch.equal(grads[name], grad) for name, grad in eager_grads.items())


def _broken_compile(fn, **kwargs):
    def run(*args):
        raise RuntimeError("no compiler today")
    return run


def test_a_failing_training_compiler_falls_back_to_eager_once(monkeypatch):
    model = _model("vanilla")
    ids = torch.randint(0, 64, (2, 7))
    eager_loss, eager_grads, eager_totals = _train_step(model, ids, compiled=False)
    monkeypatch.setattr(backbone, "compiled_steps_available", lambda device: True)
    monkeypatch.setattr(backbone, "_ISOLATED_REGIONS", True)
    monkeypatch.setattr(backbone, "_TRAINING_STEPS", {})
    monkeypatch.setattr(torch, "compile", _broken_compile)
    assert model.decoder.compile_training_blocks(True)
    model.zero_grad(set_to_none=True)
    with pytest.warns(RuntimeWarning, match="no compiler today") as caught, compute.measure() as ledger:
        loss = model(ids, ids.roll(-1, 1)).loss
        loss.backward()
    assert len(caught) == 1 and not model.decoder._compile_training_blocks  # eager from then on
    assert torch.equal(loss.detach(), eager_loss) and ledger.totals == eager_totals  # nothing counted twice
    assert all(torch.equal(p.grad, eager_grads[n]) for n, p in model.named_parameters() if p.grad is not None)


def test_evaluation_and_cached_decoding_stay_eager_with_compiled_training(monkeypatch):
    """Without gradients, or with a cache, a mask or a kv_hook in the plan, no block takes the compiled step
    (and nothing is compiled): the outputs are the eager ones bit for bit."""
    model = _model("ponderlm3", latent_steps=2)
    ids = torch.randint(0, 64, (2, 7))
    model.eval()
    with torch.no_grad():
        eager_eval = model(ids, ids.roll(-1, 1)).loss
        eager_decode = model.decode(ids, model.new_cache(2))
    eager_cached_grad = model.decode(ids, model.new_cache(2)).logits  # gradients on, but a cache

    compiled = []
    monkeypatch.setattr(backbone, "compiled_steps_available", lambda device: True)
    monkeypatch.setattr(backbone, "_ISOLATED_REGIONS", True)
    monkeypatch.setattr(backbone, "_TRAINING_STEPS", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or _broken_compile(fn))
    assert model.decoder.compile_training_blocks(True)
    calls = _spy_blocks(monkeypatch)
    with torch.no_grad():
        assert torch.equal(model(ids, ids.roll(-1, 1)).loss, eager_eval)
        decoded = model.decode(ids, model.new_cache(2))
    assert torch.equal(decoded.logits, eager_decode.logits) and torch.equal(decoded.steps, eager_decode.steps)
    assert torch.equal(model.decode(ids, model.new_cache(2)).logits, eager_cached_grad)
    assert calls and not any(ran for ran, _ in calls) and not compiled
    assert model.decoder._compile_training_blocks  # still on: nothing failed
