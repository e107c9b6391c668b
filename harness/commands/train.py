"""``python -m harness train``: one job (method, size, budget, seed), trained and evaluated."""

from __future__ import annotations

import argparse
import json

from harness.core import registry
from harness.core.config import dataclass_from
from harness.data import DataConfig
from harness.job import Job, TrainConfig, parse_overrides
from harness.train import train_job


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
               train=dataclass_from(TrainConfig, train), data=dataclass_from(DataConfig, data))


def run(args: argparse.Namespace) -> int:
    job = job_from_args(args)
    registry.get(job.method).make_config(job.size, job.model)  # validate before loading data
    result = train_job(job, args.out, progress=not args.no_progress, force=args.force)
    keys = ("method", "size", "params", "train_tokens", "train_flops", "val_loss", "val_ppl",
            "infer_flops_per_token", "wall_seconds")
    print(json.dumps({k: result.get(k) for k in keys}, indent=2))
    return 0
