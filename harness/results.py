"""The results store of a sweep: one JSON line per finished job in ``OUT/runs.jsonl``.

Layout of a sweep folder ``OUT``::

    runs.jsonl        one record per finished job (appended, never rewritten)
    plan.json         the plan the last sweep ran (jobs, sizes, tokens, FLOPs, estimates)
    jobs/<job_id>/    each job's folder (checkpoint/, metrics.jsonl, result.json, ...): the bulky part,
                      safe to delete once runs.jsonl holds the job (reports read only runs.jsonl)
    *.png, table.*    plots and tables written by ``harness.report``

A record is the job's ``result.json`` plus ``job_id`` (:meth:`harness.job.Job.job_id`, a hash of the
resolved job), ``status`` ("ok" or "failed", with a one-line ``error``), ``job`` (the resolved job, so a
record is self-contained) and bookkeeping (``recorded_at``, ``attempt``, ``resumed_from_step``).

Decisions that make the store lose nothing and hold nothing twice:

* An append is one ``os.write`` of one complete line on an ``O_APPEND`` descriptor, followed by
  ``fsync``: a kill leaves either the whole line or, at worst, a torn last line without its newline.
  Readers skip lines that are not complete JSON objects; the next append first ends such a torn line
  (in the same single write), so it never swallows the record after it.
* Appends hold an exclusive ``flock`` on ``runs.jsonl.lock`` while they check for duplicates: a job id
  already present with status "ok" is not written again, so the worker that finished a job and the
  driver that collected it may both append (the second is a no-op), and two sweeps into one folder
  cannot duplicate a job. The one exception is a later sweep that adds downstream tasks to a finished
  job: its record (a superset) is appended and wins. Failed records are kept as history; an "ok"
  record of the same job wins over them.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any

from harness.core.io import file_lock

RUNS_FILE = "runs.jsonl"
JOBS_DIR = "jobs"
PLAN_FILE = "plan.json"
OK, FAILED = "ok", "failed"


def one_line(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters: what a failed record stores."""
    lines = str(exc).strip().splitlines()
    first = lines[0].strip() if lines else ""
    message = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return message if len(message) <= limit else message[:limit - 3] + "..."


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: store them as null so every reader (not only Python's) can parse a line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        return _finite(value.item())
    return value


class ResultsStore:
    """Append-only, kill-safe, duplicate-free records of a sweep folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        self.path = self.root / RUNS_FILE
        self.skipped_lines = 0  # incomplete or corrupt lines seen by the last read
        self.skipped_at: list[int] = []  # their line numbers (1-based)

    # -- layout -----------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> pathlib.Path:
        return self.root / JOBS_DIR / job_id

    # -- reading ----------------------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, in file order; torn or corrupt lines are skipped (and counted)."""
        self.skipped_lines, self.skipped_at = 0, []
        if not self.path.exists():
            return []
        out: list[dict[str, Any]] = []
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    record = None  # a line cut by a kill (or damaged by hand)
                if isinstance(record, dict) and isinstance(record.get("job_id"), str):
                    out.append(record)
                else:
                    self.skipped_lines += 1
                    self.skipped_at.append(number)
        return out

    def skipped_note(self) -> str | None:
        """One line naming the lines the last read skipped, or None when it skipped none."""
        if not self.skipped_lines:
            return None
        shown = ", ".join(map(str, self.skipped_at[:10])) + (", ..." if len(self.skipped_at) > 10 else "")
        return (f"skipped {self.skipped_lines} torn or malformed line(s) of {self.path} (line {shown}): "
                "not complete JSON records with a job_id")

    def latest(self) -> dict[str, dict[str, Any]]:
        """job id -> its record: the last "ok" record if there is one (a later one only adds downstream
        scores), else the last failed one."""
        chosen: dict[str, dict[str, Any]] = {}
        for record in self.records():
            previous = chosen.get(record["job_id"])
            if previous is None or record.get("status") == OK or previous.get("status") != OK:
                chosen[record["job_id"]] = record
        return chosen

    def finished_ids(self) -> set[str]:
        return {job_id for job_id, r in self.latest().items() if r.get("status") == OK}

    # -- writing ----------------------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> bool:
        """Append ``record`` (needs ``job_id`` and ``status``); False if the job is already recorded ok."""
        if not isinstance(record.get("job_id"), str) or record.get("status") not in (OK, FAILED):
            raise ValueError("a results record needs a string 'job_id' and a 'status' of 'ok' or 'failed'")
        record = dict(record)
        record.setdefault("recorded_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        line = json.dumps(_finite(record), sort_keys=True, allow_nan=False).encode() + b"\n"
        with file_lock(self.root / (RUNS_FILE + ".lock")):
            if self._covered(record):
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if self._ends_torn(fd):
                    line = b"\n" + line  # close the torn line in the same write: it stays unparseable alone
                os.write(fd, line)  # one write of the whole line: O_APPEND keeps it contiguous
                os.fsync(fd)
            finally:
                os.close(fd)
        return True

    def _covered(self, record: dict[str, Any]) -> bool:
        """An ok record of this job is already stored with (at least) the same downstream tasks."""
        if record["status"] != OK:
            return False
        present = self.latest().get(record["job_id"])
        if present is None or present.get("status") != OK:
            return False
        return set(record.get("downstream") or {}) <= set(present.get("downstream") or {})

    def _ends_torn(self, fd: int) -> bool:
        size = os.fstat(fd).st_size
        if size == 0:
            return False
        with open(self.path, "rb") as handle:
            handle.seek(size - 1)
            return handle.read(1) != b"\n"


def ok_record(job: Any, result: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The record of a finished job: its result plus id, status, the resolved job and ``extra``."""
    return {**result, "job_id": job.job_id(), "status": OK, "job": job.to_dict(), **extra}


def failed_record(job: Any, error: str, **extra: Any) -> dict[str, Any]:
    """The record of a job that raised (after its retries): enough to list it in tables and rerun it."""
    return {"job_id": job.job_id(), "status": FAILED, "error": error, "method": job.method, "size": job.size,
            "seed": job.seed, "budget": job.budget, "tags": job.tags, "job": job.to_dict(), **extra}


__all__ = ["FAILED", "JOBS_DIR", "OK", "PLAN_FILE", "RUNS_FILE", "ResultsStore", "failed_record", "ok_record",
           "one_line"]
