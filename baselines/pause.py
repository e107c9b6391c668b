"""Pause tokens: K pause slots after every token, predicting from the last (docs/design.md, "Pause").

Sequence layout (as PonderLM-2's, with learned inputs instead of fed-back hidden states):

    x_1, p^1, .., p^K, x_2, p^1, .., p^K, ..., x_T, p^1, .., p^K          length (K+1) T

with plain causal attention over the interleaved order. Every slot of token t uses RoPE position t;
the KV-cache slot is the interleaved index (t (K+1) + k), which is not the position. The next token
x_{t+1} is predicted from the output at the last pause slot (t, K); pause slots get no loss. Training is
one parallel forward over the interleaved sequence; cached decoding appends each token with its K slots.

Reference: the pause baseline of the PonderLM-2 repository (LUMIA-Group/PonderLM-2,
``modeling_llama_pause.py``, ``LlamaForCausalLM._insert_pause_tokens`` and ``forward``; Goyal et al. 2024,
"Think before you speak"). It writes K copies of ONE pause id (``pause_token_id``, default 50288: an
unused row of its 50,304-row padded vocabulary, so no resize) after every token, repeats each token's
position id over its K+1 slots (``position_ids.repeat_interleave``), multiplies every input embedding,
the pause row's included, by sqrt(d), and takes logits only at the last pause slot
(``selected_indices = j (1+K) + K``), with the usual cross-entropy over all vocabulary rows.

``pause_token`` picks the parameterisation:

``"vocabulary"`` (default, the reference's): one pause token, i.e. one embedding row used at all K slots
    (its gradient is the sum over the slots) and one LM-head row. This harness's vocabulary is the
    tokenizer's V with no spare rows, so the pause token's two rows are this method's own parameters
    (``pause_embeddings`` [1, d], ``pause_head`` [1, d]) beside the backbone's V rows: the (V+1)-row
    vocabulary of the reference, while the backbone, export and every caller keep V.
    Training loss = cross-entropy over the V+1 logits (the pause logit is in the softmax, as in the
    reference), computed exactly as ``lm_loss + pause_nll``: lm_loss is the cross-entropy over the real V
    and pause_nll = -log(1 - p_pause) (stat ``pause_nll``), since -log softmax_{V+1}(y) =
    -log softmax_V(y) - log(1 - p_pause).
    Decided here: deployed decoding and scoring give logits over the real V only (the contract's width;
    lm-eval and generation read them) and skip the pause row: the pause token is an input, never a
    prediction. So evaluation measures lm_loss, which is what ``TrainOutput.lm_loss`` reports, and the
    parallel and deployed losses compare like with like. The reference's own eval loss is the V+1 one;
    it exceeds ours by the mean pause_nll (~0 once trained: the pause is never a target).
``"per_slot"``: K distinct learned input vectors, one per pause index, outside the vocabulary and with no
    head row (the loss is lm_loss): this project's earlier parameterisation, kept as an option.

Both kinds of pause vector get the token-embedding rows' init (``init_weight`` at ``weight_std``) and are
scaled by ``embed_scale`` at use. Compute: (K+1) T block positions over a (K+1) T causal context, plus T
heads; training adds the pause row, 2 d per head position (``other_flops``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import compute
from harness.core.config import ModelConfig, require
from harness.core.registry import register
from models.backbone import IGNORE_INDEX, KVCache, init_weight
from models.base import DecodeOutput, LanguageModel, TrainOutput, next_token_loss
from models.shared import constant_steps

#: pause_token values: one pause token of the vocabulary (embedding + head row), or K input vectors
PAUSE_TOKENS = ("vocabulary", "per_slot")


@dataclass
class PauseConfig(ModelConfig):
    summary = "pause tokens: pause_tokens pause slots after every token, at its position; predict from the last"

    # modeling_llama_pause.py multiplies every input embedding by sqrt(d), whatever scale_embeds says.
    embed_scale_rule: str = "sqrt(d)"
    pause_tokens: int = 3  # K pause slots after every token (the reference script's num_latent_thoughts); 0 = vanilla
    # "vocabulary": K copies of one pause token (an embedding row and a head row in the training softmax),
    # as the reference; "per_slot": K distinct input vectors outside the vocabulary, no head row.
    pause_token: str = "vocabulary"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "pause_tokens", isinstance(self.pause_tokens, int) and self.pause_tokens >= 0,
                 "must be a non-negative integer (pause slots per token; 0 = vanilla)")
        require(self, "pause_token", self.pause_token in PAUSE_TOKENS,
                 f"must be one of {', '.join(PAUSE_TOKENS)} (one vocabulary token, or one vector per slot)")

    @property
    def has_pause_row(self) -> bool:
        """Whether the pause token has an LM-head row in the training softmax."""
        return self.pause_token == "vocabulary" and self.pause_tokens > 0


@register("pause")
class Pause(LanguageModel):
    """Pause tokens: K pause slots after every token, sharing its position; predict from the last.

    =======================================  ==========================================  =========================
    reference behaviour                      here                                        why
    =======================================  ==========================================  =========================
    K copies of one pause id, a row of the   ``pause_token="vocabulary"``: one embedding  same parameters; V stays
    padded vocabulary (embedding + head)     row + one head row, the method's own         the tokenizer's for the
                                                                                          backbone and callers
    pause logit in the loss softmax          loss = CE over V+1 = lm_loss + pause_nll    same objective
    eval loss: CE over all rows              decode/score over the real V (no pause      contract width; the pause
                                             logit); lm_loss is that CE                  is never a prediction
    slots of token t at position t           same                                        -
    logits only at the K-th pause slot       same (T heads)                              -
    inputs x sqrt(d), pause row too          ``embed_scale_rule="sqrt(d)"``              modeling_llama_pause.py
    trunc. normal +-3 std init               ``init_weight`` under ponder_init           ``_init_weights``
    K = 3 (train_pause_llama_1_4b.sh)        ``pause_tokens=3``                          the script's value
    -                                        ``pause_token="per_slot"``: K vectors       earlier choice, kept
    =======================================  ==========================================  =========================
    """

    Config = PauseConfig
    reference_weight_decay = 0.1  # PonderLM-2 repo, scripts/train_pause_llama_1_4b.sh
    test_variants = {"pause0": {"pause_tokens": 0}, "pause1": {"pause_tokens": 1},
                     "per_slot": {"pause_tokens": 2, "pause_token": "per_slot"}}

    def max_extra_steps(self) -> int:
        return self.config.pause_tokens

    def __init__(self, config: PauseConfig):
        super().__init__(config)
        cfg = config
        rows = cfg.pause_tokens if cfg.pause_token == "per_slot" or cfg.pause_tokens == 0 else 1
        # input vectors: the token-embedding rows' init (Decoder.reset_parameters), scaled at use
        self.pause_embeddings = nn.Parameter(init_weight(torch.empty(rows, cfg.d_model), cfg.weight_std, cfg))
        # the pause token's LM-head row: the head rows' init; in the training softmax only (module docstring)
        head = init_weight(torch.empty(1, cfg.d_model), cfg.weight_std, cfg) if cfg.has_pause_row else None
        self.register_parameter("pause_head", None if head is None else nn.Parameter(head))

    @property
    def group(self) -> int:
        """Slots per token: the token itself and its K pauses."""
        return self.config.pause_tokens + 1

    def _interleave(self, input_ids: torch.Tensor, first_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids [B, n] -> slot inputs [B, n (K+1), d] and RoPE positions [B, n (K+1)] (no token loop)."""
        b, n = input_ids.shape
        tokens = self.decoder.embed(input_ids)[:, :, None]  # [B, n, 1, d]
        # one vocabulary row repeated at the K slots (its gradient sums over them), or K per-slot vectors
        pauses = self.pause_embeddings.expand(self.config.pause_tokens, -1)
        pauses = (pauses * self.config.embed_scale).to(tokens.dtype)[None, None].expand(b, n, -1, -1)  # [B, n, K, d]
        x = torch.cat((tokens, pauses), dim=2).flatten(1, 2)
        positions = torch.arange(first_position, first_position + n, device=input_ids.device)
        return x, positions.repeat_interleave(self.group).expand(b, -1)

    def _last_pause(self, h: torch.Tensor) -> torch.Tensor:
        """Slot outputs [B, n (K+1), d] -> the output at each token's last pause slot [B, n, d]."""
        b = h.shape[0]
        return h.view(b, -1, self.group, h.shape[-1])[:, :, -1]

    def _parallel_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Normalised outputs [B, T, d] at each token's last pause slot: one causal forward, no cache."""
        x, positions = self._interleave(input_ids, 0)
        h = self.decoder.run_blocks(x, self.decoder.plan(positions))
        return self.decoder.norm(self._last_pause(h))

    def parallel_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Training-form logits [B, T, V] over the real vocabulary (the pause row is the loss's, see forward)."""
        return self.decoder.head(self._parallel_hidden(input_ids))

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> TrainOutput:
        h = self._parallel_hidden(input_ids)
        logits = self.decoder.head(h)
        lm_loss = next_token_loss(logits, targets)
        stats = {"mean_extra_steps": float(self.config.pause_tokens)}
        if self.pause_head is None:
            return TrainOutput(loss=lm_loss, lm_loss=lm_loss, stats=stats)
        # the pause token's logit joins the softmax: CE over V+1 = CE over V + (-log(1 - p_pause))
        compute.record_matmul(2.0 * self.config.d_model * (h.numel() // h.shape[-1]))
        pause_logit = F.linear(h, self.pause_head)[..., 0].float()
        pause_nll = F.softplus(pause_logit - torch.logsumexp(logits.float(), dim=-1))
        scored = (targets != IGNORE_INDEX).float()
        pause_nll = (pause_nll * scored).sum() / scored.sum().clamp_min(1.0)
        stats["pause_nll"] = pause_nll.item()
        return TrainOutput(loss=lm_loss + pause_nll, lm_loss=lm_loss, stats=stats)

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
        # decoding appends slot by slot in the same order, so it does the same work. Training adds the
        # pause token's head row (2 d per head position); deployed decoding does not compute it.
        slots = self.group * seq_len
        per_token = self.decoder.analytic_forward_flops(slots, compute.causal_key_pairs(slots), seq_len) / seq_len
        return per_token + (2.0 * self.config.d_model if training and self.config.has_pause_row else 0.0)
