"""The backbone is a real LLaMA: same logits as transformers, cached decoding equals a full forward."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harness.core.config import ModelConfig
from models.backbone import Decoder

CONFIGS = [
    dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64),
    dict(vocab_size=61, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=96, rope_theta=500.0),
    dict(vocab_size=128, d_model=64, n_layers=1, n_heads=2, d_ff=160, norm_eps=1e-6),
]


def to_hf(decoder: Decoder) -> LlamaForCausalLM:
    cfg = decoder.cfg
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=512, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    hf = LlamaForCausalLM(hf_cfg).eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
             for k, v in decoder.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_logits_match_transformers_llama(overrides, batch_size):
    decoder = Decoder(ModelConfig(ponder_init=False, **overrides)).eval()
    hf = to_hf(decoder)
    ids = torch.randint(0, overrides["vocab_size"], (batch_size, 23))
    with torch.no_grad():
        ours = decoder(ids)
        theirs = hf(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("overrides", CONFIGS)
def test_cached_decoding_equals_full_forward(overrides):
    decoder = Decoder(ModelConfig(**overrides)).eval()
    ids = torch.randint(0, overrides["vocab_size"], (2, 17))
    with torch.no_grad():
        full = decoder(ids)
        cache = decoder.new_cache(2)
        pieces = [decoder(ids[:, :5], cache=cache)]  # a prefill, then one token at a time, then a chunk
        pieces += [decoder(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
        pieces.append(decoder(ids[:, 12:], cache=cache))
    assert cache.length == 17
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_slots_sharing_a_position_and_invalid_slots():
    """Slots are not positions: two slots at one RoPE position, and a slot that is no key."""
    decoder = Decoder(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, d_ff=64)).eval()
    x = decoder.embed(torch.randint(0, 50, (1, 4)))
    positions = torch.tensor([[0, 0, 1, 1]])
    with torch.no_grad():
        plan = decoder.plan(positions)
        full = decoder.run_blocks(x, plan)
        cache = decoder.new_cache(1)
        steps = [decoder.run_blocks(x[:, i:i + 1], decoder.plan(positions[:, i:i + 1], cache=cache))
                 for i in range(4)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        # an invalid slot is invisible: dropping it changes nothing for the others
        valid = torch.tensor([[True, False, True, True]])
        masked = decoder.run_blocks(x, decoder.plan(positions, key_valid=valid))
        dropped = decoder.run_blocks(x[:, [0, 2, 3]], decoder.plan(positions[:, [0, 2, 3]]))
        torch.testing.assert_close(masked[:, [0, 2, 3]], dropped, atol=1e-5, rtol=1e-5)
