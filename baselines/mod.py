"""Mixture-of-Depths (Raposo, Ritter, Richards, Lillicrap, Humphreys, Santoro 2024, arXiv 2404.02258).

No official code: implemented from the paper; the class docstring's table says what is taken from it,
what is decided here where it is silent, and why. Only what differs from the backbone is here.

Routed blocks (Sec. 3.4, eq. 1). Some blocks of the L-layer backbone are *routed* (``route_every``: every
other block, the paper's best setting). A routed block l has a router, a bias-free Linear(d, 1) that gives
every token a scalar weight r_i = w_l^T x_i from the block's input residual stream. In training, the k
tokens of the row with the largest r_i (k = max(1, int(``capacity`` x T)), capacity 12.5%, the paper's
best) go through the block and the others skip it on the residual:

    x_i <- x_i + r_i f_i(X~)   if i is among the top-k,        x_i <- x_i   otherwise,

f being the block's whole residual branch, self-attention and the MLP after it (f(x) = Block(x) - x for
the backbone's pre-norm block), and X~ the chosen tokens only: they are gathered in causal order at their
own RoPE positions and attend only to each other (the others are neither queries nor keys there). The raw
router weight r_i, not a sigmoid of it, multiplies f: that puts the router on the LM loss's gradient path
(Sec. 3.4).

Causal decisions (Sec. 3.5). Top-k over the row looks at later tokens, so deployed decoding decides per
token, from its prefix only, with one of the paper's two rules (``causal_rule``):

* ``"predictor"`` (default): a small MLP per routed block, Linear(d, h) -> SiLU -> Linear(h, 1), reads the
  router's input under a stop-gradient and is trained with binary cross-entropy to predict top-k
  membership; a token takes the block iff its logit >= 0 (probability >= 0.5). The LM objective is
  untouched (the paper: the auxiliary-loss rule costs it ~0.2-0.3%), and the paper's autoregressive
  evaluation uses this predictor-based sampling.
* ``"aux_loss"``: binary cross-entropy of the router's own logits against top-k membership; a token takes
  the block iff sigmoid(r_i) >= 0.5, i.e. r_i >= 0.

``forward`` always uses top-k (the training computation; its ``lm_loss`` under eval is what the harness
records as ``parallel_val_loss``, the paper's training-form number); ``decode``/``score`` use the causal
rule (``val_loss``). Stats: ``causal_agreement`` (how often the causal rule agrees with top-k, the paper's
prediction accuracy) and ``causal_fraction`` (the share of tokens the causal rule would route through:
deployed compute follows it, not the capacity).

Cached decoding keeps one KV cache per routed block holding only the tokens that took it (a call gathers
them into as many new slots as its busiest row needs; a row's unused slots are no keys); unrouted blocks
share the main cache. ``decode`` reports ``participation`` [B, n, U] (token ran routed block u) and
``steps`` = its row sum, so ``max_extra_steps()`` = U, the number of routed blocks.

Compute (ledger, :meth:`decode_flops`, :meth:`analytic_flops_per_token`): unrouted blocks over every real
token (causal); routed block u over its participants with a_u(a_u+1)/2 causal pairs per row (each sees the
participants at or before it); the head over real tokens; and as ``other`` FLOPs the routing matmuls. In
deployed decoding the rule's scorer (router, or predictor 2h(d+1)) runs on every real token at every
routed block and, under the predictor rule, the router (2d) only on the participants, whose weight it
gives. Training runs router (and predictor) on every token. Capacity top-k fixes the routed counts, so the
training count is exact.
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

CAUSAL_RULES = ("predictor", "aux_loss")
# router_aux_weight when unset, per rule: the BCE is what makes r >= 0 mean "in the top-k" under aux_loss.
# 0.01: the paper gives no weight; MoR's reference trains the same BCE (sigmoid router against top-k) at 0.001
# per micro-batch, i.e. 0.001 x A per optimizer step: 0.008 at its A = 8 accumulation steps (baselines/mor.py).
DEFAULT_ROUTER_AUX_WEIGHT = {"aux_loss": 0.01, "predictor": 0.0}


@dataclass
class MoDConfig(ModelConfig):
    summary = "Mixture-of-Depths: top-k capacity routing around every other block (causal rule at inference)"

    capacity: float = 0.125  # fraction of a row's tokens through each routed block in training (paper: 12.5%)
    route_every: int = 2  # block i is routed iff i % route_every == route_every - 1 (2: blocks 1, 3, 5, ...)
    causal_rule: str = "predictor"  # deployed decision: "predictor" (MLP, stop-gradient) | "aux_loss" (r >= 0)
    # BCE of the router logits against top-k membership, mean over routed blocks; None = 0.01 under aux_loss,
    # 0 under predictor (DEFAULT_ROUTER_AUX_WEIGHT); positive under predictor adds it too.
    router_aux_weight: float | None = None
    predictor_weight: float = 1.0  # BCE of the predictor (causal_rule="predictor"), mean over routed blocks
    predictor_hidden: int | None = None  # the predictor MLP's width; None = d_model // 2

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "capacity", 0.0 < self.capacity <= 1.0, "must be in (0, 1] (the paper's best: 0.125)")
        require(self, "route_every", isinstance(self.route_every, int) and 1 <= self.route_every <= self.n_layers,
                f"must be an integer in 1..n_layers={self.n_layers} (1: every block routed, 2: every other)")
        require(self, "causal_rule", self.causal_rule in CAUSAL_RULES, f"must be one of {', '.join(CAUSAL_RULES)}")
        require(self, "router_aux_weight", self.router_aux_weight is None or self.router_aux_weight >= 0,
                "must be non-negative, or None for the rule's default")
        require(self, "router_aux_weight", self.causal_rule != "aux_loss" or self.aux_weight > 0,
                "must be positive with causal_rule=aux_loss: the BCE is what trains r >= 0 to mean top-k")
        require(self, "predictor_weight", self.predictor_weight > 0, "must be positive")
        require(self, "predictor_hidden", self.predictor_hidden is None or self.predictor_hidden >= 1,
                "must be a positive integer, or None for d_model // 2")

    @property
    def routed_layers(self) -> tuple[int, ...]:
        """The routed blocks (0-based), in order: routed unit u is block routed_layers[u]."""
        return tuple(i for i in range(self.n_layers) if i % self.route_every == self.route_every - 1)

    @property
    def aux_weight(self) -> float:
        """The router BCE's weight in force: ``router_aux_weight``, or the rule's default."""
        return DEFAULT_ROUTER_AUX_WEIGHT[self.causal_rule] if self.router_aux_weight is None else self.router_aux_weight

    @property
    def hidden(self) -> int:
        """The predictor's width in force: ``predictor_hidden``, or d_model // 2."""
        return max(1, self.d_model // 2) if self.predictor_hidden is None else self.predictor_hidden

    def tokens_per_block(self, seq_len: int) -> int:
        """k: the tokens of a length-``seq_len`` row that take each routed block in training."""
        return max(1, int(self.capacity * seq_len))


@dataclass
class MoDCache:
    """The main cache (unrouted blocks, one slot per token) and one per routed block (its participants only)."""

    main: KVCache
    routed: list[KVCache]


def top_k_membership(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T] bool: the k largest ``scores`` of each row (the tokens above the row's percentile, eq. 1)."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(k, dim=1).indices, True)


@register("mod")
class MixtureOfDepths(LanguageModel):
    """Mixture-of-Depths: top-k capacity routing around every other block, a causal rule at inference.

    ====================================  ====================================  ==================================
    reference (the paper)                 here                                  why
    ====================================  ====================================  ==================================
    route every other block (its best)    ``route_every=2``: blocks 1, 3, 5..   silent on which of a pair: block 0
                                            (pico, 3 layers: block 1 only;        stays full, so every router reads
                                            nano: 1, 3, 5)                        context, not bare embeddings
    capacity 12.5% of the sequence        ``capacity=0.125``, k = max(1,        the paper's best; k >= 1 so short
      (its best)                            int(0.125 T)) per row (16 at 128)     rows still route
    r_i = w^T x_i, a scalar per token     bias-free Linear(d, 1) on the         eq. 1 as written; silent on norm
                                            block's input; the backbone's init    and init: one init rule
    x + r_i f(x) for the top-k, f =       f(x) = Block(x) - x (attention and    eq. 1: the raw weight puts the
      attention and MLP; others pass        MLP residuals), times raw r_i (no     router on the gradient path
      unchanged                             sigmoid)                              (Sec. 3.4)
    chosen tokens attend among            gathered in causal order at their     only X~ enters f (eq. 1); the
      themselves                            RoPE positions; a KV cache per        ledger counts exactly those pairs
                                            routed block holds only them
    causal sampling (Sec. 3.5): (a) BCE   both (``causal_rule``); default       the predictor leaves the LM loss
      on router logits, r > 0; (b) MLP      "predictor": logit >= 0 decides       as trained (the BCE costs it
      predictor, stop-gradient input                                              0.2-0.3%); its autoregressive
                                                                                  evaluation samples this way
    loss weights: not given               BCE means over routed blocks; router  depth-independent; about MoR's
                                            0.01 (aux_loss), predictor 1.0        effective BCE weight; predictor
                                                                                  loss trains only the predictor
    predictor: "a small auxiliary MLP"    Linear(d, d/2), SiLU, Linear(d/2, 1)  ~4% of a pico block's FLOPs;
                                            with biases                           biases learn the 12.5% base rate
    perplexity of the top-k model         val_loss: causal rule (deployed);     top-k sees the future; both are
                                            parallel_val_loss: top-k              recorded
    ~1B isoFLOP models, 2048 tokens       the CPU ladder's shapes (vanilla's)   compared at measured FLOPs
    MoDE, stochastic/no-router variants   not offered                           not the paper's best MoD
    no padding in training                padding neither routed nor counted    padded scoring and decoding
    ====================================  ====================================  ==================================
    """

    Config = MoDConfig
    depth_baseline = True  # claim C2 compares PonderLM-3 with it at equal FLOPs
    adaptive = True
    test_variants = {"aux_loss": {"causal_rule": "aux_loss"},
                     # three routed units: participation carries more than the step count
                     "every_block": {"route_every": 1},
                     "every_block_aux_gqa": {"route_every": 1, "causal_rule": "aux_loss", "capacity": 0.5,
                                             "n_heads": 4, "n_kv_heads": 2}}

    def __init__(self, config: MoDConfig):
        super().__init__(config)
        c = config
        self.routed = c.routed_layers
        self.unit_of = {layer: u for u, layer in enumerate(self.routed)}
        self.routers = nn.ModuleList(nn.Linear(c.d_model, 1, bias=False) for _ in self.routed)
        self.predictors = nn.ModuleList()
        if c.causal_rule == "predictor":
            self.predictors.extend(nn.Sequential(nn.Linear(c.d_model, c.hidden), nn.SiLU(), nn.Linear(c.hidden, 1))
                                   for _ in self.routed)
        for linear in [*self.routers, *(m for p in self.predictors for m in p if isinstance(m, nn.Linear))]:
            init_linear(linear, c)
        self.forced_steps: int | None = None

    # -- declarations ---------------------------------------------------------------------------

    def max_extra_steps(self) -> int:
        return len(self.routed)

    def force_steps(self, steps: int) -> None:
        """Deployed inference: every token takes the first ``steps`` routed blocks and skips the rest.

        Only the decisions are overridden: the rule's scorer still runs on every token (so what a token costs
        stays a function of its participation) and the router still scales the chosen tokens' updates.
        """
        if not 0 <= steps <= len(self.routed):
            raise ValueError(f"cannot force {steps} routed blocks: the model routes {len(self.routed)}")
        self.forced_steps = steps

    # -- routing --------------------------------------------------------------------------------

    @property
    def _predictor_flops(self) -> float:
        """Matmul FLOPs of one predictor call on one token: 2 h (d + 1)."""
        return 2.0 * self.config.hidden * (self.config.d_model + 1)

    @staticmethod
    def _on_rows(fn: nn.Module, x: torch.Tensor, rows: torch.Tensor, flops_per_row: float) -> torch.Tensor:
        """fn(x)[..., 0] in float32 [B, n], computed and counted on ``rows`` [B, n] only (0 elsewhere)."""
        compute.record_matmul(flops_per_row * compute.as_count(rows))
        if bool(rows.all()):
            return fn(x)[..., 0].float()
        index, ok = compact(rows)
        out = fn(x.gather(1, index[..., None].expand(-1, -1, x.shape[-1])))[..., 0].float().masked_fill(~ok, 0.0)
        return out.new_zeros(rows.shape).scatter(1, index, out)

    def _route(self, x: torch.Tensor, layer: int, positions: torch.Tensor, live: torch.Tensor,
               cache: MoDCache | None, training_form: bool, terms: dict[str, list[torch.Tensor]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed block ``layer`` on x [B, n, d] (eq. 1). Returns (x, chosen [B, n] bool).

        ``training_form``: top-k of the router weights over the row, and the auxiliary terms; otherwise the
        causal rule (or the forced steps), per token.
        """
        cfg, dec, u = self.config, self.decoder, self.unit_of[layer]
        router = self.routers[u]
        predictor = self.predictors[u] if len(self.predictors) else None
        d = cfg.d_model
        weight = None  # router weights [B, n] where computed for every token
        if training_form:
            weight = self._on_rows(router, x, live, 2.0 * d)
            chosen = top_k_membership(weight, cfg.tokens_per_block(x.shape[1]))
            target = chosen.float()
            if cfg.aux_weight > 0:
                terms["router_bce"].append(F.binary_cross_entropy_with_logits(weight, target))
            decider = weight
            if predictor is not None:  # stop-gradient: the predictor never shapes the residual stream
                decider = self._on_rows(predictor, x.detach(), live, self._predictor_flops)
                terms["predictor_bce"].append(F.binary_cross_entropy_with_logits(decider, target))
            terms["causal_agreement"].append(((decider >= 0) == chosen).float().mean())
            terms["causal_fraction"].append((decider >= 0).float().mean())
        else:
            if predictor is None:
                decider = weight = self._on_rows(router, x, live, 2.0 * d)
            else:
                decider = self._on_rows(predictor, x, live, self._predictor_flops)
            if self.forced_steps is not None:
                chosen = live & (u < self.forced_steps)
            else:  # sigmoid(logit) >= 0.5 <=> logit >= 0, decided per token from its prefix
                chosen = live & (decider >= 0)
        index, ok = compact(chosen)
        if index.shape[1] == 0:  # no token takes the block: nothing runs, no cache slot is allocated
            return x, chosen
        full = bool(ok.all())
        gather = index[..., None].expand(-1, -1, x.shape[-1])
        xs = x.gather(1, gather)
        if weight is None:  # predictor rule at inference: the router runs on the chosen tokens only
            compute.record_matmul(2.0 * d * compute.as_count(ok))
            r = router(xs)[..., 0].float()
        else:
            r = weight.gather(1, index)
        own = None if cache is None else cache.routed[u]
        plan = dec.plan(positions.gather(1, index), cache=own, key_valid=None if full else ok)
        ys = dec.run_blocks(xs, plan, layers=range(layer, layer + 1))
        ys = xs + r[..., None].to(ys.dtype) * (ys - xs)  # x + r f(x), f the block's residual branch
        if not full:  # a row's tail entries point at tokens that skip the block: leave them untouched
            ys = torch.where(ok[..., None], ys, xs)
        return x.scatter(1, gather, ys), chosen

    def _run(self, input_ids: torch.Tensor, cache: MoDCache | None, valid: torch.Tensor | None,
             training_form: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Embed -> blocks (routed ones per :meth:`_route`) -> norm. Returns (h, participation [B, n, U], terms)."""
        dec = self.decoder
        b, n = input_ids.shape
        offset = 0 if cache is None else cache.main.length
        positions = dec.positions_after(offset, b, n, input_ids.device)
        live = torch.ones(b, n, dtype=torch.bool, device=input_ids.device) if valid is None else valid
        plan = dec.plan(positions, cache=None if cache is None else cache.main, key_valid=valid)
        x = dec.embed(input_ids)
        chosen, terms = [], {k: [] for k in ("router_bce", "predictor_bce", "causal_agreement", "causal_fraction")}
        for layer in range(self.config.n_layers):
            if layer in self.unit_of:
                x, ran = self._route(x, layer, positions, live, cache, training_form, terms)
                chosen.append(ran)
            else:
                x = dec.run_blocks(x, plan, layers=range(layer, layer + 1))
        return dec.norm(x), torch.stack(chosen, dim=-1), {k: torch.stack(v).mean() for k, v in terms.items() if v}

    # -- training -------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> TrainOutput:
        cfg = self.config
        h, participation, terms = self._run(input_ids, None, None, training_form=True)
        lm_loss = self.decoder.head_loss(h, targets)
        weights = {"router_bce": cfg.aux_weight, "predictor_bce": cfg.predictor_weight}
        added = [weights[k] * v for k, v in terms.items() if k in weights]
        loss = (lm_loss + torch.stack(added).sum()) if added else lm_loss
        stats = {k: float(v.detach()) for k, v in terms.items()}
        stats["mean_extra_steps"] = float(participation.float().sum(-1).mean())
        return TrainOutput(loss=loss, lm_loss=lm_loss, stats=stats)

    # -- deployed inference ---------------------------------------------------------------------

    def new_cache(self, batch_size: int) -> MoDCache:
        # Each routed cache is indexed by decoder layer like the main one; only its own block's layer gets keys.
        return MoDCache(self.decoder.new_cache(batch_size), [self.decoder.new_cache(batch_size) for _ in self.routed])

    def decode(self, input_ids: torch.Tensor, cache: MoDCache, valid: torch.Tensor | None = None) -> DecodeOutput:
        h, participation, _ = self._run(input_ids, cache, valid, training_form=False)
        return DecodeOutput(self.decoder.head(h, valid), participation.sum(-1), participation)

    # -- compute --------------------------------------------------------------------------------

    def flops_for_participation(self, participation: torch.Tensor, real: torch.Tensor) -> float:
        """Forward FLOPs of deployed decoding of fresh rows whose real tokens ``real`` [B, T] ran the routed
        blocks ``participation`` [B, T, U] marks (module docstring, "Compute")."""
        cfg, dec = self.config, self.decoder
        part = participation & real[..., None]
        n_real, pairs = compute.active_key_pairs(real)  # each participant sees the participants at or before it
        total = dec.layers_flops(cfg.n_layers - len(self.routed), n_real, pairs)
        total += sum(dec.layers_flops(1, *compute.active_key_pairs(part[..., u])) for u in range(len(self.routed)))
        if len(self.predictors):  # the predictor decides on every real token, the router weighs the chosen
            total += len(self.routed) * n_real * self._predictor_flops + 2.0 * cfg.d_model * float(part.sum())
        else:
            total += len(self.routed) * n_real * 2.0 * cfg.d_model
        return total + compute.head_flops(cfg.d_model, cfg.vocab_size, n_real)

    def decode_flops(self, steps: torch.Tensor | None, valid: torch.Tensor | None = None,
                     participation: torch.Tensor | None = None) -> float:
        """From ``participation`` alone (``steps`` is its row sum and says too little: which blocks a token
        ran decides whom it attends to)."""
        if participation is None:
            raise ValueError("MixtureOfDepths.decode_flops needs the participation that decode reported")
        real = torch.ones(participation.shape[:2], dtype=torch.bool) if valid is None else valid.cpu()
        return self.flops_for_participation(participation.cpu(), real)

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Inference: the maximum (every token runs every routed block). Training: top-k, k per row and block,
        router (and predictor) on every token."""
        cfg, t = self.config, seq_len
        if not training:
            everything = torch.ones(1, t, len(self.routed), dtype=torch.bool)
            return self.flops_for_participation(everything, torch.ones(1, t, dtype=torch.bool)) / t
        dec, k, u = self.decoder, cfg.tokens_per_block(t), len(self.routed)
        total = dec.layers_flops(cfg.n_layers - u, t, compute.causal_key_pairs(t))
        total += dec.layers_flops(u, k, compute.causal_key_pairs(k))
        total += u * t * (2.0 * cfg.d_model + (self._predictor_flops if len(self.predictors) else 0.0))
        return (total + compute.head_flops(cfg.d_model, cfg.vocab_size, t)) / t
