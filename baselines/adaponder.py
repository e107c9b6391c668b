"""Gated adaptive depth in the AdaPonderLM style (Song et al. 2026, arXiv 2603.01914).

Sources. No official code is public (the paper links none; none was found). The abstract gives:
iterated pondering passes with an iteration-specific MLP gate after each pass, a monotone halting mask
(a halted token never resumes), KV reuse (a halted token's keys and values stay visible to later
iterations, so it needs no more compute) and self-supervised training of the gates. The paper's body
could not be read from here (searched: its arXiv abstract and HTML pages, paper-summary sites, code
and issue search for "AdaPonderLM", "bottom-K ponder loss", "2603.01914", LUMIA-Group repositories).
Its loss is taken from two independent public descriptions of the paper that agree:
github.com/Krebbet/wiki-kit (wiki/research/adaponderlm.md, "Training objective", a note written from
the paper's PDF) and the re-implementation github.com/YONEK0/llm-hybrid-loop (s10_train_v4.py,
``train_step_v4``). Everything else below is decided here; the table in :class:`AdaPonder` lists what
differs from those descriptions.

Iterations. Iteration i = 1..N (config ``max_iterations`` N) is one full pass of the L-block stack,
fed PonderLM's way (Zeng et al. 2025; same rule as ``baselines/pondering.py``):
E^1 = s e(x_t) and E^{i+1} = E^i + softmax(logits^i) V, where V is the input-embedding matrix times
the backbone's ``embed_scale`` and s = N-1 with ``ponder_scale_token`` (the PonderLM reference's
token-embedding multiplier; s = 1 when N = 1 or when off). N = 1 is exactly the backbone, and a model
whose gates never fire equals PonderLM v1 with N-1 pondering steps and the same weights.

Gate. After iteration i < N the gate g_i (its own MLP per iteration: Linear(d, ``gate_hidden``) ->
SiLU -> Linear(gate_hidden, 1) -> sigmoid) reads the token's final-norm hidden state (the vector the
LM head reads) and outputs a halting probability q_i = sigmoid(z_i). The paper's gate value is the
probability to go on, s_i = 1 - q_i = sigmoid(-z_i): the same gate with its output negated. Weights
~ N(0, 2/(5 fan_in)); the output bias starts at ``gate_init_bias`` (-2: q ~ 0.12, so training starts
near full depth, like PonderLM, and the ponder loss teaches halting). There is no gate after
iteration N: every token stops there.

Inference (``decode``/``score``), hard and causal (the gate sees only the token's own state):
continue_1 = 1, continue_{i+1} = continue_i * [q_i < ``halt_threshold``] (0.5). A token's prediction
is the logits of the iteration where it halted. In iteration i only continuing tokens are queries
(gathered, so halted tokens cost nothing); every real token is a key: a halted token's K/V from its
last iteration are copied into the later iterations' caches (one KV cache per iteration).

Training (``forward``), a differentiable relaxation of the same computation, dense over all N
iterations (every token runs every pass, so training FLOPs are fixed: N passes, N heads, N-1 gates,
N-1 pondering mixtures, all with gradients):

* c_1 = 1, c_{i+1} = c_i (1 - q_i) is the probability of reaching iteration i; the halting
  distribution is w_i = c_i q_i (i < N), w_N = c_N (it sums to 1);
* soft KV reuse: in iteration i every token's keys/values are the expectation of what inference would
  present, K~_i = sum_{j<i} w_j K_j + c_i K_i (same for V), K_j being its own iteration-j keys;
* the LM loss is the expected loss over the halting distribution, sum_i w_i CE_i (PonderNet-style);
  ``lm_loss`` is this expectation;
* the ponder loss, weight ``compute_penalty`` (lambda, 0.1), is chosen by ``ponder_loss``:

  - ``"bottom_k"`` (default), AdaPonderLM's bottom-K ponder loss as both sources describe it: the mean
    of the smallest fraction k (``bottom_k``, 0.1) of all gate values s of the batch (every token,
    every gate), i.e. of the floor(k n) smallest of the n = (N-1) x (real tokens) values s_i,t (at
    least one when k > 0). Minimising it pushes the gates nearest to halting towards halting and
    leaves the others to the LM loss, so no per-token or per-iteration ratio is fixed. lambda = 0.1
    and k = 0.1 are the note's defaults (its k_max) and the re-implementation's. Decided here: the
    values are the sigmoid outputs s (the note's symbol could also be read as the gate logits, but
    a mean of logits is unbounded below; the re-implementation uses the sigmoid outputs); padding
    positions (target ``IGNORE_INDEX``) are left out;
  - ``"expected_iterations"``, this project's earlier choice: the mean over tokens of the expected
    extra iterations E[iterations] - 1 = sum_{i>=2} c_i (the "- 1" only removes a constant, so N = 1
    is exactly the backbone's loss). Its former default weight was 0.01 (``compute_penalty=0.01``).

With q in {0, 1} every line above is exactly the inference computation (hard mask, KV reuse, the
halting iteration's logits); for soft q, gradients reach the gates through the loss weights, the KV
mixture and the ponder loss. ``forward`` computes the same relaxation in train and eval mode (its
eval ``lm_loss`` is the parallel loss of the train/inference gap); stat ``threshold_extra_steps`` is
the depth the hard rule would pick on the training pass's states.

Compute (ledger and :meth:`analytic_flops_for_depths`): per iteration, L blocks over the tokens still
running (queries) that see every real earlier key (halted ones included) and a head over them
(``head_flops``); for those queries the iteration's gate (2 gate_hidden (d + 1) FLOPs, i < N) and,
for those that go on, a pondering mixture (a [V] x [V, d] matmul, 2 d V FLOPs), both recorded as
other matmul work (``compute.record_matmul``, ``other_flops``), as PonderLM-3's router and
PonderLM-1's mixture are. Padding is neither a key, a query, nor a head position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import compute
from harness.core.config import ModelConfig, require
from harness.core.registry import register
from models.backbone import KVCache
from models.base import IGNORE_INDEX, DecodeOutput, LanguageModel, TrainOutput
from models.shared import compact, init_linear

PONDER_LOSSES = ("bottom_k", "expected_iterations")


@dataclass
class AdaPonderConfig(ModelConfig):
    summary = "AdaPonderLM-style gated pondering: per-iteration MLP gates halt tokens, KV reused"

    max_iterations: int = 3  # N pondering passes at most; 1 = the backbone
    # "bottom_k": AdaPonderLM's bottom-K ponder loss; "expected_iterations": E[iterations] - 1 (module docstring)
    ponder_loss: str = "bottom_k"
    compute_penalty: float = 0.1  # lambda, the ponder loss's weight (AdaPonderLM: 0.1)
    bottom_k: float = 0.1  # k, the fraction of the batch's gate values the bottom-K loss averages (AdaPonderLM: 0.1)
    halt_threshold: float = 0.5  # inference: halt after iteration i once q_i >= this
    gate_hidden: int = 64  # width of each iteration's gate MLP
    gate_init_bias: float = -2.0  # initial gate output bias (sigmoid(-2) ~ 0.12: start near full depth)
    ponder_scale_token: bool = True  # PonderLM reference: token embedding x (N-1) when N > 1
    # AdaPonderLM builds on the original PonderLM (LUMIA-Group/PonderingLM, modeling_gpt_neox.py, scale_embeds
    # in every Pile script): embeddings x sqrt(d)
    embed_scale_rule: str = "sqrt(d)"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "max_iterations", isinstance(self.max_iterations, int) and self.max_iterations >= 1,
                 "must be an integer >= 1 (1 = the plain backbone)")
        require(self, "ponder_loss", self.ponder_loss in PONDER_LOSSES, f"must be one of {', '.join(PONDER_LOSSES)}")
        require(self, "compute_penalty", self.compute_penalty >= 0, "must be non-negative")
        require(self, "bottom_k", 0.0 <= self.bottom_k <= 1.0,
                 "must be in [0, 1] (a fraction of the batch's gate values; 0 = no ponder loss)")
        require(self, "halt_threshold", 0.0 < self.halt_threshold < 1.0, "must be in (0, 1)")
        require(self, "gate_hidden", isinstance(self.gate_hidden, int) and self.gate_hidden > 0,
                 "must be a positive integer")

    @property
    def token_scale(self) -> float:
        return float(self.max_iterations - 1) if self.ponder_scale_token and self.max_iterations > 1 else 1.0


@dataclass
class AdaPonderCache:
    """One KV cache per iteration; every cache holds every token (halted ones with reused K/V)."""

    iterations: list[KVCache]


@register("adaponder")
class AdaPonder(LanguageModel):
    """AdaPonderLM-style gated pondering: per-iteration MLP gates, monotone halting, KV reuse.

    Reference = the paper as its public descriptions give it (no official code; module docstring).

    ==============================  ==============================  =====================================
    reference behaviour             here                            why
    ==============================  ==============================  =====================================
    loss CE + lambda bottomK_k(s),  the same, the default;          the paper's loss; the earlier
    lambda = k = 0.1                ``expected_iterations`` kept    penalty stays a named option
    CE only first, then k warmed    k constant from step 0          a model is given no training step;
    0 -> k_max over a step range                                    that needs a harness schedule
    hard mask in training; the      soft relaxation (expected LM    its hard limit is the deployed
    mixture scaled by the gate,     loss, soft KV reuse); mixture   computation (tested); the paper's
    E += m s P V                    unscaled                        training pass is only secondhand
    halt once s < tau = 1e-4        halt once q = 1 - s >= 0.5      tau suits the gated mixture (s ~ 0
                                                                    adds nothing); q here is P(halt)
    KV reuse; every position runs   KV reuse; halted tokens are     same outputs, and the saving is real
    (where(m, K_i, K_i-1))          not queries (gathered)          compute
    gate width "4h" (the note)      ``gate_hidden`` = 64            the width is unconfirmed; gates stay
                                                                    small at CPU scale
    PonderLM's inputs: x sqrt(d),   ``embed_scale_rule`` sqrt(d);   the PonderLM it extends (PonderingLM,
    accumulated, token x (N-1)      accumulated, token x (N-1)      modeling_gpt_neox.py)
    ==============================  ==============================  =====================================
    """

    Config = AdaPonderConfig
    depth_baseline = True  # claim C2 compares PonderLM-3 with it at equal FLOPs
    reference_weight_decay = 0.01  # no public recipe: PonderLM-1's, which it extends (train_ponderlm_*.sh)
    adaptive = True
    test_variants = {"n1": {"max_iterations": 1},
                     "n2_unscaled": {"max_iterations": 2, "n_layers": 2, "ponder_scale_token": False}}

    def max_extra_steps(self) -> int:
        return self.config.max_iterations - 1

    @torch.no_grad()
    def force_steps(self, steps: int) -> None:
        """Zero gate output weights; biases under which every token halts after iteration steps + 1."""
        depth = steps + 1
        if not 1 <= depth <= self.config.max_iterations:
            raise ValueError(f"cannot force {steps} extra iterations with max_iterations={self.config.max_iterations}")
        for i, gate in enumerate(self.gates, start=1):  # gate i: halt after iteration i iff q_i >= 0.5
            gate[2].weight.zero_()
            gate[2].bias.fill_(20.0 if i >= depth else -20.0)

    def __init__(self, config: AdaPonderConfig):
        super().__init__(config)
        c = config
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(c.d_model, c.gate_hidden), nn.SiLU(), nn.Linear(c.gate_hidden, 1))
            for _ in range(c.max_iterations - 1))
        for gate in self.gates:
            init_linear(gate[0], c)
            init_linear(gate[2], c, bias=c.gate_init_bias)

    def gate_flops(self) -> float:
        """Matmul FLOPs of one gate on one token: Linear(d, h) and Linear(h, 1), 2 h (d + 1) (no biases,
        like PonderLM-3's router)."""
        return 2.0 * self.config.gate_hidden * (self.config.d_model + 1)

    def mixture_flops(self) -> float:
        """Matmul FLOPs of one pondering embedding: softmax(logits) [V] x V [V, d], 2 d V."""
        return 2.0 * self.config.d_model * self.config.vocab_size

    def gate_logit(self, iteration: int, h: torch.Tensor) -> torch.Tensor:
        """z_i [...] of final-norm states h [..., d] after 0-based ``iteration`` (< N-1): q_i = sigmoid(z_i).

        The gate's matmuls are real work: the ledger records them (as ``other_flops``) for every row.
        """
        compute.record_matmul(h.numel() // h.shape[-1] * self.gate_flops())
        return self.gates[iteration](h)[..., 0].float()

    def halting_probability(self, iteration: int, h: torch.Tensor) -> torch.Tensor:
        """q_i [...] of final-norm states h [..., d] after 0-based ``iteration`` (< N-1)."""
        return torch.sigmoid(self.gate_logit(iteration, h))

    def _pondering_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [M, V] -> softmax(logits) V [M, d] (a full-vocabulary mixture, 2 d V FLOPs a row).

        Recorded as other matmul work (``other_flops``), not as a head call, as ``baselines/pondering.py``.
        """
        weight = self.decoder.embed_tokens.weight
        probs = torch.softmax(logits.float(), dim=-1).to(weight.dtype)
        compute.record_matmul(probs.shape[0] * self.mixture_flops())
        return (probs @ weight) * self.config.embed_scale

    def _first_input(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.decoder.embed(input_ids)
        return x * self.config.token_scale if self.config.token_scale != 1.0 else x

    # -- training: the soft relaxation ------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> TrainOutput:
        cfg, dec = self.config, self.decoder
        b, t = input_ids.shape
        n_iter = cfg.max_iterations
        plan = dec.plan(torch.arange(t, device=input_ids.device).expand(b, t))
        real = targets != IGNORE_INDEX
        n_real = real.sum().clamp_min(1)
        x_in = self._first_input(input_ids)
        reach = torch.ones(b, t, device=input_ids.device)  # c_i
        halted_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * cfg.n_layers  # sum_{j<i} w_j K_j
        expected_loss = torch.zeros(b, t, device=input_ids.device)
        expected_iters = torch.zeros(b, t, device=input_ids.device)
        alive = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        hard_depth = torch.ones(b, t, device=input_ids.device)
        stay: list[torch.Tensor] = []  # s_i = 1 - q_i of the real tokens, the gate values of the bottom-K loss
        for i in range(n_iter):
            own_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

            def soft_reuse(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                own_kv.append((k, v))  # noqa: B023 (called within this iteration, by run_blocks below)
                if halted_kv[layer] is None:  # iteration 1: c_1 = 1, nothing halted yet
                    return k, v
                c = reach[:, None, :, None].to(k.dtype)  # noqa: B023 (likewise)
                return halted_kv[layer][0] + c * k, halted_kv[layer][1] + c * v

            plan.kv_hook = soft_reuse
            h = dec.norm(dec.run_blocks(x_in, plan))
            logits = dec.head(h)
            ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none").view(b, t)
            expected_iters = expected_iters + reach
            if i == n_iter - 1:
                expected_loss = expected_loss + reach * ce
                break
            z = self.gate_logit(i, h)
            q = torch.sigmoid(z)
            stay.append(torch.sigmoid(-z)[real])  # = 1 - q_i, without the rounding of 1 - q near q = 1
            halt = reach * q  # w_i
            expected_loss = expected_loss + halt * ce
            for layer, (k, v) in enumerate(own_kv):
                w = halt[:, None, :, None].to(k.dtype)
                prev = halted_kv[layer]
                halted_kv[layer] = (w * k, w * v) if prev is None else (prev[0] + w * k, prev[1] + w * v)
            reach = reach - halt  # c_{i+1} = c_i (1 - q_i)
            alive = alive & (q < cfg.halt_threshold)
            hard_depth = hard_depth + alive.float()
            x_in = x_in + self._pondering_embedding(logits.flatten(0, 1)).view_as(x_in)
        lm_loss = (expected_loss * real).sum() / n_real
        mean_iters = (expected_iters * real).sum() / n_real
        if cfg.ponder_loss == "bottom_k":
            ponder = bottom_k_mean(torch.cat(stay), cfg.bottom_k) if stay else lm_loss.new_zeros(())
        else:  # "expected_iterations"
            ponder = mean_iters - 1.0
        penalty = cfg.compute_penalty * ponder
        stats = {"mean_extra_steps": float(mean_iters.detach()) - 1.0, "compute_penalty": float(penalty.detach()),
                 "threshold_extra_steps": float((hard_depth * real).sum() / n_real) - 1.0}
        return TrainOutput(loss=lm_loss + penalty, lm_loss=lm_loss, stats=stats)

    # -- deployed inference: hard halting, gathered queries, reused KV ----------------------------

    def new_cache(self, batch_size: int) -> AdaPonderCache:
        return AdaPonderCache([self.decoder.new_cache(batch_size) for _ in range(self.config.max_iterations)])

    def _cached_iteration(self, x_in: torch.Tensor, positions: torch.Tensor, running: torch.Tensor,
                          prev: KVCache, cur: KVCache, valid: torch.Tensor | None) -> torch.Tensor | None:
        """One iteration (>= 2) over the new tokens: queries are the ``running`` ones only.

        Every new token gets a slot in ``cur``; running tokens write their fresh K/V there, halted ones
        a copy of their K/V from ``prev`` (the previous iteration's cache, which already holds their
        last computed K/V). Returns the new states [B, n, d] (meaningful where ``running``) or None.
        """
        dec, n = self.decoder, x_in.shape[1]
        start = cur.allocate(n, key_valid=valid)
        old = [(prev.keys[layer][:, :, start:start + n], prev.values[layer][:, :, start:start + n])
               for layer in range(self.config.n_layers)]
        index, ok = compact(running)
        if index.shape[1] == 0:  # nobody runs: only the KV reuse
            for layer, (k, v) in enumerate(old):
                cur.write(layer, start, k, v)
            return None
        total = cur.length
        own_slot = start + index  # [B, m]
        allowed = (torch.arange(total, device=index.device)[None, None, :] <= own_slot[..., None])
        plan = dec.plan(positions.gather(1, index), allowed=allowed, key_valid=cur.key_valid[:, :total],
                        query_valid=ok)

        def reuse(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            at = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
            keep = ok[:, None, :, None]
            old_k, old_v = old[layer]
            new_k = old_k.scatter(2, at, torch.where(keep, k, old_k.gather(2, at)))
            new_v = old_v.scatter(2, at, torch.where(keep, v, old_v.gather(2, at)))
            return cur.write(layer, start, new_k, new_v)

        at = index[..., None].expand(-1, -1, x_in.shape[-1])
        plan.kv_hook = reuse
        x = dec.run_blocks(x_in.gather(1, at), plan)
        return torch.zeros_like(x_in).scatter(1, at, x)

    def decode(self, input_ids: torch.Tensor, cache: AdaPonderCache, valid: torch.Tensor | None = None
               ) -> DecodeOutput:
        cfg, dec = self.config, self.decoder
        b, n = input_ids.shape
        caches = cache.iterations
        start = caches[0].length
        positions = self.decoder.positions_after(start, b, n, input_ids.device)
        running = torch.ones(b, n, dtype=torch.bool, device=input_ids.device) if valid is None else valid.clone()
        x_in = self._first_input(input_ids)
        h = dec.run_blocks(x_in, dec.plan(positions, cache=caches[0], key_valid=valid))  # iteration 1
        logits_out = h.new_zeros(b, n, cfg.vocab_size)
        depth = torch.zeros(b, n, dtype=torch.long, device=input_ids.device)
        for i in range(cfg.max_iterations):
            if i > 0:
                h = self._cached_iteration(x_in, positions, running, caches[i - 1], caches[i], valid)
                if h is None:
                    continue  # later caches still need the reused K/V of these tokens
            states = dec.norm(h[running])
            logits = dec.head(states)
            depth = depth + running.long()
            if i == cfg.max_iterations - 1:
                halt = torch.ones(states.shape[0], dtype=torch.bool, device=states.device)
            else:
                halt = self.halting_probability(i, states) >= cfg.halt_threshold
            chosen = logits_out[running]
            chosen[halt] = logits[halt].to(chosen.dtype)
            logits_out[running] = chosen
            going_on = running.clone()
            going_on[running] = ~halt
            if i < cfg.max_iterations - 1 and bool(going_on.any()):
                ponder = torch.zeros_like(x_in)
                ponder[going_on] = self._pondering_embedding(logits[~halt]).to(x_in.dtype)
                x_in = x_in + ponder
            running = going_on
        return DecodeOutput(logits_out, (depth - 1).clamp_min(0))

    # -- compute ----------------------------------------------------------------------------------

    def analytic_flops_for_depths(self, depths: torch.Tensor) -> float:
        """Forward FLOPs of deployed inference for rows whose tokens ran ``depths`` [B, T] iterations.

        depth 0 marks padding. In iteration i the tokens with depth >= i are queries; every real
        token at or before a query is its key (halted ones through KV reuse). Each query also gets the
        iteration's head, its gate (i < N) and, for i >= 2, the pondering mixture that fed it.
        """
        cfg, dec = self.config, self.decoder
        d = depths.reshape(-1, depths.shape[-1])
        real = d > 0
        seen = real.long().cumsum(1)
        total = 0.0
        for i in range(1, cfg.max_iterations + 1):
            running = (d >= i) & real
            queries = float(running.sum())
            total += dec.layers_flops(cfg.n_layers, queries, float((seen * running).sum()))
            total += compute.head_flops(cfg.d_model, cfg.vocab_size, queries)
            if i < cfg.max_iterations:
                total += queries * self.gate_flops()
            if i >= 2:
                total += queries * self.mixture_flops()
        return total

    def decode_flops(self, steps: torch.Tensor | None, valid: torch.Tensor | None = None,
                     participation: torch.Tensor | None = None) -> float:
        depths = steps + 1 if valid is None else torch.where(valid, steps + 1, 0)
        return self.analytic_flops_for_depths(depths)

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Training runs every iteration densely; inference at most the same (every token N passes)."""
        return self.analytic_flops_for_depths(torch.full((1, seq_len), self.config.max_iterations)) / seq_len


def bottom_k_mean(values: torch.Tensor, k: float) -> torch.Tensor:
    """Mean of the floor(k n) smallest of ``values`` [n] (at least one when k > 0); 0 when k = 0 or n = 0."""
    count = math.floor(k * values.numel() + 1e-9)
    count = max(count, 1) if k > 0 else 0
    if count == 0 or values.numel() == 0:
        return values.new_zeros(())
    return values.topk(min(count, values.numel()), largest=False).values.mean()
