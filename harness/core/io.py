"""File helpers shared by every layer: one atomic write, one JSON reader, one inter-process lock.

Atomic writes go to a temporary file in the same folder and replace the target in one rename, so a
process killed mid-write leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any

from harness.core.errors import CheckpointError, ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no fcntl; locking is then a no-op
    fcntl = None  # type: ignore[assignment]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: setting it to read it is not thread-safe


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a plain open() would honour the umask
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


def make_folder(path: str | os.PathLike, what: str = "folder") -> pathlib.Path | None:
    """Create folder ``path`` (and its parents); the top-most folder created (None if it existed).

    Raises :class:`~harness.core.errors.ConfigError` with one line that says why it cannot be created
    (a file in the way, no permission, a read-only or virtual file system) instead of an OSError.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        return None
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    top = path if ancestor == path else next(p for p in [path, *path.parents] if p.parent == ancestor)
    if ancestor == path or not ancestor.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {ancestor} is a file, not a folder; "
                          "choose another path or move the file away")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            why = f"no permission to write in {ancestor}"
        elif exc.errno == errno.EROFS:
            why = f"{ancestor} is on a read-only file system"
        elif exc.errno in (errno.ENOENT, errno.ENOTDIR) and ancestor.exists():
            why = f"{ancestor} does not accept new folders (a virtual or special file system)"
        else:
            why = f"{ancestor} refused it"
        raise ConfigError(f"{what} {path} cannot be created: {why} ({exc.strerror}); choose another path") from None
    return top


def check_writable(folder: str | os.PathLike, what: str, fix: str = "choose another folder") -> None:
    """A ConfigError naming ``folder`` unless a file can be created in it (read-only, no permission, disk
    full): a command that writes several files checks first, so it fails before its first write, not halfway."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".harness-probe.", dir=folder)
    except OSError as exc:
        raise write_error(exc, what, fix) from None
    os.close(fd)
    os.unlink(probe)


def write_error(exc: OSError, what: str, fix: str = "choose another folder") -> ConfigError:
    """One line for an OSError met while writing ``what``: the path, the system's reason and ``fix``."""
    where = f" {exc.filename}" if exc.filename else ""
    return ConfigError(f"cannot write {what}{where}: {exc.strerror or exc}; {fix}")


def remove_if_empty(top: pathlib.Path | None, path: str | os.PathLike) -> None:
    """Undo :func:`make_folder`: remove ``path`` and its parents up to ``top`` while they are empty."""
    if top is None:
        return
    current = pathlib.Path(path)
    while True:
        try:
            current.rmdir()
        except OSError:
            return
        if current == top:
            return
        current = current.parent


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


__all__ = ["check_writable", "file_lock", "make_folder", "read_json", "remove_if_empty", "write_bytes_atomic",
           "write_error", "write_json_atomic"]
