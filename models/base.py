"""The plugin contract (DESIGN.md section 3): what every method provides to the harness.

A method is a :class:`LanguageModel` subclass with a typed ``Config`` (a :class:`ModelConfig`
subclass), registered by name. It implements

* :meth:`forward` -- the training forward: ids and targets -> loss (with any auxiliary loss) and stats;
* :meth:`new_cache` and :meth:`decode` -- deployed inference, incremental with a KV cache
  (hard pruning, exact sequential latent steps, ...);
* :meth:`analytic_flops_per_token` -- the FLOPs the tests compare with the ledger's measurement.

:meth:`score` (per-token log-probabilities the way the method is deployed) and
:meth:`train_flops_per_token` (for budget matching) follow from those and rarely need overriding.
The default implementations are the vanilla decoder's, so a method states only what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import compute
from harness.core.config import ModelConfig
from models.backbone import IGNORE_INDEX, Decoder, KVCache


@dataclass
class TrainOutput:
    loss: torch.Tensor  # the objective to minimise: LM loss plus any auxiliary loss
    lm_loss: torch.Tensor  # mean next-token cross-entropy alone
    stats: dict[str, float] = field(default_factory=dict)  # e.g. mean_extra_steps, aux_loss


@dataclass
class DecodeOutput:
    logits: torch.Tensor  # [B, n, V]: the next-token logits after each given token
    steps: torch.Tensor | None = None  # [B, n] extra steps taken per token, for adaptive methods


@dataclass
class ScoreOutput:
    logprobs: torch.Tensor  # [B, T] log p(target_t | inputs_<=t); 0 where the target is IGNORE_INDEX
    steps: torch.Tensor | None = None  # [B, T] extra steps per token (adaptive methods)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


class LanguageModel(nn.Module):
    """Base class of every registered method; as it stands, the vanilla decoder."""

    Config: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.decoder = Decoder(config)

    # -- training -------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> TrainOutput:
        loss = self.decoder.head_loss(self.decoder.hidden(input_ids), targets)
        return TrainOutput(loss=loss, lm_loss=loss)

    # -- deployed inference ---------------------------------------------------------------------

    def new_cache(self, batch_size: int) -> Any:
        return self.decoder.new_cache(batch_size)

    def decode(self, input_ids: torch.Tensor, cache: Any, valid: torch.Tensor | None = None) -> DecodeOutput:
        """Append tokens [B, n] to the cache and return next-token logits after each of them.

        ``valid`` [B, n] marks real tokens; invalid ones (padding) become no key and are not counted.
        """
        return DecodeOutput(self.decoder(input_ids, cache=cache, valid=valid))

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, targets: torch.Tensor) -> ScoreOutput:
        """Per-token log-probabilities computed exactly as the method is deployed.

        Positions whose target is IGNORE_INDEX are padding at the end of a row: they are decoded but
        not counted as keys or queries (causality makes them invisible to the real tokens anyway).
        """
        valid = targets != IGNORE_INDEX
        all_valid = bool(valid.all())
        cache = self.new_cache(input_ids.shape[0])
        out = self.decode(input_ids, cache, valid=None if all_valid else valid)
        compute.record_tokens(valid.sum().item())
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)
        picked = logprobs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        steps = None if out.steps is None else out.steps.masked_fill(~valid, 0)
        return ScoreOutput(picked.masked_fill(~valid, 0.0), steps)

    # -- compute --------------------------------------------------------------------------------

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Forward FLOPs per token of one sequence of ``seq_len`` tokens (DESIGN.md section 4).

        ``training=True`` gives the training forward's passes (each counted once); for inference,
        adaptive methods may report their maximum here: the ledger measures what actually ran.
        """
        return self.decoder.analytic_forward_flops(
            seq_len, compute.causal_key_pairs(seq_len), seq_len) / seq_len

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) for budget matching: 3x every graded pass.

        Methods with passes under ``no_grad`` override this to count those once.
        """
        return compute.BACKWARD_MULTIPLIER * self.analytic_flops_per_token(seq_len, training=True)

    def num_params(self, non_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.decoder.embed_tokens.weight.numel() if non_embedding else total


__all__ = ["DecodeOutput", "IGNORE_INDEX", "KVCache", "LanguageModel", "ScoreOutput", "TrainOutput",
           "next_token_loss"]
