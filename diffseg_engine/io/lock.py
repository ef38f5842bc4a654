"""An exclusive lock on one case's outputs, so that two runs into the same `--out` never interleave.

Owns: `OutputLock`: the file ``<out>/.<case>.lock`` held with `fcntl.flock` (the kernel drops the lock when
its process dies, even by SIGKILL, so a stale file never blocks a later run) and holding the owner's pid for
the message. A second run fails at once with `OutputBusyError`. The file is removed on release; the inode
check after locking makes that safe against a run that opened the old file just before.
Imports: `core.errors`. Never torch.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import OutputBusyError, OutputError


class OutputLock:
    """`with OutputLock(out_dir, case_id): ...` — raises `OutputBusyError` if another run holds it."""

    def __init__(self, folder: str | os.PathLike, case_id: str):
        self.path = Path(folder) / f".{case_id}.lock"
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot create the lock file ({exc.strerror or exc})", path=self.path,
                                  fix="choose a writable --out folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = _read_pid(fd)
                os.close(fd)
                who = f"process {owner}" if owner else "another process"
                raise OutputBusyError(f"another diffseg-engine run ({who}) is writing these results now",
                                      path=self.path.parent / self.path.name[1:-len(".lock")],
                                      fix="wait for it to finish, or choose another --out") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its previous owner removed between our open and our flock
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return self
            os.close(fd)
        raise OutputBusyError("the lock file keeps changing under this run", path=self.path,
                              fix="make sure no other program removes files in --out")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: see the inode check in acquire
        except OSError:
            pass
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
