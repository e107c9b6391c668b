"""``python -m harness plot DIR``: Pareto plots of a results folder, from its runs.jsonl alone."""

from __future__ import annotations

import argparse

from harness.commands.table import warn_skipped
from harness.core.io import make_folder
from harness.report import make_plots


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a sweep folder (only its runs.jsonl is read)")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: the folder)")


def run(args: argparse.Namespace) -> int:
    if args.out:
        make_folder(args.out, "--out")
    for path in make_plots(args.folder, args.out):
        print(f"wrote {path}")
    warn_skipped(args.folder)
    return 0
