"""CoTFormer and its adaptive variant (Mohtashami, Pagliardini, Jaggi, "CoTFormer: A Chain-of-Thought Driven
Architecture with Budget-Adaptive Computation Cost at Inference"; docs/design.md, "CoTFormer").

Reference code: epfml/CoTFormer -- ``models/cotformer_full_depth.py`` (CoTFormer),
``models/cotformer_full_depth_lnmid_depthemb.py`` (LN-CoTFormer: ``ln_mid``, depth embedding),
``models/adaptive_cotformer_mod_efficient_sigmoid_crw_lnmid_de_random_factor_single_final.py`` (adaptive
LN-CoTFormer), ``get_router_weights.py`` and ``get_ppl_per_mac.py`` (its threshold at inference),
``experiments.md`` (the launch commands) and ``config/base.py`` (defaults). The class docstring's table says
what differs here and why.

Layers (``GPTBase.__init__``). Of ``n_layers`` = L, the first ``prefix_layers`` (``n_layer_begin``) and the last
``suffix_layers`` (``n_layer_end``) run once per token, causal over the tokens; the M = L - P - S middle layers
(the chain) run ``repeats`` R (``n_repeat``) times with shared weights.

The chain (``GPTBase.forward``, ``CausalSelfAttention.forward`` after ``init_cache``). Repeat r's input is repeat
r-1's output at the same token. In chain layer j at repeat r, token t is a query over the layer-j keys of every
token t' <= t at every repeat r' <= r: the reference appends each repeat's keys to one buffer per layer
([repeat 1 | repeat 2 | ...]) and masks by token index only (``attn_mask`` = the causal T x T mask repeated
over the repeats), so a token sees its own earlier repeats (the chain of thought) and every earlier token's
at the repeats computed so far. Every repeat of token t is at RoPE position t. Options of LN-CoTFormer:
``mid_norm`` (``ln_mid``: a norm after every repeat, the last included) and ``depth_embedding`` added to repeat
r's input before its layers: ``linear_learned`` e (R - r), ``learned`` E[R - r] (``indices = n_repeat - rep_idx``).

Adaptive (``cotformer_adaptive``, the adaptive file). After repeat r < R, router r (Linear(d, 1), no bias; the
``MoDBlock``) reads each token's state and gives w = sigmoid(score). A token that takes repeat r + 1 leaves it
with x_in (1 - w) + y w, y = ln_mid(chain(x_in + depth embedding)), x_in its state after repeat r (``crw``); a
token that stops keeps x_in, its final state for the suffix layers (``single_final``). Only the tokens taking
repeat r are its queries and keys (``efficient``); the keys of a token that stopped stay visible to later
repeats of later tokens (the shared KV of token-wise depth).

* Training (``random_factor``, ``depth_random_method`` = uniform): per step, length factors f_1 >= .. >= f_{R-1}
  are sorted clamp(1.05 u, max 1), u ~ U(0, 1)^{R-1}; repeat r + 1 takes, per row, the top-k_{r+1} router scores
  among repeat r's tokens, k_1 = T, k_{r+1} = int(f_r / f_{r-1} k_r) (f_0 = 1). No auxiliary loss: routers
  learn through w alone.
* The reference's evaluation runs the same top-k at ``eval_length_factor`` (default 1: every token, every
  repeat): a choice over the whole sequence, future included. Its threshold (``get_router_weights.py``,
  ``get_ppl_per_mac.py``) records every token's w at every repeat (capacity 1), takes the running minimum over
  the repeats and turns a threshold t into capacities, the fraction of tokens with min w >= 1 - t, then
  evaluates top-k at them. Deployed decoding here applies that rule per token: a token takes repeat r + 1 iff
  w_r >= ``continue_threshold`` (= 1 - t). It depends on the token's prefix only (causal), and it is nested
  (a stopped token never resumes), so the running minimum is implicit. ``forward`` in eval mode keeps the
  reference's top-k at ``eval_length_factors`` (the harness records it as ``parallel_val_loss``).

Cached decoding: the prefix and suffix layers keep the backbone's cache (one slot per token); the chain keeps,
per layer, the keys and values of every (token, repeat) taken, with each key's position and repeat
(:class:`ChainKV`): query (t, r) sees key (t', r') iff t' <= t and r' <= r, which is the reference's mask (in its
parallel forward, no repeat after r exists yet when repeat r runs).

Compute (:meth:`CoTFormer.analytic_flops_for_depths`, the ledger): prefix and suffix layers over every real
token, causal; chain repeat r over the a_r tokens taking it, query (t, r) seeing sum_{r' <= r} #{t' <= t taking
r'} keys; routers 2d per token at each repeat r < R it takes (``other_flops``); one head per token. Fixed
CoTFormer: R x the chain's matmuls, r x a causal pass's keys at repeat r. Adaptive training: the expectation
over the reference's length factors (:func:`expected_training_counts`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.core import compute
from harness.core.config import ModelConfig, require
from harness.core.registry import register
from models.backbone import AttentionPlan, Decoder, KVCache, RMSNorm, init_weight
from models.base import DecodeOutput, LanguageModel, TrainOutput
from models.shared import compact, init_linear

DEPTH_EMBEDDINGS = ("none", "linear_learned", "learned")  # the reference's --depth_embedding: None, or its two


@dataclass
class CoTFormerConfig(ModelConfig):
    summary = "CoTFormer: middle layers repeated R times, each repeat's tokens attending to all earlier repeats'"

    # n_repeat 5: the reference's LN-CoTFormer and adaptive runs (experiments.md, 24 x 5) and its 12 x 5
    repeats: int = 5
    # n_layer_begin / n_layer_end: 0 / 0 in the CoTFormer runs; the LN and adaptive runs reserve 2 / 1 of 24,
    # which round to 0 / 0 at the CPU rungs' 3-6 layers (set them at larger rungs)
    prefix_layers: int = 0
    suffix_layers: int = 0
    mid_norm: bool = False  # ln_mid after every repeat: off in cotformer_full_depth, on in LN-CoTFormer
    depth_embedding: str = "none"  # none | linear_learned | learned (--depth_embedding; default None)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "repeats", isinstance(self.repeats, int) and self.repeats >= 1,
                "must be an integer >= 1 (1 = the plain backbone)")
        for name in ("prefix_layers", "suffix_layers"):
            require(self, name, isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                    "must be a non-negative integer")
        require(self, "suffix_layers", self.prefix_layers + self.suffix_layers < self.n_layers,
                f"prefix_layers + suffix_layers must leave at least one repeated layer in n_layers={self.n_layers}")
        require(self, "mid_norm", isinstance(self.mid_norm, bool), "must be true or false")
        require(self, "depth_embedding", self.depth_embedding in DEPTH_EMBEDDINGS,
                f"must be one of {', '.join(DEPTH_EMBEDDINGS)}")

    @property
    def chain_layers(self) -> int:
        """M: the layers every repeat runs."""
        return self.n_layers - self.prefix_layers - self.suffix_layers


@dataclass
class AdaptiveCoTFormerConfig(CoTFormerConfig):
    summary = "adaptive CoTFormer: a router per repeat picks the tokens that go on (top-k in training, w >= threshold)"

    mid_norm: bool = True  # the adaptive model is LN-CoTFormer's (no adaptive script sets --disable_ln_mid)
    # Deployed rule: take repeat r+1 iff sigmoid(router_r) >= this (= 1 - the reference's threshold t, which
    # get_ppl_per_mac.py sweeps over 0..1 to trace the budget curve). Decided: 0.5, i.e. score >= 0.
    continue_threshold: float = 0.5
    # --eval_length_factor: the forward's top-k factors in eval mode (R - 1 values); () = every token continues
    eval_length_factors: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "continue_threshold", 0.0 <= self.continue_threshold <= 1.0,
                "must lie in [0, 1] (0 = every token takes every repeat)")
        factors = tuple(float(f) for f in self.eval_length_factors)
        self.eval_length_factors = factors
        require(self, "eval_length_factors", len(factors) in (0, self.repeats - 1),
                f"give no value (all 1) or repeats - 1 = {self.repeats - 1} values")
        require(self, "eval_length_factors", all(0.0 <= f <= 1.0 for f in factors)
                and all(a >= b for a, b in zip(factors, factors[1:])),
                "must be non-increasing fractions in [0, 1] (routing is nested)")


def capacities(factors: list[float]) -> list[float]:
    """Per-repeat keep ratios from length factors: f_r / f_{r-1} (f_0 = 1; 0 after a factor 0), as the
    reference's ``mod_capacity_factors``."""
    out, prev = [], 1.0
    for factor in factors:
        out.append(factor / prev if prev != 0 else 0.0)
        prev = factor
    return out


EXPECTATION_SAMPLES = 1 << 16  # draws of the length factors behind the training FLOPs' expectation


@functools.lru_cache(maxsize=64)
def expected_training_counts(repeats: int, seq_len: int) -> tuple[float, float, float]:
    """Adaptive training, per row: E[sum_r a_r] (chain queries), E[sum_r sum_{r' <= r} a_r (a_{r'} + 1) / 2] (chain
    key pairs) and E[sum_{r < R} a_r] (router rows), a_r the tokens taking repeat r.

    a_r follows the reference's arithmetic exactly (float32 factors, float64 ratios, int() of the product); the
    expectation over the factors is a mean over 2^16 fixed-seed draws (deterministic; ~0.1% sampling error). The key
    pairs assume repeat r's tokens are a uniformly placed subset of repeat r''s: a query's keys at repeat r' are its
    rank among them, (a_{r'} + 1) / 2 on average. The ledger measures the real count (learned routing may favour
    some positions), so ``training_flops_exact`` is False.
    """
    generator = torch.Generator().manual_seed(0)
    u = torch.rand((EXPECTATION_SAMPLES, repeats - 1), generator=generator)
    factors = (u * 1.05).clamp(max=1).sort(dim=1, descending=True).values.double()
    active = [torch.full((EXPECTATION_SAMPLES,), float(seq_len), dtype=torch.float64)]
    prev = torch.ones(EXPECTATION_SAMPLES, dtype=torch.float64)
    for i in range(repeats - 1):
        cap = torch.where(prev != 0, factors[:, i] / prev, 0.0)  # 0 after a factor 0, as the reference
        active.append(torch.floor(cap * active[-1]))
        prev = factors[:, i]
    queries = sum(active)
    pairs = sum(a_r * (active[q] + 1) / 2 for r, a_r in enumerate(active) for q in range(r + 1))
    routed = sum(active[:-1], torch.zeros_like(prev))
    return float(queries.mean()), float(pairs.mean()), float(routed.mean())


@dataclass
class ChainKV:
    """The chain layers' keys and values of every (token, repeat) run so far, in run order, with each key's RoPE
    position, repeat and validity: the reference's one buffer per layer over the repeats, made a cache.

    Keys are concatenated, not written in place, so a training forward keeps every repeat's keys for backward
    (the reference needs its ``InPlaceSetSlice`` autograd function for that).
    """

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> k, v [B, Hkv, S, D]
    pos: torch.Tensor | None = None  # [B, S] RoPE position (token index)
    rep: torch.Tensor | None = None  # [B, S] repeat 1..R
    ok: torch.Tensor | None = None  # [B, S] a real key (not padding, not a compaction filler)

    def add(self, decoder: Decoder, positions: torch.Tensor, ok: torch.Tensor, r: int) -> AttentionPlan:
        """Register repeat r's queries (``positions`` [B, m], ``ok`` marking real ones) as keys too, and return
        their plan: query (t, r) sees key (t', r') iff t' <= t and r' <= r, and the key is real."""
        def cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
            return new if old is None else torch.cat((old, new), dim=1)

        self.pos, self.ok = cat(self.pos, positions), cat(self.ok, ok)
        self.rep = cat(self.rep, torch.full_like(positions, r))
        allowed = (self.pos[:, None, :] <= positions[:, :, None]) & (self.rep[:, None, :] <= r)
        plan = decoder.plan(positions, allowed=allowed, key_valid=self.ok, query_valid=ok)
        return dataclasses.replace(plan, kv_hook=self._append, _cast={})

    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.kv:
            old_k, old_v = self.kv[layer]
            k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
        self.kv[layer] = (k, v)
        return k, v


@dataclass
class CoTFormerCache:
    """Prefix and suffix layers: the backbone's cache, one slot per token. Chain: :class:`ChainKV`."""

    main: KVCache
    chain: ChainKV
    n_tokens: int = 0  # RoPE position of the next token


@register("cotformer")
class CoTFormer(LanguageModel):
    """CoTFormer: the middle layers run R times; repeat r's tokens attend to every earlier repeat's tokens.

    What differs from the reference code (module docstring), and why (rows marked A: ``cotformer_adaptive``):

    =========================================  ======================================  ==============================
    reference behaviour                        here                                    why
    =========================================  ======================================  ==============================
    GPT-2 blocks: LayerNorm, GELU 4d MLP,      the shared Llama block: RMSNorm,        one block type for every
      fused qkv, no biases, RoPE on              SwiGLU, RoPE on halves, theta 10^4      method: the mechanism is what
      interleaved pairs, theta 10^4              (= a permutation of q/k rows)           is compared (parity script)
    ln_mid: LayerNorm                          ``mid_norm``: RMSNorm                   the backbone's norm
    wte tied to lm_head, N(0, 0.02),           the backbone's: untied, ponder_init     one init rule for all methods
      c_proj / sqrt(2 L), embeddings             (out-proj / sqrt(2 L) too),
      unscaled                                   embeddings x sqrt(2.5 d)
    depth embedding N(0, 0.02)                 the backbone's std (``weight_std``)     one init rule
    n_repeat 5 (24 x 5 LN- and adaptive        ``repeats`` = 5                         the adaptive runs' value
      runs; 12 x 5)
    n_layer_begin/end 0/0 (CoTFormer runs),    ``prefix_layers``/``suffix_layers``     2/24 and 1/24 of the CPU
      2/1 of 24 (LN- and adaptive runs)          0/0                                     rungs' 3-6 layers round to 0
    all repeats' keys in one preallocated      concatenated per repeat (ChainKV)       same attention; autograd-safe
      buffer (in-place autograd function)
    no cached decoding of the chain            a cache of every (token, repeat) with   deployed cost; equal to
                                                 its position and repeat                 recomputation
    A: n_repeat routers, the last unused       R - 1 routers                           no parameter without gradient
    A: a router whose repeat took no token     0 x its weights added to the loss       every parameter in the graph
       (int() of a small factor) gets no                                                 (DDP, the contract)
       gradient
    A: router init N(0, 0.02)                  the backbone's rule (``init_linear``)   one init rule
    A: evaluation: top-k over the sequence     ``forward`` in eval mode: the same;     top-k sees the future; the
       at eval_length_factor (default 1);        deployed: w >= ``continue_threshold``   threshold per token is causal
       threshold t calibrated into top-k         (= 1 - t) per token                     and needs no calibration pass
       capacities (get_ppl_per_mac.py)
    A: other depth_random_methods              not offered                             unused by the launch commands
    =========================================  ======================================  ==============================
    """

    Config = CoTFormerConfig
    depth_baseline = True  # claim C2 compares PonderLM-3 with it at equal FLOPs
    config: CoTFormerConfig
    reference_weight_decay = 0.1  # experiments.md: --weight_decay 0.1 in every run
    test_variants = {
        "r1": {"repeats": 1},
        "r2_ln_prefix_suffix": {"repeats": 2, "prefix_layers": 1, "suffix_layers": 1, "mid_norm": True,
                                "depth_embedding": "linear_learned"},
        "r3_learned_depth_gqa": {"repeats": 3, "depth_embedding": "learned", "n_heads": 4, "n_kv_heads": 2},
    }

    def __init__(self, config: CoTFormerConfig):
        super().__init__(config)
        c = config
        self.first = range(0, c.prefix_layers)
        self.middle = range(c.prefix_layers, c.n_layers - c.suffix_layers)
        self.last = range(c.n_layers - c.suffix_layers, c.n_layers)
        self.mid_norm = RMSNorm(c.d_model, c.norm_eps) if c.mid_norm else None
        rows = {"none": 0, "linear_learned": 1, "learned": c.repeats}[c.depth_embedding]
        self.depth_embedding = nn.Embedding(rows, c.d_model) if rows else None
        if self.depth_embedding is not None:
            init_weight(self.depth_embedding.weight, c.weight_std, c)

    def max_extra_steps(self) -> int:
        return self.config.repeats - 1

    # -- the chain ----------------------------------------------------------------------------

    def _depth_vector(self, r: int) -> torch.Tensor | None:
        """The depth embedding added to repeat r's input (``indices`` = R - r in the reference)."""
        if self.depth_embedding is None:
            return None
        index = self.config.repeats - r
        if self.config.depth_embedding == "linear_learned":
            return self.depth_embedding.weight[0] * index
        return self.depth_embedding.weight[index]

    def _repeat(self, x: torch.Tensor, positions: torch.Tensor, active: torch.Tensor, chain: ChainKV, r: int,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """Repeat r of the chain over the ``active`` tokens [B, n] of x [B, n, d]; the others keep their state.

        The active tokens are gathered in causal order at their own positions; with router weights ``weight``
        [B, n] their state becomes x_in (1 - w) + y w (adaptive), else y, y = norm(chain(x_in + depth emb.)).
        """
        everyone = bool(active.all())
        if everyone:
            xs, pos, ok = x, positions, active
        else:
            index, ok = compact(active)
            if index.shape[1] == 0:
                return x
            gather = index[..., None].expand(-1, -1, x.shape[-1])
            xs, pos = x.gather(1, gather), positions.gather(1, index)
        depth = self._depth_vector(r)
        inputs = xs if depth is None else xs + depth.to(xs.dtype)
        ys = self.decoder.run_blocks(inputs, chain.add(self.decoder, pos, ok, r), layers=self.middle)
        if self.mid_norm is not None:
            ys = self.mid_norm(ys)
        if weight is not None:
            w = (weight if everyone else weight.gather(1, index))[..., None].to(ys.dtype)
            ys = xs * (1 - w) + ys * w
        if everyone:
            return ys
        return x.scatter(1, gather, torch.where(ok[..., None], ys, xs))

    def _repeats(self, x: torch.Tensor, positions: torch.Tensor, live: torch.Tensor, chain: ChainKV,
                 training_form: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every real token takes all R repeats. Returns (x, repeats taken [B, n] (0 at padding), extra loss)."""
        for r in range(1, self.config.repeats + 1):
            x = self._repeat(x, positions, live, chain, r)
        return x, live.long() * self.config.repeats, None

    def _run(self, input_ids: torch.Tensor, cache: CoTFormerCache | None, valid: torch.Tensor | None,
             training_form: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Embed -> prefix layers -> R repeats of the chain -> suffix layers -> norm. Returns (h, depth, extra loss)."""
        dec, c = self.decoder, self.config
        b, n = input_ids.shape
        positions = dec.positions_after(0 if cache is None else cache.n_tokens, b, n, input_ids.device)
        live = torch.ones(b, n, dtype=torch.bool, device=input_ids.device) if valid is None else valid
        plan = None
        if c.prefix_layers or c.suffix_layers:
            plan = dec.plan(positions, cache=None if cache is None else cache.main, key_valid=valid)
        x = dec.embed(input_ids)
        if c.prefix_layers:
            x = dec.run_blocks(x, plan, layers=self.first)
        chain = ChainKV() if cache is None else cache.chain
        x, depth, extra = self._repeats(x, positions, live, chain, training_form)
        if c.suffix_layers:
            x = dec.run_blocks(x, plan, layers=self.last)
        if cache is not None:
            cache.n_tokens += n
        return dec.norm(x), depth, extra

    # -- training and deployed inference ------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> TrainOutput:
        h, depth, extra = self._run(input_ids, None, None, training_form=True)
        lm_loss = self.decoder.head_loss(h, targets)
        loss = lm_loss if extra is None else lm_loss + extra
        return TrainOutput(loss=loss, lm_loss=lm_loss, stats={"mean_extra_steps": float(depth.float().mean()) - 1.0})

    def new_cache(self, batch_size: int) -> CoTFormerCache:
        return CoTFormerCache(self.decoder.new_cache(batch_size), ChainKV())

    def decode(self, input_ids: torch.Tensor, cache: CoTFormerCache, valid: torch.Tensor | None = None) -> DecodeOutput:
        h, depth, _ = self._run(input_ids, cache, valid, training_form=False)
        return DecodeOutput(self.decoder.head(h, valid), (depth - 1).clamp_min(0))

    # -- compute ------------------------------------------------------------------------------

    def _router_flops(self, depths: torch.Tensor) -> float:
        return 0.0

    def analytic_flops_for_depths(self, depths: torch.Tensor) -> float:
        """Forward FLOPs of deployed inference over rows whose tokens took ``depths`` [B, T] repeats (0 = padding).

        Query (t, r) sees, for every r' <= r, the tokens t' <= t that took repeat r' (itself included).
        """
        c = self.config
        d = depths.reshape(-1, depths.shape[-1])
        real = d > 0
        n_real, causal = compute.active_key_pairs(real)
        total = self.decoder.layers_flops(c.prefix_layers + c.suffix_layers, n_real, causal)
        seen = [(d >= r).long().cumsum(1) for r in range(1, c.repeats + 1)]  # repeat-r keys at or before each token
        for r in range(1, c.repeats + 1):
            active = d >= r
            pairs = sum(float((seen[q] * active).sum()) for q in range(r))
            total += self.decoder.layers_flops(c.chain_layers, float(active.sum()), pairs)
        return total + self._router_flops(d) + compute.head_flops(c.d_model, c.vocab_size, n_real)

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Every token takes the R repeats, in training and at inference alike."""
        return self.analytic_flops_for_depths(torch.full((1, seq_len), self.config.repeats)) / seq_len


@register("cotformer_adaptive")
class AdaptiveCoTFormer(CoTFormer):
    """Adaptive LN-CoTFormer: after each repeat a router picks the tokens that go on (top-k in training, its
    weight against ``continue_threshold`` at inference); stopped tokens' keys stay visible (shared KV)."""

    Config = AdaptiveCoTFormerConfig
    config: AdaptiveCoTFormerConfig
    adaptive = True
    # The same decoder weights, every repeat taken, no routers (``mid_norm=true`` makes it this model's
    # LN-CoTFormer). The pruned_decoding bench role is not declared: the bench and its tests compare PonderLM-3.
    fixed_twin = "cotformer"
    steps_field = "repeats"
    test_variants = {
        "r1": {"repeats": 1},
        "r3_prefix_suffix_learned_depth": {"repeats": 3, "prefix_layers": 1, "suffix_layers": 1,
                                           "depth_embedding": "learned"},
        "every_token_continues": {"continue_threshold": 0.0},
        "no_mid_norm_gqa_linear_depth": {"mid_norm": False, "n_heads": 4, "n_kv_heads": 2,
                                         "depth_embedding": "linear_learned"},
    }

    def __init__(self, config: AdaptiveCoTFormerConfig):
        super().__init__(config)
        self.routers = nn.ModuleList(nn.Linear(config.d_model, 1, bias=False) for _ in range(config.repeats - 1))
        for router in self.routers:
            init_linear(router, config)
        self.forced_depth: int | None = None

    def force_steps(self, steps: int) -> None:
        """Deployed inference: every token takes exactly steps + 1 repeats (decisions only; the routers still
        run where they would and their weights still mix)."""
        if not 0 <= steps < self.config.repeats:
            raise ValueError(f"cannot force {steps} extra repeats with repeats={self.config.repeats}")
        self.forced_depth = steps + 1

    def training_flops_exact(self) -> bool:
        """Training draws the length factors per step: its count is an expectation (R = 1 routes nothing)."""
        return self.config.repeats == 1

    def length_factors(self) -> list[float]:
        """This forward's f_1..f_{R-1}: sorted clamp(1.05 u, max 1) in training (the reference's default
        ``depth_random_method``), ``eval_length_factors`` (default 1) in eval mode."""
        c = self.config
        if not self.training:
            return list(c.eval_length_factors) or [1.0] * (c.repeats - 1)
        u = torch.rand((c.repeats - 1,))
        return torch.clamp(u * 1.05, max=1).sort(descending=True).values.tolist()

    def _router_scores(self, r: int, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """router_r(x) [B, n] in float32 for the ``active`` tokens (0 elsewhere); 2d FLOPs each (``other_flops``)."""
        router = self.routers[r - 1]
        compute.record_matmul(2.0 * router.in_features * compute.as_count(active))
        if bool(active.all()):
            return router(x)[..., 0].float()
        index, ok = compact(active)
        xs = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        score = router(xs)[..., 0].float().masked_fill(~ok, 0.0)
        return torch.zeros(active.shape, dtype=score.dtype, device=score.device).scatter(1, index, score)

    def _repeats(self, x: torch.Tensor, positions: torch.Tensor, live: torch.Tensor, chain: ChainKV,
                 training_form: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Repeat 1 for every real token; after repeat r < R, the chosen ones take repeat r + 1, mixed by w.

        ``training_form``: nested top-k per row at the length factors (:meth:`length_factors`); otherwise the
        deployed rule w >= ``continue_threshold`` (or ``force_steps``). Returns (x, depth, extra loss).
        """
        c = self.config
        depth = live.long()
        active, weight, mixed = live, None, set()
        caps = capacities(self.length_factors()) if training_form else []
        count = x.shape[1]  # training form: tokens per row at this repeat (no padding in training)
        for r in range(1, c.repeats + 1):
            x = self._repeat(x, positions, active, chain, r, weight)
            if weight is not None:
                mixed.add(r - 2)  # router r - 1's weights entered this repeat
            if r == c.repeats:
                break
            score = self._router_scores(r, x, active)
            w = torch.sigmoid(score)
            if training_form:  # the reference's MoDBlock: top-k of the scores (sigmoid after, for the weights)
                count = int(caps[r - 1] * count)
                chosen = score.masked_fill(~active, float("-inf")).topk(count, dim=1).indices
                selected = torch.zeros_like(active).scatter(1, chosen, True)
            elif self.forced_depth is not None:
                selected = active & (r < self.forced_depth)
            else:
                selected = active & (w >= c.continue_threshold)
            if not bool(selected.any()):
                break
            depth = depth + selected.long()
            active, weight = selected, w
        extra = None
        if training_form and torch.is_grad_enabled() and len(mixed) < len(self.routers):
            # 0 x the weights of routers no selected token used: every parameter stays in the graph (DDP)
            extra = sum(0.0 * router.weight.sum() for i, router in enumerate(self.routers) if i not in mixed)
        return x, depth, extra

    def decode_flops(self, steps: torch.Tensor | None, valid: torch.Tensor | None = None,
                     participation: torch.Tensor | None = None) -> float:
        depths = steps + 1 if valid is None else torch.where(valid, steps + 1, 0)
        return self.analytic_flops_for_depths(depths)

    def _router_flops(self, depths: torch.Tensor) -> float:
        """Router r (r < R) scores every token that took repeat r."""
        return 2.0 * self.config.d_model * sum(float((depths >= r).sum()) for r in range(1, self.config.repeats))

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Inference: the maximum (every token takes R repeats). Training: the expectation over the length factors
        (:func:`expected_training_counts`)."""
        c, t = self.config, seq_len
        if not training or c.repeats == 1:
            return super().analytic_flops_per_token(seq_len)
        queries, pairs, routed = expected_training_counts(c.repeats, t)
        total = self.decoder.layers_flops(c.prefix_layers + c.suffix_layers, t, compute.causal_key_pairs(t))
        total += self.decoder.layers_flops(c.chain_layers, queries, pairs)
        total += 2.0 * c.d_model * routed + compute.head_flops(c.d_model, c.vocab_size, t)
        return total / t


__all__ = ["AdaptiveCoTFormer", "AdaptiveCoTFormerConfig", "ChainKV", "CoTFormer", "CoTFormerCache",
           "CoTFormerConfig", "capacities", "expected_training_counts"]
