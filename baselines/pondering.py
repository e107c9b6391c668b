"""PonderLM (v1): pondering embeddings fed back over P extra full passes (docs/design.md, "PonderLM-1 (pondering)").

Zeng et al. 2025, "Pretraining Language Models to Ponder in Continuous Space" (method section): pass p maps
input embeddings E^p to a next-token distribution P^p; instead of sampling a token, the pondering
embedding T^p = P^p V (the distribution's weighted sum of the input-embedding rows V) is added to the
token's input for the next pass, and the loss is taken on the last pass only. Two official codes differ
in how the next input is formed; ``ponder_reference`` picks one, and each sets everything that differs:

``"ponderlm2"`` (default): the PonderLM-1 baseline of the PonderLM-2 repository (LUMIA-Group/PonderLM-2,
    ``modeling_llama_orin.py``, ``LlamaForCausalLM.forward``, run by ``scripts/train_ponderlm_llama_1_4b.sh``
    with ``--patch_method ponderlm``), the baseline the PonderLM-2/3 papers report. The next input is the
    token embedding plus the LATEST pondering embedding only (``current_embeds = inputs_embeds0 +
    interpolated_embeds``; the accumulating branch needs ``residual_interpolated_embeds``, which no script
    sets), and the token embedding is not multiplied (``#* self.config.num_latent_thoughts`` is commented
    out); output projections at weight_std / sqrt(2L) (its ``_init_weights``)::

        E^0 = s e(x),   E^{p+1} = E^0 + softmax(head(norm(f(E^p)))) V   (p = 0..P-1)

``"original"``: the PonderingLM repository (LUMIA-Group/PonderingLM, ``modeling_gpt_neox.py``, which its
    Pile scripts run with ``--mutiply_pondering_steps true``): the pondering embeddings of ALL previous
    passes accumulate (``current_embeds = current_embeds + interpolated_embeds``), the token embedding is
    multiplied by P (so it keeps a weight comparable to the sum of P convex combinations of rows), and
    output projections start at weight_std / sqrt(2L(P+1)) (its ``GPTNeoXPreTrainedModel._init_weights``;
    its Llama file uses sqrt(2L))::

        E^0 = P s e(x),   E^{p+1} = E^p + softmax(head(norm(f(E^p)))) V

In both, loss = CE(head(norm(f(E^P))), x_next); s = sqrt(d) (both codes' ``scale_embeds``:
``embed_scale_rule = "sqrt(d)"``), and V is the input-embedding matrix times s (both scale the mixed rows),
so a pondering embedding lives in the space of a token's input. Gradients flow through every pass.

* ``ponder_top_k`` (0 = full vocabulary, as both references run): with k > 0 the distribution is the
  softmax over the k largest logits only (renormalised, as PonderingLM's ``compute_interpolated_embeds``
  with ``use_topk``), and only those k rows are mixed.
* Decided here: with P = 0 the token multiplier is 1 (the original code would zero the input), so P = 0
  is exactly the backbone (vanilla with the same ``embed_scale_rule``) under both rules.

Compute per token: P+1 causal passes of the stack, P+1 heads (every pass's logits are needed), and P
embedding mixtures. A mixture is a [V] x [V, d] matmul (2 d V FLOPs; 2 d k with top-k), as large as a
head; it is recorded in the ledger as ``other_flops`` (``compute.record_matmul``).

Cached decoding keeps one KV stack per pass (the pass-p input at position t needs pass p-1's output
at t, and pass p attends to pass-p keys of earlier positions), so a chunk of tokens runs through all
P+1 passes, each writing its own layers p*L .. p*L+L-1 of the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.core import compute
from harness.core.config import ModelConfig, require
from harness.core.registry import register
from models.backbone import AttentionPlan, KVCache
from models.base import DecodeOutput, LanguageModel, TrainOutput, next_token_loss
from models.shared import constant_steps

#: ponder_reference values: whether pondering embeddings accumulate (and the token embedding is x P)
PONDER_REFERENCES = ("ponderlm2", "original")


@dataclass
class PonderingConfig(ModelConfig):
    summary = "PonderLM v1: ponder_steps extra passes, each adding a probability-weighted embedding"

    # Both PonderLM-1 codes scale token embeddings (and the mixed rows) by sqrt(d) (``scale_embeds``).
    embed_scale_rule: str = "sqrt(d)"
    ponder_steps: int = 3  # P extra full passes (both references' scripts use 3); 0 = vanilla
    # "ponderlm2": next input = token embedding + the latest pondering embedding, output projections
    # / sqrt(2L) (PonderLM-2 repo, modeling_llama_orin.py); "original": pondering embeddings accumulate, token
    # embedding x P, output projections / sqrt(2L(P+1)) (PonderingLM repo, modeling_gpt_neox.py). Module docstring.
    ponder_reference: str = "ponderlm2"
    ponder_top_k: int = 0  # mix only the top-k tokens' rows (softmax over those k logits); 0 = all

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "ponder_steps", isinstance(self.ponder_steps, int) and self.ponder_steps >= 0,
                 "must be a non-negative integer (extra pondering passes; 0 = vanilla)")
        require(self, "ponder_reference", self.ponder_reference in PONDER_REFERENCES,
                 f"must be one of {', '.join(PONDER_REFERENCES)} (which official code's recurrence and init)")
        require(self, "ponder_top_k", isinstance(self.ponder_top_k, int) and self.ponder_top_k >= 0,
                 "must be a non-negative integer (0 = full vocabulary)")
        require(self, "ponder_top_k", self.ponder_top_k <= self.vocab_size,
                 f"must not exceed vocab_size={self.vocab_size} (0 = full vocabulary)")

    @property
    def mixed_rows(self) -> int:
        """Embedding rows mixed per pondering embedding."""
        return self.ponder_top_k or self.vocab_size

    @property
    def accumulate(self) -> bool:
        """Whether pass p+1's input adds every previous pondering embedding (original) or the latest only."""
        return self.ponder_reference == "original"

    @property
    def token_multiplier(self) -> float:
        """The token embedding's factor in every pass's input: P under "original" (1 at P = 0), else 1."""
        return float(self.ponder_steps) if self.accumulate and self.ponder_steps > 0 else 1.0

    @property
    def output_std(self) -> float:
        """o_proj/down_proj init: weight_std / sqrt(2L(P+1)) under "original" with ponder_init, else the backbone's."""
        if self.accumulate and self.ponder_init:
            return self.weight_std / math.sqrt(2.0 * self.n_layers * (self.ponder_steps + 1))
        return super().output_std


@register("pondering")
class Pondering(LanguageModel):
    """PonderLM v1: P extra passes, each feeding back the predicted distribution's embedding mixture.

    ======================  =============================================  ===================================
    reference behaviour     here                                           why
    ======================  =============================================  ===================================
    next input = e + T^p    ``ponder_reference="ponderlm2"`` (default)     the baseline PonderLM-2/3 report
    (orin.py, latest only)
    accumulate, e x P,      ``ponder_reference="original"``                PonderingLM's own code, kept
    out-proj /sqrt(2L(P+1))
    scale sqrt(d), rows     ``embed_scale_rule="sqrt(d)"``, V x s          both codes' ``scale_embeds``
    x sqrt(d) too
    trunc. normal +-3 std   ``init_weight`` under ponder_init              both codes' ``_init_weights``
    original: x P zeroes    factor 1 at P = 0                              P = 0 is then the backbone
    the input at P = 0
    no KV cache (recompute  one KV stack per pass                          same function, deployed cost
    every pass)
    ======================  =============================================  ===================================
    """

    Config = PonderingConfig
    reference_weight_decay = 0.01  # PonderLM-2 repo, scripts/train_ponderlm_llama_1_4b.sh
    test_variants = {"steps0": {"ponder_steps": 0}, "steps2": {"ponder_steps": 2},
                     "original": {"ponder_reference": "original"},
                     "top_k_gqa": {"ponder_steps": 1, "ponder_top_k": 7, "n_heads": 4, "n_kv_heads": 2}}

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
        tokens = self.decoder.embed(input_ids)
        if cfg.token_multiplier != 1.0:
            tokens = tokens * cfg.token_multiplier
        x = tokens
        for p in range(self.n_passes):
            h = self.decoder.norm(self.decoder.run_blocks(x, plan, cache_layer_offset=p * cfg.n_layers))
            logits = self.decoder.head(h, valid)
            if p == cfg.ponder_steps:
                return logits
            if valid is None:
                ponder = self._pondering_embedding(logits.flatten(0, 1)).view_as(x)
            else:  # padded slots are no query: mix (and count) only the real ones
                ponder = torch.zeros_like(x)
                ponder[valid] = self._pondering_embedding(logits[valid]).to(x.dtype)
            # original: E^{p+1} = E^p + T^p (accumulated); ponderlm2: E^{p+1} = E^0 + T^p (latest only)
            x = (x if cfg.accumulate else tokens) + ponder
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
