"""Vanilla: the shared backbone alone.

Its size ladder (``--size pico ... 2.8b``, harness/core/config.py) gives the "bigger model at equal
inference FLOPs" points every adaptive method must beat.

Its reference is the PonderLM-2 repository's vanilla runs (``scripts/train_vanilla_llama_1_4b.sh``, no
``--patch_method``: ``src/llamafactory/model/llama_patch.py`` leaves transformers' stock
``LlamaForCausalLM`` in place): N(0, initializer_range) weights, untruncated, unscaled embeddings. That is
``ponder_init = False`` here, a named option. The default keeps the methods' shared init instead
(``ponder_init = True``, sqrt(2.5d), PonderLM-2's), decided on a measurement: on the reference study's
protocol (307,200 tokens, lr 3e-3) the stock init trains far slower at the CPU rungs, validation
perplexity 184.6 (pico), 207.6 (nano), 182.2 (micro), means of 3 seeds, against 142.0, 137.9 and 105.3
with the shared init (results/reference). A vanilla handicapped by its init would flatter every method
compared with it, so the dense frontier gets the init the methods themselves use, and a comparison
measures the method, not the init.

reference behaviour               here                                  why
================================  ====================================  =================================
stock Llama init, N(0, 0.02),     the shared init (``ponder_init``);    measured above: the stock init
untruncated, no embedding scale   the stock one: ``ponder_init=False``  would handicap the baseline
weight decay 0.01                 ``reference_weight_decay = 0.01``     same (Pythia rungs)
================================  ====================================  =================================
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.config import ModelConfig
from harness.core.registry import register
from models.base import LanguageModel


@dataclass
class VanillaConfig(ModelConfig):
    summary = "the LLaMA-style backbone alone: one pass per token"


@register("vanilla")
class Vanilla(LanguageModel):
    """The LLaMA-style backbone alone: one pass of L blocks per token."""

    Config = VanillaConfig
    reference_weight_decay = 0.01  # PonderLM-2 repo, scripts/train_vanilla_llama_1_4b.sh
    test_variants = {"gqa": {"n_heads": 4, "n_kv_heads": 2}}
