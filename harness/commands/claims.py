"""``python -m harness claims DIR``: the PonderLM-3 paper's claims C1-C5 tested on a study's runs."""

from __future__ import annotations

import argparse
import pathlib

from harness.claims import evaluate_claims, load_arms, markdown, write_claims
from harness.core.io import check_writable, write_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a sweep folder (only its runs.jsonl is read)")
    parser.add_argument("--no-write", action="store_true", help="print the report without writing DIR/claims.md")


def run(args: argparse.Namespace) -> int:
    if args.no_write:
        arms = load_arms(args.folder)
        print(markdown(arms, evaluate_claims(arms), pathlib.Path(args.folder).resolve().name), end="")
    else:
        fix = "pass --no-write to print the report without writing it"
        if pathlib.Path(args.folder).is_dir():  # a missing folder is reported by write_claims (no runs.jsonl)
            check_writable(args.folder, "claims.md into", fix)
        try:
            path = write_claims(args.folder)
        except OSError as exc:  # the disk filled up between the check and the write
            raise write_error(exc, "claims.md", fix) from None
        print(path.read_text(encoding="utf-8"), end="")
        print(f"wrote {path}")
    return 0
