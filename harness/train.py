"""Train one :class:`~harness.job.Job` to its FLOPs budget, then evaluate it.

* Tokens = budget / training FLOPs per token of that method and size (docs/design.md, "Compute accounting"); the
  achieved training FLOPs are measured by the compute ledger and recorded beside the budget.
* AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on GPU.
* Determinism: batch b of step s is drawn from a generator seeded by (seed, s), and torch's RNG is
  re-seeded from (seed, s) before each step, so a resumed run repeats an uninterrupted one exactly.
* ``DIR/checkpoint`` (safetensors + JSON) is rewritten every ``train.checkpoint_every`` steps; running
  the same command again resumes from it. ``DIR/metrics.jsonl`` holds one JSON line per logged step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import platform
import shutil
import sys
import time
from typing import Any

import torch

from harness import checkpoint, hf
from harness.core import compute
from harness.core.errors import CheckpointError, ConfigError, TrainingError
from harness.core.io import make_folder, read_json, remove_if_empty, write_json_atomic
from harness.data import batch_at, load_corpus
from harness.evaluate import evaluate_model
from harness.job import Job, TrainConfig, autocast_for, make_model, resolve_device


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warmup = max(1, round(cfg.warmup_fraction * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms, biases
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2 ** 63 - 1)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=not enabled,
                file=sys.stderr)


def train_job(job: Job, out: str | os.PathLike, progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Run (or resume, or return the finished result of) ``job`` in folder ``out``."""
    out = pathlib.Path(out)
    finished = _finished_result(job, out, force)  # reads only: nothing is written until the job is validated
    if finished is not None:
        return finished
    remove_if_empty(make_folder(out, "job folder"), out)  # a folder that cannot be created fails now, not later

    started = time.time()
    torch.manual_seed(job.seed)
    device = resolve_device(job.train.device)
    corpus = load_corpus(job.data)
    model = make_model(job, corpus.tokenizer.vocab_size)
    # continued pretraining: the checkpoint's weights, the method's own parameters keep their init (a resume
    # then overwrites all of them from DIR/checkpoint)
    init_from = hf.load_into(model, job.init_from) if job.init_from else None
    model = model.to(device)
    cfg = job.train

    tokens_per_step = cfg.tokens_per_step
    flops_per_token = model.train_flops_per_token(cfg.seq_len)
    steps = _total_steps(job, flops_per_token, len(corpus.train))
    previous = _claim_folder(job, out, force)  # the first write, once data, config and budget are validated
    corpus.tokenizer.save(out / "tokenizer.json")

    optimizer = build_optimizer(model, cfg)
    ckpt_dir = out / "checkpoint"
    metrics_file = out / "metrics.jsonl"
    start_step, measured, seconds_before = _resume(ckpt_dir, metrics_file, model, optimizer)

    def save(step: int, train_seconds: float) -> None:
        checkpoint.save(ckpt_dir, model, optimizer, {
            "method": job.method, "model_config": model.config.to_dict(), "step": step, "total_steps": steps,
            "ledger": dataclasses.asdict(ledger.totals), "train_seconds": train_seconds})

    model.train()
    ledger = compute.ComputeLedger(measured)
    bar = _progress(steps, start_step, f"{job.method}/{job.size}", progress)
    step_timer, window_tokens, seconds = time.time(), 0, seconds_before
    with ledger, open(metrics_file, "a") as metrics:
        for step in range(start_step, steps):
            torch.manual_seed(step_seed(job.seed, step))
            lr = lr_at(step, steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_value, lm_loss_value, stats = 0.0, 0.0, {}
            for micro in range(cfg.grad_accum):  # micro-batch index step*A+m: A=1 is plain step indexing
                inputs, targets = batch_at(corpus.train, step * cfg.grad_accum + micro, cfg.batch_size,
                                           cfg.seq_len, job.seed)
                with autocast_for(device, cfg.precision):
                    output = model(inputs.to(device), targets.to(device))
                micro_loss = output.loss.item()
                if not math.isfinite(micro_loss):
                    bar.close()
                    raise TrainingError(
                        f"{job.method}: loss became {micro_loss} at step {step} (lr {lr:.3g}); lower train.lr "
                        f"or set train.grad_clip>0; the last good checkpoint (step {_checkpoint_step(ckpt_dir)}) "
                        "is kept")
                (output.loss / cfg.grad_accum).backward()
                loss_value += micro_loss / cfg.grad_accum
                lm_loss_value += output.lm_loss.item() / cfg.grad_accum
                for k, v in output.stats.items():
                    stats[k] = stats.get(k, 0.0) + float(v) / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")).item()
            optimizer.step()
            ledger.add_tokens(tokens_per_step)
            window_tokens += tokens_per_step
            bar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == steps:
                now = time.time()
                rate = window_tokens / max(now - step_timer, 1e-9)
                seconds += now - step_timer
                step_timer, window_tokens = now, 0
                record = {"step": done, "tokens": done * tokens_per_step, "loss": loss_value,
                          "lm_loss": lm_loss_value, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_second": rate, "train_flops": ledger.totals.train_flops, **stats}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:,.0f}")
            if done % cfg.checkpoint_every == 0 or done == steps:
                save(done, seconds)
    bar.close()

    result = {
        "method": job.method, "size": job.size, "seed": job.seed, "job_id": job.job_id(),
        "params": model.num_params(), "non_embedding_params": model.num_params(non_embedding=True),
        "budget": job.budget, "train_steps": steps, "train_tokens": steps * tokens_per_step,
        "train_flops": ledger.totals.train_flops, "train_flops_per_token_analytic": flops_per_token,
        "train_seconds": seconds, "config": model.config.to_dict(), "train_config": dataclasses.asdict(cfg),
        "data": dataclasses.asdict(job.data) | {"name": corpus.name, "unigram_ppl": corpus.unigram_perplexity()},
        "tags": job.tags, "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
    }
    if init_from:  # {"path", "loaded", "kept_own_init"}: what came from the checkpoint, what kept its own init
        result["init_from"] = init_from
    result.update(evaluate_model(model, corpus, cfg, device, records_path=out / "tokens.npz",
                                 progress=progress))
    result["wall_seconds"] = time.time() - started + seconds_before
    if previous.get("downstream"):  # scores of an earlier `harness eval --tasks` survive re-evaluation
        result["downstream"] = previous["downstream"]
    warning = flops_warning(result, model.adaptive)
    if warning:
        result["flops_warning"] = warning
    write_json_atomic(out / "result.json", result)
    return result


FLOPS_TOLERANCE = 0.02  # measured inference FLOPs may exceed (adaptive) or differ from (fixed) the analytic count


def flops_warning(result: dict[str, Any], adaptive: bool) -> str | None:
    """A one-line warning when measured inference FLOPs per token disagree with the method's analytic count:
    above its maximum by more than 2% (adaptive), or off by more than 2% either way (fixed compute)."""
    measured, analytic = result.get("infer_flops_per_token"), result.get("infer_flops_per_token_analytic_max")
    if not measured or not analytic:
        return None
    ratio = measured / analytic
    if ratio <= 1 + FLOPS_TOLERANCE and (adaptive or ratio >= 1 - FLOPS_TOLERANCE):
        return None
    kind = "above its analytic maximum" if adaptive else "off its analytic count"
    return (f"{result.get('method')}: measured inference {measured:.4g} FLOPs/token is {(ratio - 1) * 100:+.1f}% "
            f"{kind} {analytic:.4g}; analytic_flops_per_token (or decode_flops) misses work that decode does, "
            f"so compute-matched comparisons are off: run `python -m harness check {result.get('method')}`")


def _job_differences(previous: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``field: old -> new`` for every (nested) field in which two job descriptions differ."""
    out = []
    for key in sorted(set(previous) | set(current), key=str):
        old, new = previous.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += _job_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return out


def _checkpoint_finished(ckpt_dir: pathlib.Path) -> bool:
    """The checkpoint holds the last step of the job (step == total_steps)."""
    if not (ckpt_dir / "state.json").exists():
        return False
    state = checkpoint.load_state(ckpt_dir)
    return state.get("total_steps") is not None and int(state.get("step", -1)) == int(state["total_steps"])


def _finished_result(job: Job, out: pathlib.Path, force: bool) -> dict[str, Any] | None:
    """Without writing anything: the finished result of ``job`` in ``out``, None if there is none to return,
    a ConfigError naming the differing fields if ``out`` holds another job.

    A job is finished when its checkpoint holds its last step and result.json its full record; a
    result.json beside an unfinished checkpoint (an older ``harness eval``) does not count.
    """
    if force or not out.is_dir():
        return None  # a file in the way fails in make_folder, with its own message
    job_file = out / "job.json"
    if not job_file.exists():
        return None
    previous = read_json(job_file, "job description")
    current = json.loads(json.dumps(job.to_dict(), default=str))
    if previous != current:
        differences = _job_differences(previous, current) if isinstance(previous, dict) else ["job.json"]
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise ConfigError(f"{out} holds a different job ({shown}); use another --out, repeat the earlier "
                          "arguments to resume it, or pass --force to start over")
    result_file = out / "result.json"
    if not (result_file.exists() and _checkpoint_finished(out / "checkpoint")):
        return None
    result = read_json(result_file, "result")
    return result if result.get("method") is not None and "train_flops" in result else None


def _claim_folder(job: Job, out: pathlib.Path, force: bool) -> dict[str, Any]:
    """Make ``out`` the folder of ``job`` (wiped first with ``force``); the result.json it held, or {}."""
    make_folder(out, "job folder")
    if force:
        for stale in ("checkpoint", "result.json", "metrics.jsonl", "tokens.npz"):
            path = out / stale
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    write_json_atomic(out / "job.json", job.to_dict())
    result_file = out / "result.json"
    try:
        return read_json(result_file, "result") if result_file.exists() else {}
    except CheckpointError:
        return {}


def _total_steps(job: Job, flops_per_token: float, train_tokens: int) -> int:
    """The optimizer steps that ``job.budget`` buys; a TrainingError if that is none or the data is too short."""
    cfg = job.train
    tokens_per_step = cfg.tokens_per_step
    steps = round(job.budget / (flops_per_token * tokens_per_step))
    if steps < 1:
        raise TrainingError(
            f"budget {job.budget:.3g} FLOPs buys less than one step of {job.method} at size {job.size} "
            f"({flops_per_token * tokens_per_step:.3g} FLOPs per step); raise --budget or lower "
            "train.batch_size / train.grad_accum / train.seq_len")
    if train_tokens < cfg.seq_len + 2:
        raise TrainingError(f"training split has {train_tokens} tokens, fewer than one sequence of "
                            f"{cfg.seq_len}; use more data or a smaller train.seq_len")
    return steps


def _resume(ckpt_dir: pathlib.Path, metrics_file: pathlib.Path, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[int, compute.LedgerTotals, float]:
    """Load the checkpoint into ``model`` and ``optimizer`` if there is one: (step, ledger totals, seconds)."""
    if not (ckpt_dir / "state.json").exists():
        if metrics_file.exists():
            metrics_file.unlink()
        return 0, compute.LedgerTotals(), 0.0
    state = checkpoint.load_state(ckpt_dir)
    checkpoint.load_weights(ckpt_dir, model)
    checkpoint.load_optimizer(ckpt_dir, optimizer, state["optimizer"])
    start_step = int(state["step"])
    measured = compute.LedgerTotals(**state["ledger"])
    seconds_before = float(state.get("train_seconds", 0.0))
    _truncate_metrics(metrics_file, start_step)
    return start_step, measured, seconds_before


def _checkpoint_step(ckpt_dir: pathlib.Path) -> int:
    try:
        return int(checkpoint.load_state(ckpt_dir)["step"])
    except CheckpointError:
        return 0


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and _is_complete(line) and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _is_complete(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False  # a line cut by a kill
