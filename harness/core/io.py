"""File helpers shared by every layer: one atomic write, one JSON reader, one inter-process lock.

Atomic writes go to a temporary file in the same folder and replace the target in one rename, so a
process killed mid-write leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

from harness.core.errors import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no fcntl; locking is then a no-op
    fcntl = None  # type: ignore[assignment]


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file the harness wrote; CheckpointError naming ``what`` if missing or corrupt."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is corrupt ({exc.__class__.__name__}: {exc}); "
                              "delete it to start that job again") from None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive inter-process lock on ``path`` (created if missing).

    The kernel releases it when the holder dies, so a killed process never leaves a stale lock.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a previous holder to finish or die
        yield
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


__all__ = ["file_lock", "read_json", "write_bytes_atomic", "write_json_atomic"]
