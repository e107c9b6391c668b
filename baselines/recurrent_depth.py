"""Recurrent depth (Huginn; Geiping et al. 2025, arXiv 2502.05171): a core block looped r times on a latent state.

Reference code: seal-rg/recurrent-pretraining. ``recpre/raven_modeling_minimal.py`` (``RavenForCausalLM``: forward,
``iterate_forward``, ``core_block_forward``, ``randomized_iteration_sampler``, ``initialize_state``, the exit
evaluators and ``HuginnDynamicCache``), its training model ``recpre/model_dynamic.py`` (``RecurrentGPT``, the same
recurrence and sampler), ``recpre/init.py`` (the "takase" init) and the released shape ``nebel-raven-3.5b``
(``recpre/model_registry.py``, ``recpre/raven_config_minimal.json``). The class docstrings list what differs, and why.

The model (paper Sec. 3, eq. 1), on the backbone's ``n_layers`` = P + R + C distinct layers (``prelude_layers`` P,
``coda_layers`` C, the R layers between them are the core block):

    e = P(embed(x))                              prelude: P ordinary layers
    s_0 ~ TruncNormal(0, sigma^2), sigma = sqrt(2/(5d)) x sqrt(d)   "like-init": an embedding row's init, scaled
    s_i = R(A([s_{i-1}; e])),  i = 1..r          A = Linear(2d, d), no bias (``adapter``, "injection_type linear")
    p = head(norm(C(norm(s_r))))                 coda: C layers; the final norm is applied twice (``ln_f``)

Training (``randomized_iteration_sampler``, "poisson-lognormal-filling"; one draw per forward, i.e. per step):
with t = max(mean_recurrence - k_b, 0), k_b = ``backprop_depth``, tau ~ LogNormal(log(t + k_b) - 1/8, 1/2) and
p = Poisson(tau) + 1 iterations, the first n = max(p - k_b, 0) run under ``torch.no_grad`` and the last
k = min(k_b, p) with gradients (truncated backpropagation: only the last k iterations, the prelude through the
injection of those k, the coda and head get gradients). E[p] = max(mean_recurrence, k_b) + 1. The ledger counts
the n iterations once and the rest 3x (docs/design.md, "Compute accounting"); :meth:`RecurrentDepth.expected_iterations`
gives E[n] and E[k] exactly (:func:`poisson_lognormal_pmf`), so ``train_flops_per_token`` is the expectation and
``training_flops_exact`` is False unless ``sampling = "fixed"`` (n = t, k = k_b every step, the reference's "fixed").

Stratified draws (decided here, ``stratified``, default on): training forward i takes p = F^-1(u_i), F the CDF of
p above and u_i = frac(1/2 + i (sqrt 5 - 1)/2) (a Weyl sequence; i is the buffer ``sampler_draws``, saved with the
weights), instead of iid draws. Every draw has the reference's distribution, but the mean over a run converges
about like 1/N instead of 1/sqrt(N): at pico (vocabulary 2048, 128 tokens, the defaults) a step's training FLOPs
vary by 25% (one sd), so over 30 / 150 / 1,000 steps iid draws miss the planned budget by 4.5 / 2.0 / 0.8% (one
sd; the trainer warns above 2%), the Weyl draws by 1.5 / 0.5 / 0.07% (measured). ``stratified = False`` draws as
the reference does, call for call on the global RNG (which the trainer seeds per step), so one seed gives the
reference's (n, k) and s_0 (scripts/parity_recurrent_depth.py).

Deployed (the reference's eval mode and its ``num_steps``): r = ``recurrence`` iterations (default
``mean_recurrence``), every token, one KV stack per (iteration, core layer) -- the reference's cache keeps one
entry per ``step_idx`` -- plus the prelude's and the coda's: P + rR + C cache layers, one slot per token.

Initial state in deployed decoding (decided here): the reference draws s_0 afresh on every call, so cached
decoding would not equal recomputation. Here s_0 of the token at position t is a fixed draw from the same
distribution, a function of (t, channel) only (:data:`DEPLOYED_STATE_SEED`): a prefix decoded in pieces, at once
or token by token starts every token from the same state, and it is in the distribution training saw.
``state_init = "zero"`` starts from 0 in training and deployment alike (the reference's ``state_init="zero"``,
or ``init_scale=0`` at inference).

Adaptive exit (``recurrent_depth_adaptive``; paper Sec. 6.1, ``generate_with_adaptive_compute`` and the exit
evaluators): token t stops after iteration i once the criterion of successive iterations falls below
``exit_threshold``, at the latest after r:

* ``"kl"`` (default; the paper's): KL(q_{i-1} || q_i) of the output distributions, q_i = softmax(head(norm(C(
  norm(s_i))))), q_0 uniform (``KLExitEvaluator``: ``F.kl_div(log q_i, log q_{i-1}, log_target=True)``); the
  paper's threshold 5e-4 (the code's "auto" is 1e-3). The coda and head run after every iteration, and the
  prediction is that of the exit iteration: the coda's keys of token t are those of its exit iteration (each
  check overwrites them, as ``predict_from_latents`` does with its cache);
* ``"latent-diff"`` (``LatentDiffExitEvaluator``): ||s_i - s_{i-1}|| / ||s_i||, threshold 0.03 (its "auto");
  the coda and head run once, on the exit state.

A token that exited at iteration e is still a key for later tokens at iterations i > e: its keys and values in
core layer j are those of its iteration e (the reference's ``latest-m4`` cache lookup: the latest iteration with
the same core layer), copied forward, never recomputed. The coda check of a token attends to the earlier tokens'
final coda keys, so a decode call runs its tokens one position after another, as the reference's
``_prefill_with_varied_exit_steps`` does; batch rows run in lock-step, and a row that has exited is no query and
is not counted (the batch computes it and discards it, as PonderLM-2's lock-step rows). The latent-diff rule runs
the same loop (its decisions would allow all positions at once; one code path keeps it simple): scoring 8 x 128
tokens at pico takes ~4-6 s so, against ~0.2 s for the fixed-r model's parallel decoding.

Compute (ledger and :meth:`RecurrentDepth.analytic_flops_for_depths`): per token, P prelude layers, and per
iteration it takes R core layers and the adapter (2 x 2d x d FLOPs, ``other_flops``); the coda and head once
("latent-diff", fixed) or after every iteration ("kl"); every layer's query sees every real token at or before it.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from harness.core import compute
from harness.core.config import ModelConfig, require
from harness.core.registry import register
from models.backbone import AttentionPlan, KVCache, init_weight
from models.base import DecodeOutput, LanguageModel, TrainOutput
from models.shared import constant_steps

SAMPLINGS = ("poisson-lognormal-filling", "fixed")
STATE_INITS = ("like-init", "zero")
EXIT_CRITERIA = {"kl": 5e-4, "latent-diff": 0.03}  # criterion -> default threshold (paper; the code's "auto")
SIGMA = 0.5  # the log-normal's sigma in randomized_iteration_sampler (hard-coded there)
GOLDEN = (math.sqrt(5) - 1) / 2  # the stratified draws' step: u_i = frac(1/2 + i GOLDEN) (a Weyl sequence)
# deployed s_0 at position t: row t % STATE_CHUNK of chunk t // STATE_CHUNK, drawn from seed DEPLOYED_STATE_SEED + chunk
DEPLOYED_STATE_SEED, STATE_CHUNK = 0, 256


@dataclass
class RecurrentDepthConfig(ModelConfig):
    summary = "recurrent depth (Huginn): prelude, a core block looped r times with the input injected, coda"

    n_layers: int = 3  # stored layers P + R + C (the backbone's default 2 leaves no core block)
    embed_scale_rule: str = "sqrt(d)"  # RavenForCausalLM.emb_scale = sqrt(n_embd)
    rope_theta: float = 50000.0  # raven_config_minimal.py rope_base
    norm_eps: float = 1e-6  # raven_config_minimal.json norm_eps
    prelude_layers: int = 1  # P (reference 2 of 8 layers); the core block is n_layers - P - C layers
    coda_layers: int = 1  # C (reference 2)
    mean_recurrence: int = 8  # mean iterations in training (reference 32), and deployed r unless `recurrence` is set
    backprop_depth: int = 2  # k_b: iterations with gradients (reference mean_backprop_depth 8)
    sampling: str = "poisson-lognormal-filling"  # or "fixed": n = mean - k_b, k = k_b every step
    stratified: bool = True  # draw p by a Weyl sequence through its inverse CDF (module docstring); False: iid
    recurrence: int | None = None  # deployed r (None: mean_recurrence, the reference's eval default)
    state_init: str = "like-init"  # s_0: "like-init" (reference) or "zero"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prelude_layers", "coda_layers"):
            require(self, name, isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                    "must be an integer >= 0")
        require(self, "n_layers", self.n_layers - self.prelude_layers - self.coda_layers >= 1,
                f"must exceed prelude_layers + coda_layers = {self.prelude_layers + self.coda_layers} "
                "(the core block needs a layer)")
        require(self, "mean_recurrence", isinstance(self.mean_recurrence, int) and self.mean_recurrence >= 1,
                "must be an integer >= 1")
        require(self, "backprop_depth", isinstance(self.backprop_depth, int) and self.backprop_depth >= 1,
                "must be an integer >= 1 (the last iterations get gradients)")
        require(self, "sampling", self.sampling in SAMPLINGS, f"must be one of {', '.join(SAMPLINGS)}")
        r = self.recurrence
        require(self, "recurrence", r is None or (isinstance(r, int) and r >= 1),
                "must be an integer >= 1, or None for mean_recurrence")
        require(self, "state_init", self.state_init in STATE_INITS, f"must be one of {', '.join(STATE_INITS)}")

    @property
    def core_layers(self) -> int:
        return self.n_layers - self.prelude_layers - self.coda_layers

    @property
    def deployed_recurrence(self) -> int:
        return self.mean_recurrence if self.recurrence is None else self.recurrence

    @property
    def effective_depth(self) -> int:
        """P + R x mean_recurrence + C: the reference's ``effective_expected_depth``, the L of its output init."""
        return self.prelude_layers + self.core_layers * self.mean_recurrence + self.coda_layers


@register("recurrent_depth")
class RecurrentDepth(LanguageModel):
    """Recurrent depth (Huginn) at a fixed number of iterations r when deployed.

    ==================================  =====================================  ====================================
    reference behaviour                 here                                   why
    ==================================  =====================================  ====================================
    SandwichBlock: x = n2(x + attn(n1   the backbone's pre-norm LLaMA block,   every method shares one block. The
    x)); x = n4(x + mlp(n3 x)); qk      no qk bias; state not normalised       state still converges (pico: RMS
    bias; fused Wqkv; interleaved RoPE  between iterations; rotate-half RoPE   3.59 after 300 steps at 8 and at
                                                                               64 iterations; parity script: the
                                                                               reference's loop, this block)
    2 prelude / 4 core / 2 coda layers  ``prelude_layers`` 1, ``coda_layers``  pico has 3 layers: one per part is
    of 8 (nebel-raven-3.5b)             1, core = n_layers - 2                 the only split keeping all three;
                                                                               P = C = 2 at 8 layers is the 2/4/2
    mean_recurrence 32,                 8 and 2 (ratio 1/4 kept)               at pico (vocab 2048) 2.95x vanilla's
    mean_backprop_depth 8                                                      inference FLOPs (looped K=3: 3.14x)
                                                                               and 1.95x its training FLOPs; 32/8
                                                                               would be 9.5x and 5.2x
    poisson-lognormal-filling: iid r    the same distribution, stratified      iid draws miss a 150-step run's
    per step, truncated backprop        draws (``stratified=False``: the       budget by 2.0% (1 sd), the Weyl
                                        reference's calls, same seed, same r)  ones by 0.5%; parity uses iid
    s_0 random at every call,           training: the same draw; deployed:     cached decoding must equal
    inference too                       a fixed draw per position              recomputation; same distribution
    tied embeddings                     untied (the backbone's)                every method here is untied
    init "takase": out-proj std /       the backbone's init with o_proj and    same distributions (the scaled
    sqrt(2 (P + R mean + C))            down_proj scaled to that std           draws stay paired across methods)
    eval: num_steps = mean_recurrence   ``recurrence`` (None: mean)            steps_field of the adaptive twin
    ==================================  =====================================  ====================================
    """

    Config = RecurrentDepthConfig
    config: RecurrentDepthConfig
    depth_baseline = True  # claim C2 compares PonderLM-3 with it at equal FLOPs (the adaptive twin inherits it)
    # The Huginn run (launch_configs/frontier_nebel_512_nodes.yaml) trains with ELLISAdam, not AdamW: decoupled decay
    # p *= 1 - (lr / peak lr) 4e-5 per step, which maps on no AdamW weight decay: the scale's default applies.
    reference_weight_decay = None
    test_variants = {"fixed_sampling": {"sampling": "fixed", "backprop_depth": 3},
                     "r1_zero_state": {"recurrence": 1, "state_init": "zero"},
                     "core_only": {"prelude_layers": 0, "coda_layers": 0, "n_layers": 2, "mean_recurrence": 3}}

    def __init__(self, config: RecurrentDepthConfig):
        super().__init__(config)
        c = config
        self.prelude = range(0, c.prelude_layers)
        self.core = range(c.prelude_layers, c.prelude_layers + c.core_layers)
        self.coda = range(c.prelude_layers + c.core_layers, c.n_layers)
        self.adapter = nn.Linear(2 * c.d_model, c.d_model, bias=False)
        init_weight(self.adapter.weight, c.weight_std, c)  # the reference's "adapter": std sqrt(2/(5d))
        if c.ponder_init:
            # The reference's output projections are at std / sqrt(2 x effective depth), the backbone's at
            # std / sqrt(2 n_layers): scaling the drawn weights gives the reference's (truncated) distribution
            # and keeps the draws paired with the other methods'.
            scale = math.sqrt(c.n_layers / c.effective_depth)
            with torch.no_grad():
                for block in self.decoder.layers:
                    block.self_attn.o_proj.weight.mul_(scale)
                    block.mlp.down_proj.weight.mul_(scale)
        self._deployed_states: torch.Tensor | None = None  # [positions, d] table, see initial_state
        # training forwards drawn so far (stratified sampling); saved with the weights, so a resumed run goes on
        self.register_buffer("sampler_draws", torch.zeros((), dtype=torch.long))

    def max_extra_steps(self) -> int:
        return self.config.deployed_recurrence - 1

    # -- the recurrence --------------------------------------------------------------------------

    def adapter_flops(self) -> float:
        """Matmul FLOPs of the injection A([s; e]) for one token: Linear(2d, d), 4 d^2."""
        return 2.0 * 2 * self.config.d_model * self.config.d_model

    def sample_iterations(self) -> tuple[int, int]:
        """(n, k): iterations without and with gradients for this forward (``randomized_iteration_sampler``).

        Training: "poisson-lognormal-filling", stratified (``stratified``: the draw u_i = frac(1/2 + i phi) of
        training forward i through the inverse CDF, :func:`poisson_lognormal_pmf`) or as the reference draws it
        (the same calls on the global RNG); or "fixed". Eval mode: (r, 0), the reference's eval branch with
        r = ``recurrence``.
        """
        cfg = self.config
        if not self.training:
            return cfg.deployed_recurrence, 0
        s = cfg.backprop_depth
        t = max(cfg.mean_recurrence - s, 0)
        if cfg.sampling == "fixed":
            return t, s
        if cfg.stratified:
            u = (0.5 + int(self.sampler_draws) * GOLDEN) % 1.0
            self.sampler_draws += 1
            p = 1 + bisect.bisect_left(_cumulative(cfg.mean_recurrence, s), u)
        else:
            torch.rand((1,))  # the reference's meta-tensor test draws one uniform first: one seed, its (n, k)
            mu = math.log(t + s) - SIGMA ** 2 / 2
            rate = torch.zeros((1,)).log_normal_(mean=mu, std=SIGMA)
            p = int(torch.poisson(torch.tensor([rate], dtype=torch.float)).item()) + 1
        return max(p - s, 0), min(s, p)

    def expected_iterations(self) -> tuple[float, float]:
        """(E[n], E[k]) of :meth:`sample_iterations` in training (exact up to the quadrature error, ~1e-8)."""
        cfg = self.config
        return _expected_iterations(cfg.mean_recurrence, cfg.backprop_depth, cfg.sampling)

    def initial_state(self, e: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """s_0 [B, n, d] for prelude outputs e [B, n, d] at RoPE ``positions`` [B, n] ("like-init" or zero)."""
        cfg = self.config
        if cfg.state_init == "zero":
            return torch.zeros_like(e)
        if self.training:
            std = cfg.weight_std
            x = torch.randn_like(e)  # overwritten next, but drawn as the reference does: one seed, its draws
            nn.init.trunc_normal_(x, mean=0.0, std=std, a=-3 * std, b=3 * std)
            return x * cfg.embed_scale
        return self._deployed_state_table(int(positions.max()) + 1).to(e.device, e.dtype)[positions]

    def _deployed_state_table(self, n_positions: int) -> torch.Tensor:
        """Fixed "like-init" draws [>= n_positions, d]: chunk c of STATE_CHUNK positions from its own seed, so the
        table's rows never depend on how far it has grown."""
        table = self._deployed_states
        have = 0 if table is None else table.shape[0]
        if have < n_positions:
            cfg, std = self.config, self.config.weight_std
            chunks = [] if table is None else [table]
            for chunk in range(have // STATE_CHUNK, -(-n_positions // STATE_CHUNK)):
                generator = torch.Generator().manual_seed(DEPLOYED_STATE_SEED + chunk)
                rows = nn.init.trunc_normal_(torch.empty(STATE_CHUNK, cfg.d_model), 0.0, std, -3 * std, 3 * std,
                                             generator=generator)
                chunks.append(rows * cfg.embed_scale)
            table = self._deployed_states = torch.cat(chunks)
        return table

    def iterate(self, x: torch.Tensor, e: torch.Tensor, plan: AttentionPlan, iteration: int) -> torch.Tensor:
        """One iteration s -> R(A([s; e])) (``core_block_forward``); cache layers P + iteration x R + j."""
        compute.record_matmul(plan.queries * self.adapter_flops())
        x = self.adapter(torch.cat([x, e], dim=-1))
        offset = iteration * self.config.core_layers
        return self.decoder.run_blocks(x, plan, layers=self.core, cache_layer_offset=offset)

    def coda_hidden(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """norm(C(norm(s))): the hidden state the head reads (the final norm used twice, as ``ln_f``)."""
        cfg, dec = self.config, self.decoder
        # cache layers P + rR + j: offset (r - 1) R, as the coda's decoder indices start at P + R
        offset = (cfg.deployed_recurrence - 1) * cfg.core_layers
        return dec.norm(dec.run_blocks(dec.norm(x), plan, layers=self.coda, cache_layer_offset=offset))

    # -- training ------------------------------------------------------------------------------

    def loss_with(self, input_ids: torch.Tensor, targets: torch.Tensor, iterations: tuple[int, int] | None = None,
                  state: torch.Tensor | None = None) -> TrainOutput:
        """The training forward with the (n, k) iterations and s_0 given, else drawn (in the reference's order:
        s_0, then (n, k)); the parity script passes both."""
        dec = self.decoder
        b, t = input_ids.shape
        positions = dec.positions_after(0, b, t, input_ids.device)
        plan = dec.plan(positions)
        e = dec.run_blocks(dec.embed(input_ids), plan, layers=self.prelude)
        x = self.initial_state(e, positions) if state is None else state
        n_free, n_graded = self.sample_iterations() if iterations is None else iterations
        with torch.no_grad():
            for i in range(n_free):
                x = self.iterate(x, e, plan, i)
        for i in range(n_free, n_free + n_graded):
            x = self.iterate(x, e, plan, i)
        loss = dec.head_loss(self.coda_hidden(x, plan), targets)
        stats = {"mean_extra_steps": float(n_free + n_graded - 1), "no_grad_iterations": float(n_free),
                 "grad_iterations": float(n_graded)}
        return TrainOutput(loss=loss, lm_loss=loss, stats=stats)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> TrainOutput:
        return self.loss_with(input_ids, targets)

    def training_flops_exact(self) -> bool:
        return self.config.sampling == "fixed"

    # -- deployed inference ----------------------------------------------------------------------

    def new_cache(self, batch_size: int) -> KVCache:
        cfg, p = self.config, self.decoder.lm_head.weight
        n_layers = cfg.prelude_layers + cfg.deployed_recurrence * cfg.core_layers + cfg.coda_layers
        return KVCache(n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, device=p.device, dtype=p.dtype)

    def _prelude(self, input_ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None):
        """Allocate the new tokens' slots; (plan, positions, e, s_0) of the call."""
        dec = self.decoder
        b, n = input_ids.shape
        positions = dec.positions_after(cache.length, b, n, input_ids.device)
        plan = dec.plan(positions, cache=cache, key_valid=valid)
        e = dec.run_blocks(dec.embed(input_ids), plan, layers=self.prelude)
        return plan, positions, e, self.initial_state(e, positions)

    def decode(self, input_ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None) -> DecodeOutput:
        plan, _, e, x = self._prelude(input_ids, cache, valid)
        for i in range(self.config.deployed_recurrence):
            x = self.iterate(x, e, plan, i)
        logits = self.decoder.head(self.coda_hidden(x, plan), valid)
        return DecodeOutput(logits, constant_steps(input_ids, self.max_extra_steps()))

    # -- compute -------------------------------------------------------------------------------

    def coda_every_iteration(self) -> bool:
        """Whether the coda and head run after every iteration (the KL exit check); here, once per token."""
        return False

    def analytic_flops_for_depths(self, depths: torch.Tensor) -> float:
        """Forward FLOPs of deployed inference over rows whose tokens took ``depths`` [B, T] iterations (0: padding).

        Every layer's query sees every real token of its row at or before it (exited tokens through their
        latest keys); per iteration a token runs the adapter and R core layers; the coda and head run once per
        token, or after every iteration (:meth:`coda_every_iteration`).
        """
        cfg = self.config
        d = depths.reshape(-1, depths.shape[-1]).to(torch.float64)
        real = d > 0
        seen = real.cumsum(1).to(torch.float64) * real  # keys each real token's query sees
        tokens, pairs = float(real.sum()), float(seen.sum())
        iterations, iteration_pairs = float(d.sum()), float((d * seen).sum())
        dec = self.decoder
        total = dec.layers_flops(cfg.prelude_layers, tokens, pairs)
        total += dec.layers_flops(cfg.core_layers, iterations, iteration_pairs) + iterations * self.adapter_flops()
        readouts, readout_pairs = (iterations, iteration_pairs) if self.coda_every_iteration() else (tokens, pairs)
        total += dec.layers_flops(cfg.coda_layers, readouts, readout_pairs)
        return total + compute.head_flops(cfg.d_model, cfg.vocab_size, readouts)

    def decode_flops(self, steps: torch.Tensor | None, valid: torch.Tensor | None = None,
                     participation: torch.Tensor | None = None) -> float:
        depths = steps.to(torch.long) + 1
        return self.analytic_flops_for_depths(depths if valid is None else torch.where(valid, depths, 0))

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Inference: every token at r iterations. Training: the forward at E[n + k] iterations."""
        if not training:
            full = torch.full((1, seq_len), self.config.deployed_recurrence)
            return self.analytic_flops_for_depths(full) / seq_len
        free, graded = self.expected_iterations()
        outer, per_iteration = self._training_parts(seq_len)
        return (outer + (free + graded) * per_iteration) / seq_len

    def train_flops_per_token(self, seq_len: int) -> float:
        """3x the prelude, coda, head and the k graded iterations; 1x the n iterations under no_grad (expected)."""
        free, graded = self.expected_iterations()
        outer, per_iteration = self._training_parts(seq_len)
        return (compute.BACKWARD_MULTIPLIER * (outer + graded * per_iteration) + free * per_iteration) / seq_len

    def _training_parts(self, seq_len: int) -> tuple[float, float]:
        """Forward FLOPs of one training sequence: (prelude + coda + head, one iteration)."""
        cfg, t = self.config, seq_len
        pairs = compute.causal_key_pairs(t)
        outer = self.decoder.layers_flops(cfg.prelude_layers + cfg.coda_layers, t, pairs)
        outer += compute.head_flops(cfg.d_model, cfg.vocab_size, t)
        return outer, self.decoder.layers_flops(cfg.core_layers, t, pairs) + t * self.adapter_flops()


@functools.cache
def poisson_lognormal_pmf(mean_recurrence: int, backprop_depth: int) -> tuple[float, ...]:
    """P(p = j) for j = 1, 2, ... of "poisson-lognormal-filling": p = 1 + Poisson(tau), tau ~ LogNormal(mu, 1/2),
    mu = log(t + s) - 1/8 (so E[tau] = t + s), t = max(mean_recurrence - s, 0), s = backprop_depth; up to a tail
    below 1e-12. E_tau[e^-tau tau^m / m!] by Gauss-Hermite quadrature in log tau (a smooth integrand; 96 nodes
    give the mean to ~1e-8)."""
    import numpy as np  # only here: the quadrature nodes

    s = backprop_depth
    t = max(mean_recurrence - s, 0)
    nodes, weights = np.polynomial.hermite_e.hermegauss(96)  # probabilists': weight exp(-z^2 / 2)
    weights = weights / math.sqrt(2 * math.pi)
    rate = np.exp(math.log(t + s) - SIGMA ** 2 / 2 + SIGMA * nodes)
    term, pmf, total = np.exp(-rate), [], 0.0
    for m in range(100_000):
        pmf.append(float((weights * term).sum()))
        total += pmf[-1]
        if total > 1 - 1e-12 and m > t + s:
            break
        term = term * rate / (m + 1)
    return tuple(pmf)


@functools.cache
def _cumulative(mean_recurrence: int, backprop_depth: int) -> list[float]:
    """P(p <= j) for j = 1, 2, ...: the inverse CDF of the stratified draws is a bisection in it."""
    return list(itertools.accumulate(poisson_lognormal_pmf(mean_recurrence, backprop_depth)))


@functools.cache
def _expected_iterations(mean_recurrence: int, backprop_depth: int, sampling: str) -> tuple[float, float]:
    """(E[n], E[k]) of the training sampler: n = max(p - s, 0), k = min(s, p), s = backprop_depth.

    E[p] = E[tau] + 1 = t + s + 1 exactly; E[k] = sum_{j<s} j P(p = j) + s P(p >= s) from
    :func:`poisson_lognormal_pmf`; E[n] = E[p] - E[k].
    """
    s = backprop_depth
    t = max(mean_recurrence - s, 0)
    if sampling == "fixed":
        return float(t), float(s)
    pmf = poisson_lognormal_pmf(mean_recurrence, backprop_depth)
    below = pmf[:s - 1]  # P(p = j), j = 1..s-1
    expected_k = sum((j + 1) * q for j, q in enumerate(below)) + s * (1.0 - sum(below))
    return t + s + 1.0 - expected_k, expected_k


@dataclass
class RecurrentDepthAdaptiveConfig(RecurrentDepthConfig):
    summary = "recurrent depth (Huginn) with the paper's per-token exit: stop once successive iterations agree"

    exit_criterion: str = "kl"  # "kl" (paper Sec. 6.1) or "latent-diff" (reference LatentDiffExitEvaluator)
    exit_threshold: float | None = None  # None: the criterion's reference value (kl 5e-4, latent-diff 0.03)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self, "exit_criterion", self.exit_criterion in EXIT_CRITERIA,
                f"must be one of {', '.join(EXIT_CRITERIA)}")
        require(self, "exit_threshold", self.exit_threshold is None or self.exit_threshold >= 0,
                "must be >= 0 (0 = never exit early), or None for the criterion's reference value")

    @property
    def threshold(self) -> float:
        return EXIT_CRITERIA[self.exit_criterion] if self.exit_threshold is None else self.exit_threshold


@register("recurrent_depth_adaptive")
class RecurrentDepthAdaptive(RecurrentDepth):
    """Recurrent depth (Huginn) with the per-token adaptive exit of the paper's Sec. 6.1, at most r iterations.

    Training is :class:`RecurrentDepth`'s (the reference trains without exits); its eval-mode forward is the
    fixed-r parallel loss, so the harness's ``parallel_gap`` is the cost of exiting early.

    ==================================  =====================================  ====================================
    reference behaviour                 here                                   why
    ==================================  =====================================  ====================================
    exit when KL(q_{i-1} || q_i) < 5e-4 ``exit_criterion="kl"``, threshold     the paper's rule; the code's "auto"
    (paper; code "auto" 1e-3)           5e-4                                   is 1e-3
    latent-diff 0.03, entropy-diff,     ``"latent-diff"`` kept; the others     latent-diff is the cheap one (no
    cosine, argmax-stability, min-p KL  left out                               coda per check); the paper uses KL
    exited tokens' keys at later        the same (copied forward)              ``lookup_strategy="latest-m4"``
    iterations: latest same-layer entry
    batch rows run until all exit       rows in lock-step, an exited row is    the reference says: benchmark
    (cache polluted), benchmark at B=1  no query and keeps its latest keys     adaptive compute at batch size 1
    the check's coda is real compute    counted (coda + head per iteration)    measured compute, not steps
    ==================================  =====================================  ====================================
    """

    Config = RecurrentDepthAdaptiveConfig
    config: RecurrentDepthAdaptiveConfig
    adaptive = True
    fixed_twin = "recurrent_depth"  # the same weights with every token at r iterations
    steps_field = "recurrence"  # sets max_extra_steps = recurrence - 1 (so no pruned_decoding bench role)
    test_variants = {"kl_mixed": {"exit_threshold": 0.05, "mean_recurrence": 6},
                     "latent_diff": {"exit_criterion": "latent-diff", "exit_threshold": 0.3, "mean_recurrence": 6},
                     "r1": {"recurrence": 1, "state_init": "zero"}}

    def __init__(self, config: RecurrentDepthAdaptiveConfig):
        super().__init__(config)
        self.forced_iterations: int | None = None  # force_steps: decisions overridden, the checks still run

    @torch.no_grad()
    def force_steps(self, steps: int) -> None:
        if not 0 <= steps <= self.max_extra_steps():
            raise ValueError(f"cannot force {steps} extra iterations with recurrence={self.config.deployed_recurrence}")
        self.forced_iterations = steps + 1

    def coda_every_iteration(self) -> bool:
        return self.config.exit_criterion == "kl"

    def decode(self, input_ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None) -> DecodeOutput:
        """Token after token (see the module docstring), each iterating until its exit; rows in lock-step."""
        cfg, dec = self.config, self.decoder
        b, n = input_ids.shape
        _, positions, e, states = self._prelude(input_ids, cache, valid)
        live = torch.ones(b, n, dtype=torch.bool, device=input_ids.device) if valid is None else valid
        logits = e.new_zeros(b, n, cfg.vocab_size)
        iterations = torch.zeros(b, n, dtype=torch.long, device=input_ids.device)
        start, total = cache.length - n, cache.length
        slots = torch.arange(total, device=input_ids.device)
        key_valid = cache.key_valid[:, :total]
        kl = cfg.exit_criterion == "kl"
        for p in range(n):
            slot = start + p
            allowed = (slots <= slot)[None, None, :].expand(b, 1, total)
            running = live[:, p].clone()
            x, ep, position = states[:, p:p + 1], e[:, p:p + 1], positions[:, p:p + 1]
            previous = (torch.full((b, cfg.vocab_size), -math.log(cfg.vocab_size), device=x.device) if kl else x)
            for i in range(cfg.deployed_recurrence):
                if not bool(running.any()):  # every row exited: its latest keys serve the later iterations
                    self._copy_forward(cache, slot, i)
                    continue
                plan = dec.plan(position, allowed=allowed, key_valid=key_valid, query_valid=running[:, None])
                plan.kv_hook = self._row_writer(cache, slot, running)
                x = torch.where(running[:, None, None], self.iterate(x, ep, plan, i), x)
                iterations[:, p] += running.long()
                last = i == cfg.deployed_recurrence - 1
                if kl:  # KLExitEvaluator: the coda and head after every iteration, KL(q_{i-1} || q_i)
                    step_logits = dec.head(self.coda_hidden(x, plan), running[:, None])[:, 0]
                    log_q = torch.log_softmax(step_logits.float(), dim=-1)
                    change = (previous.exp() * (previous - log_q)).sum(-1)
                    previous = log_q
                else:  # LatentDiffExitEvaluator: ||s_i - s_{i-1}|| / ||s_i||
                    change = (x - previous).norm(dim=-1)[:, 0] / x.norm(dim=-1)[:, 0]
                    previous = x
                if self.forced_iterations is not None:
                    exits = running & (iterations[:, p] >= self.forced_iterations)
                else:
                    exits = running & (change < cfg.threshold)
                if last:
                    exits = running
                if kl:
                    logits[:, p] = torch.where(exits[:, None], step_logits.to(logits.dtype), logits[:, p])
                running = running & ~exits
            if not kl:  # the coda once, on every real row's exit state
                plan = dec.plan(position, allowed=allowed, key_valid=key_valid, query_valid=live[:, p:p + 1])
                plan.kv_hook = self._row_writer(cache, slot, live[:, p])
                logits[:, p] = dec.head(self.coda_hidden(x, plan), live[:, p:p + 1])[:, 0].to(logits.dtype)
        return DecodeOutput(logits, (iterations - 1).clamp_min(0))

    def _row_writer(self, cache: KVCache, slot: int, rows: torch.Tensor):
        """kv_hook writing the keys and values of ``rows`` [B] at ``slot``; the other rows get their latest: in
        core layer j of iteration i > 0 their entry of iteration i - 1 (itself copied forward if they exited
        earlier), in the coda (and iteration 0, where only padding rows are idle) what the layer holds."""
        cfg = self.config
        first_core = cfg.prelude_layers + cfg.core_layers  # core layers of iterations 1.. (0-based)
        end_core = cfg.prelude_layers + cfg.deployed_recurrence * cfg.core_layers
        keep = rows[:, None, None, None]

        def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            source = layer - cfg.core_layers if first_core <= layer < end_core else layer
            keys, values = cache.buffers(source, k.dtype)
            k = torch.where(keep, k, keys[:, :, slot:slot + 1])
            v = torch.where(keep, v, values[:, :, slot:slot + 1])
            return cache.write(layer, slot, k, v)

        return write

    def _copy_forward(self, cache: KVCache, slot: int, iteration: int) -> None:
        """Every row's core keys and values at ``slot`` for ``iteration`` = those of the iteration before."""
        cfg = self.config
        if iteration == 0:  # only a position where every row is padding gets here: no key to keep
            return
        for j in range(cfg.core_layers):
            layer = cfg.prelude_layers + iteration * cfg.core_layers + j
            keys, values = cache.buffers(layer - cfg.core_layers, cache.dtype)
            cache.write(layer, slot, keys[:, :, slot:slot + 1], values[:, :, slot:slot + 1])


__all__ = ["RecurrentDepth", "RecurrentDepthAdaptive", "RecurrentDepthAdaptiveConfig", "RecurrentDepthConfig"]
