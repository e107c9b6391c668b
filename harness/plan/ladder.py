"""The scales of the size ladder (CPU rungs, Pythia rungs) and what a method costs at a rung."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from harness.core import compute, registry
from harness.core.config import CPU_SIZES, CPU_VOCAB_SIZE, PYTHIA_SIZES, SIZES
from harness.core.errors import ConfigError

CHINCHILLA_TOKENS_PER_PARAM = 20.0
REFERENCE_METHOD = "vanilla"  # whose tokens --match tokens gives every method, and who picks the scale



@dataclass(frozen=True)
class Scale:
    """One setting of the size ladder: its rungs and the training/data/model defaults its jobs use.

    A user's ``--set`` wins over every default here.
    """

    name: str
    sizes: tuple[str, ...]
    train: dict[str, Any]  # TrainConfig fields
    vocab_size: int  # BPE vocabulary when the data uses the default tokenizer
    description: str
    size_train: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-rung TrainConfig fields
    model: dict[str, Any] = field(default_factory=dict)  # model-config fields of every job (e.g. norm_eps)
    method_weight_decay: bool = False  # each method's LanguageModel.reference_weight_decay replaces train's

    def train_defaults(self, size: str, method: str) -> dict[str, Any]:
        """TrainConfig fields a job of ``method`` at ``size`` starts from, before the user's ``--set``."""
        values = {**self.train, **self.size_train.get(size, {})}
        if self.weight_decay_source(method) == "method":
            values["weight_decay"] = registry.get(method).cls.reference_weight_decay
        return values

    def weight_decay_source(self, method: str) -> str:
        """Where :meth:`train_defaults` takes the weight decay from: "method" or "scale"."""
        if self.method_weight_decay and registry.get(method).cls.reference_weight_decay is not None:
            return "method"
        return "scale"


# Pythia (Biderman et al. 2023, table of hyper-parameters): learning rate per model size. The PonderLM-2
# scripts use the same at the rungs they train (scripts/train_*_llama_410m.sh 3e-4, *_1_4b.sh 2e-4).
PYTHIA_LR = {"70m": 1e-3, "160m": 6e-4, "410m": 3e-4, "1b": 3e-4, "1.4b": 2e-4, "2.8b": 1.6e-4}

# The Pythia scale reproduces the official PonderLM-2 recipe (LUMIA-Group/PonderLM-2): its Llama configs'
# rms_norm_eps 0.1 (llama_config/{125m,410m,1.4b,2.8b}/config.json; vocabulary 50304 and untied embeddings,
# as every rung here) and its training scripts' AdamW betas (0.9, 0.95), warmup_ratio 0.02, cosine_with_min_lr
# to min_lr_rate 0.1 and max_grad_norm 1.0 (the trainer's default). Weight decay is per method in the scripts
# (scripts/*.sh: 0.1 for PonderLM-2, loop and pause; 0.01 for PonderLM and vanilla), so each method declares
# its own as LanguageModel.reference_weight_decay (models/base.py): PonderLM-3 takes PonderLM-2's, MoR its
# own configs' 0.1, gated adaptive depth (no public recipe) PonderLM-1's 0.01; a method that declares none
# gets vanilla's 0.01. The batch stays Pythia's 1024 x 2048 tokens (the scripts take 64 x 2048 per step).
PYTHIA_TRAIN = {"seq_len": 2048, "batch_size": 8, "grad_accum": 128, "warmup_fraction": 0.02, "min_lr_ratio": 0.1,
                "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.01, "grad_clip": 1.0, "eval_tokens": 262144,
                "eval_batch_size": 8, "checkpoint_every": 1000}
PYTHIA_MODEL = {"norm_eps": 0.1}

SCALES: dict[str, Scale] = {
    "cpu": Scale("cpu", CPU_SIZES, {}, CPU_VOCAB_SIZE,
                 "CPU rungs, TrainConfig defaults: seq_len 128, 16 sequences per step, "
                 f"BPE vocabulary {CPU_VOCAB_SIZE}"),
    "pythia": Scale(
        "pythia", PYTHIA_SIZES, PYTHIA_TRAIN, 50304,
        "Pythia rungs with PonderLM-2's recipe: seq_len 2048, 1024 sequences (2M tokens) per step as Pythia, "
        "in 128 micro-batches of 8 on one GPU per job, Pythia's lr per rung, AdamW (0.9, 0.95), 2% warm-up, "
        "cosine to 10%, each method's reference weight decay (else 0.01), RMSNorm eps 0.1, vocabulary 50304 "
        "(Pythia's padded size)",
        {size: {"lr": lr} for size, lr in PYTHIA_LR.items()}, PYTHIA_MODEL, method_weight_decay=True),
}


def scale_of(size: str) -> Scale:
    for scale in SCALES.values():
        if size in scale.sizes:
            return scale
    raise ConfigError(f"size: unknown size {size!r}; choose one of {', '.join(SIZES)}")


@dataclass(frozen=True)
class Counts:
    params: int
    non_embedding_params: int
    train_flops_per_token: float
    infer_flops_per_token_max: float  # analytic; adaptive methods execute less (measured in results)
    d_model: int
    n_layers: int


class _SkipInitialisation(TorchFunctionMode):
    """Make in-place initialisers no-ops while a model is built on ``meta`` (they are 5-10x the build).

    Meta tensors hold no values, so nothing is lost; only shapes (hence parameter counts and FLOPs)
    matter. A torch function mode intercepts the calls for this thread only, patching nothing.
    """

    SKIPPED = frozenset({"normal_", "uniform_", "fill_", "zero_", "trunc_normal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]  # torch.nn.init passes it by keyword
        return func(*args, **(kwargs or {}))


@functools.cache
def _count(method: str, size: str, model_overrides: str, vocab_size: int, seq_len: int) -> Counts:
    plugin = registry.get(method)
    config = plugin.make_config(size, {**json.loads(model_overrides), "vocab_size": vocab_size})
    try:
        with torch.device("meta"), _SkipInitialisation():  # shapes only: no memory, even at 2.8b
            model = plugin.build(config)
    except ConfigError:
        raise
    except Exception:
        if SIZES[size].d_model > 256:  # a plugin that cannot be built on meta: too big to build for real
            raise
        model = plugin.build(config)
    return Counts(model.num_params(), model.num_params(non_embedding=True),
                  float(model.train_flops_per_token(seq_len)), float(model.analytic_flops_per_token(seq_len)),
                  config.d_model, config.n_layers)


def count(method: str, size: str, model_overrides: dict[str, Any], vocab_size: int, seq_len: int) -> Counts:
    """Parameters and per-token FLOPs of ``method`` at ``size`` (built on the meta device, cached)."""
    return _count(method, size, json.dumps(model_overrides, sort_keys=True, default=str), vocab_size, seq_len)


def lm_head_share(size: str, vocab_size: int = CPU_VOCAB_SIZE, seq_len: int = 128) -> float:
    """Share of vanilla's forward FLOPs per token spent in the LM head (2 d V) at rung ``size``.

    From the model's own analytic count over a sequence of ``seq_len`` tokens (TrainConfig's default).
    The CPU ladder keeps it at or below one third (harness/core/config.py, SIZES).
    """
    c = count(REFERENCE_METHOD, size, {}, vocab_size, seq_len)
    return compute.head_flops(c.d_model, vocab_size, 1) / c.infer_flops_per_token_max
