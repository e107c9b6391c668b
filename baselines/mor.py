"""Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524): a shared middle block applied up to R times.

Layers (the paper's "Middle-Cycle" sharing, Sec. 2.1): the backbone's first ``unshared_first`` and
last ``unshared_last`` layers are unshared; the layers in between form ONE shared block f that a
token goes through 1..R times (config ``recursions`` R). With R = 1 every token takes the block once,
so the model is exactly the backbone (same weights, same logits): MoR with R recursions has the
parameters of the vanilla model of the same ``n_layers`` and up to ``unshared_first + R x middle +
unshared_last`` layers of compute per token.

Recursion 1 is dense and unscaled. Decided here: the paper's expert-choice capacity schedule keeps
every token at the first recursion anyway (k_1 = N), so routing there decides nothing; scaling it by a
router weight would only break "one recursion = the backbone". Routing decides recursions 2..R.

Routing (config ``routing``):

* ``"expert"`` (expert-choice, Sec. 2.2.1). Before recursion r >= 2 a router Linear(d, 1) with a
  sigmoid scores the tokens still active; training keeps the top-k_r of them, k_r = max(1,
  floor(capacity_r x T)) of the whole sequence, nested (only tokens selected at r-1 are candidates).
  The selected tokens are gathered in causal order with their original RoPE positions, run through f
  attending only to each other, and updated as in the paper's Eq. (H^{r+1} = g f(H^r) + H^r) with f's
  residual update scaled by the router weight g = sigmoid(score): H <- H + g (f(H) - H) (``torch.lerp``,
  exact at g = 1). Unselected tokens keep their state (residual passthrough).
  Top-k looks at the whole sequence, future included, so inference cannot use it. The paper's
  auxiliary-loss variant trains the router's sigmoid with BCE to predict top-k membership (target 1 for
  selected candidates, 0 for dropped ones; mean over candidates, averaged over recursions, weight
  ``router_aux_weight``); inference then decides causally: a token active at r-1 takes recursion r iff
  sigmoid(score) >= 0.5 (``INFERENCE_THRESHOLD``). The ``forward`` pass always uses top-k (it is the
  training computation; its ``lm_loss`` under eval is the parallel loss); ``score``/``decode`` use the
  threshold. Stat ``router_agreement`` is how often the two rules agree on the candidates.
* ``"token"`` (token-choice, Sec. 2.2.1). A router Linear(d, R) on the first recursion's input H^1
  assigns each token a depth i = argmax softmax + 1, once. The token takes recursions 1..i unscaled
  and its total update is scaled by the chosen probability g at exit, as the reference code does:
  H_out = H^1 + g (F_i(H^1) - H^1). Load balancing: Switch-style R sum_i f_i P_i (f_i = fraction of
  tokens with depth i, P_i = their mean router probability), weight ``balance_weight``. The routing is
  per-token and causal, so training and inference compute the same thing.

Recursion-wise KV caching (Sec. 2.2.2): in recursion r only the tokens active at r are keys and
queries. Training gathers them; cached decoding keeps one KV cache per recursion r >= 2 (recursion 1
shares the main cache with the unshared layers), and a token that exits before r writes no KV at r:
each decode call gathers the tokens active at r into as many new slots as the busiest batch row
needs, a row's unused slots are marked not-a-key (and are no query). A call where no token is active
at r allocates nothing there.

Compute (ledger and :meth:`analytic_flops_for_depths`): the unshared layers and recursion 1 over every
real token (causal), plus for r >= 2 the middle layers over the a_r active tokens with a_r(a_r+1)/2
causal pairs, plus the head over real tokens. Routers (2d or 2dR FLOPs per token) are not counted, like
norms. Training FLOPs: expert-choice is exact (k_r is fixed by T); token-choice depends on the learned
routing, so :meth:`analytic_flops_per_token` (training) assumes the balanced split the balancing loss
drives towards (a fraction (R-r+1)/R of tokens at recursion r) -- the ledger measures the real value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import compute
from harness.core.config import ModelConfig, require
from harness.core.registry import register
from models.backbone import KVCache
from models.base import DecodeOutput, LanguageModel, TrainOutput
from models.shared import compact, init_linear

INFERENCE_THRESHOLD = 0.5  # expert-choice at inference: continue iff sigmoid(router) >= 0.5 (BCE target)
ROUTINGS = ("expert", "token")


@dataclass
class MoRConfig(ModelConfig):
    summary = "Mixture-of-Recursions: shared middle block applied 1..R times per token (routed)"

    recursions: int = 3  # R: most applications of the shared middle block; 1 = the backbone
    routing: str = "expert"  # "expert" (expert-choice top-k, causal threshold at inference) | "token"
    # Expert-choice: fraction of the sequence's tokens that take recursion r = 1..R. () = the paper's
    # linear schedule (R-r+1)/R; one value rho = geometric (rho^(r-1)); R values = explicit, first 1.0.
    capacity: tuple[float, ...] = ()
    unshared_first: int = 1  # leading unshared layers (Middle-Cycle)
    unshared_last: int = 1  # trailing unshared layers
    router_aux_weight: float = 0.1  # expert-choice: weight of the BCE that makes the threshold causal
    balance_weight: float = 0.01  # token-choice: weight of the Switch load-balancing loss

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "recursions", isinstance(self.recursions, int) and self.recursions >= 1,
                 "must be an integer >= 1 (1 = the plain backbone)")
        require(self, "routing", self.routing in ROUTINGS, f"must be one of {', '.join(ROUTINGS)}")
        for name in ("unshared_first", "unshared_last"):
            require(self, name, isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                     "must be a non-negative integer")
        require(self, "unshared_last", self.unshared_first + self.unshared_last < self.n_layers,
                 f"unshared_first + unshared_last must leave a shared middle block in n_layers={self.n_layers}")
        for name in ("router_aux_weight", "balance_weight"):
            require(self, name, getattr(self, name) >= 0, "must be non-negative")
        cap = tuple(float(c) for c in self.capacity)
        self.capacity = cap
        require(self, "capacity", len(cap) in (0, 1, self.recursions),
                 f"give no value (linear schedule), one ratio, or recursions={self.recursions} values")
        require(self, "capacity", all(0.0 < c <= 1.0 for c in cap), "every ratio must be in (0, 1]")
        if len(cap) == self.recursions and self.recursions > 1:
            require(self, "capacity", cap[0] == 1.0, "recursion 1 is dense: the first value must be 1.0")
            require(self, "capacity", all(a >= b for a, b in zip(cap, cap[1:])),
                     "must be non-increasing (routing is nested)")

    @property
    def capacity_schedule(self) -> tuple[float, ...]:
        """Fraction of the sequence taking recursion r, for r = 1..R."""
        r_max = self.recursions
        if not self.capacity:
            return tuple((r_max - r + 1) / r_max for r in range(1, r_max + 1))
        if len(self.capacity) == 1 and r_max > 1:
            return tuple(self.capacity[0] ** (r - 1) for r in range(1, r_max + 1))
        return self.capacity

    def tokens_at(self, r: int, seq_len: int) -> int:
        """Expert-choice training: k_r, the tokens of a length-``seq_len`` row that take recursion r."""
        # the epsilon keeps e.g. (2/3) x 12 from flooring to 7 through rounding
        return max(1, int(self.capacity_schedule[r - 1] * seq_len + 1e-9))

    @property
    def n_middle(self) -> int:
        return self.n_layers - self.unshared_first - self.unshared_last


@dataclass
class MoRCache:
    """Main cache (unshared layers + recursion 1, one slot per token) and one cache per recursion >= 2."""

    main: KVCache
    recursions: list[KVCache]


@register("mor")
class MixtureOfRecursions(LanguageModel):
    """Mixture-of-Recursions: unshared first/last layers, a shared middle block applied 1..R times."""

    Config = MoRConfig
    adaptive = True
    test_variants = {"token": {"routing": "token"}, "r1": {"recursions": 1},
                     "r1_token": {"recursions": 1, "routing": "token"},
                     "r2_gqa_capacity": {"recursions": 2, "n_layers": 2, "unshared_last": 0, "n_heads": 4,
                                         "n_kv_heads": 2, "capacity": (0.5,)}}

    def max_extra_steps(self) -> int:
        return self.config.recursions - 1

    @torch.no_grad()
    def force_steps(self, steps: int) -> None:
        """Zero router weights; biases that send every token through exactly steps + 1 recursions."""
        depth, cfg = steps + 1, self.config
        if not 1 <= depth <= cfg.recursions:
            raise ValueError(f"cannot force {steps} extra recursions with recursions={cfg.recursions}")
        for router in self.routers:
            router.weight.zero_()
        if cfg.routing == "expert":  # continue at recursion r iff sigmoid(bias) >= 0.5
            for r, router in enumerate(self.routers, start=2):
                router.bias.fill_(20.0 if r <= depth else -20.0)
        elif self.routers:  # token choice: argmax picks the depth
            self.routers[0].bias.copy_(F.one_hot(torch.tensor(depth - 1), cfg.recursions) * 20.0)

    def training_flops_exact(self) -> bool:
        """Token choice's training cost follows the learned routing (the analytic count is balanced)."""
        return self.config.routing == "expert" or self.config.recursions == 1

    def __init__(self, config: MoRConfig):
        super().__init__(config)
        c = config
        self.first = range(0, c.unshared_first)
        self.middle = range(c.unshared_first, c.unshared_first + c.n_middle)
        self.last = range(c.unshared_first + c.n_middle, c.n_layers)
        if c.routing == "expert":
            self.routers = nn.ModuleList(nn.Linear(c.d_model, 1) for _ in range(c.recursions - 1))
        else:
            self.routers = nn.ModuleList([nn.Linear(c.d_model, c.recursions)] if c.recursions > 1 else [])
        for router in self.routers:
            init_linear(router, c)

    # -- the recursion stack ------------------------------------------------------------------

    def _recursion(self, x: torch.Tensor, positions: torch.Tensor, active: torch.Tensor,
                   weight: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        """One application of the shared block to the ``active`` tokens only (recursion-wise KV).

        The active tokens are gathered in causal order at their original RoPE positions, so they see
        only each other; ``weight`` [B, n] (expert-choice router weights) scales their update.
        """
        index, ok = compact(active)
        if index.shape[1] == 0:
            return x
        full = bool(ok.all())
        gather = index[..., None].expand(-1, -1, x.shape[-1])
        xs = x.gather(1, gather)
        plan = self.decoder.plan(positions.gather(1, index), cache=cache, key_valid=None if full else ok)
        ys = self.decoder.run_blocks(xs, plan, layers=self.middle)
        if weight is not None:  # H + g (f(H) - H); lerp is exact at g = 1
            ys = torch.lerp(xs, ys, weight.gather(1, index)[..., None].to(ys.dtype))
        if not full:  # a row's padding entries point at inactive tokens: leave those untouched
            ys = torch.where(ok[..., None], ys, xs)
        return x.scatter(1, gather, ys)

    def _run(self, input_ids: torch.Tensor, cache: MoRCache | None, valid: torch.Tensor | None,
             training_form: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """Embed -> unshared -> recursions -> unshared -> norm. Returns (h, depth, aux loss, stats).

        ``training_form`` selects the expert-choice training rule (nested top-k over the sequence); otherwise
        the causal inference rule (sigmoid >= 0.5). ``depth`` [B, n] is 1..R (0 for padding).
        """
        cfg, dec = self.config, self.decoder
        b, n = input_ids.shape
        offset = 0 if cache is None else cache.main.length
        positions = self.decoder.positions_after(offset, b, n, input_ids.device)
        live = torch.ones(b, n, dtype=torch.bool, device=input_ids.device) if valid is None else valid
        plan = dec.plan(positions, cache=None if cache is None else cache.main, key_valid=valid)
        x = dec.run_blocks(dec.embed(input_ids), plan, layers=self.first)
        h1 = x
        x = dec.run_blocks(x, plan, layers=self.middle)  # recursion 1: every token, unscaled
        depth = live.long()
        aux, stats = None, {}
        if cfg.recursions > 1 and cfg.routing == "token":
            logits = self.routers[0](h1).float()
            probs = torch.softmax(logits, dim=-1)
            choice = probs.argmax(dim=-1)
            exit_weight = probs.gather(-1, choice[..., None])[..., 0]
            assigned = choice + 1
            if training_form:
                frac = F.one_hot(choice[live], cfg.recursions).float().mean(0)
                mean_prob = probs[live].mean(0)
                aux = cfg.balance_weight * cfg.recursions * (frac * mean_prob).sum()
                stats["balance_loss"] = float(aux.detach())
        bce, agree = [], []
        for r in range(2, cfg.recursions + 1):
            cache_r = None if cache is None else cache.recursions[r - 2]
            if cfg.routing == "expert":
                score = self.routers[r - 2](x)[..., 0]
                if training_form:
                    k = cfg.tokens_at(r, n)
                    chosen = score.masked_fill(~live, float("-inf")).topk(k, dim=1).indices
                    selected = torch.zeros_like(live).scatter(1, chosen, True)
                    bce.append(F.binary_cross_entropy_with_logits(score[live].float(), selected[live].float()))
                    agree.append(((score[live] >= 0) == selected[live]).float().mean())
                else:  # sigmoid(score) >= 0.5  <=>  score >= 0, decided per token, causally
                    selected = live & (score >= 0)
                x = self._recursion(x, positions, selected, torch.sigmoid(score), cache_r)
            else:
                selected = live & (assigned >= r)
                x = self._recursion(x, positions, selected, None, cache_r)
            live = selected
            depth = depth + selected.long()
        if cfg.recursions > 1 and cfg.routing == "token":
            x = torch.lerp(h1, x, exit_weight[..., None].to(x.dtype))
        if bce:
            bce_mean = torch.stack(bce).mean()
            aux = cfg.router_aux_weight * bce_mean
            stats["router_bce"] = float(bce_mean.detach())
            stats["router_agreement"] = float(torch.stack(agree).mean())
        x = dec.run_blocks(x, plan, layers=self.last)
        return dec.norm(x), depth, aux, stats

    # -- training -----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> TrainOutput:
        h, depth, aux, stats = self._run(input_ids, None, None, training_form=True)
        lm_loss = self.decoder.head_loss(h, targets)
        loss = lm_loss if aux is None else lm_loss + aux
        stats["mean_extra_steps"] = float(depth.float().mean()) - 1.0
        return TrainOutput(loss=loss, lm_loss=lm_loss, stats=stats)

    # -- deployed inference -------------------------------------------------------------------

    def new_cache(self, batch_size: int) -> MoRCache:
        # Recursion caches use the backbone's layer indexing; only the middle layers ever get keys.
        return MoRCache(self.decoder.new_cache(batch_size),
                        [self.decoder.new_cache(batch_size) for _ in range(self.config.recursions - 1)])

    def decode(self, input_ids: torch.Tensor, cache: MoRCache, valid: torch.Tensor | None = None) -> DecodeOutput:
        h, depth, _, _ = self._run(input_ids, cache, valid, training_form=False)
        if valid is None:
            logits = self.decoder.head(h)
        else:  # padding is no query: no head either
            logits = h.new_zeros(*h.shape[:-1], self.config.vocab_size)
            logits[valid] = self.decoder.head(h[valid]).to(logits.dtype)
        return DecodeOutput(logits, (depth - 1).clamp_min(0))

    # -- compute ------------------------------------------------------------------------------

    def _stack_flops(self, n_layers: int, queries: float, key_pairs: float) -> float:
        dec = self.decoder
        return n_layers * compute.block_flops(dec.block_matmul_params, dec.layers[0].attn_width, queries, key_pairs)

    def analytic_flops_for_depths(self, depths: torch.Tensor) -> float:
        """Forward FLOPs of deployed inference over rows whose tokens took ``depths`` [B, T] recursions.

        depth 0 marks padding (no token). Recursion r's active tokens see only earlier active tokens.
        """
        d = depths.reshape(-1, depths.shape[-1])
        real = d > 0
        total = 0.0
        for r in range(1, self.config.recursions + 1):
            active = (d >= r) & real
            pairs = float((active.long().cumsum(1) * active).sum())
            n_layers = self.config.n_layers if r == 1 else self.config.n_middle
            total += self._stack_flops(n_layers, float(active.sum()), pairs)
        return total + compute.head_flops(self.config.d_model, self.config.vocab_size, float(real.sum()))

    def decode_flops(self, steps: torch.Tensor | None, valid: torch.Tensor | None = None) -> float:
        depths = steps + 1 if valid is None else torch.where(valid, steps + 1, 0)
        return self.analytic_flops_for_depths(depths)

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Inference: the maximum (every token takes R recursions). Training: see the module docstring."""
        cfg, t = self.config, seq_len
        if not training:
            return self.analytic_flops_for_depths(torch.full((1, t), cfg.recursions)) / t
        total = self._stack_flops(cfg.n_layers, t, compute.causal_key_pairs(t))
        total += compute.head_flops(cfg.d_model, cfg.vocab_size, t)
        for r in range(2, cfg.recursions + 1):
            if cfg.routing == "expert":
                a = float(cfg.tokens_at(r, t))
            else:  # balanced assignment: a fraction (R-r+1)/R of the tokens reaches recursion r
                a = t * (cfg.recursions - r + 1) / cfg.recursions
            total += self._stack_flops(cfg.n_middle, a, a * (a + 1) / 2)
        return total / t
