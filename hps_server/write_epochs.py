"""Write epochs: one counter per served table that every upsert and delete bumps, read by write-backs.

A copy of rows read before a write began must not land in a level above after it: a write-back compares
the table's epoch read before its rows with the epoch at insert time, and drops the rows when it moved
or is odd (a write is under way: it bumps once when it starts and once when every copy has been
refreshed). The counters live in this process, or in a shared-memory file that every worker of one
supervisor maps, written by the group's one writer alone; a word counts committed writes, so a worker
knows when its read-only view of the persistent level must catch up, and a last one says whether the
volatile level holds rows a failed write of the writer may have left stale (workers read below until the
writer has dropped them). It holds no rows.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")


class WriteEpochs:
    """`size` table epochs and a count of committed writes, in private or shared memory."""

    def __init__(self, size: int, shared_name: str = "", create: bool = False) -> None:
        """shared_name: the shared-memory file (under /dev/shm) holding them, created when `create`; empty
        keeps them in this process."""
        self.shared_name = shared_name
        words = size + 2
        self._owner = create
        if not shared_name:
            self._values = np.zeros(words, np.int64)
            return
        path = SHM_DIR / shared_name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, 8 * words)
            elif os.fstat(fd).st_size != 8 * words:
                raise ValueError(f"write epochs {shared_name!r}: sized for another set of tables")
            self._map = mmap.mmap(fd, 8 * words)
        finally:
            os.close(fd)
        self._values = np.ndarray(words, np.int64, buffer=self._map)

    def of(self, slot: int) -> int:
        return int(self._values[slot])

    def begin(self, slot: int) -> None:
        """A write of the table starts: its epoch turns odd until end()."""
        self._values[slot] += 1

    def end(self, slot: int) -> None:
        self._values[slot] += 1

    @property
    def commits(self) -> int:
        """Writes committed to the authoritative level so far."""
        return int(self._values[-2])

    def committed(self) -> None:
        self._values[-2] += 1

    def volatile_stale(self) -> bool:
        """Whether the writer's volatile level may hold stale rows it has not dropped yet."""
        return bool(self._values[-1])

    def mark_volatile_stale(self, stale: bool) -> None:
        self._values[-1] = int(stale)

    def close(self) -> None:
        """Unmaps them; the creator also removes the shared file (workers keep their mappings)."""
        if not self.shared_name:
            return
        del self._values
        self._map.close()
        if self._owner:
            (SHM_DIR / self.shared_name).unlink(missing_ok=True)
