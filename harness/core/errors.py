"""Every error a user can fix, under one base class (docs/design.md, "Errors").

A :class:`HarnessError`'s message is one line that names the problem and the fix. The CLI catches
this base class once and prints the message without a traceback (``HARNESS_DEBUG=1`` shows it); a
sweep records such a job as failed at once, because retrying cannot fix bad input. Anything else is a
bug or an infrastructure fault and keeps its traceback.

The subclasses only say where the problem lies, so a caller can catch one kind; none adds behaviour.
"""

from __future__ import annotations


class HarnessError(Exception):
    """Input the user can fix; ``str(error)`` is one line naming the problem and the fix."""

    def __init__(self, message: str = "") -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever the raiser wrapped


class ConfigError(HarnessError, ValueError):
    """A bad configuration value; the message names the field and what would be valid."""


class UnknownMethodError(ConfigError):
    """A method name that no registered plugin has."""


class PlanError(ConfigError):
    """A sweep or plan that cannot run as asked (no rung fits, budget too small, ...)."""


class SweepError(PlanError):
    """A sweep that cannot start as asked (budget beyond the hardware without --yes, no Ray cluster)."""


class StudyError(ConfigError):
    """A study file that cannot be used; the message names the file and the field."""


class DataError(HarnessError):
    """Missing, empty or unreadable training data, or a bad data setting."""


class CheckpointError(HarnessError):
    """A missing, corrupt or mismatched checkpoint or job file; the message names the file and the fix."""


class TrainingError(HarnessError):
    """Training cannot go on (NaN loss, budget too small); the message says what to change."""


class DownstreamError(HarnessError):
    """A downstream task that cannot run (unknown name, data not installed)."""


class ReportError(HarnessError):
    """A results folder that cannot be reported on (no runs, unreadable records)."""


class AnalysisError(HarnessError):
    """A job folder that cannot be analysed (no per-token records)."""


__all__ = ["AnalysisError", "CheckpointError", "ConfigError", "DataError", "DownstreamError", "HarnessError",
           "PlanError", "ReportError", "StudyError", "SweepError", "TrainingError", "UnknownMethodError"]
