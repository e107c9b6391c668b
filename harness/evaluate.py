"""Validation perplexity computed the way each method is deployed, at measured inference FLOPs.

Perplexity is scored with :meth:`LanguageModel.score` (cached, exact, hard-pruned decoding) over
non-overlapping validation windows of the training sequence length; every block call during scoring
goes to a compute ledger, so ``infer_flops_per_token`` is what actually ran, averaged over those
windows. The parallel (training-form) loss of the same text is reported beside it: their difference
is the train/inference gap (``jacobi_gap`` and ``consistency_gap`` for the PonderLM family).
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.core import compute
from harness.core.errors import CheckpointError
from harness.data import TokenizedCorpus, validation_windows
from harness.job import autocast_for


@contextlib.contextmanager
def config_override(model: torch.nn.Module, **changes: Any) -> Iterator[None]:
    """Temporarily change fields of ``model.config`` (e.g. prune_threshold=0 for exact decoding)."""
    old = {k: getattr(model.config, k) for k in changes}
    for k, v in changes.items():
        setattr(model.config, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(model.config, k, v)


def _batches(windows: torch.Tensor, batch_size: int, device: torch.device):
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size].to(device)
        yield batch[:, :-1], batch[:, 1:]


@torch.no_grad()
def deployed_loss(model, windows, batch_size, device, autocast, progress=None, keep_records=False, greedy=False):
    """Mean NLL under deployed inference, the ledger totals of what ran, per-token records (optional;
    with ``greedy`` also the greedy next token, record "greedy") and whether the method reports extra
    steps per token."""
    nll_sum, tokens, reports_steps = 0.0, 0, False
    records: dict[str, list[np.ndarray]] = {"token": [], "nll": [], "steps": []}
    with compute.measure() as ledger:
        for inputs, targets in _batches(windows, batch_size, device):
            with autocast:
                out = model.score(inputs, targets)
            if greedy and keep_records:  # the greedy next token of the deployed distributions
                records.setdefault("greedy", []).append(out.greedy.flatten().cpu().numpy().astype(np.int32))
            nll = -out.logprobs.double()
            nll_sum += nll.sum().item()
            tokens += targets.numel()
            if keep_records:
                records["token"].append(targets.flatten().cpu().numpy().astype(np.int32))
                records["nll"].append(nll.flatten().cpu().numpy().astype(np.float32))
                # extra steps per token; 0 for a method that reports none (analyze reads them all)
                steps = out.steps if out.steps is not None else torch.zeros_like(targets)
                records["steps"].append(steps.flatten().cpu().numpy().astype(np.int16))
                reports_steps = out.steps is not None
            if progress is not None:
                progress.update(1)
    arrays = {k: np.concatenate(v) for k, v in records.items() if v}
    return nll_sum / tokens, ledger.totals, arrays, reports_steps


@torch.no_grad()
def parallel_loss(model, windows, batch_size, device, autocast) -> float:
    total, tokens = 0.0, 0
    for inputs, targets in _batches(windows, batch_size, device):
        with autocast:
            total += model(inputs, targets).lm_loss.double().item() * targets.numel()
        tokens += targets.numel()
    return total / tokens


def bits_per_byte(nll: np.ndarray, targets: np.ndarray, token_bytes: np.ndarray) -> float:
    """Sum of the targets' NLLs (nats) / (ln 2 x the UTF-8 bytes those targets stand for).

    Comparable across tokenizers, unlike perplexity (docs/design.md, "Evaluation"). Special tokens
    (the end-of-document token) stand for no text: their NLL counts, their bytes are 0.
    """
    n_bytes = int(token_bytes[np.asarray(targets, dtype=np.int64)].sum())
    return float(np.asarray(nll, dtype=np.float64).sum() / (math.log(2) * n_bytes)) if n_bytes else float("nan")


def difficulty_metrics(difficulty: np.ndarray, records: dict[str, np.ndarray], reports_steps: bool,
                       infer_flops_per_token: float) -> dict[str, Any]:
    """Metrics by difficulty (synthetic sources, ``harness.data.synthetic``): for each h > 0, the number of
    answers, accuracy (greedy next token = the answer), mean NLL and, for a method reporting steps, mean
    deployed extra steps; the same for the filler (h = 0) where it has a meaning; Spearman(steps, h) over
    the answers; accuracy at the deepest h. Keys are strings (JSON)."""
    difficulty = np.asarray(difficulty, dtype=np.int64)
    correct = records["greedy"] == records["token"]
    nll = records["nll"].astype(np.float64)
    levels = sorted(int(h) for h in np.unique(difficulty) if h > 0)
    by_h: dict[str, dict[str, float]] = {}
    for h in [0, *levels]:
        mask = difficulty == h
        if not mask.any():
            continue
        row = {"n": int(mask.sum()), "accuracy": float(correct[mask].mean()), "nll": float(nll[mask].mean())}
        if reports_steps:
            row["mean_steps"] = float(records["steps"][mask].astype(np.float64).mean())
        by_h[str(h)] = row
    out: dict[str, Any] = {"difficulty": by_h, "difficulty_max_h": max(levels) if levels else 0,
                           "difficulty_infer_flops_per_token": infer_flops_per_token}
    if levels:
        out["deepest_h_accuracy"] = by_h[str(max(levels))]["accuracy"]
    answers = difficulty > 0
    if reports_steps and answers.sum() > 2:
        steps = records["steps"][answers].astype(np.float64)
        if np.ptp(steps) > 0:   # constant steps: nothing to correlate, no key
            from scipy.stats import spearmanr
            out["spearman_steps_h"] = float(spearmanr(steps, difficulty[answers]).statistic)
    return out


def evaluate_model(model, corpus: TokenizedCorpus, cfg, device: torch.device,
                   records_path: str | pathlib.Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Perplexity, measured inference FLOPs per token, train/inference gaps and step statistics."""
    started = time.time()
    model.eval()
    windows = validation_windows(corpus.val, cfg.seq_len, cfg.eval_tokens or None)
    if len(windows) == 0:
        raise CheckpointError(f"validation split has {len(corpus.val)} tokens, fewer than one window of "
                              f"{cfg.seq_len}; use more data or a smaller train.seq_len")
    autocast = autocast_for(device, cfg.precision)
    n_batches = math.ceil(len(windows) / cfg.eval_batch_size)
    difficulty = None
    if corpus.val_difficulty is not None:
        difficulty = validation_windows(corpus.val_difficulty, cfg.seq_len, cfg.eval_tokens or None)[:, 1:]
    with tqdm(total=n_batches, desc="evaluate", unit="batch", disable=not progress) as bar:
        loss, totals, records, reports_steps = deployed_loss(model, windows, cfg.eval_batch_size, device,
                                                             autocast, bar, keep_records=True,
                                                             greedy=difficulty is not None)
    parallel = parallel_loss(model, windows, cfg.eval_batch_size, device, autocast)
    result: dict[str, Any] = {
        "val_loss": loss, "val_ppl": math.exp(loss), "val_tokens": int(totals.tokens),
        "val_bits_per_byte": bits_per_byte(records["nll"], records["token"], corpus.tokenizer.token_bytes()),
        "infer_flops_per_token": totals.per_token("forward_flops"),
        "infer_flops_per_token_analytic_max": model.analytic_flops_per_token(cfg.seq_len),
        "parallel_val_loss": parallel, "parallel_gap": parallel - loss,
    }
    # per-window mean NLL, in window order: the paired bootstrap over windows resamples these (harness.stats)
    result["val_window_loss"] = [round(float(x), 6) for x in
                                 records["nll"].astype(np.float64).reshape(len(windows), -1).mean(axis=1)]
    if reports_steps:
        result["mean_extra_steps"] = float(records["steps"].mean())
        result["max_extra_steps"] = int(records["steps"].max())
    if difficulty is not None:
        result.update(difficulty_metrics(difficulty.flatten().numpy(), records, reports_steps,
                                         result["infer_flops_per_token"]))
        records["difficulty"] = difficulty.flatten().numpy().astype(np.int8)
    spec = model.evaluation_spec()
    if spec.jacobi:  # the parallel form is a Jacobi solve of decoding (the PonderLM family)
        if spec.exact_overrides:
            # e.g. PonderLM-3: the Jacobi fixed point is exact decoding with nothing pruned (tau = 0)
            with config_override(model, **spec.exact_overrides):
                exact, *_ = deployed_loss(model, windows, cfg.eval_batch_size, device, autocast)
            result["exact_val_loss"] = exact
            result["jacobi_gap"] = parallel - exact
            result["consistency_gap"] = parallel - loss
        else:
            result["jacobi_gap"] = parallel - loss
    if records_path is not None and records:
        np.savez_compressed(records_path, **records)
    result["eval_seconds"] = time.time() - started
    model.train()
    return result
