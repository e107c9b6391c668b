"""6. Threads per job: training throughput of one and of several concurrent jobs at each thread count.

A sweep runs several jobs at once; whether each should use one thread or several is a measurement, not
a guess: on a 2-core machine, one job at two threads competes with nothing but loses to synchronisation
in every parallel kernel of a CPU-sized model, while two jobs at one thread each keep both cores busy.
Every configuration (jobs at once, threads per job) runs its jobs as separate processes (as a sweep's
workers are) started together on the same batch; each times ``threads_steps`` training steps after one
warm-up step, and the row reports tokens/s per job and in total. ``recommended`` names, for each number
of concurrent jobs measured, the thread count with the highest total throughput.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from typing import Any

import torch

from harness.bench.common import BenchConfig
from harness.core import registry
from harness.data import TokenizedCorpus, batch_at

_START_TIMEOUT_S = 600  # a worker that has not reported by then (import, model build, warm-up) is dead


def _worker(method: str, size: str, vocab_size: int, threads: int, inputs: torch.Tensor, targets: torch.Tensor,
            steps: int, barrier, results) -> None:
    """One job: build the model, warm up, wait for the others, time ``steps`` training steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = registry.build(method, size, {"vocab_size": vocab_size}).train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(inputs, targets).loss.backward()

    step()
    barrier.wait(timeout=_START_TIMEOUT_S)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    results.put(time.perf_counter() - started)


def measure_concurrent(method: str, size: str, vocab_size: int, inputs: torch.Tensor, targets: torch.Tensor,
                       jobs: int, threads: int, steps: int) -> list[float]:
    """Seconds per training step of each of ``jobs`` processes running at once with ``threads`` each."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters, as a sweep's workers
    barrier, results = context.Barrier(jobs), context.Queue()
    processes = [context.Process(target=_worker, args=(method, size, vocab_size, threads, inputs, targets, steps,
                                                       barrier, results), daemon=True) for _ in range(jobs)]
    for p in processes:
        p.start()
    try:
        seconds = [results.get(timeout=_START_TIMEOUT_S) / steps for _ in range(jobs)]
    except queue.Empty:
        raise RuntimeError(f"bench threads: a {method} worker ({jobs} jobs x {threads} threads) did not report; "
                           "exit codes " + ", ".join(str(p.exitcode) for p in processes)) from None
    finally:
        for p in processes:
            p.join(timeout=60)
    return seconds


def bench_threads(cfg: BenchConfig, corpus: TokenizedCorpus, tick) -> dict[str, Any]:
    inputs, targets = batch_at(corpus.train, 0, cfg.threads_batch, cfg.threads_seq_len, seed=0)
    tokens = inputs.numel()
    rows = []
    for jobs, threads in cfg.threads_configs:
        seconds = measure_concurrent(cfg.threads_method, cfg.threads_size, corpus.vocab_size, inputs, targets,
                                     jobs, threads, cfg.threads_steps)
        per_job = [tokens / s for s in seconds]
        rows.append({"jobs": jobs, "threads_per_job": threads, "step_seconds": seconds,
                     "tokens_per_s_per_job": sum(per_job) / jobs, "total_tokens_per_s": sum(per_job)})
        tick()
    recommended = {}
    for jobs in sorted({r["jobs"] for r in rows}):
        best = max((r for r in rows if r["jobs"] == jobs), key=lambda r: r["total_tokens_per_s"])
        recommended[str(jobs)] = best["threads_per_job"]
    return {"method": cfg.threads_method, "size": cfg.threads_size, "batch_size": cfg.threads_batch,
            "seq_len": cfg.threads_seq_len, "cores": os.cpu_count(), "rows": rows,
            "recommended_threads_per_job": recommended}


__all__ = ["bench_threads", "measure_concurrent"]
