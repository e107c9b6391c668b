"""The rules taken from the reference code (LUMIA-Group/PonderLM-2 and LUMIA-Group/PonderingLM), pinned on tiny
configs against hand-computed values: PonderLM-1's two next-input rules and their inits, the pause token
as one vocabulary row, each method's embedding scale, the truncated init, the looped default, and the
export of a non-default embedding scale."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from harness import hf
from harness.core import registry
from harness.core.config import ConfigError, ModelConfig
from harness.data import train_bpe
from models.shared import init_linear

V = 53
BASE = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64)


def build(name, **overrides):
    return registry.build(name, overrides={**BASE, **overrides})


def ids_of(batch, length):
    return torch.randint(0, V, (batch, length))


def trunc_std(std):
    """Standard deviation of N(0, std^2) truncated at +-3 std (what nn.init.trunc_normal_ draws)."""
    z = 3.0
    pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return std * math.sqrt(1 - 2 * z * pdf / math.erf(z / math.sqrt(2)))


# -- PonderLM-1 ----------------------------------------------------------------------------------------------

def _pass_inputs(model, ids):
    """The input embeddings of every pass of ``model.parallel_logits(ids)``, recorded at the block stack."""
    seen, run = [], model.decoder.run_blocks

    def recorder(x, plan, layers=None, cache_layer_offset=0):
        seen.append(x.detach().clone())
        return run(x, plan, layers, cache_layer_offset)

    model.decoder.run_blocks = recorder
    with torch.no_grad():
        logits = model.parallel_logits(ids)
    del model.decoder.run_blocks
    return seen, logits


@pytest.mark.parametrize("rule", ["ponderlm2", "original"])
def test_pondering_pass_inputs_follow_the_rule(rule):
    """ponderlm2 (modeling_llama_orin.py): E^{p+1} = E^0 + T^p, E^0 = sqrt(d) e(x), the token NOT multiplied;
    original (PonderingLM): E^{p+1} = E^p + T^p, E^0 = P sqrt(d) e(x). T^p = softmax(logits^p) (sqrt(d) W)."""
    steps = 3
    model = build("pondering", ponder_steps=steps, ponder_reference=rule).eval()
    dec, d = model.decoder, BASE["d_model"]
    ids = ids_of(2, 7)
    inputs, logits = _pass_inputs(model, ids)
    assert len(inputs) == steps + 1
    token = dec.embed_tokens.weight[ids].detach() * math.sqrt(d)  # sqrt(d): both codes' scale_embeds
    first = token * steps if rule == "original" else token
    torch.testing.assert_close(inputs[0], first, rtol=1e-6, atol=1e-6)
    plan = dec.plan(torch.arange(7).expand(2, 7))
    with torch.no_grad():
        for p in range(steps):
            pass_logits = dec.lm_head(dec.norm(dec.run_blocks(inputs[p], plan)))
            mixture = torch.softmax(pass_logits, -1) @ (dec.embed_tokens.weight * math.sqrt(d))
            previous = inputs[p] if rule == "original" else inputs[0]
            torch.testing.assert_close(inputs[p + 1], previous + mixture, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, dec.lm_head(dec.norm(dec.run_blocks(inputs[-1], plan))),
                                   rtol=1e-5, atol=1e-5)


def test_pondering_default_is_the_ponderlm2_baseline_and_the_rules_differ():
    assert registry.get("pondering").make_config().ponder_reference == "ponderlm2"
    latest = build("pondering", ponder_steps=2).eval()
    accumulated = build("pondering", ponder_steps=2, ponder_reference="original").eval()
    accumulated.load_state_dict(latest.state_dict())
    ids = ids_of(2, 6)
    with torch.no_grad():
        assert (latest.parallel_logits(ids) - accumulated.parallel_logits(ids)).abs().amax() > 1e-3
    with pytest.raises(ConfigError, match=r"\.ponder_reference="):
        build("pondering", ponder_reference="latest")


@pytest.mark.parametrize("rule,divisor", [("ponderlm2", 2 * 4), ("original", 2 * 4 * (3 + 1))])
def test_pondering_output_projection_init_per_rule(rule, divisor):
    """o_proj/down_proj ~ N(0, 2/(5d)) / sqrt(2L) in orin.py's _init_weights, / sqrt(2L(P+1)) in PonderingLM's
    modeling_gpt_neox.py; every other weight at sqrt(2/(5d)); all truncated at 3 std."""
    d, n_layers = 64, 4
    model = build("pondering", ponder_steps=3, ponder_reference=rule, d_model=d, n_layers=n_layers, n_heads=4,
                  d_ff=256, vocab_size=512)
    std = math.sqrt(2 / (5 * d))
    out = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith(("o_proj.weight",
                                                                                              "down_proj.weight"))])
    assert out.std().item() == pytest.approx(trunc_std(std / math.sqrt(divisor)), rel=0.03)
    rest = torch.cat([p.detach().flatten() for n, p in model.named_parameters()
                      if n.endswith(("q_proj.weight", "gate_proj.weight", "lm_head.weight", "embed_tokens.weight"))])
    assert rest.std().item() == pytest.approx(trunc_std(std), rel=0.03)


# -- pause ---------------------------------------------------------------------------------------------------

def test_pause_token_is_one_vocabulary_row_in_the_softmax():
    """modeling_llama_pause.py: K copies of one pause id; its embedding row's gradient is the sum over the K
    slots, and its head row is in the cross-entropy's softmax (V+1 logits), loss only at the K-th pause slot."""
    k, t = 3, 5
    model = build("pause", pause_tokens=k)
    assert model.config.pause_token == "vocabulary" and model.pause_embeddings.shape == (1, BASE["d_model"])
    dec, scale = model.decoder, model.config.embed_scale
    ids, targets = ids_of(2, t), ids_of(2, t)
    out = model(ids, targets)
    out.loss.backward()

    slots = [model.pause_embeddings.detach().clone().requires_grad_() for _ in range(k)]
    head_row = model.pause_head.detach().clone().requires_grad_()
    columns = []
    for i in range(t):  # a deliberately naive construction: the token, then its K pause copies
        columns.append(dec.embed(ids[:, i]))
        columns += [(slot * scale).expand(2, -1) for slot in slots]
    positions = torch.tensor([i for i in range(t) for _ in range(k + 1)]).expand(2, -1)  # repeat_interleave
    h = dec.norm(dec.run_blocks(torch.stack(columns, 1), dec.plan(positions)))[:, k::k + 1]
    logits = torch.cat((h @ dec.lm_head.weight.T, h @ head_row.T), dim=-1)  # V+1 rows
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()

    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.lm_loss, F.cross_entropy(logits[..., :V].flatten(0, 1), targets.flatten()),
                               rtol=1e-5, atol=1e-6)
    assert out.stats["pause_nll"] == pytest.approx((out.loss - out.lm_loss).item(), abs=1e-6)
    assert out.stats["pause_nll"] > 0  # the pause row takes probability mass
    total = sum(slot.grad for slot in slots)
    torch.testing.assert_close(model.pause_embeddings.grad, total, rtol=1e-4, atol=1e-7)
    assert (slots[0].grad - slots[1].grad).abs().amax() > 1e-3 * total.abs().amax()  # a sum of different slots
    torch.testing.assert_close(model.pause_head.grad, head_row.grad, rtol=1e-4, atol=1e-7)


def test_pause_evaluation_is_over_the_real_vocabulary_and_equals_lm_loss():
    model = build("pause", pause_tokens=2).eval()
    ids = ids_of(2, 9)
    with torch.no_grad():
        out = model(ids[:, :-1], ids[:, 1:])
        logits = model.decode(ids, model.new_cache(2)).logits
        scored = model.score(ids[:, :-1], ids[:, 1:]).logprobs
    assert logits.shape[-1] == V
    assert out.lm_loss.item() == pytest.approx(-scored.mean().item(), abs=1e-5)
    assert out.loss.item() > out.lm_loss.item()
    assert model.analytic_flops_per_token(8, training=True) == model.analytic_flops_per_token(8) + 2 * BASE["d_model"]


def test_pause_per_slot_keeps_k_vectors_and_no_head_row():
    model = build("pause", pause_tokens=3, pause_token="per_slot")
    assert model.pause_embeddings.shape == (3, BASE["d_model"]) and model.pause_head is None
    ids = ids_of(2, 6)
    out = model(ids, ids)
    assert out.loss is out.lm_loss and "pause_nll" not in out.stats
    with pytest.raises(ConfigError, match=r"\.pause_token="):
        build("pause", pause_token="shared")


# -- embedding scale, init -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method,rule,c", [("pondering", "sqrt(d)", 1.0), ("pause", "sqrt(d)", 1.0),
                                           ("looped", "sqrt(2.5d)", 2.5), ("ponderlm2", "sqrt(2.5d)", 2.5),
                                           ("ponderlm3", "sqrt(2.5d)", 2.5)])
def test_embedding_scale_per_method_default(method, rule, c):
    """orin.py (PonderLM-1) and pause.py scale by sqrt(d); modeling_llama.py (interpolation off) and loop.py
    by sqrt(2.5 d); ponder_init off is plain LLaMA (unscaled)."""
    assert registry.get(method).make_config().embed_scale_rule == rule
    model = build(method)
    ids = ids_of(2, 5)
    with torch.no_grad():
        expected = model.decoder.embed_tokens(ids) * math.sqrt(c * BASE["d_model"])
        torch.testing.assert_close(model.decoder.embed(ids), expected, rtol=0, atol=0)
    assert build(method, ponder_init=False).config.embed_scale == 1.0


def test_embed_scale_rule_is_validated():
    with pytest.raises(ConfigError, match=r"ModelConfig\.embed_scale_rule="):
        ModelConfig(embed_scale_rule="sqrt(3d)")
    assert ModelConfig(d_model=64, embed_scale_rule="sqrt(d)").embed_scale == 8.0


def test_reference_init_is_truncated_at_three_std():
    """Every reference _init_weights: nn.init.trunc_normal_(std=std, a=-3 std, b=3 std); plain LLaMA is not."""
    model = build("vanilla", d_model=64, n_heads=4, d_ff=256, vocab_size=512, ponder_init=True)
    cfg = model.config
    for name, p in model.decoder.named_parameters():
        if name.endswith("norm.weight"):
            continue
        std = cfg.output_std if name.endswith(("o_proj.weight", "down_proj.weight")) else cfg.weight_std
        assert p.abs().max().item() <= 3 * std * (1 + 1e-6), name
    assert model.decoder.embed_tokens.weight.abs().max().item() > 2.9 * cfg.weight_std  # truncated, not narrower
    linear = nn.Linear(64, 1024)
    init_linear(linear, cfg)  # the routers and gates methods add follow the same rule
    assert linear.weight.abs().max().item() <= 3 * math.sqrt(2 / (5 * 64)) * (1 + 1e-6)
    plain = build("vanilla", d_model=64, n_heads=4, d_ff=256, vocab_size=512, ponder_init=False, init_std=0.02)
    assert plain.decoder.embed_tokens.weight.abs().max().item() > 3 * 0.02  # transformers' untruncated init


# -- looped ----------------------------------------------------------------------------------------------------

def test_looped_default_is_the_reference_three_loops():
    """modeling_llama_loop.py with --num_latent_thoughts 3: embeddings x sqrt(2.5 d), the stack 4 times, norm once;
    output projections at / sqrt(2L), whatever the loop count."""
    model = build("looped").eval()
    assert model.config.loops == 3
    dec = model.decoder
    ids = ids_of(2, 6)
    with torch.no_grad():
        plan = dec.plan(torch.arange(6).expand(2, 6))
        x = dec.embed_tokens(ids) * math.sqrt(2.5 * BASE["d_model"])
        for _ in range(4):
            x = dec.run_blocks(x, plan)
        torch.testing.assert_close(model.parallel_logits(ids), dec.lm_head(dec.norm(x)), rtol=1e-5, atol=1e-5)
    assert model.config.output_std == pytest.approx(model.config.weight_std / math.sqrt(2 * BASE["n_layers"]))


# -- export -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ponder_init", [False, True])
def test_export_folds_a_sqrt_d_scale_and_init_from_restores_the_function(tmp_path, ponder_init):
    """A pondering model (scale sqrt(d), not the backbone default) exports as a Llama whose logits are its
    backbone's, and --init-from the export gives back the same pondering function."""
    tokenizer = train_bpe(["the quick brown fox jumps over the lazy dog, and then some. " * 40], 300)
    tokenizer.save(tmp_path / "tokenizer.json")
    vocab = tokenizer.vocab_size
    model = registry.build("pondering", overrides={**BASE, "vocab_size": vocab}).eval()
    assert model.config.embed_scale == pytest.approx(math.sqrt(BASE["d_model"]))
    out = hf.export(model, "pondering", tmp_path / "tokenizer.json", tmp_path / "out")
    llama = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, vocab, (2, 9))
    plugin = registry.get("pondering")
    back = plugin.build(hf.model_config(plugin, str(out), {"ponder_init": ponder_init}))
    hf.load_into(back, str(out))
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=ids).logits, model.decoder(ids), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(back.parallel_logits(ids), model.parallel_logits(ids), rtol=1e-4, atol=1e-4)
