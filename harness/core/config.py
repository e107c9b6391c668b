"""Typed, validated configuration for the shared decoder backbone and every method built on it.

A method's config is a dataclass that subclasses :class:`ModelConfig` and adds only its own fields.
Validation lives in ``__post_init__`` and raises :class:`ConfigError` naming the field and the fix,
so a bad ``--set key=value`` fails before anything is built.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from harness.core.errors import ConfigError, HarnessError


@dataclass(frozen=True)
class Size:
    """One rung of the size ladder: only the backbone's shape, never the vocabulary."""

    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int

    def as_overrides(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _swiglu_width(d_model: int, multiple: int = 64) -> int:
    """SwiGLU width whose 3 matrices hold as many weights as a 4d GELU MLP (LLaMA's 8/3 rule)."""
    return multiple * math.ceil(8 * d_model / 3 / multiple)


# CPU rungs where depth matters (calibrated in results/calibration/, docs/design.md "Evidence"): head dimension
# 64 at every rung (the CPU attention kernel at head dimension 16 ran at 18-27% of the matmul rate, and real
# models use 64-128), and shallow, wide shapes: at d=64 the models were width-bound and neither depth nor
# pondering bought anything, while at d=128 two more layers buy a clear loss drop, which is the room pondering
# needs. pico -> nano doubles the depth (and the non-embedding parameters) at the same width: the "one rung up"
# of PonderLM-2's headline (C0) and the depth half of the dense frontier (P1); nano -> micro -> tiny widen.
# With the CPU vocabulary (CPU_VOCAB_SIZE) and TrainConfig's seq_len 128 the LM head (2 d V FLOPs per token)
# is at most 1/3 of the vanilla forward FLOPs at every rung (harness.plan.ladder.lm_head_share, checked in
# tests), as at the paper's 410M where it is ~15%. Mixture-of-Recursions' Middle-Cycle sharing needs
# n_layers - 2 to split into R recursions; at these depths the studies run its Cycle variant (every layer
# shared, unshared_first = unshared_last = 0), one of the MoR paper's four sharing strategies.
# The Pythia rungs copy Pythia's width, depth and heads with a SwiGLU
# MLP of equal parameter count (LLaMA's 8/3 rule). Its width is the official PonderLM-2 configs'
# intermediate_size where they have a model of that shape (LUMIA-Group/PonderLM-2, llama_config/*/config.json:
# "125m" is our 160m, 2064; 410m 2752 and 1.4b 5504 equal the rule; their 1.4b has 32 heads to Pythia's 16,
# and their "2.8b" is 2048 x 48 layers, not Pythia's 2560 x 32). Those configs' rms_norm_eps 0.1 and their
# scripts' optimiser settings are the plan's Pythia scale (harness/plan/ladder.py), not part of a rung.
SIZES: dict[str, Size] = {
    "pico": Size(d_model=128, n_layers=3, n_heads=2, d_ff=_swiglu_width(128, 32)),
    "nano": Size(d_model=128, n_layers=6, n_heads=2, d_ff=_swiglu_width(128, 32)),
    "micro": Size(d_model=192, n_layers=6, n_heads=3, d_ff=_swiglu_width(192, 32)),
    "tiny": Size(d_model=256, n_layers=6, n_heads=4, d_ff=_swiglu_width(256, 32)),
    "70m": Size(d_model=512, n_layers=6, n_heads=8, d_ff=_swiglu_width(512)),
    "160m": Size(d_model=768, n_layers=12, n_heads=12, d_ff=2064),
    "410m": Size(d_model=1024, n_layers=24, n_heads=16, d_ff=_swiglu_width(1024)),
    "1b": Size(d_model=2048, n_layers=16, n_heads=8, d_ff=_swiglu_width(2048)),
    "1.4b": Size(d_model=2048, n_layers=24, n_heads=16, d_ff=_swiglu_width(2048)),
    "2.8b": Size(d_model=2560, n_layers=32, n_heads=32, d_ff=_swiglu_width(2560)),
}
CPU_SIZES = ("pico", "nano", "micro", "tiny")
PYTHIA_SIZES = ("70m", "160m", "410m", "1b", "1.4b", "2.8b")
#: BPE vocabulary of the CPU rungs (DataConfig's default and the CPU plan scale's): small enough that the
#: LM head stays under 1/3 of the forward FLOPs at every CPU rung (see SIZES).
CPU_VOCAB_SIZE = 2048
#: ModelConfig.embed_scale_rule -> c of the embedding scale sqrt(c d) (reference files in the field's comment)
EMBED_SCALE_RULES: dict[str, float] = {"sqrt(2.5d)": 2.5, "sqrt(d)": 1.0}


@dataclass
class ModelConfig:
    """The LLaMA-style backbone shared by every method (RMSNorm, RoPE, SwiGLU, untied embeddings)."""

    vocab_size: int = 8192
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (multi-head); fewer = grouped-query attention
    d_ff: int = 176
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # The reference init of the PonderLM-2 repository (every modeling_llama*.py, ``_init_weights``): weights
    # ~ N(0, 2/(5d)) truncated at +-3 std, output projections (o_proj, down_proj) further / sqrt(2L), and
    # token embeddings scaled at lookup by sqrt(c d), c = ``embed_scale_rule``. On for every method so they
    # share one init (docs/design.md, "Backbone"); off = plain LLaMA (N(0, init_std), unscaled embeddings),
    # which is what transformers computes.
    ponder_init: bool = True
    init_std: float = 0.02  # used when ponder_init is off
    # Under ponder_init: "sqrt(2.5d)" (PonderLM-2's modeling_llama.py with interpolation off, as its scripts
    # run it, and modeling_llama_loop.py: embeddings of unit RMS, like the post-norm hidden states fed back)
    # or "sqrt(d)" (modeling_llama_orin.py = PonderLM-1, modeling_llama_pause.py). Each method's config sets
    # its reference's value; this default is PonderLM-2's.
    embed_scale_rule: str = "sqrt(2.5d)"

    #: one-line description shown by ``python -m harness list``; set by each method's config.
    summary: ClassVar[str] = "LLaMA-style decoder backbone"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            require(self, name, getattr(self, name) > 0, "must be a positive integer")
        require(self, "n_heads", self.d_model % self.n_heads == 0,
                 f"must divide d_model={self.d_model}")
        require(self, "n_heads", (self.d_model // self.n_heads) % 2 == 0,
                 f"must leave an even head dimension for RoPE (d_model/n_heads={self.d_model / self.n_heads:g})")
        require(self, "n_kv_heads", self.n_heads % self.n_kv_heads == 0,
                 f"must divide n_heads={self.n_heads}")
        require(self, "rope_theta", self.rope_theta > 0, "must be positive")
        require(self, "norm_eps", self.norm_eps > 0, "must be positive")
        require(self, "init_std", self.init_std > 0, "must be positive")
        require(self, "embed_scale_rule", self.embed_scale_rule in EMBED_SCALE_RULES,
                f"must be one of {', '.join(EMBED_SCALE_RULES)} (token embeddings x sqrt(c d) under ponder_init)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def weight_std(self) -> float:
        """Init std of weights and embedding rows: sqrt(2/(5d)) under ponder_init, else init_std."""
        return math.sqrt(2.0 / (5.0 * self.d_model)) if self.ponder_init else self.init_std

    @property
    def output_std(self) -> float:
        """Init std of the residual branches' output projections (o_proj, down_proj): weight_std / sqrt(2L)
        under ponder_init (the reference ``_init_weights``), else init_std."""
        return self.weight_std / math.sqrt(2.0 * self.n_layers) if self.ponder_init else self.init_std

    @property
    def embed_scale(self) -> float:
        """Token embeddings are multiplied by this at lookup: sqrt(c d) per ``embed_scale_rule`` under
        ponder_init, else 1."""
        return math.sqrt(EMBED_SCALE_RULES[self.embed_scale_rule] * self.d_model) if self.ponder_init else 1.0

    # -- construction helpers -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from plain values (JSON, CLI); unknown keys are an error naming the valid ones."""
        return dataclass_from(cls, values)

    @classmethod
    def for_size(cls, size: str, **overrides: Any) -> ModelConfig:
        if size not in SIZES:
            raise ConfigError(f"size: unknown size {size!r}; choose one of {', '.join(SIZES)}")
        return cls.from_dict({**SIZES[size].as_overrides(), **overrides})

    def replace(self, **changes: Any) -> ModelConfig:
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def describe_fields(cls) -> dict[str, dict[str, Any]]:
        """Field name -> {type, default} for ``harness list``."""
        hints = typing.get_type_hints(cls)
        out = {}
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out[f.name] = {"type": _type_name(hints[f.name]), "default": default}
        return out


def dataclass_from(cls: type, values: dict[str, Any]) -> Any:
    """The one way every config dataclass is built from plain values (JSON, CLI strings, study files).

    Unknown keys are an error naming the valid ones; each value is coerced to the field's declared
    type; the dataclass's own ``__post_init__`` then validates ranges through :func:`require`.
    """
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; "
                          f"valid fields: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(cls, k, hints[k], v) for k, v in values.items()})


def require(cfg: Any, name: str, ok: bool, message: str, error: type[HarnessError] = ConfigError) -> None:
    """The one validation idiom of every config ``__post_init__``: raise ``error`` naming the field unless ok.

    ``error`` says where the problem lies (DataConfig raises DataError); the message is always
    ``Class.field=value: what would be valid``.
    """
    if not ok:
        raise error(f"{type(cfg).__name__}.{name}={getattr(cfg, name)!r}: {message}")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce(cls: type, name: str, tp: Any, value: Any) -> Any:
    """Turn a CLI string (or JSON value) into the field's declared type, or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(cls, name, inner[0], value)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(coerce(cls, name, args[0], v) for v in items)
    if not isinstance(value, str):
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp in (int, float, bool, str) and not isinstance(value, tp):
            raise ConfigError(f"{cls.__name__}.{name}: expected {tp.__name__}, got {value!r}")
        return value
    try:
        if tp is bool:
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            return int(float(value)) if "e" in value.lower() else int(value)
        if tp in (float, str):
            return tp(value)
    except ValueError:
        raise ConfigError(f"{cls.__name__}.{name}: expected {_type_name(tp)}, got {value!r}") from None
    raise ConfigError(f"{cls.__name__}.{name}: cannot parse {value!r} as {_type_name(tp)}")


__all__ = ["CPU_SIZES", "CPU_VOCAB_SIZE", "ConfigError", "EMBED_SCALE_RULES", "ModelConfig", "PYTHIA_SIZES", "SIZES",
           "Size", "coerce", "dataclass_from", "field", "require"]
