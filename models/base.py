"""The plugin contract (docs/design.md, "The plugin contract"): what every method provides to the harness.

A method is a :class:`LanguageModel` subclass with a typed ``Config`` (a :class:`ModelConfig`
subclass), registered by name. It implements

* :meth:`forward` -- the training forward: ids and targets -> loss (with any auxiliary loss) and stats;
* :meth:`new_cache` and :meth:`decode` -- deployed inference, incremental with a KV cache
  (hard pruning, exact sequential latent steps, ...);
* :meth:`analytic_flops_per_token` -- the FLOPs the tests compare with the ledger's measurement
  (and :meth:`decode_flops`, the count for what each token actually ran, where that varies: its extra
  steps, and for per-layer routing its ``participation``, both reported by :meth:`decode`).

:meth:`score` (per-token log-probabilities the way the method is deployed) and
:meth:`train_flops_per_token` (for budget matching) follow from those and rarely need overriding.
The default implementations are the vanilla decoder's, so a method states only what differs.

Declarations (read by the harness and the contract tests, never guessed from names or attributes):

* ``adaptive`` and :meth:`max_extra_steps` / :meth:`force_steps` -- whether tokens take a varying
  number of extra steps, the most they may take, and how to make every token take a given number;
* :meth:`evaluation_spec` -- extra evaluation metrics (:class:`EvalSpec`: Jacobi gaps, exact decoding);
* :meth:`training_flops_exact` -- whether the ledger's training count equals the analytic one;
* ``bench_roles`` and ``fixed_twin`` -- the benchmarks a method takes part in (:data:`BENCH_ROLES`);
* ``test_variants`` -- config overrides every contract test also runs (tests/test_contract.py);
* ``reference_weight_decay`` -- the weight decay of the method's reference recipe (paper-scale plans);
* ``depth_baseline`` -- a recursive or adaptive-depth baseline that claim C2 compares PonderLM-3 with.

A plugin declares, for example::

    @register("my_method")
    class MyMethod(LanguageModel):
        Config = MyConfig
        adaptive = True
        test_variants = {"depth1": {"max_depth": 1}, "token": {"routing": "token"}}
        def max_extra_steps(self) -> int: return self.config.max_depth - 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import compute
from harness.core.config import ModelConfig
from models.backbone import IGNORE_INDEX, Decoder, KVCache

# Benchmark roles (harness/bench): what a method declares in ``bench_roles`` to take part.
JACOBI_TRAINING = "jacobi_training"  # training is a Jacobi solve: Config.jacobi_passes (the J drawn)
#                                      and forward(..., jacobi_passes=J) time each J against vanilla
PRUNED_DECODING = "pruned_decoding"  # adaptive decoding against its ``fixed_twin`` (same decoder
#                                      weights, every step taken); needs max_extra_steps/force_steps
#                                      and ``steps_field``, the config field that sets the maximum
BENCH_ROLES = frozenset({JACOBI_TRAINING, PRUNED_DECODING})


@dataclass(frozen=True)
class EvalSpec:
    """Extra evaluation metrics a method asks for (harness/evaluate.py).

    ``jacobi``: the parallel (training-form) loss is a Jacobi solve of deployed decoding, so their
    difference is reported as ``jacobi_gap``. ``exact_overrides``: config changes under which deployed
    decoding is the exact fixed point of that solve (PonderLM-3 with tau > 0: ``prune_threshold=0``);
    when given, the loss under them is reported as ``exact_val_loss``, ``jacobi_gap`` is measured
    against it and ``consistency_gap`` against deployed decoding.
    """

    jacobi: bool = False
    exact_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainOutput:
    loss: torch.Tensor  # the objective to minimise: LM loss plus any auxiliary loss
    lm_loss: torch.Tensor  # mean next-token cross-entropy alone
    stats: dict[str, float] = field(default_factory=dict)  # e.g. mean_extra_steps, aux_loss


@dataclass
class DecodeOutput:
    logits: torch.Tensor  # [B, n, V]: the next-token logits after each given token
    steps: torch.Tensor | None = None  # [B, n] extra steps taken per token, for adaptive methods
    # [B, n, U] bool: the token ran routed unit u (a layer it may skip, as in Mixture-of-Depths). What a token
    # ran is then part of the output, so decode_flops counts it without state kept in the model.
    participation: torch.Tensor | None = None


@dataclass
class ScoreOutput:
    logprobs: torch.Tensor  # [B, T] log p(target_t | inputs_<=t); 0 where the target is IGNORE_INDEX
    steps: torch.Tensor | None = None  # [B, T] extra steps per token (adaptive methods)
    greedy: torch.Tensor | None = None  # [B, T] argmax of the same deployed distributions (greedy next token)
    participation: torch.Tensor | None = None  # [B, T, U] as DecodeOutput's; False at padding


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


class LanguageModel(nn.Module):
    """Base class of every registered method; as it stands, the vanilla decoder."""

    Config: ClassVar[type[ModelConfig]] = ModelConfig
    # Tokens take a varying number of extra steps (routing, halting, pruning): inference FLOPs are
    # at most analytic_flops_per_token, and force_steps(max_extra_steps()) reaches it.
    adaptive: ClassVar[bool] = False
    bench_roles: ClassVar[frozenset[str]] = frozenset()  # a subset of BENCH_ROLES
    fixed_twin: ClassVar[str | None] = None  # registered method: this one with every step taken
    steps_field: ClassVar[str | None] = None  # config field setting max_extra_steps (PRUNED_DECODING)
    # Named config overrides the contract tests run besides the defaults (e.g. K=0, another routing).
    test_variants: ClassVar[dict[str, dict[str, Any]]] = {}
    # Overrides on top of the contract's tiny config under the defaults and every variant: a shape the
    # method's config allows (Mixture-of-Recursions needs n_layers - 2 to split into its recursions).
    test_base: ClassVar[dict[str, Any]] = {}
    # A recursive or adaptive-depth baseline (shared-weight loops, recursions, routed or halted depth): claim C2
    # compares PonderLM-3 with every such arm of a study at equal inference FLOPs (harness/claims.py).
    depth_baseline: ClassVar[bool] = False
    # AdamW weight decay of the method's reference training recipe (its official script; None: none, the
    # scale's default applies). The plan's Pythia scale trains the method with it unless --set
    # train.weight_decay is given (harness/plan/ladder.py); the CPU rungs keep TrainConfig's for every method.
    reference_weight_decay: ClassVar[float | None] = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.decoder = Decoder(config)

    # -- training -------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> TrainOutput:
        loss = self.decoder.head_loss(self.decoder.hidden(input_ids), targets)
        return TrainOutput(loss=loss, lm_loss=loss)

    # -- deployed inference ---------------------------------------------------------------------

    def new_cache(self, batch_size: int) -> Any:
        return self.decoder.new_cache(batch_size)

    def decode(self, input_ids: torch.Tensor, cache: Any, valid: torch.Tensor | None = None) -> DecodeOutput:
        """Append tokens [B, n] to the cache and return next-token logits after each of them.

        ``valid`` [B, n] marks real tokens; invalid ones (padding) become no key and are not counted.
        """
        return DecodeOutput(self.decoder(input_ids, cache=cache, valid=valid))

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, targets: torch.Tensor) -> ScoreOutput:
        """Per-token log-probabilities computed exactly as the method is deployed.

        Positions whose target is IGNORE_INDEX are padding at the end of a row: they are decoded but
        not counted as keys or queries (causality makes them invisible to the real tokens anyway).
        """
        valid = targets != IGNORE_INDEX
        all_valid = bool(valid.all())
        cache = self.new_cache(input_ids.shape[0])
        out = self.decode(input_ids, cache, valid=None if all_valid else valid)
        compute.record_tokens(valid.sum().item())
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)
        picked = logprobs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        steps = None if out.steps is None else out.steps.masked_fill(~valid, 0)
        ran = None if out.participation is None else out.participation & valid[..., None]
        return ScoreOutput(picked.masked_fill(~valid, 0.0), steps, out.logits.argmax(-1), ran)

    # -- declarations -----------------------------------------------------------------------------

    def max_extra_steps(self) -> int:
        """The most extra steps a token may take (the ``steps`` of :class:`DecodeOutput`); 0 here."""
        return 0

    def force_steps(self, steps: int) -> None:
        """Make every token take exactly ``steps`` extra steps at deployed inference (tests, benchmarks).

        Adaptive methods set their routing to do so; a fixed-compute method takes its steps already.
        """
        if self.adaptive or steps != self.max_extra_steps():
            raise NotImplementedError(f"{type(self).__name__} cannot force {steps} extra steps per token")

    def evaluation_spec(self) -> EvalSpec:
        """Extra evaluation metrics of this method (none here)."""
        return EvalSpec()

    def training_flops_exact(self) -> bool:
        """Whether the ledger's count of one training forward is analytic_flops_per_token(training=True)
        x tokens exactly (False where it is an expectation: sampled passes, learned routing)."""
        return True

    # -- compute --------------------------------------------------------------------------------

    def analytic_flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Forward FLOPs per token of one sequence of ``seq_len`` tokens (docs/design.md, "Compute accounting").

        ``training=True`` gives the training forward's passes (each counted once); for inference,
        adaptive methods may report their maximum here: the ledger measures what actually ran.
        """
        return self.decoder.analytic_forward_flops(
            seq_len, compute.causal_key_pairs(seq_len), seq_len) / seq_len

    def decode_flops(self, steps: torch.Tensor | None, valid: torch.Tensor | None = None,
                     participation: torch.Tensor | None = None) -> float:
        """Forward FLOPs of deployed decoding of fresh rows [B, T] whose tokens took ``steps`` extra steps.

        ``valid`` marks real tokens (right padding); ``participation`` [B, T, U] is what :meth:`decode`
        reported per routed unit (None for methods that report none). Here, a fixed-compute method: each row
        of n real tokens costs n x analytic_flops_per_token(n), whatever ``steps`` says. Adaptive methods
        override; ``harness check`` compares the result with the ledger's measurement.
        """
        shape = (steps if steps is not None else valid).shape
        lengths = [shape[-1]] * shape[0] if valid is None else valid.sum(dim=-1).tolist()
        return float(sum(n * self.analytic_flops_per_token(n) for n in lengths if n))

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) for budget matching: 3x every graded pass.

        Methods with passes under ``no_grad`` override this to count those once.
        """
        return compute.BACKWARD_MULTIPLIER * self.analytic_flops_per_token(seq_len, training=True)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters; ``non_embedding`` leaves out the token embedding and the (untied) LM head.

        Pythia's convention (Biderman et al. 2023, Table 1: 70M has 18.9M non-embedding parameters, i.e.
        without embed_in and embed_out), so a method's count reflects its blocks, not the vocabulary.
        """
        total = sum(p.numel() for p in self.parameters())
        if not non_embedding:
            return total
        embeddings = {id(w): w.numel() for w in (self.decoder.embed_tokens.weight, self.decoder.lm_head.weight)}
        return total - sum(embeddings.values())  # a tied head is one tensor, subtracted once


__all__ = ["BENCH_ROLES", "DecodeOutput", "EvalSpec", "IGNORE_INDEX", "JACOBI_TRAINING", "KVCache",
           "LanguageModel", "PRUNED_DECODING", "ScoreOutput", "TrainOutput", "next_token_loss"]
