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
therefore holds 1/R of the backbone's middle MLP and norm parameters and runs at most 2 + R x M/R = L layers
per token, the vanilla model's depth. The kept layers are initialised as the L-layer backbone's (the
reference builds the L-layer model and ``sharing_strategy`` ties recursion r's copies to the first). R = 1 is
exactly the backbone (no router).

Attention per recursion (config ``share_attention``). After the tying, ``transform_layer_to_mor_expert``
wraps each recursion's copies in an expert-choice ``MoRLlamaDecoderLayer``, whose ``__init__`` replaces every
block's ``self_attn`` with a fresh ``MoRLlamaAttention``: the expert-choice model the authors trained has
separate q/k/v/o projections per recursion, and only the MLP and the two norms are shared. Token-choice
(``transform_layer_to_mor_token``) keeps the tied attention. ``share_attention = None`` (default) follows
the reference per routing (expert: per recursion, token: shared); ``True`` is the fully shared block the
paper's text describes; ``False`` gives token-choice per-recursion attention too. Recursion r's attention
in layer j of the block is the L-layer backbone's layer 1 + (r-1) M/R + j attention (initialised by the
backbone's rule), recursion 1's is the block's own. At the reference's test shape (d 64, 4 heads, d_ff
176, vocabulary 256, R = 3) that is 299,776 parameters at L = 8 and 216,704 at L = 5, the reference's
counts (234,240 and 183,936 fully shared).

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
the released configs': 1e-5 for token-choice, off for expert-choice.

Auxiliary losses under gradient accumulation (``util/trainer_pt.py``, ``training_step``). The reference's
trainer adds ``coeff x aux`` to every micro-batch's loss and backpropagates it without dividing by the
accumulation steps A (``model_accepts_loss_kwargs``: the LM loss is already a sum over num_items_in_batch,
the tokens of all A micro-batches). The z-loss and the token-choice balancing loss are divided by
num_items_in_batch / (B T) = A inside the model, so they enter once per optimizer step; the expert-choice
BCE is not (``bce_loss(...) / (bs * n)`` is a per-micro-batch mean), so its effective weight is
``coeff x A`` = 0.001 x A, A = total_batch_size / (per_device_batch x GPUs) (1024 / (16 x GPUs) in the
released configs: 8 on 8 GPUs). Here every term, the BCE included, enters once per optimizer step with
its configured weight: the trainer divides each micro-batch's whole loss by ``train.grad_accum``. To
reproduce a reference run, set ``router_aux_weight`` = 0.001 x A.

Evaluation: the reference computes its perplexity (trainer evaluation and ``evaluate_fineweb_test.py``)
with the model's forward in eval mode, i.e. the training top-k over the whole sequence, which sees later
tokens' router scores. Here that is the ``forward``'s ``lm_loss``, which the harness's evaluation records as
``parallel_val_loss`` (harness/evaluate.py, ``parallel_loss``): the reference-style, top-k validation loss to
compare with the MoR paper's numbers. ``val_loss`` is the deployed, causal one (``score``/``decode``, the
threshold rule below), and ``parallel_gap`` = parallel_val_loss - val_loss is the train/deploy gap.

Recursion-wise KV caching (Sec. 2.2.2, the default): in recursion r only the tokens that take it are keys
and queries. Training gathers them; cached decoding keeps one KV cache per recursion r >= 2 (recursion 1,
which every token takes, shares the main cache with the unshared layers), and a token that exits before r
writes no KV at r: each decode call gathers the tokens active at r into as many new slots as the busiest
batch row needs, a row's unused slots are marked not-a-key (and are no query). A call where no token is
active at r allocates nothing there.

Recursive KV sharing (Sec. 2.2.2, config ``kv_sharing``; the released ``*_kv-share_rec3_*`` config, with
``update_cache`` off): recursions r >= 2 reuse recursion 1's keys and values. In the reference,
``RecursiveDynamicCache.update`` returns, for every layer of recursion r >= 2, the cache of the same layer of
recursion 1 (``1 + (layer_idx - 1) % base_depth``), and ``MoRLlamaDecoderLayer.forward`` runs the block over
all tokens and keeps the selected ones' outputs. So a token that takes recursion r attends, in layer j, to
the recursion-1 keys and values of layer j of every token at or before it (all tokens take recursion 1),
with recursion r's own queries and output projection. Here recursion r runs on its tokens only, with those
keys and values; its key/value projections are not computed (the reference computes and discards them) and
do not exist (the reference holds them, never trained: unused parameters would stall DDP). Cached decoding
needs no per-recursion cache: recursion r reads the main cache that recursion 1 wrote.

Compute (ledger and :meth:`analytic_flops_for_depths`): the unshared layers over every real token
(causal), recursion r's M/R layers over the a_r tokens that take it with a_r(a_r+1)/2 causal pairs (with
KV sharing: each sees every real token at or before it, and the layers of r >= 2 skip the key/value
projections), the head over real tokens, and the routers' matmuls, recorded as ``other`` FLOPs like
PonderLM-3's router:
expert-choice 2d per candidate per recursion (recursion r's router runs on the tokens that took r-1, every
token for r = 1 and 2), token-choice 2dR per token. Training FLOPs: expert-choice is exact (k_r is fixed by
T); token-choice depends on the learned routing, so :meth:`analytic_flops_per_token` (training) assumes
the balanced split the balancing loss drives towards (a fraction (R-r+1)/R of tokens at recursion r) --
the ledger measures the real value. With KV sharing the key pairs at r >= 2 depend on which tokens are
chosen; the analytic training count assumes they are spread evenly ((T+1)/2 keys each).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import compute
from harness.core.config import ModelConfig, require
from harness.core.registry import register
from models.backbone import Attention, AttentionPlan, KVCache, rotate
from models.base import DecodeOutput, LanguageModel, TrainOutput
from models.shared import compact, init_linear

INFERENCE_THRESHOLD = 0.5  # expert-choice at inference: continue iff sigmoid(router) >= 0.5 (BCE target)
ROUTINGS = ("expert", "token")
# The released configs' router z-loss weight (mor.z_loss / mor.z_coeff) per routing, when router_z_weight is unset.
REFERENCE_Z_WEIGHT = {"expert": 0.0, "token": 1e-5}
# Whether the reference shares the block's attention across recursions, per routing, when share_attention is
# unset: expert_choice_router.py gives every recursion a fresh MoRLlamaAttention, token-choice keeps the tie.
REFERENCE_SHARE_ATTENTION = {"expert": False, "token": True}


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
    # One attention for all recursions (True), or q/k/v/o per recursion with the MLP and norms shared (False);
    # None = the reference's per routing (REFERENCE_SHARE_ATTENTION: expert per recursion, token shared).
    share_attention: bool | None = None
    kv_sharing: bool = False  # recursions >= 2 reuse recursion 1's keys and values (the kv-share_rec3 config)

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
        require(self, "share_attention", self.share_attention in (None, True, False),
                "must be true, false, or none for the reference's choice per routing")
        require(self, "kv_sharing", isinstance(self.kv_sharing, bool), "must be true or false")
        require(self, "kv_sharing", not self.kv_sharing or self.recursions >= 2,
                f"shares recursion 1's keys and values with later recursions: needs recursions >= 2 (got "
                f"{self.recursions}); set kv_sharing=false")
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
    def attention_shared(self) -> bool:
        """Whether every recursion uses the block's one attention: ``share_attention``, or the reference's."""
        return REFERENCE_SHARE_ATTENTION[self.routing] if self.share_attention is None else self.share_attention

    @property
    def z_weight(self) -> float:
        """The router z-loss weight in force: ``router_z_weight``, or the released config's for the routing."""
        return REFERENCE_Z_WEIGHT[self.routing] if self.router_z_weight is None else self.router_z_weight


@dataclass
class MoRCache:
    """Main cache (unshared layers + recursion 1, one slot per token) and one cache per recursion >= 2."""

    main: KVCache
    recursions: list[KVCache]


class SharedKVAttention(Attention):
    """Attention of a recursion r >= 2 under KV sharing: its own queries and output projection, the keys and
    values recursion 1 computed (handed over by the plan's ``kv_hook``). Holds no key/value projections:
    they would never be used (:class:`MixtureOfRecursions`, KV sharing)."""

    def __init__(self, source: Attention):
        nn.Module.__init__(self)  # not Attention.__init__: no k_proj/v_proj
        self.n_heads, self.n_kv_heads, self.head_dim = source.n_heads, source.n_kv_heads, source.head_dim
        self.q_proj, self.o_proj = source.q_proj, source.o_proj

    def forward(self, x: torch.Tensor, plan: AttentionPlan, layer: int) -> torch.Tensor:
        b, n, _ = x.shape
        q = F.linear(x, self.q_proj.weight).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = plan.kv_hook(layer, None, None)
        return self.attend(rotate(q, plan.cos, plan.sin_signed), k, v, plan)


@register("mor")
class MixtureOfRecursions(LanguageModel):
    """Mixture-of-Recursions: unshared first/last layers, a shared block of (L-2)/R layers applied 1..R times.

    What differs from the reference code (module docstring), and why:

    ==========================================  ==================================  ==========================
    reference behaviour                         here                                why
    ==========================================  ==================================  ==========================
    (L-2)/R not whole: drops layers, warns      ConfigError naming both fields      no silent model change
    MoR needs R >= 2 (util/config.py)           R = 1 is the backbone, no router    equality check vs vanilla
    expert-choice: fresh MoRLlamaAttention      same (share_attention unset); True  as run; True = the paper's
      per recursion (expert_choice_router.py),    shares it, False also unties it     text, fully shared
      token-choice: attention tied                for token-choice
    those attentions at PyTorch's default       the L-layer backbone's attentions   one init rule; at d=960
      Linear init (U(+-1/sqrt(d))), the first     (backbone init), recursion 1's      the default's std 0.019
      recursion's included                        the block's own                     is the backbone's 0.02
    expert-choice top-k also at evaluation      sigmoid >= 0.5 at inference (the    top-k sees the future;
      (perplexity script included)                top-k loss: parallel_val_loss)      both are recorded
    capacity: any non-increasing schedule       first value 1.0                     all take recursion 1
    z-loss, balancing loss / A (accumulation)   once per optimizer step             as the reference
    expert BCE per micro-batch, not / A:        once per optimizer step: weight     the reference's weight
      effective weight 0.001 x A (trainer_pt)     router_aux_weight for any A         depends on the GPU count
    KV sharing (kv-share_rec3 config): r >= 2   same (kv_sharing); r >= 2 hold and  no wasted compute, no
      compute k/v, then use recursion 1's         compute no k/v projections          untrained parameters
    router init N(0, initializer_range)         the backbone's rule (init_linear)   one init rule
    warm-ups, loss-free balancing, MLP routers  not offered                         unused by released configs
    KV update_cache, LoRA relaxation, temp.     not offered (temperature 1)         unused by released configs
    no padding in training batches              padding neither routed nor counted  padded scoring, decoding
    ==========================================  ==================================  ==========================
    """

    Config = MoRConfig
    depth_baseline = True  # claim C2 compares PonderLM-3 with it at equal FLOPs
    reference_weight_decay = 0.1  # mixture_of_recursions, conf/pretrain/*_smollm-360m_*.yaml
    adaptive = True
    # n_layers - 2 = 3 splits into the default 3 recursions (the contract's tiny config has 3 layers)
    test_base = {"n_layers": 5}
    test_variants = {"token": {"routing": "token"}, "r1": {"recursions": 1, "n_layers": 3},
                     "r1_token": {"recursions": 1, "routing": "token", "n_layers": 3},
                     "r2_gqa_capacity": {"recursions": 2, "n_layers": 5, "unshared_last": 0, "n_heads": 4,
                                         "n_kv_heads": 2, "capacity": (0.5,)},
                     "shared_attention": {"share_attention": True},
                     "token_per_recursion_attention": {"routing": "token", "share_attention": False},
                     "kv_sharing": {"kv_sharing": True},
                     "kv_sharing_shared_gqa": {"kv_sharing": True, "share_attention": True, "n_heads": 4,
                                               "n_kv_heads": 2, "capacity": (0.5,)},
                     "token_kv_sharing": {"routing": "token", "kv_sharing": True},
                     # Cycle sharing (no unshared layers: the block's attention is the decoder's first)
                     "cycle": {"n_layers": 3, "unshared_first": 0, "unshared_last": 0},
                     "cycle_kv_sharing": {"n_layers": 3, "unshared_first": 0, "unshared_last": 0, "kv_sharing": True}}

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
        """Token choice's training cost follows the learned routing (the analytic count is balanced), and so
        do KV sharing's key pairs (which tokens are chosen)."""
        return self.config.recursions == 1 or (self.config.routing == "expert" and not self.config.kv_sharing)

    def __init__(self, config: MoRConfig):
        super().__init__(config)
        c = config
        # The decoder was built and initialised as the L-layer backbone; keep its first unshared layers, ONE
        # copy of the shared block and its last unshared layers (sharing_strategy ties the other copies to it).
        kept = [*range(c.unshared_first + c.n_shared), *range(c.n_layers - c.unshared_last, c.n_layers)]
        # Per-recursion attention: recursion r >= 2's attention in layer j of the block is the one of the
        # backbone's layer that copy stood for (uf + (r-1) M/R + j), so it starts as the L-layer model did.
        copies = [c.unshared_first + (r - 1) * c.n_shared + j
                  for r in range(2, c.recursions + 1) for j in range(c.n_shared)]
        dropped = [self.decoder.layers[i].self_attn for i in copies]
        self.decoder.layers = nn.ModuleList(self.decoder.layers[i] for i in kept)
        self.first = range(0, c.unshared_first)
        self.middle = range(c.unshared_first, c.unshared_first + c.n_shared)
        self.last = range(c.unshared_first + c.n_shared, len(kept))
        self.forced_depth: int | None = None
        # attentions[(r-2) M/R + j]: recursion r's attention in layer j of the block (per-recursion only)
        self.attentions = nn.ModuleList()
        if not c.attention_shared:
            self.attentions.extend(SharedKVAttention(a) if c.kv_sharing else a for a in dropped)
        # Shared attention under KV sharing: recursion r >= 2 queries through the block's own q/o projections.
        # A plain list, not registered: the projections are the block's (no second name for one tensor).
        self._shared_kv_views = ([SharedKVAttention(self.decoder.layers[i].self_attn) for i in self.middle]
                                 if c.attention_shared and c.kv_sharing else [])
        kv = c.n_kv_heads * c.head_dim
        # Matmul weights a query touches in one block of recursion r >= 2 (KV sharing: no k/v projections).
        self._recursion_matmul_params = self.decoder.block_matmul_params - (2 * c.d_model * kv if c.kv_sharing else 0)
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

    @contextlib.contextmanager
    def _attention_of(self, r: int) -> Iterator[None]:
        """Recursion r's attention in the shared block's layers while the block runs recursion r.

        The block's modules are swapped, not bypassed, so that every recursion still calls the Block module
        (its hooks run: FSDP unsharding of the shared MLP and norms, forward hooks), and its ledger entry
        counts the weights recursion r touches (``matmul_params``: KV sharing skips the k/v projections).
        """
        views = self.attentions if len(self.attentions) else self._shared_kv_views
        if r == 1 or not len(views):
            yield
            return
        blocks = [self.decoder.layers[i] for i in self.middle]
        saved = [(block.self_attn, block.matmul_params) for block in blocks]
        offset = (r - 2) * self.config.n_shared if len(self.attentions) else 0
        try:
            for j, block in enumerate(blocks):
                block.self_attn, block.matmul_params = views[offset + j], self._recursion_matmul_params
            yield
        finally:
            for block, (attention, params) in zip(blocks, saved):
                block.self_attn, block.matmul_params = attention, params

    def _first_recursion_plan(self, plan: AttentionPlan, shared_kv: dict | None) -> AttentionPlan:
        """The plan of recursion 1; under KV sharing it keeps each layer's keys and values in ``shared_kv``
        (written to the main cache first, when there is one) for the later recursions."""
        if shared_kv is None:
            return plan

        def keep(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if plan.cache is not None:
                k, v = plan.cache.write(layer, plan.cache_start, k, v)
            shared_kv[layer] = (k, v)
            return k, v

        return dataclasses.replace(plan, kv_hook=keep, _cast={})

    def _shared_kv_plan(self, positions: torch.Tensor, index: torch.Tensor, ok: torch.Tensor,
                        live: torch.Tensor, cache: MoRCache | None, shared_kv: dict) -> AttentionPlan:
        """Plan of a recursion r >= 2 under KV sharing: queries = the gathered tokens ``index`` [B, m] (``ok``
        marks real entries), keys = recursion 1's, every real token at or before the query."""
        start = 0 if cache is None else cache.main.length - live.shape[1]  # the new tokens' first slot
        valid = live if cache is None else cache.main.key_valid[:, :cache.main.length]
        slots = torch.arange(valid.shape[1], device=index.device)
        allowed = slots[None, None, :] <= (start + index)[..., None]
        plan = self.decoder.plan(positions.gather(1, index), allowed=allowed, key_valid=valid, query_valid=ok)
        return dataclasses.replace(plan, kv_hook=lambda layer, k, v: shared_kv[layer])

    def _recursion(self, x: torch.Tensor, positions: torch.Tensor, active: torch.Tensor,
                   weight: torch.Tensor | None, r: int, live: torch.Tensor, cache: MoRCache | None,
                   shared_kv: dict | None) -> torch.Tensor:
        """Recursion r >= 2 of the shared block on the ``active`` tokens only (recursion-wise KV).

        The active tokens are gathered in causal order at their original RoPE positions, so they see only
        each other (under KV sharing: recursion 1's keys and values of every real token at or before them).
        With expert-choice router weights ``weight`` [B, n] their state becomes H + g f(H)
        (expert_choice_router.py, STEP 5); without (token-choice) it becomes f(H).
        """
        index, ok = compact(active)
        if index.shape[1] == 0:
            return x
        full = bool(ok.all())
        gather = index[..., None].expand(-1, -1, x.shape[-1])
        xs = x.gather(1, gather)
        if shared_kv is not None:
            plan = self._shared_kv_plan(positions, index, ok, live, cache, shared_kv)
        else:
            own = None if cache is None else cache.recursions[r - 2]
            plan = self.decoder.plan(positions.gather(1, index), cache=own, key_valid=None if full else ok)
        with self._attention_of(r):
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
        shared_kv = {} if cfg.kv_sharing else None
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
                first = self._first_recursion_plan(plan, shared_kv)
                x = x + weight[..., None].to(x.dtype) * self.decoder.run_blocks(x, first, layers=self.middle)
            else:
                x = self._recursion(x, positions, selected, weight, r, live, cache, shared_kv)
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
        shared_kv = {} if cfg.kv_sharing else None
        # recursion 1: every token, unscaled
        x = self.decoder.run_blocks(x, self._first_recursion_plan(plan, shared_kv), layers=self.middle)
        depth = live.long()
        for r in range(2, cfg.recursions + 1):
            selected = live & (assigned >= r)
            x = self._recursion(x, positions, selected, None, r, live, cache, shared_kv)
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
        # Under KV sharing recursions >= 2 read the main cache (recursion 1's keys and values): none of their own.
        n = 0 if self.config.kv_sharing else self.config.recursions - 1
        return MoRCache(self.decoder.new_cache(batch_size), [self.decoder.new_cache(batch_size) for _ in range(n)])

    def decode(self, input_ids: torch.Tensor, cache: MoRCache, valid: torch.Tensor | None = None) -> DecodeOutput:
        h, depth, _, _ = self._run(input_ids, cache, valid, training_form=False)
        if valid is None:
            logits = self.decoder.head(h)
        else:  # padding is no query: no head either
            logits = h.new_zeros(*h.shape[:-1], self.config.vocab_size)
            logits[valid] = self.decoder.head(h[valid]).to(logits.dtype)
        return DecodeOutput(logits, (depth - 1).clamp_min(0))

    # -- compute ------------------------------------------------------------------------------

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
        n_real, pairs = compute.active_key_pairs(real)
        total = self.decoder.layers_flops(cfg.unshared_first + cfg.unshared_last, n_real, pairs)
        total += self.decoder.layers_flops(cfg.n_shared, n_real, pairs)  # recursion 1: every real token
        seen = real.long().cumsum(1)  # KV sharing: real tokens at or before each position (recursion 1's keys)
        for r in range(2, cfg.recursions + 1):
            active = d >= r
            queries, key_pairs = compute.active_key_pairs(active)
            if cfg.kv_sharing:
                key_pairs = float((seen * active).sum())
            total += self.decoder.layers_flops(cfg.n_shared, queries, key_pairs, self._recursion_matmul_params)
        total += self._router_flops([float((real & (d >= r - 1)).sum()) for r in range(1, cfg.recursions + 1)])
        return total + compute.head_flops(cfg.d_model, cfg.vocab_size, n_real)

    def decode_flops(self, steps: torch.Tensor | None, valid: torch.Tensor | None = None,
                     participation: torch.Tensor | None = None) -> float:
        depths = steps + 1 if valid is None else torch.where(valid, steps + 1, 0)
        return self.analytic_flops_for_depths(depths)

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Inference: the maximum (every token takes R recursions). Training: see the module docstring."""
        cfg, t = self.config, seq_len
        if not training:
            return self.analytic_flops_for_depths(torch.full((1, t), cfg.recursions)) / t
        total = self.decoder.layers_flops(cfg.unshared_first + cfg.unshared_last, t, compute.causal_key_pairs(t))
        total += compute.head_flops(cfg.d_model, cfg.vocab_size, t)
        if cfg.routing == "expert":
            active = [float(cfg.tokens_at(r, t)) for r in range(1, cfg.recursions + 1)]
        else:  # balanced assignment: a fraction (R-r+1)/R of the tokens reaches recursion r
            active = [t * (cfg.recursions - r + 1) / cfg.recursions for r in range(1, cfg.recursions + 1)]
        for r, a in enumerate(active, start=1):
            if r == 1:
                total += self.decoder.layers_flops(cfg.n_shared, a, a * (a + 1) / 2)
            elif cfg.kv_sharing:  # chosen tokens spread evenly: (T+1)/2 of recursion 1's keys each
                total += self.decoder.layers_flops(cfg.n_shared, a, a * (t + 1) / 2, self._recursion_matmul_params)
            else:
                total += self.decoder.layers_flops(cfg.n_shared, a, a * (a + 1) / 2, self._recursion_matmul_params)
        total += self._router_flops([float(t), *active[:-1]])
        return total / t
