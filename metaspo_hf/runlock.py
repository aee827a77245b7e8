"""One process per run folder: an exclusive OS file lock on ``<run folder>/run.lock``.

The file holds the holder's PID, so that a refused process can name it. The operating system drops
the lock when its holder exits, however it exits (``kill -9`` included), so a lock left by a killed
process is simply free: the next process takes it over. The file itself stays (removing it would let
two processes lock two different files); a clean release empties it, so a PID found in a free lock
file is the mark of a holder that died while working.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MetaspoError

LOCK_NAME = "run.lock"

if os.name == "posix":
    import fcntl

    def _try_lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

else:
    import msvcrt

    # Windows locks are mandatory: lock a byte past the PID text, so that a refused process can read it.
    _LOCKED_BYTE = 1 << 20

    def _try_lock(fd: int) -> None:
        os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def _unlock(fd: int) -> None:
        os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class RunLock:
    """The lock of one run folder; ``acquire`` it before writing there, ``release`` it when done."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> int | None:
        """Take the lock, or raise MetaspoError naming the process that holds it.

        Returns the PID of an earlier holder that died without releasing it (a stale lock, now taken
        over), else None.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _try_lock(fd)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            raise MetaspoError(
                f"run folder {self.path.parent} is in use by "
                + (f"process {holder}" if holder else "another process") + f" (lock file {self.path})",
                hint="one process works in a run folder at a time: wait for that one to end, or stop it "
                     "and resume; --output-dir elsewhere starts a separate run",
            ) from None
        previous = _read_pid(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return previous

    def release(self) -> None:
        """Empty the lock file (a clean end) and unlock it; does nothing when not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            _unlock(fd)
        finally:
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 32).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
