"""Training batches and validation windows drawn from token streams."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from harness.core.errors import DataError

# ========================================================================================== batches

def batch_at(tokens: np.ndarray, step: int, batch_size: int, seq_len: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch ``step``: ``batch_size`` random windows of ``seq_len + 1`` tokens.

    The window starts come from a numpy Generator seeded by a hash of ``(seed, step)``, so the batch
    depends only on those two numbers (a resumed run sees exactly the same batches). Returns
    ``(inputs, targets)``, int64 tensors ``[batch_size, seq_len]``; targets are inputs shifted by one.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1 (got {batch_size}, {seq_len})")
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(f"the token stream has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; use a "
                        "smaller seq_len or more data")
    digest = hashlib.blake2b(f"batch_at:{int(seed)}:{int(step)}".encode(), digest_size=16).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    starts = rng.integers(0, n - seq_len, size=batch_size)
    windows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    t = torch.from_numpy(windows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def validation_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Windows ``[N, seq_len + 1]`` (int64) over the validation split in order.

    Window ``i`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``: consecutive windows share one
    boundary token, so every token after the first is a prediction target exactly once. Only the
    first ``max_tokens`` tokens are used when given; the tail shorter than a window is dropped
    (``N`` is 0 when there are fewer than ``seq_len + 1`` tokens).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1 (got {seq_len})")
    t = tokens if max_tokens is None else tokens[:max(0, int(max_tokens))]
    n = max(0, (len(t) - 1) // seq_len)
    if n == 0:
        return torch.zeros((0, seq_len + 1), dtype=torch.int64)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
    return torch.from_numpy(np.asarray(t[idx], dtype=np.int64))
