"""Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524): a shared block of layers applied 1..R times per token.

Reference code: the authors' ``mixture_of_recursions`` repository -- ``model/sharing_strategy/llama.py``
(``sharing_strategy``), ``model/mor_model/modeling_llama.py`` (``MoRLlamaModel.forward``,
``transform_layer_to_mor_expert``/``_token``), ``model/mor_model/expert_choice_router.py`` and
``token_choice_router.py`` (``MoRLlamaDecoderLayer.forward``), ``model/mor_model/util.py``
(``LinearRouter``), ``util/trainer_pt.py`` (``training_step``: how the auxiliary losses enter), at its
released configs (``conf/pretrain/250720_pretrain_smollm-360m_rec3_middle_cycle_random_lr3e-3_mor_*.yaml``).
The class docstring ends with what differs and why.

Layers (Middle-Cycle sharing, Sec. 2.1; ``sharing_strategy``): of a backbone of ``n_layers`` = L layers, the
first ``unshared_first`` and last ``unshared_last`` (1 and 1, as in the reference) stay unshared, and the
M = L - 2 middle layers become ONE block of M/R layers (``recursions`` R) that a token goes through 1..R
times. M/R must be whole: the config says so (the reference instead drops layers with a warning). MoR
therefore holds 1/R of the backbone's middle parameters and runs at most 2 + R x M/R = L layers per token,
the vanilla model's depth. The kept layers are initialised as the L-layer backbone's (the reference builds
the L-layer model and ties recursion r's copies to the first). R = 1 is exactly the backbone (no router).

Routing (config ``routing``), for R >= 2:

* ``"expert"`` (expert-choice, ``expert_choice_router.py``, ``MoRLlamaDecoderLayer.forward``). Every
  recursion r = 1..R has its own router Linear(d, 1, no bias) that scores the candidates (the tokens selected
  at r-1; every token at r = 1): router weight g = ``expert_alpha`` x sigmoid(score) (alpha = 0.1). Training
  keeps the top-k_r candidates, k_r = max(1, int(capacity_r x T)), gathers them in causal order at their
  original RoPE positions, runs the block over them (they attend only to each other) and ADDS the gated
  block output, its residual included: H <- H + g f(H) (the reference's ``scatter_add`` of
  ``top_k_tokens_processed * weights``). Unselected tokens keep H. Recursion 1 is routed too: the capacity
  schedule keeps every token there, but its update is scaled by its router weight like any other.
  Auxiliary loss (``sampling: aux_loss``): BCE with logits of each router against top-k membership of its
  candidates, mean over the candidates, SUMMED over the R recursions, weight ``router_aux_weight`` = 0.001.
  Top-k looks at the whole sequence, future included, so deployed decoding decides causally: a candidate
  takes recursion r iff sigmoid(score) >= 0.5 (``INFERENCE_THRESHOLD``, the reference's ``sampling_acc``
  prediction), except at a recursion whose capacity is 1.0 (recursion 1), which keeps every candidate, as
  training does. The ``forward`` pass always uses top-k (it is the training computation; its ``lm_loss``
  under eval is the parallel loss); ``score``/``decode`` use the threshold. Stat ``router_agreement``: how
  often the two rules agree at the recursions the threshold decides.
* ``"token"`` (token-choice, ``token_choice_router.py``). One router Linear(d, R, no bias) reads H^1, the
  shared block's input, and picks a depth i = argmax of softmax(logits) once per token; g = the chosen
  probability. The token takes recursions 1..i (only tokens of depth >= r are keys and queries at r) and
  leaves with H^1 + g F_i(H^1), F_i(H^1) being the block's output after i recursions (the reference's
  ``final_x`` = x plus ``finished_x * finished_w``). Balancing loss (``balancing: loss``): R sum_i f_i P_i
  (f_i = fraction of tokens with depth i, P_i = mean router probability of depth i), weight
  ``balance_weight`` = 0.1. The routing is per token and causal: training and inference compute the same.

Router z-loss (``z_loss``/``z_coeff``): mean over routed tokens of logsumexp(router logits)^2 (for the
expert-choice's one logit: the logit squared, summed over recursions), weight ``router_z_weight``; unset =
the released configs': 1e-5 for token-choice, off for expert-choice. Each auxiliary loss enters once per
batch: the reference divides it by num_items_in_batch / (B T), its number of accumulated micro-batches,
which is 1 for one batch.

Recursion-wise KV caching (Sec. 2.2.2): in recursion r only the tokens that take it are keys and queries.
Training gathers them; cached decoding keeps one KV cache per recursion r >= 2 (recursion 1, which every
token takes, shares the main cache with the unshared layers), and a token that exits before r writes no KV
at r: each decode call gathers the tokens active at r into as many new slots as the busiest batch row
needs, a row's unused slots are marked not-a-key (and are no query). A call where no token is active at r
allocates nothing there.

Compute (ledger and :meth:`analytic_flops_for_depths`): the unshared layers over every real token
(causal), recursion r's M/R layers over the a_r tokens that take it with a_r(a_r+1)/2 causal pairs, the
head over real tokens, and the routers' matmuls, recorded as ``other`` FLOPs like PonderLM-3's router:
expert-choice 2d per candidate per recursion (recursion r's router runs on the tokens that took r-1, every
token for r = 1 and 2), token-choice 2dR per token. Training FLOPs: expert-choice is exact (k_r is fixed by
T); token-choice depends on the learned routing, so :meth:`analytic_flops_per_token` (training) assumes
the balanced split the balancing loss drives towards (a fraction (R-r+1)/R of tokens at recursion r) --
the ledger measures the real value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import compute
from harness.core.config import ModelConfig, require
from harness.core.registry import register
from models.backbone import AttentionPlan, KVCache
from models.base import DecodeOutput, LanguageModel, TrainOutput
from models.shared import compact, init_linear

INFERENCE_THRESHOLD = 0.5  # expert-choice at inference: continue iff sigmoid(router) >= 0.5 (BCE target)
ROUTINGS = ("expert", "token")
# The released configs' router z-loss weight (mor.z_loss / mor.z_coeff) per routing, when router_z_weight is unset.
REFERENCE_Z_WEIGHT = {"expert": 0.0, "token": 1e-5}


@dataclass
class MoRConfig(ModelConfig):
    summary = "Mixture-of-Recursions: a shared block of (L-2)/R layers applied 1..R times per token (routed)"

    recursions: int = 3  # R: most applications of the shared block; 1 = the plain backbone
    routing: str = "expert"  # "expert" (expert-choice top-k, causal threshold at inference) | "token"
    # Expert-choice: fraction of the sequence's tokens that take recursion r = 1..R. () = the reference's
    # linear schedule (R-r+1)/R; one value rho = geometric (rho^(r-1)); R values = explicit, first 1.0.
    capacity: tuple[float, ...] = ()
    unshared_first: int = 1  # leading unshared layers (Middle-Cycle: 1)
    unshared_last: int = 1  # trailing unshared layers (Middle-Cycle: 1)
    expert_alpha: float = 0.1  # expert-choice router weight = alpha x sigmoid(score) (mor.expert.alpha)
    router_aux_weight: float = 0.001  # expert-choice BCE, summed over recursions (mor.expert.coeff)
    balance_weight: float = 0.1  # token-choice balancing loss (mor.token.coeff)
    router_z_weight: float | None = None  # router z-loss; None = the released config's (REFERENCE_Z_WEIGHT)

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
        require(self, "router_z_weight", self.router_z_weight is None or self.router_z_weight >= 0,
                 "must be non-negative, or None for the reference's weight")
        require(self, "expert_alpha", self.expert_alpha > 0, "must be positive")
        cap = tuple(float(c) for c in self.capacity)
        self.capacity = cap
        require(self, "capacity", len(cap) in (0, 1, self.recursions),
                 f"give no value (linear schedule), one ratio, or recursions={self.recursions} values")
        require(self, "capacity", all(0.0 < c <= 1.0 for c in cap), "every ratio must be in (0, 1]")
        if len(cap) == self.recursions and self.recursions > 1:
            require(self, "capacity", cap[0] == 1.0, "recursion 1 keeps every token: the first value must be 1.0")
            require(self, "capacity", all(a >= b for a, b in zip(cap, cap[1:])),
                     "must be non-increasing (routing is nested)")
        # Last, so a bad value of another field is reported as that field.
        uf, ul, r = self.unshared_first, self.unshared_last, self.recursions
        fit = uf + ul + r * max(1, round(self.n_middle / r))
        require(self, "n_layers", self.n_middle % r == 0,
                f"with recursions={r}, n_layers - unshared_first - unshared_last = {self.n_middle} middle layers must "
                f"split into {r} equal recursions (Middle-Cycle shares (n_layers-2)/R layers); use n_layers = {uf + ul}"
                f" + a multiple of {r} (e.g. {fit}) or recursions dividing {self.n_middle}")

    @property
    def capacity_schedule(self) -> tuple[float, ...]:
        """Fraction of the sequence taking recursion r, for r = 1..R (util/config.py: (R-r+1)/R by default)."""
        r_max = self.recursions
        if not self.capacity:
            return tuple((r_max - r + 1) / r_max for r in range(1, r_max + 1))
        if len(self.capacity) == 1 and r_max > 1:
            return tuple(self.capacity[0] ** (r - 1) for r in range(1, r_max + 1))
        return self.capacity

    def tokens_at(self, r: int, seq_len: int) -> int:
        """Expert-choice training: k_r, the tokens of a length-``seq_len`` row that take recursion r
        (``top_k = max(1, int(capacity_factor * seq_len))`` in MoRLlamaDecoderLayer.forward)."""
        return max(1, int(self.capacity_schedule[r - 1] * seq_len))

    @property
    def n_middle(self) -> int:
        """M: the backbone's layers between the unshared ones (compute depth of one token taking every recursion)."""
        return self.n_layers - self.unshared_first - self.unshared_last

    @property
    def n_shared(self) -> int:
        """Layers of the shared block: M / R (``base_depth`` of the reference's middle_cycle sharing)."""
        return self.n_middle // self.recursions

    @property
    def z_weight(self) -> float:
        """The router z-loss weight in force: ``router_z_weight``, or the released config's for the routing."""
        return REFERENCE_Z_WEIGHT[self.routing] if self.router_z_weight is None else self.router_z_weight


@dataclass
class MoRCache:
    """Main cache (unshared layers + recursion 1, one slot per token) and one cache per recursion >= 2."""

    main: KVCache
    recursions: list[KVCache]


@register("mor")
class MixtureOfRecursions(LanguageModel):
    """Mixture-of-Recursions: unshared first/last layers, a shared block of (L-2)/R layers applied 1..R times.

    What differs from the reference code (module docstring), and why:

    ==========================================  ==================================  ==========================
    reference behaviour                         here                                why
    ==========================================  ==================================  ==========================
    (L-2)/R not whole: drops layers, warns      ConfigError naming both fields      no silent model change
    MoR needs R >= 2 (util/config.py)           R = 1 is the backbone, no router    equality check vs vanilla
    expert-choice top-k also at evaluation      sigmoid >= 0.5 at inference         top-k sees the future
    capacity: any non-increasing schedule       first value 1.0                     all take recursion 1
    aux losses / (num_items_in_batch / (B T))   once per batch                      one batch: the factor is 1
    router init N(0, initializer_range)         the backbone's rule (init_linear)   one init rule
    warm-ups, loss-free balancing, MLP routers  not offered                         unused by released configs
    KV sharing, LoRA relaxation, temperature    not offered (temperature 1)         unused by released configs
    no padding in training batches              padding neither routed nor counted  padded scoring, decoding
    ==========================================  ==================================  ==========================
    """

    Config = MoRConfig
    reference_weight_decay = 0.1  # mixture_of_recursions, conf/pretrain/*_smollm-360m_*.yaml
    adaptive = True
    # n_layers - 2 = 3 splits into the default 3 recursions (the contract's tiny config has 3 layers)
    test_base = {"n_layers": 5}
    test_variants = {"token": {"routing": "token"}, "r1": {"recursions": 1, "n_layers": 3},
                     "r1_token": {"recursions": 1, "routing": "token", "n_layers": 3},
                     "r2_gqa_capacity": {"recursions": 2, "n_layers": 5, "unshared_last": 0, "n_heads": 4,
                                         "n_kv_heads": 2, "capacity": (0.5,)}}

    def max_extra_steps(self) -> int:
        return self.config.recursions - 1

    def force_steps(self, steps: int) -> None:
        """Deployed inference: every token takes exactly steps + 1 recursions from now on.

        Only the routing decisions are overridden; the routers still run and their weights still scale the
        updates (expert-choice g, token-choice the probability of the forced depth). Training is unaffected.
        """
        depth = steps + 1
        if not 1 <= depth <= self.config.recursions:
            raise ValueError(f"cannot force {steps} extra recursions with recursions={self.config.recursions}")
        self.forced_depth = depth

    def training_flops_exact(self) -> bool:
        """Token choice's training cost follows the learned routing (the analytic count is balanced)."""
        return self.config.routing == "expert" or self.config.recursions == 1

    def __init__(self, config: MoRConfig):
        super().__init__(config)
        c = config
        # The decoder was built and initialised as the L-layer backbone; keep its first unshared layers, ONE
        # copy of the shared block and its last unshared layers (sharing_strategy ties the other copies to it).
        kept = [*range(c.unshared_first + c.n_shared), *range(c.n_layers - c.unshared_last, c.n_layers)]
        self.decoder.layers = nn.ModuleList(self.decoder.layers[i] for i in kept)
        self.first = range(0, c.unshared_first)
        self.middle = range(c.unshared_first, c.unshared_first + c.n_shared)
        self.last = range(c.unshared_first + c.n_shared, len(kept))
        self.forced_depth: int | None = None
        if c.recursions == 1:
            outputs = []
        else:  # LinearRouter: one per recursion (expert) or one over the R depths (token), no bias
            outputs = [1] * c.recursions if c.routing == "expert" else [c.recursions]
        self.routers = nn.ModuleList(nn.Linear(c.d_model, k, bias=False) for k in outputs)
        for router in self.routers:
            init_linear(router, c)

    # -- the recursion stack ------------------------------------------------------------------

    @staticmethod
    def _router_logits(router: nn.Linear, x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """router(x) in float32 [B, n, out] for the ``candidates`` [B, n] only (0 elsewhere).

        The reference runs each router on its candidates only (x gathered by ``prev_selected_tokens``); the
        ledger counts 2 d out FLOPs per candidate (padding rows of a gathered batch are no candidates).
        """
        compute.record_matmul(2.0 * router.in_features * router.out_features * compute.as_count(candidates))
        if bool(candidates.all()):
            return router(x).float()
        index, ok = compact(candidates)
        xs = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        out = router(xs).float().masked_fill(~ok[..., None], 0.0)
        full = out.new_zeros(*candidates.shape, router.out_features)
        return full.scatter(1, index[..., None].expand(-1, -1, router.out_features), out)

    def _recursion(self, x: torch.Tensor, positions: torch.Tensor, active: torch.Tensor,
                   weight: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        """One application of the shared block to the ``active`` tokens only (recursion-wise KV).

        The active tokens are gathered in causal order at their original RoPE positions, so they see only
        each other. With expert-choice router weights ``weight`` [B, n] their state becomes H + g f(H)
        (expert_choice_router.py, STEP 5); without (token-choice) it becomes f(H).
        """
        index, ok = compact(active)
        if index.shape[1] == 0:
            return x
        full = bool(ok.all())
        gather = index[..., None].expand(-1, -1, x.shape[-1])
        xs = x.gather(1, gather)
        plan = self.decoder.plan(positions.gather(1, index), cache=cache, key_valid=None if full else ok)
        ys = self.decoder.run_blocks(xs, plan, layers=self.middle)
        if weight is not None:
            ys = xs + weight.gather(1, index)[..., None].to(ys.dtype) * ys
        if not full:  # a row's padding entries point at inactive tokens: leave those untouched
            ys = torch.where(ok[..., None], ys, xs)
        return x.scatter(1, gather, ys)

    def _expert(self, x: torch.Tensor, positions: torch.Tensor, plan: AttentionPlan, live: torch.Tensor,
                cache: MoRCache | None, training_form: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Expert-choice recursions 1..R. Returns (x, depth [B, n], auxiliary terms)."""
        cfg, n = self.config, x.shape[1]
        depth = torch.zeros_like(live, dtype=torch.long)
        candidates = live
        bce, z, agree = [], [], []
        for r in range(1, cfg.recursions + 1):
            if not bool(candidates.any()):
                break
            score = self._router_logits(self.routers[r - 1], x, candidates)[..., 0]
            keeps_all = cfg.capacity_schedule[r - 1] >= 1.0
            if training_form:
                chosen = score.masked_fill(~candidates, float("-inf")).topk(cfg.tokens_at(r, n), dim=1).indices
                selected = torch.zeros_like(candidates).scatter(1, chosen, True)
                s, target = score[candidates], selected[candidates]
                bce.append(F.binary_cross_entropy_with_logits(s, target.float()))
                z.append(s.square().mean())  # logsumexp over one logit is the logit
                if not keeps_all:
                    agree.append(((s >= 0) == target).float().mean())
            elif self.forced_depth is not None:
                selected = candidates & (r <= self.forced_depth)
            elif keeps_all:
                selected = candidates
            else:  # sigmoid(score) >= 0.5  <=>  score >= 0, decided per token, causally
                selected = candidates & (score >= 0)
            weight = cfg.expert_alpha * torch.sigmoid(score)
            if r == 1:  # every real token (capacity 1.0): the main plan and cache, H + g f(H)
                x = x + weight[..., None].to(x.dtype) * self.decoder.run_blocks(x, plan, layers=self.middle)
            else:
                x = self._recursion(x, positions, selected, weight, None if cache is None else cache.recursions[r - 2])
            depth = depth + selected.long()
            candidates = selected
        aux = {}
        if bce:
            aux["router_bce"] = torch.stack(bce).sum()
            aux["router_z_loss"] = torch.stack(z).sum()
        if agree:
            aux["router_agreement"] = torch.stack(agree).mean()
        return x, depth, aux

    def _token(self, x: torch.Tensor, positions: torch.Tensor, plan: AttentionPlan, live: torch.Tensor,
               cache: MoRCache | None, training_form: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Token-choice recursions 1..R. Returns (x, depth [B, n], auxiliary terms)."""
        cfg = self.config
        h1 = x
        logits = self._router_logits(self.routers[0], x, live)
        probs = torch.softmax(logits, dim=-1)
        if not training_form and self.forced_depth is not None:
            choice = torch.full_like(live, self.forced_depth - 1, dtype=torch.long)
        else:
            choice = probs.argmax(dim=-1)
        gate = probs.gather(-1, choice[..., None])
        assigned = choice + 1
        x = self.decoder.run_blocks(x, plan, layers=self.middle)  # recursion 1: every token, unscaled
        depth = live.long()
        for r in range(2, cfg.recursions + 1):
            selected = live & (assigned >= r)
            x = self._recursion(x, positions, selected, None, None if cache is None else cache.recursions[r - 2])
            depth = depth + selected.long()
        x = h1 + gate.to(x.dtype) * x  # H^1 + g F_i(H^1)
        aux = {}
        if training_form:
            frac = F.one_hot(choice[live], cfg.recursions).float().mean(0)
            aux["balance_loss"] = cfg.recursions * (frac * probs[live].mean(0)).sum()
            aux["router_z_loss"] = torch.logsumexp(logits[live], dim=-1).square().mean()
        return x, depth, aux

    def _run(self, input_ids: torch.Tensor, cache: MoRCache | None, valid: torch.Tensor | None,
             training_form: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """Embed -> unshared -> recursions -> unshared -> norm. Returns (h, depth, aux loss, stats).

        ``training_form`` selects the expert-choice training rule (nested top-k over the sequence) and the
        auxiliary losses; otherwise the causal inference rule. ``depth`` [B, n] is 1..R (0 for padding).
        """
        cfg, dec = self.config, self.decoder
        b, n = input_ids.shape
        offset = 0 if cache is None else cache.main.length
        positions = dec.positions_after(offset, b, n, input_ids.device)
        live = torch.ones(b, n, dtype=torch.bool, device=input_ids.device) if valid is None else valid
        plan = dec.plan(positions, cache=None if cache is None else cache.main, key_valid=valid)
        x = dec.run_blocks(dec.embed(input_ids), plan, layers=self.first)
        if cfg.recursions == 1:
            x, depth, terms = dec.run_blocks(x, plan, layers=self.middle), live.long(), {}
        elif cfg.routing == "expert":
            x, depth, terms = self._expert(x, positions, plan, live, cache, training_form)
        else:
            x, depth, terms = self._token(x, positions, plan, live, cache, training_form)
        x = dec.run_blocks(x, plan, layers=self.last)
        weights = {"router_bce": cfg.router_aux_weight, "balance_loss": cfg.balance_weight,
                   "router_z_loss": cfg.z_weight}
        added = [weights[k] * v for k, v in terms.items() if weights.get(k)]
        aux = torch.stack(added).sum() if added else None
        return dec.norm(x), depth, aux, {k: float(v.detach()) for k, v in terms.items()}

    # -- training -----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> TrainOutput:
        h, depth, aux, stats = self._run(input_ids, None, None, training_form=True)
        lm_loss = self.decoder.head_loss(h, targets)
        loss = lm_loss if aux is None else lm_loss + aux
        stats["mean_extra_steps"] = float(depth.float().mean()) - 1.0
        return TrainOutput(loss=loss, lm_loss=lm_loss, stats=stats)

    # -- deployed inference -------------------------------------------------------------------

    def new_cache(self, batch_size: int) -> MoRCache:
        # Recursion caches use the decoder's layer indexing; only the shared block's layers ever get keys.
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

    def _router_flops(self, candidates: list[float]) -> float:
        """Router matmuls given recursion r's candidate count (r = 1..R): expert 2d each, token 2dR at r = 1."""
        cfg = self.config
        if cfg.recursions == 1:
            return 0.0
        if cfg.routing == "expert":
            return 2.0 * cfg.d_model * sum(candidates)
        return 2.0 * cfg.d_model * cfg.recursions * candidates[0]

    def analytic_flops_for_depths(self, depths: torch.Tensor) -> float:
        """Forward FLOPs of deployed inference over rows whose tokens took ``depths`` [B, T] recursions.

        depth 0 marks padding (no token). Recursion r's active tokens see only earlier active tokens;
        recursion r's router runs on the tokens that took r-1 (every token for r = 1).
        """
        cfg = self.config
        d = depths.reshape(-1, depths.shape[-1])
        real = d > 0

        def tokens_and_pairs(active: torch.Tensor) -> tuple[float, float]:
            return float(active.sum()), float((active.long().cumsum(1) * active).sum())

        n_real, pairs = tokens_and_pairs(real)
        total = self._stack_flops(cfg.unshared_first + cfg.unshared_last, n_real, pairs)
        for r in range(1, cfg.recursions + 1):
            total += self._stack_flops(cfg.n_shared, *tokens_and_pairs(d >= r))
        total += self._router_flops([float((real & (d >= r - 1)).sum()) for r in range(1, cfg.recursions + 1)])
        return total + compute.head_flops(cfg.d_model, cfg.vocab_size, n_real)

    def decode_flops(self, steps: torch.Tensor | None, valid: torch.Tensor | None = None) -> float:
        depths = steps + 1 if valid is None else torch.where(valid, steps + 1, 0)
        return self.analytic_flops_for_depths(depths)

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Inference: the maximum (every token takes R recursions). Training: see the module docstring."""
        cfg, t = self.config, seq_len
        if not training:
            return self.analytic_flops_for_depths(torch.full((1, t), cfg.recursions)) / t
        total = self._stack_flops(cfg.unshared_first + cfg.unshared_last, t, compute.causal_key_pairs(t))
        total += compute.head_flops(cfg.d_model, cfg.vocab_size, t)
        if cfg.routing == "expert":
            active = [float(cfg.tokens_at(r, t)) for r in range(1, cfg.recursions + 1)]
        else:  # balanced assignment: a fraction (R-r+1)/R of the tokens reaches recursion r
            active = [t * (cfg.recursions - r + 1) / cfg.recursions for r in range(1, cfg.recursions + 1)]
        for a in active:
            total += self._stack_flops(cfg.n_shared, a, a * (a + 1) / 2)
        total += self._router_flops([float(t), *active[:-1]])
        return total / t
