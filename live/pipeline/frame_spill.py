"""A frame store for :class:`~stemlive.live.analysis.drift.TiltAccumulator` that spills to disk above a budget.

The accumulator keeps every frame of the open tilt for its final correction. Above ``budget_bytes`` the further
frames go to an anonymous temporary file written with plain ``os.pwrite`` (page cache, not the process' RSS, unlike
``mmap``) and are read back one at a time with ``os.pread``; the bytes are the float32 frames themselves, so the
result is bit-identical to the in-memory path. The file is unlinked when created (``tempfile.TemporaryFile``): it
leaves nothing behind even if the process is killed, and its space is freed by :meth:`SpillingFrameStore.close`
(called when the tilt is finished) or when the store is garbage-collected (a stage that failed).

If the spill file cannot be created or written (``spill_dir`` missing or not writable, disk full), the store
keeps its frames in memory instead (those already spilled are read back and the file is freed, which gives the
space back to a full disk) and keeps the error in :attr:`SpillingFrameStore.spill_error`: no frame is lost and
the results stay the same, but ``budget_bytes`` no longer bounds the memory; the stage reports it as a problem.
"""

from __future__ import annotations

import os
import tempfile
import weakref

import numpy as np


class SpillingFrameStore:
    """List-like store of equally shaped frames: the first ones in memory up to ``budget_bytes``, the rest on disk.

    Parameters
    ----------
    budget_bytes : int
        Bytes of frames held in memory; 0 spills every frame.
    spill_dir : str, optional
        Directory of the temporary file (default: the system's, ``TMPDIR``).

    Attributes
    ----------
    spill_error : OSError or None
        Why the spill file could not be created or written; from then on every frame is held in memory.
    """

    def __init__(self, budget_bytes: int, spill_dir: str | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.spill_dir = spill_dir
        self._memory: list[np.ndarray] = []
        self._held = 0
        self._n_spilled = 0
        self._fd: int | None = None
        self._shape: tuple[int, ...] | None = None
        self._dtype: np.dtype | None = None
        self._finalizer: weakref.finalize | None = None
        self.spill_error: OSError | None = None

    def __len__(self) -> int:
        return len(self._memory) + self._n_spilled

    @property
    def n_spilled(self) -> int:
        """Number of frames on disk."""
        return self._n_spilled

    def append(self, frame: np.ndarray) -> None:
        """Store ``frame`` (kept as is: the caller passes its own copy)."""
        frame = np.ascontiguousarray(frame)
        if self._shape is None:
            self._shape, self._dtype = frame.shape, frame.dtype
        elif frame.shape != self._shape or frame.dtype != self._dtype:
            raise ValueError(f"frame {frame.shape} {frame.dtype} differs from the first {self._shape} {self._dtype}")
        if self.spill_error is not None or (self._n_spilled == 0 and self._held + frame.nbytes <= self.budget_bytes):
            self._memory.append(frame)
            self._held += frame.nbytes
            return
        try:
            self._spill(frame)
        except OSError as e:  # keep the frames rather than lose the tilt: memory instead of the budget
            self._unspill()
            self.spill_error = e
            self._memory.append(frame)
            self._held += frame.nbytes

    def _spill(self, frame: np.ndarray) -> None:
        """Write ``frame`` after the spilled ones (counted only once it is written whole)."""
        if self._fd is None:
            f = tempfile.TemporaryFile(prefix="stemlive-tilt-", dir=self.spill_dir)
            self._fd = os.dup(f.fileno())  # keep only the descriptor; the file was unlinked on creation
            f.close()
            self._finalizer = weakref.finalize(self, os.close, self._fd)
        data = frame.data.cast("B")
        offset = self._n_spilled * frame.nbytes
        while len(data):  # pwrite may write less than asked
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written
        self._n_spilled += 1

    def _unspill(self) -> None:
        """Read the spilled frames back into memory and free the spill file (a read error propagates)."""
        back = [self[i] for i in range(len(self._memory), len(self))]
        self._memory += back
        self._held += sum(f.nbytes for f in back)
        self._n_spilled = 0
        self._free_file()

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"frame {i} of {n}")
        i %= n
        if i < len(self._memory):
            return self._memory[i]
        if self._fd is None or self._shape is None or self._dtype is None:
            raise RuntimeError("the spill file was closed")
        out = np.empty(self._shape, dtype=self._dtype)
        size = out.nbytes
        got = os.preadv(self._fd, [out.data.cast("B")], (i - len(self._memory)) * size)
        if got != size:
            raise OSError(f"short read of spilled frame {i}: {got} of {size} bytes")
        return out

    def close(self) -> None:
        """Drop the frames and free the spill file (idempotent)."""
        self._memory.clear()
        self._held = 0
        self._n_spilled = 0
        self._free_file()

    def _free_file(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # closes the descriptor once
            self._finalizer = None
        self._fd = None
