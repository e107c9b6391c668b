"""``python -m harness COMMAND ...``: one module per command, imported only when used.

Each command module provides ``add_arguments(parser)`` and ``run(args) -> int``. Errors a user can fix
(bad config, missing data, corrupt checkpoint) are printed as one line, without a traceback, and exit
with status 2; set HARNESS_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("harness.commands.list_plugins", "list registered methods, their summaries and config fields"),
    "train": ("harness.train", "train one job (method, size, budget, seed) and evaluate it"),
    "eval": ("harness.evaluate", "re-evaluate a saved job (perplexity, downstream tasks)"),
    "analyze": ("harness.analyze", "per-token analysis of an adaptive job: steps against token NLL"),
    "plan": ("harness.plan", "the jobs a sweep at a FLOPs budget would run, with time estimates"),
    "sweep": ("harness.sweep", "train and evaluate every method at matched compute (Ray)"),
    "plot": ("harness.report", "Pareto plots of a results directory"),
    "table": ("harness.report", "the comparison table of a results directory"),
    "bench": ("harness.bench", "speed benchmarks against the reference implementations"),
    "tasks": ("harness.downstream", "list the downstream tasks available offline"),
}


class UserError(Exception):
    """An error caused by input the user can fix; shown as one line."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from models.config import ConfigError

    types: list[type[BaseException]] = [UserError, ConfigError, FileNotFoundError]
    for module, name in (("harness.data", "DataError"), ("harness.checkpoint", "CheckpointError"),
                         ("harness.train", "TrainingError"), ("harness.downstream", "DownstreamError")):
        if module in sys.modules and hasattr(sys.modules[module], name):
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="python -m harness", description="Benchmark adaptive-computation language models at matched, measured compute.",
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="commands:\n" + "\n".join(f"  {k:<8} {v[1]}" for k, v in COMMANDS.items()))
    top.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        top.parse_args(argv[:1] or ["--help"])
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m harness {name}", description=help_text)
    add = getattr(module, f"add_{name}_arguments", None) or module.add_arguments
    add(parser)
    args = parser.parse_args(argv[1:])
    run = getattr(module, f"run_{name}", None) or module.run
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("HARNESS_DEBUG") or not isinstance(exc, _user_error_types()):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
