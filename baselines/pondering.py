"""PonderLM (v1): pondering embeddings fed back over P extra full passes (docs/design.md, "PonderLM-1 (pondering)").

Zeng et al. 2025, "Pretraining Language Models to Ponder in Continuous Space" (method section): pass p maps
input embeddings E^p to a next-token distribution P^p; instead of sampling a token, the pondering
embedding T^p = P^p V (the distribution's weighted sum of the input-embedding rows V) is added
residually to the input of the next pass, and the loss is taken on the last pass only:

    E^0 = s * e(x),   E^{p+1} = E^p + softmax(head(norm(f(E^p)))) V   (p = 0..P-1),
    loss = CE(head(norm(f(E^P))), x_next)

So the input of pass p is the token embedding plus the pondering embeddings of ALL previous passes
(accumulated, not just the latest): the reference code (github.com/LUMIA-Group/PonderingLM,
``modeling_llama.py`` / ``modeling_gpt_neox.py``) does ``current_embeds = current_embeds +
interpolated_embeds`` in its loop. Further choices, each a config field:

* ``ponder_scale_token`` (default on) is the reference's ``mutiply_pondering_steps`` (on in all its
  Pile scripts): s = P, so the token's own embedding keeps a weight comparable to the sum of P
  pondering embeddings (each a convex combination of rows). With P = 0 we use s = 1 (the reference
  would zero the input), so that P = 0 is exactly the vanilla model.
* ``ponder_top_k`` (0 = full vocabulary, the reference default ``use_topk=False``): with k > 0 the
  distribution is the softmax over the k largest logits only (renormalised, as the reference's
  ``compute_interpolated_embeds``), and only those k rows are mixed.
* V is the input-embedding matrix times the backbone's ``embed_scale`` (the reference scales both the
  token embeddings and the mixed rows by its embedding scale), so a pondering embedding lives in the
  same space as a token's input. Gradients flow through every pass, as in the reference.

Compute per token: P+1 causal passes of the stack, P+1 heads (every pass's logits are needed), and P
embedding mixtures. A mixture is a [V] x [V, d] matmul (2 d V FLOPs; 2 d k with top-k), as large as a
head; it is recorded in the ledger as ``other_flops`` (``compute.record_matmul``).

Cached decoding keeps one KV stack per pass (the pass-p input at position t needs pass p-1's output
at t, and pass p attends to pass-p keys of earlier positions), so a chunk of tokens runs through all
P+1 passes, each writing its own layers p*L .. p*L+L-1 of the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.core import compute
from harness.core.config import ModelConfig, require
from harness.core.registry import register
from models.backbone import AttentionPlan, KVCache
from models.base import DecodeOutput, LanguageModel, TrainOutput, next_token_loss
from models.shared import constant_steps


@dataclass
class PonderingConfig(ModelConfig):
    summary = "PonderLM v1: ponder_steps extra passes, each adding a probability-weighted embedding"

    ponder_steps: int = 3  # P extra full passes (the reference's Pile runs use 3); 0 = vanilla
    ponder_top_k: int = 0  # mix only the top-k tokens' rows (softmax over those k logits); 0 = all
    ponder_scale_token: bool = True  # reference `mutiply_pondering_steps`: token embedding x P

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "ponder_steps", isinstance(self.ponder_steps, int) and self.ponder_steps >= 0,
                 "must be a non-negative integer (extra pondering passes; 0 = vanilla)")
        require(self, "ponder_top_k", isinstance(self.ponder_top_k, int) and self.ponder_top_k >= 0,
                 "must be a non-negative integer (0 = full vocabulary)")
        require(self, "ponder_top_k", self.ponder_top_k <= self.vocab_size,
                 f"must not exceed vocab_size={self.vocab_size} (0 = full vocabulary)")

    @property
    def mixed_rows(self) -> int:
        """Embedding rows mixed per pondering embedding."""
        return self.ponder_top_k or self.vocab_size


@register("pondering")
class Pondering(LanguageModel):
    """PonderLM v1: P extra passes, each feeding back the predicted distribution's embedding mixture."""

    Config = PonderingConfig
    test_variants = {"steps0": {"ponder_steps": 0}, "steps2": {"ponder_steps": 2},
                     "top_k_gqa": {"ponder_steps": 1, "ponder_top_k": 7, "n_heads": 4, "n_kv_heads": 2,
                                   "ponder_scale_token": False}}

    def max_extra_steps(self) -> int:
        return self.config.ponder_steps

    @property
    def n_passes(self) -> int:
        return self.config.ponder_steps + 1

    def _pondering_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] -> T = softmax(logits) V [N, d], over all rows or the top-k."""
        cfg, weight = self.config, self.decoder.embed_tokens.weight
        if cfg.ponder_top_k:
            top, index = logits.topk(cfg.ponder_top_k, dim=-1)
            probs = torch.softmax(top.float(), dim=-1).to(weight.dtype)
            # explicit batched matmul [N,1,k] x [N,k,d]: the 2 d k FLOPs the ledger records
            mixed = torch.matmul(probs[:, None, :], weight[index])[:, 0]
        else:
            probs = torch.softmax(logits.float(), dim=-1).to(weight.dtype)
            mixed = probs @ weight
        compute.record_matmul(2.0 * cfg.d_model * cfg.mixed_rows * probs.shape[0])
        # scale after mixing (same as mixing scaled rows) without materialising a scaled V x d copy
        return mixed * cfg.embed_scale

    def _run(self, input_ids: torch.Tensor, plan: AttentionPlan, valid: torch.Tensor | None) -> torch.Tensor:
        """All P+1 passes over the given tokens; returns the last pass's logits [B, n, V]."""
        cfg = self.config
        x = self.decoder.embed(input_ids)
        if cfg.ponder_scale_token and cfg.ponder_steps > 0:
            x = x * cfg.ponder_steps
        for p in range(self.n_passes):
            h = self.decoder.norm(self.decoder.run_blocks(x, plan, cache_layer_offset=p * cfg.n_layers))
            logits = self.decoder.head(h, valid)
            if p == cfg.ponder_steps:
                return logits
            # E^{p+1} = E^p + T^p: accumulate every pass's pondering embedding (reference code).
            if valid is None:
                x = x + self._pondering_embedding(logits.flatten(0, 1)).view_as(x)
            else:  # padded slots are no query: mix (and count) only the real ones
                ponder = torch.zeros_like(x)
                ponder[valid] = self._pondering_embedding(logits[valid]).to(x.dtype)
                x = x + ponder
        raise AssertionError("unreachable")

    def parallel_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Training-form logits [B, T, V]: P+1 full causal passes over the sequence, no cache."""
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        return self._run(input_ids, self.decoder.plan(positions), None)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> TrainOutput:
        loss = next_token_loss(self.parallel_logits(input_ids), targets)  # last pass only
        return TrainOutput(loss=loss, lm_loss=loss, stats={"mean_extra_steps": float(self.config.ponder_steps)})

    def new_cache(self, batch_size: int) -> KVCache:
        return self.decoder.new_cache(batch_size, n_stacks=self.n_passes)

    def decode(self, input_ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None) -> DecodeOutput:
        b, n = input_ids.shape
        positions = self.decoder.positions_after(cache.length, b, n, input_ids.device)
        plan = self.decoder.plan(positions, cache=cache, key_valid=valid)
        return DecodeOutput(self._run(input_ids, plan, valid), constant_steps(input_ids, self.config.ponder_steps))

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        cfg = self.config
        passes = self.decoder.analytic_forward_flops(
            seq_len, compute.causal_key_pairs(seq_len), self.n_passes * seq_len, n_block_passes=self.n_passes)
        mixtures = compute.head_flops(cfg.d_model, cfg.mixed_rows, cfg.ponder_steps * seq_len)
        return (passes + mixtures) / seq_len
