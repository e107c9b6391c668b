"""One job = (method, size, budget, seed, overrides): train to a FLOPs budget, then evaluate.

``python -m harness train --method NAME --budget FLOPS --out DIR [--size S] [--seed N] [--set k=v ...]``

* Tokens = budget / training FLOPs per token of that method and size (DESIGN.md section 4); the
  achieved training FLOPs are measured by the compute ledger and recorded beside the budget.
* AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on GPU.
* Determinism: batch b of step s is drawn from a generator seeded by (seed, s), and torch's RNG is
  re-seeded from (seed, s) before each step, so a resumed run repeats an uninterrupted one exactly.
* ``DIR/checkpoint`` (safetensors + JSON) is rewritten every ``train.checkpoint_every`` steps; running
  the same command again resumes from it. ``DIR/metrics.jsonl`` holds one JSON line per logged step.

``--set`` keys: ``train.<field>`` and ``data.<field>`` set the training and data configs; any other
key sets a field of the method's model config (see ``python -m harness list``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from harness import checkpoint, compute, registry
from harness.checkpoint import CheckpointError, write_json_atomic
from harness.data import DataConfig, batch_at, load_corpus
from models.config import ConfigError, coerce


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, budget too small); the message says what to change."""


@dataclass
class TrainConfig:
    """Optimisation and evaluation settings shared by every method (set with ``--set train.X=...``)."""

    seq_len: int = 128  # tokens per training sequence
    batch_size: int = 16  # sequences per micro-batch (what must fit in memory)
    grad_accum: int = 1  # micro-batches per optimizer step: a step sees batch_size x grad_accum sequences
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    checkpoint_every: int = 50  # steps between checkpoints (and at the end)
    log_every: int = 10
    eval_tokens: int = 32768  # validation tokens for perplexity (0 = the whole split)
    eval_batch_size: int = 32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16

    def __post_init__(self) -> None:
        positive = ("seq_len", "batch_size", "grad_accum", "checkpoint_every", "log_every", "eval_batch_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: must be positive")
        checks = {
            "lr": self.lr > 0, "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "warmup_fraction": 0 <= self.warmup_fraction < 1, "weight_decay": self.weight_decay >= 0,
            "beta1": 0 <= self.beta1 < 1, "beta2": 0 <= self.beta2 < 1, "grad_clip": self.grad_clip >= 0,
            "eval_tokens": self.eval_tokens >= 0,
            "precision": self.precision in ("auto", "fp32", "bf16"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: out of range "
                                  "(see harness/train.py TrainConfig)")


    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


@dataclass
class Job:
    """Everything that determines a run; its hash is the job id used by sweeps."""

    method: str
    budget: float
    size: str = "nano"
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)  # model-config overrides
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tags: dict[str, Any] = field(default_factory=dict)  # recorded, not used (e.g. the sweep's match mode)

    def __post_init__(self) -> None:
        if not (self.budget > 0 and math.isfinite(self.budget)):
            raise ConfigError(f"budget={self.budget!r}: must be a positive number of FLOPs, e.g. 1e12")
        registry.get(self.method)  # unknown method -> clear error now, not after loading data

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Job":
        d = dict(d)
        d["train"] = _dataclass_from(TrainConfig, d.get("train", {}))
        d["data"] = _dataclass_from(DataConfig, d.get("data", {}))
        return cls(**d)

    def job_id(self) -> str:
        import hashlib

        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _dataclass_from(cls: type, values: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(cls, k, hints[k], v) for k, v in values.items()})


def parse_overrides(pairs: list[str]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """``["lr=1", "train.lr=3e-3", ...]`` -> (model, train, data) override dicts."""
    model, train, data = {}, {}, {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set train.lr=1e-3")
        key, value = pair.split("=", 1)
        target = {"train": train, "data": data}.get(key.split(".", 1)[0]) if "." in key else None
        if target is None:
            model[key] = value
        else:
            target[key.split(".", 1)[1]] = value
    return model, train, data


# ---------------------------------------------------------------------------------------------------
# the run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"TrainConfig.device={name!r}: CUDA is not available here; use device=auto or cpu")
    return device


def autocast_for(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


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


def make_model(job: Job, vocab_size: int):
    plugin = registry.get(job.method)
    config = plugin.make_config(job.size, {"vocab_size": vocab_size, **job.model})
    return plugin.build(config)


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2 ** 63 - 1)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=not enabled,
                file=sys.stderr)


def train_job(job: Job, out: str | os.PathLike, progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Run (or resume, or return the finished result of) ``job`` in folder ``out``."""
    from harness.evaluate import evaluate_model

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    job_file = out / "job.json"
    if force:
        for stale in ("checkpoint", "result.json", "metrics.jsonl", "tokens.npz"):
            path = out / stale
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif job_file.exists():
        previous = checkpoint.read_json(job_file, "job description")
        if previous != json.loads(json.dumps(job.to_dict(), default=str)):
            raise ConfigError(f"{out} holds a different job ({previous.get('method')}, budget "
                              f"{previous.get('budget'):g}); use another --out or pass --force to start over")
        result_file = out / "result.json"
        if result_file.exists():
            return checkpoint.read_json(result_file, "result")
    write_json_atomic(job_file, job.to_dict())

    started = time.time()
    torch.manual_seed(job.seed)
    device = resolve_device(job.train.device)
    corpus = load_corpus(job.data)
    corpus.tokenizer.save(out / "tokenizer.json")
    model = make_model(job, corpus.tokenizer.vocab_size).to(device)
    cfg = job.train

    tokens_per_step = cfg.tokens_per_step
    flops_per_token = model.train_flops_per_token(cfg.seq_len)
    steps = round(job.budget / (flops_per_token * tokens_per_step))
    if steps < 1:
        raise TrainingError(
            f"budget {job.budget:.3g} FLOPs buys less than one step of {job.method} at size {job.size} "
            f"({flops_per_token * tokens_per_step:.3g} FLOPs per step); raise --budget or lower "
            "train.batch_size / train.grad_accum / train.seq_len")
    if len(corpus.train) < cfg.seq_len + 2:
        raise TrainingError(f"training split has {len(corpus.train)} tokens, fewer than one sequence of "
                            f"{cfg.seq_len}; use more data or a smaller train.seq_len")

    optimizer = build_optimizer(model, cfg)
    ckpt_dir = out / "checkpoint"
    metrics_file = out / "metrics.jsonl"
    start_step, measured, seconds_before = 0, compute.LedgerTotals(), 0.0
    if (ckpt_dir / "state.json").exists():
        state = checkpoint.load_state(ckpt_dir)
        checkpoint.load_weights(ckpt_dir, model)
        checkpoint.load_optimizer(ckpt_dir, optimizer, state["optimizer"])
        start_step = int(state["step"])
        measured = compute.LedgerTotals(**state["ledger"])
        seconds_before = float(state.get("train_seconds", 0.0))
        _truncate_metrics(metrics_file, start_step)
    elif metrics_file.exists():
        metrics_file.unlink()

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
    result.update(evaluate_model(model, corpus, cfg, device, records_path=out / "tokens.npz",
                                 progress=progress))
    result["wall_seconds"] = time.time() - started + seconds_before
    write_json_atomic(out / "result.json", result)
    return result


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


# ---------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, help="a registered method (python -m harness list)")
    parser.add_argument("--budget", type=float, required=True, help="training FLOPs, e.g. 1e12")
    parser.add_argument("--out", required=True, help="job folder (result.json, checkpoint, metrics)")
    parser.add_argument("--size", default="nano", help="size ladder rung: pico nano micro tiny 70m ... 2.8b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model field (d_model=96), train.FIELD or data.FIELD; repeatable")
    parser.add_argument("--force", action="store_true", help="start over even if OUT holds another job")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def job_from_args(args: argparse.Namespace) -> Job:
    model, train, data = parse_overrides(args.overrides)
    return Job(method=args.method, budget=args.budget, size=args.size, seed=args.seed, model=model,
               train=_dataclass_from(TrainConfig, train), data=_dataclass_from(DataConfig, data))


def run(args: argparse.Namespace) -> int:
    job = job_from_args(args)
    registry.get(job.method).make_config(job.size, job.model)  # validate before loading data
    result = train_job(job, args.out, progress=not args.no_progress, force=args.force)
    keys = ("method", "size", "params", "train_tokens", "train_flops", "val_loss", "val_ppl",
            "infer_flops_per_token", "wall_seconds")
    print(json.dumps({k: result.get(k) for k in keys}, indent=2))
    return 0
