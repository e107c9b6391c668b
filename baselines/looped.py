"""Looped transformer: the whole block stack applied K+1 times with shared weights (docs/design.md, "Looped").

    h^(0) = embed(x),   h^(k+1) = blocks(h^(k)) for k = 0..K,   logits = head(norm(h^(K+1)))

The residual stream of one loop is the next loop's input unchanged: no norm in between (the final
norm is applied once, after the last loop) and no re-injection of the input embedding. This is the
loop baseline of the PonderLM-2 repository (LUMIA-Group/PonderLM-2, ``modeling_llama_loop.py``:
``LlamaModel.forward`` runs ``for repeat in range(num_latent_thoughts + 1): for decoder_layer in
self.layers`` and then ``self.norm`` once; ``LlamaForCausalLM.forward`` scales the token embeddings by
sqrt(2.5 d); ``scripts/train_loop_llama_*.sh`` pass ``--num_latent_thoughts 3``), so with the same
weights it computes the same function.

Compute: (K+1) x the block FLOPs of a vanilla model of the same shape, plus one head, at 1 x the
parameters. Every loop attends causally over its own loop's keys, so cached decoding keeps one KV
stack per loop (``Decoder.new_cache(batch, n_stacks=K+1)``, loop k writing layers k*L .. k*L+L-1)
and does exactly the attention work of the parallel forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.core import compute
from harness.core.config import ModelConfig, require
from harness.core.registry import register
from models.backbone import KVCache
from models.base import DecodeOutput, LanguageModel, TrainOutput, next_token_loss
from models.shared import constant_steps


@dataclass
class LoopedConfig(ModelConfig):
    summary = "looped transformer: the block stack applied loops+1 times with shared weights"

    # modeling_llama_loop.py scales token embeddings by sqrt(2.5 d) (PonderLM-2's rule, the backbone default)
    embed_scale_rule: str = "sqrt(2.5d)"
    loops: int = 3  # K extra applications of the whole stack (the reference scripts' 3); 0 = vanilla

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "loops", isinstance(self.loops, int) and self.loops >= 0,
                 "must be a non-negative integer (extra loops; 0 = vanilla)")


@register("looped")
class Looped(LanguageModel):
    """Looped transformer: the L-block stack applied loops+1 times with shared weights, final norm once.

    ===============================  ====================================  ==============================
    reference behaviour              here                                  why
    ===============================  ====================================  ==============================
    stack x (K+1), norm once         same                                  modeling_llama_loop.py
    K = 3 (train_loop_llama_*.sh)    ``loops=3``                           the scripts' value
    embeddings x sqrt(2.5 d)         ``embed_scale_rule="sqrt(2.5d)"``     its LlamaForCausalLM.forward
    trunc. normal +-3 std init,      ``init_weight``; ``output_std``       its ``_init_weights``
    out-proj / sqrt(2L)              (not / sqrt(2L(K+1)))
    no KV cache in recurrent mode    one KV stack per loop                 same function, deployed cost
    ===============================  ====================================  ==============================
    """

    Config = LoopedConfig
    depth_baseline = True  # claim C2 compares PonderLM-3 with it at equal FLOPs
    reference_weight_decay = 0.1  # PonderLM-2 repo, scripts/train_loop_llama_1_4b.sh (Table 3; its 410m one: 0.01)
    test_variants = {"loops0": {"loops": 0}, "loops1": {"loops": 1}}

    def max_extra_steps(self) -> int:
        return self.config.loops

    @property
    def n_passes(self) -> int:
        return self.config.loops + 1

    def _run(self, input_ids: torch.Tensor, plan) -> torch.Tensor:
        x = self.decoder.embed(input_ids)
        n_layers = self.config.n_layers
        for loop in range(self.n_passes):
            # cache_layer_offset only matters with a cache: loop k owns cache layers k*L .. k*L+L-1.
            x = self.decoder.run_blocks(x, plan, cache_layer_offset=loop * n_layers)
        return self.decoder.norm(x)

    def parallel_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Training-form logits [B, T, V]: all loops over the whole sequence, no cache."""
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        return self.decoder.head(self._run(input_ids, self.decoder.plan(positions)))

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> TrainOutput:
        loss = next_token_loss(self.parallel_logits(input_ids), targets)
        return TrainOutput(loss=loss, lm_loss=loss, stats={"mean_extra_steps": float(self.config.loops)})

    def new_cache(self, batch_size: int) -> KVCache:
        return self.decoder.new_cache(batch_size, n_stacks=self.n_passes)

    def decode(self, input_ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None) -> DecodeOutput:
        b, n = input_ids.shape
        # one slot per token, shared by every loop's stack: slot index = RoPE position here
        positions = self.decoder.positions_after(cache.length, b, n, input_ids.device)
        plan = self.decoder.plan(positions, cache=cache, key_valid=valid)
        logits = self.decoder.head(self._run(input_ids, plan), valid)
        return DecodeOutput(logits, constant_steps(input_ids, self.config.loops))

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        # (K+1) causal passes of the stack, one head; training and cached inference do the same work.
        return self.decoder.analytic_forward_flops(
            seq_len, compute.causal_key_pairs(seq_len), seq_len, n_block_passes=self.n_passes) / seq_len
