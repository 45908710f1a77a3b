"""Atomic file writes: the one helper behind every file czsl-bench writes.

Records, tables, plots, cache entries, checkpoints, the tiny-CLIP checkpoint and dataset files
all go through here, so readers see the old file or the complete new one, never half of it: the
bytes go to a temporary file in the target folder (``os.replace`` is atomic only within one
filesystem), are flushed and fsynced, and the temporary file is renamed over the target.

Two things every writer needs and each copy used to get wrong:

* **permissions**: the temporary file is created with mode 0o666 and the process umask applies,
  as for any file ``open()`` creates. ``tempfile.mkstemp`` creates it 0o600, and the rename
  carried that onto every record, table and cache entry, unreadable to the rest of a group.
* **a full disk**: ``ENOSPC`` / ``EDQUOT`` becomes one :class:`DiskFullError` line naming the
  folder, and the temporary file is removed. Libraries hide the errno (torch's zip writer says
  ``enforce fail ... unexpected pos``), so the file object handed to them records the error its
  ``write`` raised before the library turned it into something else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["DiskFullError", "atomic_file", "atomic_path", "atomic_write_bytes", "atomic_write_text", "exclusive_lock"]

_DISK_FULL = tuple(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)

# The file object behind a temp file; tests replace it to simulate a full disk.
_fdopen = os.fdopen


class DiskFullError(OSError):
    """A write failed because the filesystem is full (or over quota); nothing partial is left."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns the path."""
    with atomic_file(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring); returns the path."""
    with atomic_file(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """A file object whose contents replace ``path`` when the block ends without an error.

    For libraries that write to file objects (``torch.save``, ``np.savez``, ``savefig``).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files; mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    fd, tmp = _create_temp(target)
    try:
        handle = _fdopen(fd, mode, encoding=encoding)
    except BaseException:
        os.close(fd)
        _remove(tmp)
        raise
    guarded = _RecordingFile(handle)
    try:
        yield guarded
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            handle.close()  # flushes what is buffered; on a full disk that fails again
        _remove(tmp)
        _raise_if_disk_full(guarded.error or exc, target)
        raise
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path whose file replaces ``path`` when the block ends without an error.

    For libraries that only write to a file name (``safetensors.torch.save_file``). Some of them
    replace the file with their own 0o600 temp file, so it gets back the mode the umask gave it.
    """
    target = Path(path)
    fd, tmp = _create_temp(target)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        _remove(tmp)
        _raise_if_disk_full(exc, target)
        raise
    _fsync_dir(target.parent)


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) while the block runs, so
    that processes sharing a cache build an entry once. Without POSIX locks it only yields: the
    atomic writes above still keep every entry whole, at the price of building it twice."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class _RecordingFile:
    """Passes everything to the real file object and remembers the first ``OSError`` of a write."""

    def __init__(self, handle: IO[Any]):
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _create_temp(target: Path) -> tuple[int, Path]:
    # O_EXCL with a random name is what mkstemp does, but with mode 0o666 so the umask decides.
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        # hidden and *.tmp: record loaders and cache listings skip it, cache cleaning removes it
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            _raise_if_disk_full(exc, target)
            raise
    raise FileExistsError(f"could not create a temporary file beside {target}; remove the .*.tmp files there")


def _remove(tmp: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def _raise_if_disk_full(exc: BaseException, target: Path) -> None:
    code = _disk_full_code(exc)
    if code is None:
        return
    error = DiskFullError(
        f"disk full: could not write {target.name} in {target.parent} ({os.strerror(code)}); "
        "nothing was left behind; free space there (or write somewhere else) and run again")
    error.errno = code
    raise error from None


def _disk_full_code(exc: BaseException | None) -> int | None:
    """ENOSPC/EDQUOT if ``exc`` (or what caused it) is a full disk; message text as a last resort,
    since some libraries (safetensors) keep only the OS's words."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc.errno
        text = str(exc)
        for code in _DISK_FULL:
            if os.strerror(code) in text:
                return code
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every OS/filesystem (e.g. Windows), so best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
