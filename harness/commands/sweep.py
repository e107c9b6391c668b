"""``python -m harness sweep``: a study or a budget, on Ray; resumable; writes runs, plots, tables and claims.

``python -m harness sweep [--study NAME] [--budget FLOPS] [--methods a,b] [--seeds N] [--out DIR]
[--address ADDR] [--devices-per-job N [--parallel ddp|fsdp]] [--compile] [--dry-run] [--yes]
[--match train-flops|tokens] [--tasks arc_easy,...] [--set k=v ...]``

Without ``--study`` or ``--budget`` it runs the study ``quick`` (harness/studies/quick.toml): the
default main job, under 15 minutes on a 2-core CPU, evaluation included.
"""

from __future__ import annotations

import argparse
import os
import sys

from harness.commands.plan import add_request_arguments, csv_list, request_from_args
from harness.core.errors import SweepError
from harness.plan import study
from harness.results import ResultsStore
from harness.sweep import DEFAULT_RETRIES, DEFAULT_STUDY, SweepOptions, sweep
from harness.tracking import DEFAULT_TRACKER, TRACKERS, check_tracker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_request_arguments(parser)
    parser.add_argument("--out", default=None,
                        help="sweep folder (default results/study_<name>, or results/sweep_<budget>_<match>)")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="retries of a crashed job")
    parser.add_argument("--tasks", default="",
                        help="downstream tasks after training (python -m harness tasks; default: the study's)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--task-limit", type=int, default=None, help="documents per downstream task")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument("--yes", action="store_true", help="run even if the plan exceeds the hardware found")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="forward the workers' logs")
    parser.add_argument("--tracker", choices=TRACKERS, default=DEFAULT_TRACKER,
                        help="each job's training logs besides metrics.jsonl: TensorBoard events in "
                             "jobs/<id>/tensorboard (default), W&B offline (needs the optional package wandb), or none")
    parser.add_argument("--compile", action="store_true",
                        help="train every job with its blocks through torch.compile (tens of seconds of compiling "
                             "per input shape, then faster steps: for long jobs; default: the study's compile, "
                             "else off); changes no job id")


def _default_out(budget: float, match: str) -> str:
    mantissa, exponent = f"{budget:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return os.path.join("results", f"sweep_{mantissa}e{int(exponent)}_{match}")


def run(args: argparse.Namespace) -> int:
    if args.retries < 0:
        raise SweepError(f"--retries {args.retries}: must be >= 0")
    name = args.study or (DEFAULT_STUDY if args.budget is None else None)
    loaded = study.load(name) if name else None
    request = request_from_args(args, loaded)
    if loaded is not None and args.study is None:
        print(f"default sweep: study {loaded.name!r} ({loaded.path.name}); pass --study NAME or --budget FLOPS "
              "for another", flush=True)
    tasks = csv_list(args.tasks) or (loaded.tasks if loaded else [])
    task_limit = args.task_limit if args.task_limit is not None else (loaded.task_limit if loaded else None)
    num_fewshot = args.num_fewshot if args.num_fewshot is not None else (loaded.num_fewshot if loaded else 0)
    out = args.out or (os.path.join("results", f"study_{loaded.name}") if loaded
                       else _default_out(request.budget, request.match))
    check_tracker(args.tracker)  # wandb not installed: one line, before Ray starts
    options = SweepOptions(  # the request holds --devices-per-job/--parallel, or the study's values
        out=out, address=args.address, cpus=args.cpus, cpus_per_job=args.cpus_per_job, retries=args.retries,
        devices_per_job=request.devices_per_job, parallel=request.parallel,
        compile_blocks=bool(args.compile or (loaded is not None and loaded.compile)), tracker=args.tracker,
        tasks=tasks, num_fewshot=num_fewshot, task_limit=task_limit, dry_run=args.dry_run, yes=args.yes,
        progress=not args.no_progress, verbose=args.verbose, study_text=loaded.text if loaded else None)
    outcome = sweep(request, options)
    if options.dry_run:
        return 0
    if outcome.outage:  # one line, whatever --no-progress hid: what failed and where
        print(f"error: the output folder failed ({outcome.outage}); every checkpoint is kept: fix it and run the "
              "same command to resume", file=sys.stderr)
    not_run = f", {outcome.not_run} not run" if outcome.outage else ""
    print(f"sweep: {outcome.ok} ok, {outcome.failed} failed, {outcome.skipped} already done{not_run}, "
          f"in {outcome.wall_seconds / 60:.1f} min; results in {ResultsStore(options.out).path}")
    for path in outcome.reports:
        print(f"wrote {path}")
    return 1 if outcome.failed or outcome.outage else 0
