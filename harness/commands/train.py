"""``python -m harness train``: one job (method, size, budget, seed), trained and evaluated.

``--devices N`` (N > 1) trains it on N devices through Ray Train (:mod:`harness.distributed`,
``--parallel ddp|fsdp``; ``--address`` joins a Ray cluster); the job, its id and its folder are the same
at any N. ``--compile`` runs the blocks of every training forward through torch.compile (off by default:
compiling costs tens of seconds per input shape, which long jobs repay); like N, it changes no job id.
"""

from __future__ import annotations

import argparse
import json
import sys

from harness import hf
from harness.core import registry
from harness.core.config import dataclass_from
from harness.core.errors import ConfigError
from harness.data import DataConfig
from harness.distributed import PARALLEL, RunOptions, check_devices, train_distributed
from harness.job import Job, TrainConfig, parse_overrides
from harness.plan import CONFIRM_HOURS, SCALES, detect_hardware
from harness.plan.hardware import job_hours
from harness.tracking import DEFAULT_TRACKER, TRACKERS, check_tracker
from harness.train import train_job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, help="a registered method (python -m harness list)")
    parser.add_argument("--budget", type=float, required=True, help="training FLOPs, e.g. 1e12")
    parser.add_argument("--out", required=True, help="job folder (result.json, checkpoint, metrics)")
    parser.add_argument("--size", default="nano", help="size ladder rung: pico nano micro tiny 70m ... 2.8b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model field (d_model=96), train.FIELD or data.FIELD; repeatable")
    parser.add_argument("--init-from", default="", metavar="PATH",
                        help="start from a Hugging Face Llama checkpoint: a folder with config.json and *.safetensors, "
                             "or hf:<name>; its config sets the shape (--size is ignored) and its tokenizer.json "
                             "the tokenizer")
    parser.add_argument("--force", action="store_true", help="start over even if OUT holds another job")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--yes", action="store_true", help="train even if the budget exceeds this hardware")
    parser.add_argument("--devices", type=int, default=1, metavar="N",
                        help="train on N devices through Ray Train: GPUs where the Ray cluster has them, else CPU "
                             "workers (gloo); train.batch_size must be divisible by N (default 1: this process)")
    parser.add_argument("--parallel", choices=PARALLEL, default="ddp",
                        help="with --devices N: ddp (every device holds the model) or fsdp (parameters, gradients "
                             "and optimizer state sharded over the devices)")
    parser.add_argument("--address", default=None,
                        help="with --devices N: the Ray cluster to join (default: RAY_ADDRESS, else a local "
                             "instance); the --out folder must be on storage every node sees")
    parser.add_argument("--cpus-per-device", type=int, default=1,
                        help="with --devices N on CPUs: CPU cores (torch threads) per worker")
    parser.add_argument("--compile", action="store_true",
                        help="run the blocks of every training forward through torch.compile (tens of seconds "
                             "of compiling per input shape, then faster steps: for long jobs); not part of the job")
    parser.add_argument("--tracker", choices=TRACKERS, default=DEFAULT_TRACKER,
                        help="training logs besides metrics.jsonl: TensorBoard events in OUT/tensorboard (default), "
                             "W&B offline in OUT/wandb (needs the optional package wandb), or none")


def job_from_args(args: argparse.Namespace) -> Job:
    model, train, data = parse_overrides(args.overrides)
    init_from = ""
    if getattr(args, "init_from", ""):
        init_from = hf.normalise(args.init_from)
        if "tokenizer" not in data:  # the checkpoint's tokenizer: the data is re-tokenised with it
            data["tokenizer"] = hf.tokenizer_for(init_from)
    return Job(method=args.method, budget=args.budget, size=args.size, seed=args.seed, model=model,
               train=dataclass_from(TrainConfig, train), data=dataclass_from(DataConfig, data), init_from=init_from)


def run(args: argparse.Namespace) -> int:
    job = job_from_args(args)
    check_tracker(args.tracker)  # wandb not installed: one line, before anything is loaded
    plugin = registry.get(job.method)
    if job.init_from:  # validate before loading data
        hf.model_config(plugin, job.init_from, job.model)
    else:
        plugin.make_config(job.size, job.model)
    if args.devices > 1:
        options = RunOptions(devices=args.devices, parallel=args.parallel, address=args.address,
                             cpus_per_worker=args.cpus_per_device, compile_blocks=args.compile)
        check_devices(job.train, args.devices)
        check_feasible(job, args.yes, args.devices)
        result = train_distributed(job, args.out, options, progress=not args.no_progress, force=args.force)
    else:
        if args.devices < 1:
            raise ConfigError(f"--devices {args.devices}: must be at least 1")
        check_feasible(job, args.yes)
        result = train_job(job, args.out, progress=not args.no_progress, force=args.force, tracker=args.tracker,
                           compile_blocks=args.compile, stop_on_signal=True)  # Ctrl-C: checkpoint, then exit 130
    if result.get("flops_warning"):
        print(f"warning: {result['flops_warning']}", file=sys.stderr)
    keys = ("method", "size", "params", "train_tokens", "train_flops", "val_loss", "val_ppl",
            "infer_flops_per_token", "wall_seconds")
    print(json.dumps({k: result.get(k) for k in keys}, indent=2))
    return 0


SURE_RATE = 1e8  # training FLOP/s that any machine reaches: budgets done within CONFIRM_HOURS at it skip the probe


def check_feasible(job: Job, yes: bool, devices: int = 1) -> None:
    """Stop (ConfigError, before anything is written) when the budget needs more than CONFIRM_HOURS here.

    The rate is the plan's (harness.plan.hardware.detect_hardware: a measured matmul rate x an assumed
    utilisation), optimistic for small models: the estimate errs towards starting. N devices train at N
    times that rate times an assumed scaling efficiency (harness.plan.hardware.job_hours).
    """
    if yes or job.budget <= CONFIRM_HOURS * 3600 * SURE_RATE * devices:
        return
    hardware = detect_hardware(SCALES["pythia"], job.train, 50304, workers=1)
    hours = job_hours(job.budget, hardware, devices)
    if hours > CONFIRM_HOURS:
        raise ConfigError(f"--budget {job.budget:.3g} FLOPs needs ~{hours:,.3g} h of training on this hardware "
                          f"(at most {hardware.flops_per_second:.3g} FLOP/s: {hardware.basis}); lower --budget, "
                          "or pass --yes to train anyway")
