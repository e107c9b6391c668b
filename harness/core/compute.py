"""Compute accounting: the analytic FLOPs and the ledger that measures them (docs/design.md, "Compute accounting").

Conventions (one multiply-add = 2 FLOPs):
* a block costs, per processed position, 2 x its matmul weights plus attention 2 x 2 x (n_heads x
  head_dim) x (keys that query can see) -- QK^T and AV are one multiply-add per key per channel each;
* the LM head costs 2 x d x V per position whose logits are computed;
* norms, RoPE, softmax and the embedding lookup are not counted (as in Kaplan/Chinchilla counts);
* a forward pass that receives gradients costs 3x its forward (forward + backward), one under
  ``torch.no_grad`` costs 1x.

Every attention call reports its real queries and visible query-key pairs to the active
:class:`ComputeLedger`, so inference FLOPs are measured from what ran, not from a method's maximum.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

BACKWARD_MULTIPLIER = 3  # forward + backward (2x forward) for a pass that receives gradients


def block_matmul_params(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int) -> int:
    """Weights touched by one position in one block: q, k, v, o projections and the SwiGLU MLP."""
    attn = d_model * n_heads * head_dim + 2 * d_model * n_kv_heads * head_dim + n_heads * head_dim * d_model
    mlp = 3 * d_model * d_ff
    return attn + mlp


def block_flops(matmul_params: int, attn_width: int, queries: float, key_pairs: float) -> float:
    """FLOPs of one block over ``queries`` positions that see ``key_pairs`` keys in total."""
    return 2.0 * matmul_params * queries + 4.0 * attn_width * key_pairs


def head_flops(d_model: int, vocab_size: int, positions: float) -> float:
    return 2.0 * d_model * vocab_size * positions


def causal_key_pairs(n_queries: int, n_past: int = 0) -> int:
    """Query-key pairs of causal attention: query i (0-based) after n_past cached keys sees n_past+i+1."""
    return n_queries * n_past + n_queries * (n_queries + 1) // 2


def active_key_pairs(active: torch.Tensor) -> tuple[float, float]:
    """Queries and query-key pairs when the tokens ``active`` [B, T] marks each see the active tokens of their
    row at or before them (a routed layer's participants, a recursion's tokens, a row's real tokens)."""
    return float(active.sum()), float((active.long().cumsum(-1) * active).sum())


@dataclass
class LedgerTotals:
    """What a ledger has counted so far (FLOPs are floats: budgets reach 1e20+)."""

    forward_flops: float = 0.0  # every counted pass once
    train_flops: float = 0.0  # passes with gradients count 3x
    block_flops: float = 0.0
    head_flops: float = 0.0
    matmul_flops: float = 0.0  # weight matmuls only (blocks + head): what FLOP counters compare to
    attention_flops: float = 0.0
    other_flops: float = 0.0  # matmuls outside blocks and head (e.g. PonderLM-1's embedding mixture)
    block_queries: float = 0.0  # positions processed by blocks, summed over blocks
    key_pairs: float = 0.0
    head_positions: float = 0.0
    tokens: float = 0.0  # tokens the caller says were scored or trained on (set by the caller)

    def per_token(self, which: str = "forward_flops") -> float:
        return getattr(self, which) / self.tokens if self.tokens else float("nan")


@dataclass
class ComputeLedger:
    """Accumulates the FLOPs of every block and head call made while it is active.

    Use as a context manager; ledgers nest (an inner ledger's counts also reach the outer one), so the
    trainer can keep a run-wide ledger while evaluation opens its own.
    """

    totals: LedgerTotals = field(default_factory=LedgerTotals)

    def __enter__(self) -> ComputeLedger:
        _stack().append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _stack().remove(self)

    def add(self, *, matmul: float, attention: float, queries: float, key_pairs: float,
            head_positions: float = 0.0, kind: str = "block") -> None:
        total = matmul + attention
        t = self.totals
        t.forward_flops += total
        t.train_flops += total * (BACKWARD_MULTIPLIER if torch.is_grad_enabled() else 1)
        t.matmul_flops += matmul
        t.attention_flops += attention
        if kind == "head":
            t.head_flops += total
            t.head_positions += head_positions
        elif kind == "other":
            t.other_flops += total
        else:
            t.block_flops += total
            t.block_queries += queries
            t.key_pairs += key_pairs

    def add_tokens(self, n: float) -> None:
        self.totals.tokens += float(n)

    def reset(self) -> None:
        self.totals = LedgerTotals()


_local = threading.local()


def _stack() -> list[ComputeLedger]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def active() -> bool:
    return bool(_stack())


def record_block(matmul_params: int, attn_width: int, queries: float, key_pairs: float) -> None:
    """Called by every attention block with the real queries and visible query-key pairs it ran."""
    stack = _stack()
    if not stack:
        return
    matmul = 2.0 * matmul_params * queries
    attention = 4.0 * attn_width * key_pairs
    for ledger in stack:
        ledger.add(matmul=matmul, attention=attention, queries=queries, key_pairs=key_pairs)


def record_head(d_model: int, vocab_size: int, positions: float) -> None:
    """Called by the LM head with the number of positions whose logits it computed."""
    stack = _stack()
    if not stack:
        return
    flops = head_flops(d_model, vocab_size, positions)
    for ledger in stack:
        ledger.add(matmul=flops, attention=0.0, queries=0.0, key_pairs=0.0,
                   head_positions=positions, kind="head")


def record_matmul(flops: float) -> None:
    """Matmul work outside blocks and head that a method really executes (counted as matmul FLOPs)."""
    for ledger in _stack():
        ledger.add(matmul=float(flops), attention=0.0, queries=0.0, key_pairs=0.0, kind="other")


def record_tokens(n: float) -> None:
    for ledger in _stack():
        ledger.add_tokens(n)


@contextlib.contextmanager
def measure() -> Iterator[ComputeLedger]:
    """``with measure() as ledger: ...`` -- a fresh ledger for one measurement."""
    with ComputeLedger() as ledger:
        yield ledger


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Work that no open ledger should count (the learning curve's validation inside a training run): the
    open ledgers are set aside until the block ends; a ledger opened inside still counts."""
    saved, _local.stack = _stack(), []
    try:
        yield
    finally:
        _local.stack = saved


def as_count(x: torch.Tensor | int | float) -> float:
    return float(x.sum().item()) if isinstance(x, torch.Tensor) else float(x)


__all__ = [
    "BACKWARD_MULTIPLIER", "ComputeLedger", "LedgerTotals", "active", "active_key_pairs", "as_count", "block_flops",
    "block_matmul_params", "causal_key_pairs", "head_flops", "measure", "record_block", "record_head", "record_matmul",
    "record_tokens", "unrecorded",
]
