"""``python -m harness analyze DIR``: where an adaptive job spends its steps (steps against token NLL)."""

from __future__ import annotations

import argparse
import json

from harness.analyze import analyze, markdown_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a job folder written by `python -m harness train` (holds tokens.npz)")
    parser.add_argument("--top", type=int, default=20, help="most frequent tokens in the table (default 20)")
    parser.add_argument("--bins", type=int, default=10, help="NLL quantile bins in the plot (default 10)")
    parser.add_argument("--groups", type=int, default=10,
                        help="token-frequency groups; rare/frequent = the first/last (default 10)")
    parser.add_argument("--out", default=None, help="folder for the outputs (default: the job folder)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of the report")


def run(args: argparse.Namespace) -> int:
    summary = analyze(args.folder, top=args.top, bins=args.bins, groups=args.groups, out=args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(markdown_report(summary))
    files = summary["files"]
    print(f"wrote {files['plot']}, {files['table']} and {files['summary']}")
    return 0
