"""``python -m harness plan``: the jobs a sweep would run (a budget or a study), with time estimates, each
method's training recipe per rung and the rungs skipped where a method's config is invalid.

The request arguments are shared with ``sweep`` (:func:`add_request_arguments`).
"""

from __future__ import annotations

import argparse
import json

from harness.core.errors import ConfigError
from harness.distributed import PARALLEL
from harness.plan import GPU_TABLE, MATCH_MODES, PlanRequest, format_plan, make_plan, study
from harness.plan.planning import DEFAULT_RUNGS


def csv_list(text: str | None) -> list[str] | None:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return items or None


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments ``plan`` and ``sweep`` share; None means "not given" (a study's value then holds)."""
    parser.add_argument("--study", default=None, metavar="NAME|FILE",
                        help=f"run a study file ({', '.join(study.available())}, or a path to a .toml)")
    parser.add_argument("--budget", type=float, default=None, help="training FLOPs per job, e.g. 1e20")
    parser.add_argument("--methods", default="", help="comma-separated methods (default: every registered one)")
    parser.add_argument("--sizes", default="", help="comma-separated ladder rungs (default: the IsoFLOP rule)")
    parser.add_argument("--rungs", type=int, default=None, help=f"rungs per method chosen by the rule "
                                                                f"(default {DEFAULT_RUNGS})")
    parser.add_argument("--match", choices=MATCH_MODES, default=None,
                        help="train-flops (default): equal training FLOPs; tokens: the tokens vanilla gets "
                             "(the papers' protocol)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per (method, size): 0..N-1 (default 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="train.FIELD, data.FIELD or a model field for every job; METHOD:KEY=VALUE for one method")
    parser.add_argument("--vary", action="append", default=[], metavar="METHOD:FIELD=V1,V2",
                        help="extra jobs per value (e.g. ponderlm3:compute_penalty=0.003,0.01,0.03)")
    parser.add_argument("--gpu", default=None, help=f"estimate on a named GPU: {', '.join(GPU_TABLE)}")
    parser.add_argument("--mfu", type=float, default=None, help="assumed utilisation for the estimate")
    parser.add_argument("--workers", type=int, default=None, help="devices (GPUs, or CPU job slots) for the wall-time "
                        "estimate; jobs at once: this / --devices-per-job")
    parser.add_argument("--cpus-per-job", type=int, default=1, help="CPU cores (threads) per job")
    parser.add_argument("--devices-per-job", type=int, default=None, metavar="N",
                        help="train each job on N devices through Ray Train (GPUs, else CPU workers of "
                             "--cpus-per-job CPUs each); the plan's hours are then wall hours on N devices and its "
                             "memory per device; default: the study's devices_per_job, else 1")
    parser.add_argument("--parallel", choices=PARALLEL, default=None,
                        help="with --devices-per-job: ddp (data-parallel, default) or fsdp (sharded parameters, "
                             "gradients and optimizer state, for jobs that do not fit one device)")


def request_from_args(args: argparse.Namespace, loaded: study.Study | None = None) -> PlanRequest:
    """The plan request of the command line, or of ``loaded`` with the flags given winning."""
    if args.seeds is not None and args.seeds < 1:  # checked here: `--seeds 0 or 1` below would run one seed
        raise ConfigError(f"--seeds {args.seeds}: must be at least 1 (seeds 0..N-1 per method and size)")
    hardware = {"mfu": args.mfu, "workers": args.workers, "cpus_per_job": args.cpus_per_job}
    devices = {"devices_per_job": args.devices_per_job, "parallel": args.parallel}
    if loaded is not None:
        if args.vary:
            raise ConfigError(f"--vary does not combine with --study {loaded.name}: add the values to an arm's "
                              "vary table in the study file")
        if args.gpu:
            hardware["gpu"] = args.gpu
        return loaded.request(budget=args.budget, match=args.match, sizes=csv_list(args.sizes), seeds=args.seeds,
                              overrides=list(args.overrides), methods=csv_list(args.methods),
                              rungs=args.rungs or DEFAULT_RUNGS, **devices, **hardware)
    if args.budget is None:
        raise ConfigError("give --budget FLOPS (e.g. --budget 1e12) or --study NAME")
    return PlanRequest(budget=args.budget, methods=csv_list(args.methods), sizes=csv_list(args.sizes),
                       rungs=args.rungs or DEFAULT_RUNGS, match=args.match or "train-flops", seeds=args.seeds or 1,
                       overrides=list(args.overrides), vary=list(args.vary), gpu=args.gpu,
                       devices_per_job=1 if args.devices_per_job is None else args.devices_per_job,
                       parallel=args.parallel or "ddp", **hardware)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_request_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    loaded = study.load(args.study) if args.study else None
    plan = make_plan(request_from_args(args, loaded))
    print(json.dumps(plan.to_dict(), indent=2, default=str) if args.json else format_plan(plan))
    return 0
