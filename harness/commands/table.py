"""``python -m harness table DIR``: the comparison table of a results folder (markdown, LaTeX or CSV)."""

from __future__ import annotations

import argparse
import pathlib

from harness.report import FORMATTERS, make_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a sweep folder (only its runs.jsonl is read)")
    parser.add_argument("--format", choices=list(FORMATTERS), default="md")
    parser.add_argument("--out", default=None, help="write the table to this file instead of printing it")


def run(args: argparse.Namespace) -> int:
    text = make_table(args.folder, args.format)
    if args.out:
        pathlib.Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    return 0
