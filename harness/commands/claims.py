"""``python -m harness claims DIR``: the PonderLM-3 paper's claims C1-C5 tested on a study's runs."""

from __future__ import annotations

import argparse
import pathlib

from harness.claims import evaluate_claims, load_arms, markdown, write_claims


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a sweep folder (only its runs.jsonl is read)")
    parser.add_argument("--no-write", action="store_true", help="print the report without writing DIR/claims.md")


def run(args: argparse.Namespace) -> int:
    if args.no_write:
        arms = load_arms(args.folder)
        print(markdown(arms, evaluate_claims(arms), pathlib.Path(args.folder).resolve().name), end="")
    else:
        path = write_claims(args.folder)
        print(path.read_text(encoding="utf-8"), end="")
        print(f"wrote {path}")
    return 0
