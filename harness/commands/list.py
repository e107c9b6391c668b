"""``python -m harness list [--json]``: every registered method with its summary and config fields."""

from __future__ import annotations

import argparse
import json

from harness.core import registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list of {name, summary, config, ...}")


def run(args: argparse.Namespace) -> int:
    described = [plugin.describe() for plugin in registry.plugins().values()]
    if args.json:
        print(json.dumps(described, indent=2, default=str))
        return 0
    for item in described:
        source = "" if item["source"] == "in-tree" else f"  [from {item['source']}]"
        print(f"{item['name']}: {item['summary']}{source}")
        for field, info in item["config"].items():
            print(f"    {field:<18} {info['type']:<14} default {info['default']!r}")
    return 0
