"""``python -m harness table DIR``: the comparison table of a results folder (markdown, LaTeX or CSV)."""

from __future__ import annotations

import argparse
import pathlib
import sys

from harness.core.errors import ConfigError
from harness.core.io import make_folder
from harness.report import FORMATTERS, make_table
from harness.results import ResultsStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a sweep folder (only its runs.jsonl is read)")
    parser.add_argument("--format", choices=list(FORMATTERS), default="md")
    parser.add_argument("--out", default=None, help="write the table to this file instead of printing it")


def warn_skipped(folder: str) -> None:
    """Name on stderr the lines of DIR/runs.jsonl that reports leave out (torn by a kill, damaged by hand)."""
    store = ResultsStore(folder)
    store.records()
    note = store.skipped_note()
    if note:
        print(f"warning: {note}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    text = make_table(args.folder, args.format)
    warn_skipped(args.folder)
    if args.out:
        out = pathlib.Path(args.out)
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; give a file name, e.g. {out / ('table.' + args.format)}")
        make_folder(out.parent, "--out's folder")
        try:
            out.write_text(text)
        except OSError as exc:
            raise ConfigError(f"--out {out} cannot be written: {exc.strerror}; choose another path") from None
        print(f"wrote {args.out}")
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    return 0
