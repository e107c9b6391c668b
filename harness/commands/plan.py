"""``python -m harness plan``: the jobs a sweep at a FLOPs budget would run, with time estimates.

The request arguments are shared with ``sweep`` (:func:`add_request_arguments`).
"""

from __future__ import annotations

import argparse
import json

from harness.plan import GPU_TABLE, MATCH_MODES, PlanRequest, format_plan, make_plan
from harness.plan.planning import DEFAULT_RUNGS


def csv_list(text: str | None) -> list[str] | None:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return items or None


def add_request_arguments(parser: argparse.ArgumentParser, budget_required: bool = True) -> None:
    """The arguments ``plan`` and ``sweep`` share."""
    parser.add_argument("--budget", type=float, required=budget_required,
                        help="training FLOPs per job, e.g. 1e20" + ("" if budget_required else
                                                                     " (default: the embedded default sweep)"))
    parser.add_argument("--methods", default="", help="comma-separated methods (default: every registered one)")
    parser.add_argument("--sizes", default="", help="comma-separated ladder rungs (default: the IsoFLOP rule)")
    parser.add_argument("--rungs", type=int, default=DEFAULT_RUNGS, help="rungs per method chosen by the rule")
    parser.add_argument("--match", choices=MATCH_MODES, default="train-flops",
                        help="train-flops: equal training FLOPs; tokens: the tokens vanilla gets (papers' protocol)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per (method, size): 0..N-1")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="train.FIELD, data.FIELD or a model field for every job; METHOD:KEY=VALUE for one method")
    parser.add_argument("--vary", action="append", default=[], metavar="METHOD:FIELD=V1,V2",
                        help="extra jobs per value (e.g. ponderlm3:compute_penalty=0.003,0.01,0.03)")
    parser.add_argument("--gpu", default=None, help=f"estimate on a named GPU: {', '.join(GPU_TABLE)}")
    parser.add_argument("--mfu", type=float, default=None, help="assumed utilisation for the estimate")
    parser.add_argument("--workers", type=int, default=None, help="jobs at once for the wall-time estimate")
    parser.add_argument("--cpus-per-job", type=int, default=1, help="CPU cores (threads) per job")


def request_from_args(args: argparse.Namespace, budget: float | None = None) -> PlanRequest:
    return PlanRequest(budget=args.budget if budget is None else budget, methods=csv_list(args.methods),
                       sizes=csv_list(args.sizes), rungs=args.rungs, match=args.match, seeds=args.seeds,
                       overrides=list(args.overrides), vary=list(args.vary), gpu=args.gpu, mfu=args.mfu,
                       workers=args.workers, cpus_per_job=args.cpus_per_job)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_request_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    plan = make_plan(request_from_args(args))
    print(json.dumps(plan.to_dict(), indent=2, default=str) if args.json else format_plan(plan))
    return 0
