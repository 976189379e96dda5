"""Free-space accounting for the recording service: refuse or stop a session before the disk is full.

The service keeps ``reserve_bytes`` free on the disk of its session folder, so that a session file can always be
closed (status, message, counts) even when acquisition outruns the disk. ``statvfs`` is cheap (a few
microseconds) but not free, so :class:`DiskBudget` asks the file system again only when the bytes written since
the last look could have used up half of what was left above the reserve, or after ``recheck_s``.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

#: Default free space the service keeps on the session disk.
DEFAULT_RESERVE_BYTES = 256 * 2**20
#: Default size of the ballast file released when the disk fills up anyway.
DEFAULT_BALLAST_BYTES = 16 * 2**20
BALLAST_NAME = ".stemlive-ballast"


class DiskFull(OSError):
    """Free space fell below the reserve (or the disk reported ENOSPC)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (an OSError, possibly from HDF5 via h5py) means the disk is full or over quota."""
    if isinstance(error, DiskFull):
        return True
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left" in text or "errno = 28" in text or "Disk quota" in text


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class DiskBudget:
    """Bytes that may still be written into ``folder`` before its free space reaches ``reserve_bytes``.

    Parameters
    ----------
    folder : Path
        The session folder (its file system is measured).
    reserve_bytes : int
        Free space to keep.
    recheck_s : float
        Measure again at least this often while writing (other programs share the disk).
    """

    def __init__(
        self,
        folder: Path,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        recheck_s: float = 1.0,
        ballast_bytes: int = DEFAULT_BALLAST_BYTES,
    ) -> None:
        self.folder = Path(folder)
        self.reserve_bytes = int(reserve_bytes)
        self.recheck_s = recheck_s
        self.ballast_bytes = int(ballast_bytes)
        self.ballast = self.folder / BALLAST_NAME
        self._left = 0
        self._spent = 0
        self._checked = -1e9
        self.free = 0

    def arm(self) -> bool:
        """Hold ``ballast_bytes`` of the disk in a file of their own (if there is room), for :meth:`release`.

        Should the disk fill up despite the reserve (another program, a wrong reserve), releasing the ballast
        gives HDF5 the room to flush and close the session file cleanly: a half-flushed HDF5 file handle is what
        crashed the service before.
        """
        if self.ballast_bytes <= 0 or self.ballast.exists():
            return self.ballast.exists()
        try:
            with open(self.ballast, "wb") as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, self.ballast_bytes)
                except (AttributeError, OSError):
                    f.truncate(self.ballast_bytes)
                    f.write(b"\0" * min(self.ballast_bytes, 1 << 20))
            return True
        except OSError:
            self.ballast.unlink(missing_ok=True)
            return False

    def release(self) -> None:
        """Free the ballast (the disk is full): the open file can then be closed."""
        self.ballast.unlink(missing_ok=True)

    def measure(self) -> int:
        """Ask the file system; returns the bytes left above the reserve (negative when below it)."""
        self.free = shutil.disk_usage(self.folder).free
        self._left = self.free - self.reserve_bytes + (self.ballast_bytes if self.ballast.exists() else 0)
        self._spent = 0
        self._checked = time.monotonic()
        return self._left

    def check_start(self, expected_bytes: int = 0) -> None:
        """Before a session starts: raise :class:`DiskFull` if the reserve (plus ``expected_bytes``) is not free."""
        if self.measure() < expected_bytes:
            raise DiskFull(f"disk full: {_mib(self.free)} free in {self.folder}, the service keeps "
                           f"{_mib(self.reserve_bytes)} in reserve")

    def spend(self, nbytes: int) -> None:
        """Account for ``nbytes`` about to be written; raise :class:`DiskFull` if they would cut into the reserve."""
        self._spent += nbytes
        if self._spent * 2 >= self._left or time.monotonic() - self._checked > self.recheck_s:
            self.measure()
            self._spent = nbytes
            if self._left < nbytes:
                raise DiskFull(f"disk full: {_mib(self.free)} free in {self.folder} while recording, the service "
                               f"keeps {_mib(self.reserve_bytes)} in reserve")
