"""PonderLM-2: K latent thoughts per token, trained with Jacobi passes, decoded exactly (docs/design.md, "PonderLM-2").

What differs from the shared backbone
-------------------------------------
* **Layout.** The sequence x_1, z_1^1..z_1^K, x_2, z_2^1.., of length (K+1)T, under plain causal
  attention in that interleaved order. All K+1 slots of token t share RoPE position t (slots are not
  positions: the KV cache is addressed by slot, the rotary tables by position).
* **Latent inputs.** The input at latent slot (t,k) is the final hidden state *after the final norm*,
  with no projection, produced at slot (t,k-1). Token embeddings are scaled by sqrt(2.5 d)
  (``ponder_init``) so both kinds of input have unit RMS.
* **Readout.** x_{t+1} is predicted from the output at slot (t,K).

Training (parallel): the recurrence "slot (t,k) reads slot (t,k-1)'s output" is solved by passes over
the whole sequence, each pass reading every latent input from the *previous* pass's outputs:

1. initialisation passes that build the stages. Decided here, as the reference code does
   (LUMIA-Group/PonderLM-2, ``modeling_llama.py``, "Initial Interpolation Loop"): init pass k
   (k = 0..K-1) runs the layout with k latent slots per token; its slot-(t,j) outputs become the
   inputs of slot (t,j+1) for the next pass, so each init pass refreshes the existing stages and
   appends one. For K=1 this is the one vanilla pass whose outputs become z^1. Cost:
   sum_k (k+1)T = K(K+1)/2 x T positions.
2. J Jacobi passes over the full (K+1)T layout (J drawn uniformly from ``jacobi_passes`` each training
   step, as the reference's ``randint(2, 4)``; ``eval_jacobi_passes`` in eval mode);
3. a final pass of the same kind whose slot-(t,K) outputs give the loss.

Gradients flow through every pass (the reference's choice); ``init_no_grad`` runs the init passes
under ``torch.no_grad`` instead, and the ledger then counts them once, not 3x. K=0 is the vanilla
decoder: one pass, no Jacobi passes (there is nothing to iterate).

Causality makes Jacobi exact: the latent inputs are KT unknowns, each a function of strictly earlier
slots only, so every pass fixes at least one more of them in order; after KT (a fortiori (K+1)T)
passes the final pass equals sequential decoding (tests/test_ponderlm.py measures this).

Inference is exact and sequential (no Jacobi): per token, K+1 single-position forwards with the KV
cache, each feeding its normalised final hidden state to the next; (K+1) positions per token over a
(K+1)x longer context.

PonderLM-3 (models/ponderlm3.py) extends this class: the hooks :meth:`route`, :meth:`decide` and
:meth:`objective` are where the router, the soft mask log w, the mixture readout, the hard pruning and
the compute penalty come in. Here they encode PonderLM-2 = the special case s_{t,K} = 1 (every token
takes all K steps, every key bias 0, readout from slot K).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from harness.core import compute
from harness.core.config import ModelConfig, require
from harness.core.registry import register
from models.backbone import KVCache
from models.base import JACOBI_TRAINING, DecodeOutput, EvalSpec, LanguageModel, TrainOutput


@dataclass
class PonderLM2Config(ModelConfig):
    summary = "PonderLM-2: K latent thoughts per token (fed-back hidden states), Jacobi-parallel training"

    latent_steps: int = 1  # K: latent thoughts per token (the reference trains K=1)
    jacobi_passes: tuple[int, ...] = (2, 3)  # J is drawn uniformly from these each training step
    eval_jacobi_passes: int = 3  # J of the parallel forward in eval mode (deterministic)
    init_no_grad: bool = False  # run the K initialisation passes under no_grad (counted 1x, not 3x)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "latent_steps", self.latent_steps >= 0, "must be >= 0 (0 = the vanilla decoder)")
        self.jacobi_passes = tuple(self.jacobi_passes)
        require(self, "jacobi_passes", bool(self.jacobi_passes) and all(
            isinstance(j, int) and j >= 0 for j in self.jacobi_passes), "must be non-empty integers >= 0, e.g. 2,3")
        require(self, "eval_jacobi_passes", self.eval_jacobi_passes >= 0, "must be >= 0")


@dataclass
class LatentCache:
    """KV cache of the interleaved layout plus the token count.

    ``n_tokens`` is the RoPE position of the next token; ``kv.length`` counts slots (a token and its
    executed latent steps), which is not the same thing.
    """

    kv: KVCache
    n_tokens: int = 0


@dataclass
class Decision:
    """What the router decided for one decoded token, for a batch [B] (docs/design.md, "PonderLM-3").

    ``log_w`` [B, K+1]: key bias of slot (t,k) (None = all 0, PonderLM-2); ``steps`` [B]: K_t, the latent
    steps to execute; ``weights`` [B, K+1]: readout mixture over slot outputs (None = slot K alone).
    """

    log_w: torch.Tensor | None
    steps: torch.Tensor
    weights: torch.Tensor | None


def tail_log_mass(log_s: torch.Tensor) -> torch.Tensor:
    """log w_k = log sum_{j>=k} s_j from log s [..., K+1], stably (reverse log-cum-sum-exp)."""
    return torch.logcumsumexp(log_s.flip(-1), dim=-1).flip(-1)


@register("ponderlm2")
class PonderLM2(LanguageModel):
    """PonderLM-2: K latent thoughts per token, fed back as normalised hidden states (fixed K)."""

    Config = PonderLM2Config
    reference_weight_decay = 0.1  # PonderLM-2 repo, scripts/train_ponderlm2_llama_{410m,1_4b}.sh
    config: PonderLM2Config
    bench_roles = frozenset({JACOBI_TRAINING})
    steps_field = "latent_steps"  # K: the bench times Jacobi training at the K values a study runs
    test_variants = {"K0": {"latent_steps": 0}, "K2_J2": {"latent_steps": 2, "jacobi_passes": (2,)},
                     "K2_J2_init_no_grad": {"latent_steps": 2, "jacobi_passes": (2,), "init_no_grad": True}}

    def max_extra_steps(self) -> int:
        return self.config.latent_steps

    def evaluation_spec(self) -> EvalSpec:
        return EvalSpec(jacobi=True)  # the parallel forward is a Jacobi solve of decoding

    def training_flops_exact(self) -> bool:
        """J is drawn per step: one forward's count is exact only when every draw is the same J."""
        return self.config.latent_steps == 0 or len(set(self.config.jacobi_passes)) == 1

    # -- hooks: PonderLM-3 overrides these; here s_{t,K} = 1 -------------------------------------

    def route(self, h0: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor | None:
        """Step distribution log s [..., K+1] from slot-0 outputs h0 [..., d]; None = always K steps.

        ``counted`` [...] marks the rows whose routing the ledger counts (None = all).
        """
        return None

    def router_flops(self) -> float:
        """FLOPs of one routing decision (one token in one pass); none for PonderLM-2."""
        return 0.0

    def decide(self, h0: torch.Tensor, rows: torch.Tensor | None = None) -> Decision:
        """Inference decision for one token from its slot-0 output h0 [B, d]: K steps, no bias.

        ``rows`` [B] marks real rows (None = all); padding rows' routing is not counted.
        """
        steps = torch.full((h0.shape[0],), self.config.latent_steps, dtype=torch.long, device=h0.device)
        return Decision(None, steps, None)

    def objective(self, lm_loss: torch.Tensor, log_s: torch.Tensor | None,
                  targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss to minimise and its stats; PonderLM-2 adds nothing to the LM loss."""
        return lm_loss, {"mean_extra_steps": float(self.config.latent_steps)}

    # -- training: parallel passes ----------------------------------------------------------------

    def sample_jacobi_passes(self) -> int:
        """J for this forward: uniform over ``jacobi_passes`` in training, fixed in eval mode."""
        cfg = self.config
        if not self.training:
            return cfg.eval_jacobi_passes
        return int(cfg.jacobi_passes[int(torch.randint(len(cfg.jacobi_passes), ()))])

    def _pass(self, x: torch.Tensor, prev: torch.Tensor | None,
              n_latent: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass over the layout with ``n_latent`` latent slots per token.

        x [B, T, d] token embeddings; prev [B, T, >=n_latent, d] the previous pass's normalised slot
        outputs (slot (t,k)'s input is prev[:, t, k-1]). Returns this pass's normalised outputs
        [B, T, n_latent+1, d] and the routing log s used for its key bias (None for PonderLM-2).
        """
        b, t, d = x.shape
        slots = [x[:, :, None]]
        log_s, bias = None, None
        if n_latent:
            slots.append(prev[:, :, :n_latent])
            # The router reads slot (t,0)'s output of the *previous* pass: this pass's own is not known
            # before its attention runs. At the Jacobi fixed point the two coincide (= decoding).
            log_s = self.route(prev[:, :, 0])
            if log_s is not None:
                log_w = tail_log_mass(log_s)[..., 1:n_latent + 1]
                # w_{t,0} = 1 exactly: the token slot gets bias 0, as in decoding (not log(sum s) ~ 1e-7)
                bias = torch.cat([log_w.new_zeros(b, t, 1), log_w], dim=-1).reshape(b, -1)
        inputs = torch.cat(slots, dim=2).reshape(b, t * (n_latent + 1), d)
        positions = torch.arange(t, device=x.device).repeat_interleave(n_latent + 1).expand(b, -1)
        plan = self.decoder.plan(positions, key_bias=bias)
        out = self.decoder.norm(self.decoder.run_blocks(inputs, plan))
        return out.view(b, t, n_latent + 1, d), log_s

    def latent_passes(self, input_ids: torch.Tensor,
                      jacobi_passes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All passes of the training forward: init passes, J Jacobi passes, the final pass.

        Returns the final pass's slot outputs [B, T, K+1, d] and its routing log s [B, T, K+1]
        (None for PonderLM-2 or K=0). Loops run over passes, never over tokens or slots.
        """
        K = self.config.latent_steps
        x = self.decoder.embed(input_ids)
        if K == 0:
            return self._pass(x, None, 0)
        init = torch.no_grad() if self.config.init_no_grad else contextlib.nullcontext()
        with init:
            outs, _ = self._pass(x, None, 0)  # vanilla pass: its outputs seed z^1
            for k in range(1, K):  # stage k: k latent slots, refreshes z^1..z^k and appends z^{k+1}
                outs, _ = self._pass(x, outs, k)
        for _ in range(jacobi_passes):
            outs, _ = self._pass(x, outs, K)
        return self._pass(x, outs, K)

    def readout_hidden(self, outs: torch.Tensor, log_s: torch.Tensor | None) -> torch.Tensor:
        """The hidden state [B, T, d] the LM head reads: slot K's output, or sum_k s_k h^(k) (PonderLM-3)."""
        if log_s is None:
            return outs[:, :, -1]
        return (log_s.exp().to(outs.dtype)[..., None] * outs).sum(dim=2)

    def readout(self, outs: torch.Tensor, log_s: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits [B, T, V] of :meth:`readout_hidden`."""
        return self.decoder.head(self.readout_hidden(outs, log_s))

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, *,
                jacobi_passes: int | None = None) -> TrainOutput:
        """Training (and parallel eval) forward; ``jacobi_passes`` overrides the sampled J."""
        n_jacobi = self.sample_jacobi_passes() if jacobi_passes is None else int(jacobi_passes)
        outs, log_s = self.latent_passes(input_ids, n_jacobi)
        # = next_token_loss(self.readout(outs, log_s), targets), without materialising the logits
        lm_loss = self.decoder.head_loss(self.readout_hidden(outs, log_s), targets)
        loss, stats = self.objective(lm_loss, log_s, targets)
        stats["jacobi_passes"] = float(n_jacobi if self.config.latent_steps else 0)
        return TrainOutput(loss=loss, lm_loss=lm_loss, stats=stats)

    # -- deployed inference: exact sequential latent steps ---------------------------------------

    def new_cache(self, batch_size: int) -> LatentCache:
        return LatentCache(self.decoder.new_cache(batch_size))

    def _step(self, x: torch.Tensor, position: torch.Tensor, cache: KVCache,
              key_valid: torch.Tensor | None, key_bias: torch.Tensor | None) -> torch.Tensor:
        """One slot for every row: x [B, 1, d] -> normalised output [B, 1, d], cached as a key."""
        plan = self.decoder.plan(position, cache=cache, key_bias=key_bias, key_valid=key_valid)
        return self.decoder.blocks_and_norm(x, plan)

    def decode(self, input_ids: torch.Tensor, cache: LatentCache,
               valid: torch.Tensor | None = None) -> DecodeOutput:
        """Per token: slot (t,0), then latent slots (t,1..K_t), each reading the previous output.

        Batched rows that take fewer steps (PonderLM-3) or are padding: decided here, the batch runs in
        lock-step and such a row's slot is marked *invalid* -- not a key for anyone, not a query in the
        ledger, so nothing is counted for it (its wasted arithmetic is not part of the method). A latent
        step no row needs is not run at all and allocates no cache slot.
        """
        b, n = input_ids.shape
        x = self.decoder.embed(input_ids)
        all_logits, all_steps = [], []
        for i in range(n):
            row_valid = None if valid is None else valid[:, i]
            position = torch.full((b, 1), cache.n_tokens, device=input_ids.device)
            h = self._step(x[:, i:i + 1], position, cache.kv, _as_key_valid(row_valid), None)
            decision = self.decide(h[:, 0], row_valid)
            outputs = [h]
            for k in range(1, self.config.latent_steps + 1):
                active = decision.steps >= k
                if row_valid is not None:
                    active = active & row_valid
                if not bool(active.any()):
                    break
                bias = None if decision.log_w is None else decision.log_w[:, k:k + 1]
                h = self._step(h, position, cache.kv, _as_key_valid(active), bias)
                outputs.append(h)
            if decision.weights is None:
                readout = outputs[-1]
            else:  # rows that stopped before step k have weight 0 there; their h is finite
                weights = decision.weights.to(h.dtype)
                readout = sum(weights[:, k, None, None] * o for k, o in enumerate(outputs))
            all_logits.append(self.decoder.head(readout, None if row_valid is None else row_valid[:, None]))
            steps = decision.steps if row_valid is None else decision.steps.masked_fill(~row_valid, 0)
            all_steps.append(steps)
            cache.n_tokens += 1
        return DecodeOutput(torch.cat(all_logits, dim=1), torch.stack(all_steps, dim=1))

    # -- compute ----------------------------------------------------------------------------------

    def decode_flops(self, steps: torch.Tensor, valid: torch.Tensor | None = None,
                     participation: torch.Tensor | None = None) -> float:
        """Analytic FLOPs of decoding rows whose tokens took ``steps`` [B, T] extra steps.

        Every executed slot is a query that sees every executed slot of its row up to itself (pruned,
        skipped and padded slots are no keys), so a row with S executed slots has S(S+1)/2 key pairs;
        the head, and the router (PonderLM-3, K >= 1), run once per real token.
        """
        steps = steps.to(torch.long)
        real = torch.ones_like(steps, dtype=torch.bool) if valid is None else valid.to(torch.bool)
        slots = ((1 + steps) * real).sum(dim=1).tolist()
        tokens = real.sum(dim=1).tolist()
        route = self.router_flops() if self.config.latent_steps else 0.0  # K = 0: nothing to route
        return float(sum(self.decoder.analytic_forward_flops(s, compute.causal_key_pairs(s), n)
                         + n * route for s, n in zip(slots, tokens)))

    def _pass_flops(self, seq_len: int, n_latent: int, head: bool) -> float:
        s = (n_latent + 1) * seq_len
        return self.decoder.analytic_forward_flops(s, compute.causal_key_pairs(s), seq_len if head else 0)

    def training_pass_flops(self, seq_len: int, jacobi_passes: float | None = None) -> tuple[float, float]:
        """(init passes, Jacobi + final passes) forward FLOPs of one sequence; J defaults to its mean."""
        cfg, K = self.config, self.config.latent_steps
        if jacobi_passes is None:
            jacobi_passes = sum(cfg.jacobi_passes) / len(cfg.jacobi_passes)
        if K == 0:
            return 0.0, self._pass_flops(seq_len, 0, head=True)
        route = seq_len * self.router_flops()  # every pass with latent slots routes every token
        init = sum(self._pass_flops(seq_len, k, head=False) + (route if k else 0.0) for k in range(K))
        graded = ((jacobi_passes + 1) * (self._pass_flops(seq_len, K, head=False) + route)
                  + compute.head_flops(self.config.d_model, self.config.vocab_size, seq_len))
        return init, graded

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Training: every pass once, at the mean J. Inference: K steps for every token (the maximum;
        PonderLM-3's ledger measures fewer, :meth:`decode_flops` gives the count for given steps)."""
        if training:
            return sum(self.training_pass_flops(seq_len)) / seq_len
        steps = torch.full((1, seq_len), self.config.latent_steps)
        return self.decode_flops(steps) / seq_len

    def train_flops_per_token(self, seq_len: int) -> float:
        """3x the graded passes, plus the init passes at 3x (or 1x under ``init_no_grad``), mean J.

        For K=1 this is (3 + 2J) x 3 x a vanilla forward (up to attention), not 3x
        (docs/design.md, "Compute accounting").
        """
        init, graded = self.training_pass_flops(seq_len)
        init_mult = 1 if self.config.init_no_grad else compute.BACKWARD_MULTIPLIER
        return (init_mult * init + compute.BACKWARD_MULTIPLIER * graded) / seq_len


def _as_key_valid(rows: torch.Tensor | None) -> torch.Tensor | None:
    """[B] row mask -> [B, 1] key validity, or None when every row is real (keeps the fast path)."""
    if rows is None or bool(rows.all()):
        return None
    return rows[:, None]


__all__ = ["Decision", "LatentCache", "PonderLM2", "PonderLM2Config", "tail_log_mass"]
