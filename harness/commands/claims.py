"""``python -m harness claims DIR``: the PonderLM-3 paper's claims C1-C5 tested on a study's runs."""

from __future__ import annotations

import argparse

from harness.claims import load_arms, markdown, test_claims, write_claims


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a sweep folder (only its runs.jsonl is read)")
    parser.add_argument("--no-write", action="store_true", help="print the report without writing DIR/claims.md")


def run(args: argparse.Namespace) -> int:
    arms = load_arms(args.folder)
    print(markdown(arms, test_claims(arms), args.folder.rstrip("/").split("/")[-1]), end="")
    if not args.no_write:
        print(f"wrote {write_claims(args.folder)}")
    return 0
