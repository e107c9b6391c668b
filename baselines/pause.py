"""Pause tokens: K learned pause embeddings after every token (docs/design.md, "Pause").

Sequence layout (as PonderLM-2's, with learned inputs instead of fed-back hidden states):

    x_1, p^1, .., p^K, x_2, p^1, .., p^K, ..., x_T, p^1, .., p^K          length (K+1) T

with plain causal attention over the interleaved order. Every slot of token t uses RoPE position t;
the KV-cache slot is the interleaved index (t (K+1) + k), which is not the position. The next token
x_{t+1} is predicted from the output at the last pause slot (t, K). Training is one parallel forward
over the interleaved sequence; cached decoding appends each token with its K pause slots.

Decisions where the sources leave room (Goyal et al. 2024, "Think before you speak: training language
models with pause tokens", append copies of one <pause> token at new positions):
* K *distinct* learned pause vectors p^1..p^K, one per index, so a slot knows which pause it is even
  though all of them share the token's position (a single shared vector is the special case
  p^1 = .. = p^K, reachable by training);
* they live in the token-embedding space: same init as the token-embedding rows and the same
  ``embed_scale`` (unit RMS under ``ponder_init``), so a pause slot's input looks like a token's;
* logits only at the K-th pause slot of each token: the head runs T times, not (K+1) T times.

Compute: (K+1) T block positions over a (K+1) T causal context, plus T heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.core import compute
from harness.core.config import ModelConfig, require
from harness.core.registry import register
from models.backbone import KVCache
from models.base import DecodeOutput, LanguageModel, TrainOutput, next_token_loss
from models.shared import constant_steps


@dataclass
class PauseConfig(ModelConfig):
    summary = "pause tokens: pause_tokens learned embeddings after every token, at its position"

    pause_tokens: int = 1  # K pause slots after every token; 0 = vanilla

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "pause_tokens", isinstance(self.pause_tokens, int) and self.pause_tokens >= 0,
                 "must be a non-negative integer (pause slots per token; 0 = vanilla)")


@register("pause")
class Pause(LanguageModel):
    """Pause tokens: K learned embeddings after every token, sharing its position; predict from the last."""

    Config = PauseConfig
    test_variants = {"pause0": {"pause_tokens": 0}, "pause2": {"pause_tokens": 2}}

    def max_extra_steps(self) -> int:
        return self.config.pause_tokens

    def __init__(self, config: PauseConfig):
        super().__init__(config)
        cfg = config
        # Same init rule as the token-embedding rows (Decoder.reset_parameters); scaled at use.
        self.pause_embeddings = nn.Parameter(torch.randn(cfg.pause_tokens, cfg.d_model) * cfg.weight_std)

    @property
    def group(self) -> int:
        """Slots per token: the token itself and its K pauses."""
        return self.config.pause_tokens + 1

    def _interleave(self, input_ids: torch.Tensor, first_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids [B, n] -> slot inputs [B, n (K+1), d] and RoPE positions [B, n (K+1)] (no token loop)."""
        b, n = input_ids.shape
        tokens = self.decoder.embed(input_ids)[:, :, None]  # [B, n, 1, d]
        pauses = (self.pause_embeddings * self.config.embed_scale).to(tokens.dtype)
        pauses = pauses[None, None].expand(b, n, -1, -1)  # [B, n, K, d]
        x = torch.cat((tokens, pauses), dim=2).flatten(1, 2)
        positions = torch.arange(first_position, first_position + n, device=input_ids.device)
        return x, positions.repeat_interleave(self.group).expand(b, -1)

    def _last_pause(self, h: torch.Tensor) -> torch.Tensor:
        """Slot outputs [B, n (K+1), d] -> the output at each token's last pause slot [B, n, d]."""
        b = h.shape[0]
        return h.view(b, -1, self.group, h.shape[-1])[:, :, -1]

    def parallel_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Training-form logits [B, T, V]: one causal forward over the interleaved sequence."""
        x, positions = self._interleave(input_ids, 0)
        h = self.decoder.run_blocks(x, self.decoder.plan(positions))
        return self.decoder.head(self.decoder.norm(self._last_pause(h)))

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> TrainOutput:
        loss = next_token_loss(self.parallel_logits(input_ids), targets)
        return TrainOutput(loss=loss, lm_loss=loss, stats={"mean_extra_steps": float(self.config.pause_tokens)})

    def new_cache(self, batch_size: int) -> KVCache:
        return self.decoder.new_cache(batch_size)  # one stack, K+1 slots per token

    def decode(self, input_ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None) -> DecodeOutput:
        # Every call appends whole groups, so the cache holds (tokens so far) x (K+1) slots.
        x, positions = self._interleave(input_ids, cache.length // self.group)
        slot_valid = None if valid is None else valid.repeat_interleave(self.group, dim=1)
        h = self.decoder.run_blocks(x, self.decoder.plan(positions, cache=cache, key_valid=slot_valid))
        logits = self.decoder.head(self.decoder.norm(self._last_pause(h)), valid)
        return DecodeOutput(logits, constant_steps(input_ids, self.config.pause_tokens))

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        # One stack over (K+1) T slots with causal attention in slot order, head at T slots. Cached
        # decoding appends slot by slot in the same order, so it does the same work.
        slots = self.group * seq_len
        return self.decoder.analytic_forward_flops(slots, compute.causal_key_pairs(slots), seq_len) / seq_len
