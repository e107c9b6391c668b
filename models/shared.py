"""Pieces several methods share, so that no method imports another (docs/design.md, "Layers").

* :func:`constant_steps`: the per-token extra steps of a method whose every token takes the same number
  (looped, pause, PonderLM-1).
* :func:`compact`: gather each row's active positions in causal order (routing and halting: MoR,
  gated adaptive depth).
* :func:`init_linear`: the shared init for the small linears methods add (routers, gates).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from harness.core.config import ModelConfig
from models.backbone import init_weight


def constant_steps(like: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, n] extra steps per token for a method whose every token takes the same number."""
    return torch.full(like.shape[:2], steps, dtype=torch.long, device=like.device)


def compact(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """active [B, n] -> (index [B, m], ok [B, m]): each row's active positions in causal order first.

    m is the largest active count of a row; ok marks real entries (a row's tail points at inactive
    positions and must be ignored). A stable sort keeps the original order, so causal order holds.
    """
    counts = active.sum(dim=1)
    m = int(counts.max()) if active.numel() else 0
    index = torch.sort((~active).to(torch.int8), dim=1, stable=True).indices[:, :m]
    ok = torch.arange(m, device=active.device)[None, :] < counts[:, None]
    return index, ok


def init_linear(linear: nn.Linear, config: ModelConfig, bias: float = 0.0) -> None:
    """The backbone's init for an added linear: N(0, 2/(5 fan_in)) under ponder_init, else N(0, init_std).

    For a d-input linear this is ``config.weight_std``; gates whose hidden width differs from d keep
    the same rule on their own fan-in. Truncated at +-3 std under ponder_init, as the reference
    ``_init_weights`` does for every ``nn.Linear`` (:func:`models.backbone.init_weight`). The bias (if any)
    starts at ``bias``.
    """
    std = math.sqrt(2.0 / (5.0 * linear.in_features)) if config.ponder_init else config.init_std
    init_weight(linear.weight, std, config)
    if linear.bias is not None:
        nn.init.constant_(linear.bias, bias)


__all__ = ["compact", "constant_steps", "init_linear"]
