"""PonderLM-3: token-wise adaptive latent steps on the PonderLM-2 layout (docs/design.md, "PonderLM-3").

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
from models.base import IGNORE_INDEX, JACOBI_TRAINING, PRUNED_DECODING, EvalSpec
from models.ponderlm2 import Decision, PonderLM2, PonderLM2Config, tail_log_mass


@dataclass
class PonderLM3Config(PonderLM2Config):
    summary = "PonderLM-3: router over 0..K latent steps, soft attention mask log w, hard pruning at inference"

    latent_steps: int = 3  # K: the most extra steps a token may take (decided: 3, room to adapt)
    compute_penalty: float = 0.01  # lambda on the expected extra steps per token (nats per step)
    prune_threshold: float = 1e-4  # tau: keep step k at inference iff w_{t,k} >= tau (0 = keep all)
    router_temperature: float = 0.1  # T in s = softmax(router(h) / T); see the note below

    # router_temperature: the paper is silent on it (it names the router, the penalty and tau, not how
    # the router's logits are scaled). T = 1 is the plain softmax; T < 1 scales the logits up, so the
    # penalty's pull on a tail mass w, which is proportional to w, moves the logits 1/T times faster and
    # tail masses cross tau within a CPU-length run. The measurement that chose 0.1 (pico, K = 3, vocab
    # 2048, 84k-166k training tokens, deployed decoding at tau = 1e-4, docs/design.md "PonderLM-3"):
    #   T = 1,   lambda = 1:    2.97 of 3 extra steps (nothing pruned; expected steps in training ~0)
    #   T = 0.1, lambda = 0.01: 2.53 extra steps, Spearman(steps, NLL) = +0.12, rare 2.58 > frequent 2.52
    #   T = 0.1, lambda = 0.1:  0.15 extra steps, Spearman = -0.14
    #   T = 0.1, lambda = 1:    0.0004 extra steps (every token pruned to 0)
    # A study sweeps lambda at this T to trace the Pareto curve; T is never tuned per claim.

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "compute_penalty", self.compute_penalty >= 0, "must be >= 0")
        require(self, "prune_threshold", 0 <= self.prune_threshold <= 1, "must lie in [0, 1] (0 = never prune)")
        require(self, "router_temperature", self.router_temperature > 0, "must be > 0 (1 = the plain softmax)")


@register("ponderlm3")
class PonderLM3(PonderLM2):
    """PonderLM-3: a router picks 0..K latent steps per token; soft mask in training, pruning at inference."""

    Config = PonderLM3Config
    reference_weight_decay = 0.1  # PonderLM-2's recipe, which PonderLM-3 builds on (scripts/train_ponderlm2_*.sh)
    config: PonderLM3Config
    adaptive = True
    bench_roles = frozenset({JACOBI_TRAINING, PRUNED_DECODING})
    fixed_twin = "ponderlm2"  # s_{t,K} = 1: every token takes all K steps
    steps_field = "latent_steps"
    # tau0: nothing pruned (the exact fixed point); tau0.2: a coarse tau, so tokens stop at mixed steps
    test_variants = {**PonderLM2.test_variants, "tau0": {"prune_threshold": 0.0}, "tau0.2": {"prune_threshold": 0.2}}

    def __init__(self, config: PonderLM3Config):
        super().__init__(config)
        # K = 0 routes nothing: no router (a parameter no step uses would get no gradient)
        self.router = nn.Linear(config.d_model, config.latent_steps + 1) if config.latent_steps else None
        if self.router is not None:
            nn.init.zeros_(self.router.weight)
            nn.init.zeros_(self.router.bias)

    def evaluation_spec(self) -> EvalSpec:
        """The Jacobi fixed point is decoding with nothing pruned (tau = 0)."""
        exact = {"prune_threshold": 0.0} if self.config.prune_threshold > 0 else {}
        return EvalSpec(jacobi=True, exact_overrides=exact)

    @torch.no_grad()
    def force_steps(self, steps: int) -> None:
        """Zero router weight; a bias under which every token keeps exactly ``steps`` latent steps.

        Steps 0..steps share the mass; each later one gets a logit 30 below (after the temperature), so its
        tail mass is about K e^-30 < 1e-12, under any threshold tau > 0, while step ``steps`` keeps
        w >= 1 / (K + 1).
        """
        K = self.config.latent_steps
        if not 0 <= steps <= K or (steps < K and self.config.prune_threshold <= 0):
            raise ValueError(f"cannot force {steps} of K={K} steps at prune_threshold={self.config.prune_threshold}")
        if self.router is None:  # K = 0: every token takes its 0 steps already
            return
        self.router.weight.zero_()
        self.router.bias.zero_()
        self.router.bias[steps + 1:] = -30.0 * self.config.router_temperature

    def route(self, h0: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
        """log s_{t,0..K} = log_softmax(router(h_t^(0)) / T) from normalised slot-0 outputs h0 [..., d].

        Kept in float32 (like the attention mask): log w near log(tau) must not lose bits in bf16.
        The router's matmul is real work: the ledger records it (as ``other_flops``) for counted rows.
        """
        n = h0.numel() // h0.shape[-1] if counted is None else compute.as_count(counted)
        compute.record_matmul(n * self.router_flops())
        return F.log_softmax(self.router(h0).float() / self.config.router_temperature, dim=-1)

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
