"""Vanilla: the shared backbone alone.

Its size ladder (``--size pico ... 2.8b``, harness/core/config.py) gives the "bigger model at equal
inference FLOPs" points every adaptive method must beat.
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
    test_variants = {"gqa": {"n_heads": 4, "n_kv_heads": 2}}
