"""PonderLM-3: token-wise adaptive latent steps on the PonderLM-2 layout (DESIGN.md 5).

Everything PonderLM-2 does (layout, fed-back normalised hidden states, staged init passes, Jacobi
passes, exact cached decoding) is inherited from :class:`models.ponderlm2.PonderLM2`; this file adds the
router and what it drives, through the hooks ``route``, ``decide`` and ``objective``.

Confirmed by the paper's public summaries
-----------------------------------------
* a lightweight router reads token t's step-0 hidden state and predicts s_{t,0..K}, a distribution over
  how many latent steps to take;
* tail mass w_{t,k} = sum_{j>=k} s_{t,j} (probability of reaching step k, w_{t,0} = 1); log w_{t,k} is
  added to the attention logit of *every* query toward key (t,k) -- a soft, differentiable mask;
* the output is the mixture sum_k s_{t,k} h_t^(k) of the slot outputs;
* an auxiliary compute penalty is added to the loss;
* inference: K_t = max{k : w_{t,k} >= tau}, tau = 1e-4; steps beyond K_t are never computed and never
  cached; kept keys carry the same log w bias as in training.

Decided here (each a config field or stated below)
--------------------------------------------------
* Router = ``Linear(d, K+1)`` (with bias) on the *normalised* slot-(t,0) output of the previous pass,
  recomputed in every pass that has latent slots (init passes included), so the Jacobi fixed point is
  sequential decoding, where the router reads slot (t,0)'s output of the same token. Zero-initialised:
  every token starts at the uniform distribution, nothing pruned or favoured before training.
* The mixture is over the slot outputs *after the final norm, before the LM head* (one head call per
  token). The head is linear without bias, so this equals the s-weighted mixture of logits; it is not a
  mixture of probabilities (that would need K+1 head calls per token, the dominant cost at large V).
* Penalty = ``compute_penalty`` (lambda) x mean over scored tokens (targets != -100) of
  sum_{k>=1} w_{t,k}, the expected number of extra steps; sweeping lambda traces the Pareto curve.
  Note (measured in tests/test_ponderlm.py): the penalty's pull on a router logit scales with w itself,
  so tail masses shrink slowly once small; a short run lowers the *expected* steps well before any
  w_{t,k} falls under tau = 1e-4, and until then the deployed model still takes all K steps. The
  soft-versus-hard gap is therefore a quantity to report, not an assumption.
* Inference: the pruned tail mass goes to the last kept step (its readout weight is w_{t,K_t}).
* Batched decoding runs rows in lock-step; a row that stopped marks its slot invalid (no key, not
  counted), see :meth:`PonderLM2.decode`. The ledger therefore counts only the steps actually taken.
* K_t can be 0 (no latent step). ``prune_threshold`` = 0 disables pruning (decoding is then the exact
  fixed point of the training passes).
* The router's matmul, 2 d (K+1) FLOPs per routed token (every pass with latent slots in training,
  once per token at inference), is counted in the ledger as ``other_flops`` and in the analytic
  counts; with K=0 no router runs and the model costs exactly the vanilla decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import compute
from harness.core.config import require
from harness.core.registry import register
from models.base import IGNORE_INDEX
from models.ponderlm2 import Decision, PonderLM2, PonderLM2Config, tail_log_mass


@dataclass
class PonderLM3Config(PonderLM2Config):
    summary = "PonderLM-3: router over 0..K latent steps, soft attention mask log w, hard pruning at inference"

    latent_steps: int = 3  # K: the most extra steps a token may take (decided: 3, room to adapt)
    compute_penalty: float = 0.01  # lambda on the expected extra steps per token (nats per step)
    prune_threshold: float = 1e-4  # tau: keep step k at inference iff w_{t,k} >= tau (0 = keep all)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "compute_penalty", self.compute_penalty >= 0, "must be >= 0")
        require(self, "prune_threshold", 0 <= self.prune_threshold <= 1, "must lie in [0, 1] (0 = never prune)")


@register("ponderlm3")
class PonderLM3(PonderLM2):
    """PonderLM-3: a router picks 0..K latent steps per token; soft mask in training, pruning at inference."""

    Config = PonderLM3Config
    config: PonderLM3Config

    def __init__(self, config: PonderLM3Config):
        super().__init__(config)
        self.router = nn.Linear(config.d_model, config.latent_steps + 1)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)

    def route(self, h0: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
        """log s_{t,0..K} = log_softmax(router(h_t^(0))) from normalised slot-0 outputs h0 [..., d].

        Kept in float32 (like the attention mask): log w near log(tau) must not lose bits in bf16.
        The router's matmul is real work: the ledger records it (as ``other_flops``) for counted rows.
        """
        n = h0.numel() // h0.shape[-1] if counted is None else compute.as_count(counted)
        compute.record_matmul(n * self.router_flops())
        return F.log_softmax(self.router(h0).float(), dim=-1)

    def router_flops(self) -> float:
        return 2.0 * self.config.d_model * (self.config.latent_steps + 1)

    def decide(self, h0: torch.Tensor, rows: torch.Tensor | None = None) -> Decision:
        """Hard pruning: K_t = max{k : w_{t,k} >= tau}; the pruned tail mass goes to step K_t."""
        if self.config.latent_steps == 0:  # nothing to decide: the router is not run (= vanilla)
            return super().decide(h0, rows)
        log_s = self.route(h0, rows)
        log_w = tail_log_mass(log_s)
        w = log_w.exp()
        k = torch.arange(self.config.latent_steps + 1, device=h0.device)
        # w is non-increasing in k, so the kept steps are a prefix; k=0 (w=1) is always kept.
        kept = (w >= self.config.prune_threshold) | (k == 0)
        steps = (kept * k).amax(dim=-1)
        last = steps[:, None]
        weights = torch.where(k < last, log_s.exp(), torch.where(k == last, w, torch.zeros_like(w)))
        return Decision(log_w, steps, weights)

    def objective(self, lm_loss: torch.Tensor, log_s: torch.Tensor | None,
                  targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """loss = LM loss + lambda x mean_t sum_{k>=1} w_{t,k} (expected extra steps, scored tokens)."""
        if log_s is None:  # K = 0: nothing to route
            expected = lm_loss.new_zeros(())
        else:
            extra = tail_log_mass(log_s)[..., 1:].exp().sum(dim=-1)
            scored = (targets != IGNORE_INDEX).to(extra.dtype)
            expected = (extra * scored).sum() / scored.sum().clamp_min(1.0)
        penalty = self.config.compute_penalty * expected
        return lm_loss + penalty, {"mean_extra_steps": float(expected.detach()),
                                   "compute_penalty": float(penalty.detach())}


__all__ = ["PonderLM3", "PonderLM3Config"]
