"""``python -m harness check METHOD``: the plugin contract's checks on a registered method and its variants."""

from __future__ import annotations

import argparse
import sys

from harness.check import CHECKS, METHOD_CHECKS, cases, run_checks
from harness.core import registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("methods", nargs="+", metavar="METHOD", help="registered methods (python -m harness list)")


def run(args: argparse.Namespace) -> int:
    failures = []
    for method in args.methods:
        registry.get(method)  # an unknown name: one line, exit 2
        failures += run_checks(method)
    total = sum(len(METHOD_CHECKS) + len(CHECKS) * len(cases([m])) for m in args.methods)
    for line in failures:
        print(f"FAIL {line}", file=sys.stderr)
    print(f"check: {total - len(failures)} of {total} contract checks passed ({', '.join(args.methods)})")
    return 1 if failures else 0
