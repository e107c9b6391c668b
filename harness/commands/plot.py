"""``python -m harness plot DIR``: Pareto plots of a results folder, from its runs.jsonl alone."""

from __future__ import annotations

import argparse
import pathlib

from harness.commands.table import warn_skipped
from harness.core.io import check_writable, make_folder, write_error
from harness.report import make_plots


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a sweep folder (only its runs.jsonl is read)")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: the folder)")


def run(args: argparse.Namespace) -> int:
    if args.out:
        make_folder(args.out, "--out")
    target = pathlib.Path(args.out or args.folder)
    fix = "pass --out DIR to write the plots elsewhere"
    if target.is_dir():  # a missing folder is reported by make_plots (no runs.jsonl)
        check_writable(target, "plots into", fix)
    try:
        paths = make_plots(args.folder, args.out)
    except OSError as exc:  # the disk filled up between the check and the write
        raise write_error(exc, "a plot", fix) from None
    for path in paths:
        print(f"wrote {path}")
    warn_skipped(args.folder)
    return 0
