"""``python -m harness bench``: speed benchmarks, as ratios measured side by side in one run."""

from __future__ import annotations

import argparse
import json
import pathlib

from harness.bench import SECTIONS, BenchConfig, benchmark, format_report
from harness.core.errors import ConfigError
from harness.core.io import write_json_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer rounds (under two minutes)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument("--out", default=None, help="where to write the JSON report (default: bench.json, "
                                                    "bench-quick.json with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    make = BenchConfig.quick if args.quick else BenchConfig.full
    cfg = make(threads=args.threads, sections=sections)
    out = pathlib.Path(args.out or ("bench-quick.json" if args.quick else "bench.json"))
    if out.parent and not out.parent.exists():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    report = benchmark(cfg, progress=not args.no_progress)
    write_json_atomic(out, report)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if not args.json:
        print(f"report written to {out}")
    return 0
