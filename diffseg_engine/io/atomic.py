"""Atomic file writes: a temporary file in the destination folder, fsync, rename — never a half-written file.

Owns: `AtomicFiles` (several files that appear together: each is written to a temporary file beside its
destination and fsynced; only when all are complete are they renamed into place, then the folders are
fsynced), `atomic_write` (the one-file case) and `write_error`, which turns a failed write into a one-line
`OutputError` — or `ResourceError` when the disk or the quota is full. Bytes reach the disk through
`os.write` only, so a test can simulate a full disk by patching it.
Imports: `core.errors`. Never torch.
"""
from __future__ import annotations

import errno
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from ..core.errors import DiffsegError, OutputError, ResourceError

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def write_error(exc: OSError, path: object) -> DiffsegError:
    """The user-facing error for an OSError raised while writing `path`."""
    if exc.errno in _FULL:
        return ResourceError(f"cannot be written: {exc.strerror or 'no space left on device'}", path=path,
                             fix="free disk space (or quota) there, or choose another --out; nothing "
                                 "half-written was left behind")
    return OutputError(f"cannot be written ({exc.strerror or exc})", path=path,
                       fix="check that the folder exists and is writable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames in `folder` durable (best effort: some file systems cannot fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _FdWriter(io.RawIOBase):
    """A write-only binary file over a descriptor; every write goes through `os.write`, in full."""

    def __init__(self, fd: int):
        super().__init__()
        self._fd, self._pos = fd, 0

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self._pos

    def write(self, b) -> int:  # type: ignore[override]
        view = memoryview(b).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self._pos += done
        return done


class AtomicFiles:
    """`with AtomicFiles() as files: files.write_bytes(a, ...); with files.open(b) as f: ...; files.commit()`.

    Until `commit`, only hidden temporary files (``.<name>.*.tmp`` beside each destination) exist; leaving
    the block without `commit` (an exception, a full disk, Ctrl-C) removes them and touches nothing else.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[str, Path]] = []

    def __enter__(self) -> "AtomicFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    @contextmanager
    def open(self, path: str | os.PathLike) -> Iterator[BinaryIO]:
        """A binary file whose content becomes `path` at `commit`."""
        path = Path(path)
        folder = path.parent if str(path.parent) else Path(".")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise write_error(exc, path) from None
        self._staged.append((tmp, path))
        writer = _FdWriter(fd)
        try:
            yield writer  # type: ignore[misc]
            os.fsync(fd)
        except OSError as exc:
            raise write_error(exc, path) from None
        finally:
            writer.close()
            os.close(fd)

    def write_bytes(self, path: str | os.PathLike, data: bytes) -> None:
        with self.open(path) as f:
            f.write(data)

    def commit(self) -> None:
        """Rename every staged file into place (normal permissions), then fsync the folders."""
        mode = 0o666 & ~_umask()
        folders = []
        while self._staged:
            tmp, path = self._staged[0]
            try:
                os.chmod(tmp, mode)
                os.replace(tmp, path)
            except OSError as exc:
                raise write_error(exc, path) from None
            self._staged.pop(0)
            if path.parent not in folders:
                folders.append(path.parent)
        for folder in folders:
            fsync_dir(folder if str(folder) else ".")

    def discard(self) -> None:
        """Remove the temporary files of everything not committed."""
        for tmp, _ in self._staged:
            Path(tmp).unlink(missing_ok=True)
        self._staged.clear()


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """`with atomic_write(p) as f: f.write(...)` — `p` appears only complete, with normal permissions.

    A failed write raises `OutputError` (or `ResourceError` when the disk is full) and leaves no temporary
    file; an existing `p` is then untouched.
    """
    with AtomicFiles() as files:
        with files.open(path) as f:
            yield f
        files.commit()
