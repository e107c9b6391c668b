"""``python -m harness sweep``: every method at matched compute on Ray; resumable; writes runs, plots and tables.

``python -m harness sweep [--budget FLOPS] [--methods a,b] [--seeds N] [--out DIR] [--address ADDR]
[--dry-run] [--yes] [--match train-flops|tokens] [--tasks arc_easy,...] [--task-limit N] [--set k=v ...]``

Without ``--budget`` it runs the embedded default (:data:`harness.sweep.DEFAULT_SWEEP`): every
registered method (plugins installed later are swept too) on the embedded corpus at a budget that
finishes in under 15 minutes on a 2-core CPU, evaluation included.
"""

from __future__ import annotations

import argparse
import os

from harness.commands.plan import add_request_arguments, csv_list, request_from_args
from harness.core.errors import SweepError
from harness.plan.planning import DEFAULT_RUNGS
from harness.results import ResultsStore
from harness.sweep import DEFAULT_RETRIES, DEFAULT_SWEEP, SweepOptions, sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_request_arguments(parser, budget_required=False)
    parser.set_defaults(rungs=None)
    parser.add_argument("--out", default=None, help="sweep folder (default results/sweep_<budget>_<match>)")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="retries of a crashed job")
    parser.add_argument("--tasks", default="", help="downstream tasks after training (python -m harness tasks)")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--task-limit", type=int, default=None, help="documents per downstream task")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument("--yes", action="store_true", help="run even if the plan exceeds the hardware found")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="forward the workers' logs")


def _default_out(budget: float, match: str) -> str:
    mantissa, exponent = f"{budget:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return os.path.join("results", f"sweep_{mantissa}e{int(exponent)}_{match}")


def run(args: argparse.Namespace) -> int:
    default = args.budget is None
    budget = DEFAULT_SWEEP["budget"] if default else args.budget
    if args.rungs is None:
        args.rungs = DEFAULT_SWEEP["rungs"] if default else DEFAULT_RUNGS
    if args.retries < 0:
        raise SweepError(f"--retries {args.retries}: must be >= 0")
    request = request_from_args(args, budget=budget)
    if default:
        print(f"default sweep: every registered method at {budget:.3g} FLOPs on the embedded corpus, downstream "
              f"{','.join(DEFAULT_SWEEP['tasks'])} on {DEFAULT_SWEEP['task_limit']} documents each "
              "(pass --budget for another sweep)", flush=True)
    tasks = csv_list(args.tasks) or (list(DEFAULT_SWEEP["tasks"]) if default else [])
    task_limit = args.task_limit if args.task_limit is not None or not default else DEFAULT_SWEEP["task_limit"]
    options = SweepOptions(
        out=args.out or _default_out(budget, args.match), address=args.address, cpus=args.cpus,
        cpus_per_job=args.cpus_per_job, retries=args.retries, tasks=tasks, num_fewshot=args.num_fewshot,
        task_limit=task_limit, dry_run=args.dry_run, yes=args.yes, progress=not args.no_progress,
        verbose=args.verbose)
    outcome = sweep(request, options)
    if options.dry_run:
        return 0
    print(f"sweep: {outcome.ok} ok, {outcome.failed} failed, {outcome.skipped} already done, "
          f"in {outcome.wall_seconds / 60:.1f} min; results in {ResultsStore(options.out).path}")
    for path in outcome.reports:
        print(f"wrote {path}")
    return 1 if outcome.failed else 0

