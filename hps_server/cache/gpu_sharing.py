"""One GPU cache's state shared by the processes of a worker group: CUDA IPC memory, through CuPy, and the
lock that orders the processes' operations on it.

The owner allocates the state in one cudaMalloc block and exports its IPC handle; every other process
opens that handle, so the rows live on the device once, whatever the number of processes. Queries hold
the lock shared and writes (replace, update, invalidate) exclusive, each until its GPU work is done: a
query never reads a set another process is rewriting. The lock is a `flock` on a file, which the kernel
releases when its holder dies; an exclusive holder writes its pid beside the cache's clock while it
holds it, so the next process to take the lock sees that one died part-way and empties the cache (its
sets may be half-written) before using it. Nothing here knows the cache's algorithm or kernels.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cupy as cp
import numpy as np

_ALIGN = 256
# Words of the state file: the cache's clock, and the pid of a process holding the lock exclusive.
_CLOCK, _WRITER = 0, 1


@dataclass(frozen=True)
class SharedStateSpec:
    """What another process needs to open a shared state (picklable: no CuPy objects)."""

    folder: str
    name: str
    handle: bytes
    size: int
    device: int


def _offsets(shapes: Sequence[tuple[tuple[int, ...], Any]]) -> tuple[list[int], int]:
    offsets, size = [], 0
    for shape, dtype in shapes:
        offsets.append(size)
        size += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
    return offsets, max(size, _ALIGN)


class SharedState:
    """A cache's device arrays in one IPC-shareable block, its clock, and its cross-process lock."""

    def __init__(self, folder: Path, name: str, spec: SharedStateSpec | None = None) -> None:
        """Creates a state under `folder` named `name` (spec None; arrays() allocates it), or opens the one
        `spec` describes."""
        self.folder, self.name = folder, name
        self._spec = spec
        self._memory: Any = None
        self._opened_ptr = 0
        lock_path, state_path = folder / f"{name}.lock", folder / f"{name}.state"
        if spec is None:
            state_path.write_bytes(bytes(16))
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fd = os.open(state_path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 16)
        finally:
            os.close(fd)
        self.words = np.ndarray(2, np.int64, buffer=self._map)

    @classmethod
    def open(cls, spec: SharedStateSpec) -> SharedState:
        return cls(Path(spec.folder), spec.name, spec)

    def arrays(self, shapes: Sequence[tuple[tuple[int, ...], Any]], device: int) -> list[cp.ndarray]:
        """The state arrays, of these shapes and dtypes, in one block: allocated zeroed by the owner, the
        owner's block in any other process (shapes must match the owner's)."""
        offsets, size = _offsets(shapes)
        if self._spec is None:
            self._memory = cp.cuda.Memory(size)
            cp.cuda.runtime.memset(self._memory.ptr, 0, size)
            self._spec = SharedStateSpec(
                str(self.folder), self.name, cp.cuda.runtime.ipcGetMemHandle(self._memory.ptr), size, device
            )
        else:
            if self._spec.size != size or self._spec.device != device:
                raise ValueError(f"shared L1 {self.name}: opened with another layout than its owner's")
            self._opened_ptr = cp.cuda.runtime.ipcOpenMemHandle(self._spec.handle)
            self._memory = cp.cuda.UnownedMemory(self._opened_ptr, size, self, device)
        return [
            cp.ndarray(shape, dtype, memptr=cp.cuda.MemoryPointer(self._memory, offset))
            for (shape, dtype), offset in zip(shapes, offsets, strict=True)
        ]

    @property
    def spec(self) -> SharedStateSpec:
        assert self._spec is not None, "arrays() allocates the state first"
        return self._spec

    @contextlib.contextmanager
    def hold(self, exclusive: bool, clear: Callable[[], None], finish: Callable[[], None]) -> Iterator[None]:
        """Holds the lock (shared or exclusive) around an operation; `finish` (waiting for its GPU work)
        runs before the lock is let go. If a process died holding it exclusive, `clear` empties the
        cache first, under the exclusive lock."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            if self.words[_WRITER]:
                if not exclusive:  # re-take it exclusive to clear; the check is repeated once it is held
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                if self.words[_WRITER]:
                    clear()
                    finish()
                    self.words[_WRITER] = 0
                if not exclusive:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
            if exclusive:
                self.words[_WRITER] = os.getpid()
            try:
                yield
            finally:
                finish()
                if exclusive:
                    self.words[_WRITER] = 0
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Lets go of the device memory (the owner's block is freed once no process has it open)."""
        if self._opened_ptr:
            cp.cuda.runtime.ipcCloseMemHandle(self._opened_ptr)
            self._opened_ptr = 0
        self._memory = None
        os.close(self._lock_fd)
