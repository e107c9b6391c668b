"""1. Training-step throughput of our backbone against ``transformers.LlamaForCausalLM``."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from harness.bench.common import (
    PEAK,
    TARGET_TRAIN_RATIO,
    BenchConfig,
    peak_contender,
    per_round,
    time_interleaved,
    train_step,
)
from harness.core import registry
from harness.data import TokenizedCorpus, batch_at
from harness.hf import hf_name, llama_config
from models.base import next_token_loss


def to_transformers_llama(decoder) -> torch.nn.Module:
    """``transformers.LlamaForCausalLM`` with the decoder's config and weights (SDPA attention)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(llama_config(decoder.cfg, max_positions=8192, attention_dropout=0.0,
                                       attn_implementation="sdpa"))
    state = {hf_name(k): v for k, v in decoder.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any("rotary" not in m for m in missing):  # rotary tables are not weights
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    return hf


def bench_train_throughput(cfg: BenchConfig, corpus: TokenizedCorpus, tick) -> list[dict[str, Any]]:
    inputs, targets = batch_at(corpus.train, 0, cfg.batch_size, cfg.seq_len, seed=0)
    tokens = inputs.numel()
    rows = []
    for size in cfg.sizes:
        torch.manual_seed(0)
        ours = registry.build("vanilla", size, {"vocab_size": corpus.vocab_size, "ponder_init": False}).train()
        theirs = to_transformers_llama(ours.decoder).train()
        with torch.no_grad():
            logit_diff = (ours.decoder(inputs) - theirs(input_ids=inputs, use_cache=False).logits).abs().max().item()
        matmul, peak_flops = peak_contender(cfg.peak_matmul_n)
        timings = time_interleaved({
            "ours": train_step(lambda m=ours: m(inputs, targets).loss, ours),
            "transformers": train_step(
                lambda m=theirs: next_token_loss(m(input_ids=inputs, use_cache=False).logits, targets), theirs),
            PEAK: matmul,
        }, cfg.warmup, cfg.repeats, tick)
        flops_per_token = ours.train_flops_per_token(cfg.seq_len)
        ours_rate = tokens / timings["ours"].median
        theirs_rate = tokens / timings["transformers"].median
        # the ratio round by round: transformers' step time over ours in the same round
        ratio = per_round(timings["transformers"].samples, timings["ours"].samples)
        peaks = [peak_flops / t for t in timings[PEAK].samples]
        step_flops = flops_per_token * tokens
        rows.append({
            "size": size, "params": ours.num_params(), "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
            "ours_tokens_per_s": ours_rate, "transformers_tokens_per_s": theirs_rate,
            **ratio.as_dict("ratio"), "target": TARGET_TRAIN_RATIO,
            "met": ratio.met(TARGET_TRAIN_RATIO, at_most=False),
            "decided": ratio.decided(TARGET_TRAIN_RATIO, at_most=False),
            "train_flops_per_token": flops_per_token, "max_logit_diff": logit_diff,
            "ours_spread": timings["ours"].spread, "transformers_spread": timings["transformers"].spread,
            **per_round([step_flops / t for t in timings["ours"].samples], peaks).as_dict("ours_fraction_of_peak"),
            **per_round([step_flops / t for t in timings["transformers"].samples], peaks).as_dict(
                "transformers_fraction_of_peak"),
            "peak_flops_per_s": statistics.median(peaks),
        })
    return rows



__all__ = ["bench_train_throughput", "to_transformers_llama"]
