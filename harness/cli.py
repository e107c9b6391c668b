"""``python -m harness COMMAND ...``: one module per command in :mod:`harness.commands`.

Each command module provides ``add_arguments(parser)`` and ``run(args) -> int`` and is imported only
when its command runs (some pull in lm-eval or Ray, which take seconds to import). Every error a user
can fix is a :class:`~harness.core.errors.HarnessError`: it is caught here, once, and printed as one
line without a traceback, with exit status 2; ``HARNESS_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from harness.core.errors import HarnessError

# command -> one-line help; the command's code is harness/commands/<command>.py
COMMANDS: dict[str, str] = {
    "list": "list registered methods, their summaries and config fields",
    "train": "train one job (method, size, budget, seed) and evaluate it",
    "eval": "re-evaluate a saved job (perplexity, downstream tasks)",
    "analyze": "per-token analysis of an adaptive job: steps against token NLL",
    "plan": "the jobs a sweep at a FLOPs budget would run, with time estimates",
    "sweep": "train and evaluate every method at matched compute (Ray)",
    "plot": "Pareto plots of a results directory",
    "table": "the comparison table of a results directory",
    "report": "one self-contained HTML page of a results directory (report.html)",
    "claims": "test the PonderLM-3 paper's claims C1-C5 on a study's results",
    "bench": "speed benchmarks against the reference implementations",
    "tasks": "list the downstream tasks available offline",
    "export": "write a trained job as a Hugging Face Llama folder (LlamaForCausalLM for vanilla jobs)",
    "check": "run the plugin contract's checks on a registered method (for plugin authors)",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="python -m harness",
                                  description="Benchmark adaptive-computation language models at matched, "
                                              "measured compute.",
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="commands:\n" + "\n".join(f"  {k:<8} {v}" for k, v in COMMANDS.items()))
    top.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    if not argv:  # no command is a usage error (exit 2, as argparse gives a wrong one), not a request for help
        top.print_help(sys.stderr)
        return 2
    if argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        top.parse_args(argv[:1] or ["--help"])
    name = argv[0]
    command = importlib.import_module(f"harness.commands.{name}")
    parser = argparse.ArgumentParser(prog=f"python -m harness {name}", description=COMMANDS[name])
    command.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(command.run(args) or 0)
    except KeyboardInterrupt as exc:  # its message, where there is one, says what was kept (harness.train)
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return 130
    except HarnessError as exc:
        if os.environ.get("HARNESS_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
