"""``python -m harness plot DIR``: Pareto plots of a results folder, from its runs.jsonl alone."""

from __future__ import annotations

import argparse

from harness.report import make_plots


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a sweep folder (only its runs.jsonl is read)")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: the folder)")


def run(args: argparse.Namespace) -> int:
    for path in make_plots(args.folder, args.out):
        print(f"wrote {path}")
    return 0
