"""2. Greedy generation with the KV cache against recomputing the whole prefix (vanilla)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from harness.bench.common import (
    TARGET_DECODE_SPEEDUP,
    TARGET_DECODE_TOKENS,
    BenchConfig,
    per_round,
    time_interleaved,
)
from harness.core import registry
from harness.core.config import ConfigError
from harness.data import TokenizedCorpus, validation_windows


def generate_cached(model, prompt: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Greedy generation with the KV cache: one prefill, then one single-token decode per token."""
    cache = model.new_cache(prompt.shape[0])
    logits = model.decode(prompt, cache).logits[:, -1]
    generated = []
    for i in range(n_tokens):
        token = logits.argmax(-1, keepdim=True)
        generated.append(token)
        if i + 1 < n_tokens:
            logits = model.decode(token, cache).logits[:, -1]
    return torch.cat(generated, dim=1)


def generate_recomputing(model, prompt: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Greedy generation without a cache: every token re-runs the blocks over the whole prefix.

    Only the last position goes through the LM head -- the strongest form of the baseline.
    """
    decoder, ids = model.decoder, prompt
    for _ in range(n_tokens):
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        hidden = decoder.run_blocks(decoder.embed(ids), decoder.plan(positions))
        token = decoder.head(decoder.norm(hidden[:, -1:]))[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
    return ids[:, prompt.shape[1]:]


def bench_decode_cache(cfg: BenchConfig, corpus: TokenizedCorpus, tick) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = registry.build("vanilla", cfg.decode_size, {"vocab_size": corpus.vocab_size}).eval()
    decoder = model.decoder
    # The compiled one-slot step (Decoder.compile_slot_steps) is a third contender where it can be built.
    compiled = cfg.decode_compile and decoder.compile_slot_steps(True)
    decoder.compile_slot_steps(False)
    rows = []
    for batch in cfg.decode_batches:
        windows = validation_windows(corpus.val, cfg.decode_prompt - 1, batch * cfg.decode_prompt)
        if len(windows) < batch:
            raise ConfigError(f"the validation split is too small for {batch} prompts of {cfg.decode_prompt} tokens")
        prompt = windows[:batch]
        results: dict[str, torch.Tensor] = {}

        def run(name: str, fn: Callable, n: int, results=results, prompt=prompt) -> Callable[[], None]:
            def call() -> None:
                decoder.compile_slot_steps(name == "compiled")
                with torch.inference_mode():  # as deployed decoding would run: no autograd bookkeeping
                    results[name] = fn(model, prompt, n)
            return call

        names = {"cached": generate_cached, "recompute": generate_recomputing}
        if compiled:
            names["compiled"] = generate_cached
        # Warm up on a short generation: a full recomputing run is the most expensive call here. The
        # compiled contender's first call compiles (timed apart, as compile_seconds).
        compile_seconds = None
        if compiled:
            started = time.perf_counter()
            run("compiled", generate_cached, 8)()
            compile_seconds = time.perf_counter() - started
        for _ in range(cfg.warmup):
            for name, fn in names.items():
                run(name, fn, 8)()
        timings = time_interleaved({name: run(name, fn, cfg.decode_tokens) for name, fn in names.items()},
                                   0, cfg.decode_repeats, tick)
        decoder.compile_slot_steps(False)
        agree = (results["cached"] == results["recompute"]).float().mean().item()
        # round by round (recompute over cached in the same round), as every ratio of the bench
        speedup = per_round(timings["recompute"].samples, timings["cached"].samples).median
        judged = cfg.decode_tokens >= TARGET_DECODE_TOKENS  # the saving grows with the length generated
        row = {
            "size": cfg.decode_size, "batch_size": batch, "prompt_tokens": cfg.decode_prompt,
            "generated_tokens": cfg.decode_tokens,
            "cached_seconds": timings["cached"].median, "recompute_seconds": timings["recompute"].median,
            "cached_ms_per_token": 1e3 * timings["cached"].median / cfg.decode_tokens,
            "cached_tokens_per_s": batch * cfg.decode_tokens / timings["cached"].median,
            "recompute_tokens_per_s": batch * cfg.decode_tokens / timings["recompute"].median,
            "speedup": speedup, "tokens_agree": agree, "compiled": bool(compiled),
        }
        best = speedup
        if compiled:
            compiled_speedup = per_round(timings["recompute"].samples, timings["compiled"].samples).median
            best = max(best, compiled_speedup)
            row.update({
                "compiled_seconds": timings["compiled"].median,
                "compiled_ms_per_token": 1e3 * timings["compiled"].median / cfg.decode_tokens,
                "compiled_speedup": compiled_speedup, "compile_seconds": compile_seconds,
                # compiled and eager decoding must produce the same tokens (tests/test_fast_paths.py)
                "compiled_tokens_agree": (results["compiled"] == results["cached"]).float().mean().item(),
            })
        # Judged on the faster cached path (the compiled step where a compiler exists); shorter runs
        # (--quick) are not judged.
        row.update(best_speedup=best, target=TARGET_DECODE_SPEEDUP,
                   met=best >= TARGET_DECODE_SPEEDUP if judged else None)
        rows.append(row)
    return rows


__all__ = ["bench_decode_cache", "generate_cached", "generate_recomputing"]
