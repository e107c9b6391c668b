"""Train one :class:`~harness.job.Job` to its FLOPs budget, then evaluate it.

* Tokens = budget / training FLOPs per token of that method and size (docs/design.md, "Compute accounting"); the
  achieved training FLOPs are measured by the compute ledger and recorded beside the budget.
* AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on GPU.
* Determinism: batch b of step s is drawn from a generator seeded by (seed, s), and torch's RNG is
  re-seeded from (seed, s) before each step, so a resumed run repeats an uninterrupted one exactly.
* ``DIR/checkpoint`` (safetensors + JSON) is rewritten every ``train.checkpoint_every`` steps; running
  the same command again resumes from it. ``DIR/metrics.jsonl`` holds one JSON line per logged step.
* :func:`train_job` trains in this process. A job on several devices (:mod:`harness.distributed`) runs the
  same step loop, :func:`run_steps`, on every rank; a :class:`Placement` says what differs (rows of each
  batch, gradient and metric reduction, checkpoints), and the base class is the single-process run.
* ``compile_blocks`` (``train --compile``, ``sweep --compile``, a study's ``compile = true``) runs the
  blocks of every training forward through torch.compile (``Decoder.compile_training_blocks``). A run
  option like the devices, not part of the job: its id, folder and budget do not depend on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from harness import checkpoint, hf, tracking
from harness.core import compute
from harness.core.errors import CheckpointError, ConfigError, TrainingError
from harness.core.io import make_folder, read_json, remove_if_empty, write_json_atomic
from harness.data import batch_at, load_corpus, validation_windows
from harness.evaluate import evaluate_model, parallel_loss
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


class Placement:
    """Where the step loop runs: in this one process (this class, what :func:`train_job` uses), or as one
    rank of a job on several devices (the DDP and FSDP subclasses in :mod:`harness.distributed`).

    :func:`run_steps` reaches devices, gradients, metrics and checkpoints only through these methods, so
    the single-process run is exactly the loop with every method below a no-op or the plain call.
    """

    rank = 0
    world = 1
    strategy = "single"

    def device(self, cfg: TrainConfig) -> torch.device:
        return resolve_device(cfg.device)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loop trains (DDP wraps it, FSDP shards it in place)."""
        return model

    def micro_batch(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's forward and backward (``last``: the step's final one)."""
        return contextlib.nullcontext()

    def mean(self, values: list[float]) -> list[float]:
        """Per-process values (loss, stats) -> their mean over every rank."""
        return values

    def totals(self, totals: compute.LedgerTotals) -> compute.LedgerTotals:
        """This process's ledger -> the job's (the sum over every rank)."""
        return totals

    def clip(self, model: torch.nn.Module, max_norm: float) -> float:
        """Clip the gradients' global norm to ``max_norm``; the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()

    def save(self, folder: pathlib.Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any], last: bool) -> None:
        checkpoint.save(folder, model, optimizer, state)

    def load(self, folder: pathlib.Path, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        return checkpoint.load(folder, model, optimizer)

    def evaluation_model(self, model: torch.nn.Module, rebuild) -> torch.nn.Module:
        """The plain model rank 0 evaluates once training is done; ``rebuild()`` makes one from the last
        checkpoint (what a sharded model needs)."""
        return model

    def before_step(self, step: int, start_step: int) -> None:
        """Called at the start of every step (the distributed runs' fault-injection hook)."""


@dataclass
class Prepared:
    """A validated job, ready to train: its data, model (initialised, on CPU) and number of steps."""

    corpus: Any
    model: torch.nn.Module
    steps: int
    flops_per_token: float
    init_from: dict[str, Any] | None


def prepare(job: Job) -> Prepared:
    """Seed, load the data, build (and initialise) the model and count the steps; writes nothing.

    Every rank of a job on several devices calls this too: seeded by the job alone, they build the
    same initial weights.
    """
    torch.manual_seed(job.seed)
    corpus = load_corpus(job.data)
    model = make_model(job, corpus.tokenizer.vocab_size)
    # continued pretraining: the checkpoint's weights, the method's own parameters keep their init (a resume
    # then overwrites all of them from DIR/checkpoint)
    init_from = hf.load_into(model, job.init_from) if job.init_from else None
    flops_per_token = model.train_flops_per_token(job.train.seq_len)
    steps = total_steps(job, flops_per_token, len(corpus.train))
    return Prepared(corpus, model, steps, flops_per_token, init_from)


def claim_folder(job: Job, out: pathlib.Path, force: bool, corpus) -> dict[str, Any]:
    """The first write, once data, config and budget are validated: job.json and tokenizer.json; the
    result.json the folder held before, or {}."""
    previous = _claim_folder(job, out, force)
    corpus.tokenizer.save(out / "tokenizer.json")
    return previous


def train_job(job: Job, out: str | os.PathLike, progress: bool = True, force: bool = False,
              compile_blocks: bool = False, stop_on_signal: bool = False,
              tracker: str | None = tracking.DEFAULT_TRACKER) -> dict[str, Any]:
    """Run (or resume, or return the finished result of) ``job`` in folder ``out``, in this process;
    ``compile_blocks``: the training forwards' blocks through torch.compile (see the module docstring);
    ``tracker``: where the training logs go besides metrics.jsonl (:mod:`harness.tracking`);
    ``stop_on_signal``: SIGINT or SIGTERM ends the current step, writes a checkpoint and raises
    KeyboardInterrupt (:func:`stop_signals`; what ``harness train`` asks for)."""
    out = pathlib.Path(out)
    finished = finished_result(job, out, force)  # reads only: nothing is written until the job is validated
    if finished is not None:
        return finished
    remove_if_empty(make_folder(out, "job folder"), out)  # a folder that cannot be created fails now, not later

    started = time.time()
    placement = Placement()
    placement.device(job.train)  # an unavailable device fails before the data is loaded
    prepared = prepare(job)
    previous = claim_folder(job, out, force, prepared.corpus)
    return run_steps(job, out, prepared, placement, previous.get("downstream"), started, progress, compile_blocks,
                     stop_on_signal, tracker)


def compile_training(model: torch.nn.Module, job: Job, announce: bool) -> bool:
    """Turn on the compiled training blocks of ``model`` (on its device); one line on stderr (``announce``)
    when they cannot be built here, and training stays eager."""
    if model.decoder.compile_training_blocks():
        return True
    if announce:
        print(f"{job.method}/{job.size}: --compile requested but unavailable here (torch.compile needs a C++ "
              "compiler on CPU or Triton on CUDA, and torch.compile(isolate_recompiles=...)); training eagerly",
              file=sys.stderr, flush=True)
    return False


def run_steps(job: Job, out: pathlib.Path, prepared: Prepared, placement: Placement,
              downstream: dict[str, Any] | None, started: float, progress: bool,
              compile_blocks: bool = False, stop_on_signal: bool = False,
              tracker: str | None = tracking.DEFAULT_TRACKER) -> dict[str, Any] | None:
    """Train ``prepared`` from its checkpoint (if any) to its last step, then (rank 0) evaluate it and
    write result.json. Returns the result on rank 0, None on the other ranks.

    Several ranks (:mod:`harness.distributed`): every micro-batch of ``train.batch_size`` sequences is
    drawn whole from (seed, step, micro-batch) and rank r trains its r-th slice of ``batch_size / world``
    rows, so the data and the torch RNG draws of a step (PonderLM's Jacobi pass count) are the same at any
    number of ranks; losses and stats are averaged and the compute ledger summed over ranks.
    ``compile_blocks``: the blocks through torch.compile (:func:`compile_training`), once on the device.
    ``stop_on_signal``: see :func:`train_job`. The ledger's training FLOPs are compared with the planned ones
    after the first steps (where the method's count is exact) and at the end (:func:`train_flops_warning`).
    """
    cfg = job.train
    device = placement.device(cfg)
    model = prepared.model.to(device)
    main = placement.rank == 0
    compiled = compile_blocks and compile_training(model, job, announce=main)
    trained = placement.wrap(model)
    steps, tokens_per_step = prepared.steps, cfg.tokens_per_step
    optimizer = build_optimizer(trained, cfg)
    ckpt_dir = out / "checkpoint"
    metrics_file = out / "metrics.jsonl"
    start_step, measured, seconds_before = _resume(ckpt_dir, metrics_file, trained, optimizer, placement)
    rows = None
    if placement.world > 1:
        share = cfg.batch_size // placement.world
        rows = slice(placement.rank * share, (placement.rank + 1) * share)

    def save(step: int, train_seconds: float) -> None:
        totals = placement.totals(ledger.totals)
        placement.save(ckpt_dir, trained, optimizer, {
            "method": job.method, "model_config": model.config.to_dict(), "step": step, "total_steps": steps,
            "ledger": dataclasses.asdict(totals), "train_seconds": train_seconds}, last=step == steps)

    trained.train()
    ledger = compute.ComputeLedger(measured if main else compute.LedgerTotals())  # rank 0 carries the past
    bar = _progress(steps, start_step, f"{job.method}/{job.size}", progress and main)
    step_timer, window_tokens, seconds = time.time(), 0, seconds_before
    curve_steps = curve_at(steps, cfg.curve_points)
    curve_windows = validation_windows(prepared.corpus.val, cfg.seq_len, cfg.eval_tokens or None) if curve_steps \
        else None
    exact_flops = model.training_flops_exact()
    track = tracking.open_tracker(tracker if main else None, out, job, start_step)  # TensorBoard, W&B or nothing
    with ledger, track, (open(metrics_file, "a") if main else contextlib.nullcontext()) as metrics, \
            stop_signals(stop_on_signal) as stop:
        for step in range(start_step, steps):
            placement.before_step(step, start_step)
            torch.manual_seed(step_seed(job.seed, step))
            lr = lr_at(step, steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_value, lm_loss_value, stats = _accumulate(job, prepared.corpus.train, step, rows, trained, device,
                                                           placement)
            if not math.isfinite(loss_value):  # every rank sees the same mean, so all stop here together
                bar.close()
                raise TrainingError(
                    f"{job.method}: loss became {loss_value} at step {step} (lr {lr:.3g}); "
                    f"{nan_remedies(cfg)}; the last good checkpoint (step {_checkpoint_step(ckpt_dir)}) is kept")
            grad_norm = placement.clip(trained, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            optimizer.step()
            if main:
                ledger.add_tokens(tokens_per_step)
            window_tokens += tokens_per_step
            bar.update(1)
            done = step + 1
            if done % cfg.log_every == 0 or done == steps:
                now = time.time()
                rate = window_tokens / max(now - step_timer, 1e-9)
                seconds += now - step_timer
                step_timer, window_tokens = now, 0
                train_flops = placement.totals(ledger.totals).train_flops
                record = {"step": done, "tokens": done * tokens_per_step, "loss": loss_value,
                          "lm_loss": lm_loss_value, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_second": rate, "train_flops": train_flops, **stats}
                if main:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    track.log(record, done)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:,.0f}")
            if done in curve_steps:  # before the checkpoint: a resume from it recomputes nothing twice
                point = curve_point(trained, curve_windows, cfg, device, done,
                                    placement.totals(ledger.totals).train_flops)
                if main:
                    metrics.write(json.dumps(point) + "\n")
                    metrics.flush()
                    track.log({"val_loss": point["val_loss"]}, done)
            if done % cfg.checkpoint_every == 0 or done == steps:
                save(done, seconds)
            _check_train_flops(job, prepared, placement, ledger, done, steps, exact_flops)
            _stop_if_asked(stop, done, steps, cfg, bar, save, seconds + time.time() - step_timer)
    bar.close()
    totals = placement.totals(ledger.totals)

    def rebuild() -> torch.nn.Module:
        plain = make_model(job, prepared.corpus.tokenizer.vocab_size)
        checkpoint.load_weights(ckpt_dir, plain)
        return plain.to(device)

    evaluated = placement.evaluation_model(trained, rebuild)
    if not main:
        return None
    record = {"train_steps": steps, "train_tokens": steps * tokens_per_step, "train_flops": totals.train_flops,
              "train_seconds": seconds, "device": str(device)}
    if compiled:
        record["compiled_blocks"] = True
    result = _record(job, out, prepared, evaluated, placement, record, downstream, started - seconds_before, progress)
    track.finish(result)  # the deployed numbers at the last step
    return result


def _record(job: Job, out: pathlib.Path, prepared: Prepared, model: torch.nn.Module, placement: Placement,
            trained: dict[str, Any], downstream: dict[str, Any] | None, since: float,
            progress: bool) -> dict[str, Any]:
    """Evaluate the trained ``model`` and write result.json (rank 0); ``trained``: what training measured,
    ``since``: when the job's wall clock started (earlier attempts included)."""
    cfg, corpus = job.train, prepared.corpus
    device = torch.device(trained["device"])
    result = {
        "method": job.method, "size": job.size, "seed": job.seed, "job_id": job.job_id(),
        "params": model.num_params(), "non_embedding_params": model.num_params(non_embedding=True),
        "budget": job.budget, "train_steps": trained["train_steps"], "train_tokens": trained["train_tokens"],
        "train_flops": trained["train_flops"], "train_flops_per_token_analytic": prepared.flops_per_token,
        "train_seconds": trained["train_seconds"], "config": model.config.to_dict(),
        "train_config": dataclasses.asdict(cfg),
        "data": dataclasses.asdict(job.data) | {"name": corpus.name, "unigram_ppl": corpus.unigram_perplexity()},
        "tags": job.tags, "device": trained["device"], "torch": torch.__version__, "python": platform.python_version(),
    }
    if placement.world > 1:  # how it ran; the numbers above do not depend on it
        result.update(devices=placement.world, parallel=placement.strategy)
    curve = learning_curve(out / "metrics.jsonl")
    if curve:
        result["curve"] = curve
    if trained.get("compiled_blocks"):  # how the last attempt ran: train_seconds depend on it, the losses barely
        result["compiled_blocks"] = True
    if prepared.init_from:  # {"path", "loaded", "kept_own_init"}: what came from the checkpoint, what kept its own init
        result["init_from"] = prepared.init_from
    result.update(evaluate_model(model, corpus, cfg, device, records_path=out / "tokens.npz", progress=progress))
    result["wall_seconds"] = time.time() - since
    if downstream:  # scores of an earlier `harness eval --tasks` survive re-evaluation
        result["downstream"] = downstream
    warnings = [flops_warning(result, model.adaptive),  # inference, then training (planned: the budget's count)
                train_flops_warning(job.method, trained["train_flops"],
                                    trained["train_tokens"] * prepared.flops_per_token, trained["train_steps"])]
    if any(warnings):
        result["flops_warning"] = "; ".join(w for w in warnings if w)
    write_json_atomic(out / "result.json", result)
    return result


def curve_at(steps: int, points: int) -> set[int]:
    """The steps (1-based counts of steps done) at which the learning curve is measured: ``points`` evenly
    spaced, the last step included."""
    return {max(1, round(steps * i / points)) for i in range(1, points + 1)} if points else set()


def curve_point(trained: torch.nn.Module, windows: torch.Tensor, cfg: TrainConfig, device: torch.device,
                step: int, train_flops: float) -> dict[str, Any]:
    """One point of the learning curve: the parallel validation loss after ``step`` steps (every rank runs it:
    a sharded model's forward needs them all; the values agree)."""
    trained.eval()
    with compute.unrecorded():  # evaluation is not training compute: the budget's ledger must not see it
        loss = parallel_loss(trained, windows, cfg.eval_batch_size, device, autocast_for(device, cfg.precision))
    trained.train()
    return {"step": step, "tokens": step * cfg.tokens_per_step, "train_flops": train_flops, "val_loss": loss}


def learning_curve(metrics_file: pathlib.Path) -> list[dict[str, Any]]:
    """The curve points of ``metrics.jsonl`` in step order (lines with ``val_loss``; resumed runs wrote each once)."""
    if not metrics_file.exists():
        return []
    points = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip() and _is_complete(line)]
    return sorted((p for p in points if "val_loss" in p), key=lambda p: p["step"])


def _accumulate(job: Job, tokens, step: int, rows: slice | None, trained: torch.nn.Module, device: torch.device,
                placement: Placement) -> tuple[float, float, dict[str, float]]:
    """Forward and backward of the step's micro-batches (this rank's rows of each); the mean loss, LM loss
    and stats over the step's sequences (over every rank)."""
    cfg = job.train
    loss_value, lm_loss_value, stats = 0.0, 0.0, {}
    for micro in range(cfg.grad_accum):  # micro-batch index step*A+m: A=1 is plain step indexing
        inputs, targets = batch_at(tokens, step * cfg.grad_accum + micro, cfg.batch_size, cfg.seq_len, job.seed)
        if rows is not None:
            inputs, targets = inputs[rows], targets[rows]
        with placement.micro_batch(trained, last=micro == cfg.grad_accum - 1):
            with autocast_for(device, cfg.precision):
                output = trained(inputs.to(device), targets.to(device))
            micro_loss = output.loss.item()
            (output.loss / cfg.grad_accum).backward()
        loss_value += micro_loss / cfg.grad_accum
        lm_loss_value += output.lm_loss.item() / cfg.grad_accum
        for k, v in output.stats.items():
            stats[k] = stats.get(k, 0.0) + float(v) / cfg.grad_accum
    loss_value, lm_loss_value, *values = placement.mean([loss_value, lm_loss_value, *stats.values()])
    return loss_value, lm_loss_value, dict(zip(stats, values))


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


FLOPS_CHECK_STEPS = 3  # the early training-FLOPs check runs after this many steps (the count is exact per step)


def train_flops_warning(method: str, measured: float, planned: float, steps: int) -> str | None:
    """A one-line warning when the ledger's training FLOPs after ``steps`` steps are more than 2% off the planned
    ones (tokens x ``train_flops_per_token``, what sized the job to its budget)."""
    if not measured or not planned or abs(measured / planned - 1) <= FLOPS_TOLERANCE:
        return None
    return (f"{method}: measured training {measured:.4g} FLOPs after {steps} step(s) is "
            f"{(measured / planned - 1) * 100:+.1f}% off the planned {planned:.4g}, so the job trains past or short "
            "of its budget: analytic_flops_per_token(training=True) (or train_flops_per_token) misses work that "
            f"forward does: run `python -m harness check {method}`")


def nan_remedies(cfg: TrainConfig) -> str:
    """What to change after a non-finite loss, among the settings that can still change."""
    remedies = [f"lower train.lr (now {cfg.lr:g})"]
    if cfg.grad_clip <= 0:
        remedies.append("set train.grad_clip>0 (clipping is off)")
    if cfg.precision == "bf16":
        remedies.append("set train.precision=fp32")
    if cfg.warmup_fraction < 0.05:
        remedies.append(f"raise train.warmup_fraction (now {cfg.warmup_fraction:g})")
    return " or ".join(remedies)


def _check_train_flops(job: Job, prepared: Prepared, placement: Placement, ledger: compute.ComputeLedger, done: int,
                       steps: int, exact: bool) -> None:
    """The early check of the ledger's training FLOPs against the plan, after FLOPS_CHECK_STEPS steps, for a
    method whose count is exact per step (an expectation, such as sampled passes, is checked at the end only).
    Every rank calls it: totals() reduces over them."""
    if not exact or done != min(steps, FLOPS_CHECK_STEPS):
        return
    planned = done * job.train.tokens_per_step * prepared.flops_per_token
    warning = train_flops_warning(job.method, placement.totals(ledger.totals).train_flops, planned, done)
    if warning and placement.rank == 0:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def _stop_if_asked(request: _StopRequest, done: int, steps: int, cfg: TrainConfig, bar, save,
                   seconds: float) -> None:
    """After step ``done``, if SIGINT/SIGTERM arrived during it: ``save(done, seconds)`` (unless the step
    wrote its checkpoint), then KeyboardInterrupt (``harness train`` exits 130 with its message)."""
    if request.signal is None:
        return
    if not (done % cfg.checkpoint_every == 0 or done == steps):
        save(done, seconds)
    bar.close()
    raise KeyboardInterrupt(f"stopped by {request.signal} after step {done} of {steps}, checkpoint written; run the "
                            "same command again to resume")


class _StopRequest:
    """Which signal asked the step loop to stop (None while none has)."""

    signal: str | None = None


@contextlib.contextmanager
def stop_signals(enabled: bool):
    """While the block runs, SIGINT and SIGTERM only set ``.signal`` of the yielded request (the step loop
    then checkpoints at the end of its step and stops); a second one stops at once. Only in the main thread
    (where Python delivers signals) and only when ``enabled``: elsewhere the request never fires."""
    request = _StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.signal is not None:
            raise KeyboardInterrupt(f"stopped by a second {signal.Signals(signum).name} before the checkpoint")
        request.signal = signal.Signals(signum).name
        print(f"{request.signal}: stopping after this step, once its checkpoint is written (again to stop now)",
              file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


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


def finished_result(job: Job, out: pathlib.Path, force: bool) -> dict[str, Any] | None:
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


def total_steps(job: Job, flops_per_token: float, train_tokens: int) -> int:
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
            optimizer: torch.optim.Optimizer, placement: Placement) -> tuple[int, compute.LedgerTotals, float]:
    """Load the checkpoint into ``model`` and ``optimizer`` if there is one: (step, ledger totals, seconds).

    A finished checkpoint (a job stopped while evaluating) loads its weights only: no step is left to take,
    and a sharded job's last checkpoint holds no optimizer state.
    """
    main = placement.rank == 0
    if not (ckpt_dir / "state.json").exists():
        if main and metrics_file.exists():
            metrics_file.unlink()
        return 0, compute.LedgerTotals(), 0.0
    finished = _checkpoint_finished(ckpt_dir)
    state = placement.load(ckpt_dir, model, None if finished else optimizer)
    start_step = int(state["step"])
    measured = compute.LedgerTotals(**state["ledger"])
    seconds_before = float(state.get("train_seconds", 0.0))
    if main:
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
