"""``python -m harness tasks``: the downstream tasks available offline, or their YAML folder for lm-eval."""

from __future__ import annotations

import argparse
import json

from harness.core.io import check_writable, make_folder, write_error
from harness.lmeval.tasks import describe_tasks, write_task_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m harness tasks [--json] [--corpus JSONL] [--write [DIR]]``."""
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--corpus", default=None, metavar="JSONL",
                        help="count the documents of this corpus jsonl for corpus_ppl "
                             "(`python -m harness eval DIR --tasks corpus_ppl` uses the job's validation split)")
    parser.add_argument("--write", nargs="?", const="", default=None, metavar="DIR",
                        help="write the local task YAMLs (default folder, or DIR) and print only the folder, "
                             "for lm-eval's --include_path")


def run(args: argparse.Namespace) -> int:
    """List the downstream suite: name, lm-eval task, split, documents available offline, note."""
    if args.write is not None:
        fix = "give --write a folder that can be written"
        if args.write:  # a file in the way, or a folder that cannot be made: one line, before any write
            make_folder(args.write, "--write")
            check_writable(args.write, "the task folder", fix)
        try:
            print(write_task_folder(args.write or None, corpus_jsonl=args.corpus))
        except OSError as exc:
            raise write_error(exc, "the task folder", fix) from None
        return 0
    rows = describe_tasks(args.corpus)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("name", "lm-eval task", "reuses", "split", "docs", "offline")
    table = [header] + [
        (r["name"], r["task"], r["reuses"], r["split"], "-" if r["docs"] is None else str(r["docs"]),
         "yes" if r["offline"] else "NO") for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print()
    for r in rows:
        print(f"{r['name']}: {r['note']}")
    print("\nlocal tasks evaluate with `python -m harness eval DIR --tasks NAME[,NAME...]`; other lm-eval task "
          "names pass through to lm-eval's stock tasks when the hub is reachable.")
    return 0
