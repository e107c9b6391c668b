"""``python -m harness report DIR``: the study's page, ``DIR/report.html``, from its runs.jsonl and study.toml.

One self-contained file (plots embedded, no network; :mod:`harness.report.html`); every sweep writes it too.
"""

from __future__ import annotations

import argparse
import pathlib

from harness.commands.table import warn_skipped
from harness.core.errors import ConfigError
from harness.core.io import check_writable, make_folder, write_error
from harness.report import REPORT_HTML, write_html


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a sweep folder (its runs.jsonl, study.toml and jobs/ are read)")
    parser.add_argument("--out", default=None,
                        help=f"write the page to this file (default: DIR/{REPORT_HTML}); its links to job files "
                             "are relative to where it is")


def run(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out) if args.out else None
    if out is not None:
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; give a file name, e.g. {out / REPORT_HTML}")
        make_folder(out.parent, "--out's folder")
    target = out.parent if out is not None else pathlib.Path(args.folder)
    fix = "pass --out FILE to write the page elsewhere"
    if target.is_dir():  # a missing folder is reported by the loader (no runs.jsonl)
        check_writable(target, "report.html into", fix)
    try:
        path = write_html(args.folder, out)
    except OSError as exc:
        raise write_error(exc, "report.html", fix) from None
    print(f"wrote {path}")
    warn_skipped(args.folder)
    return 0
