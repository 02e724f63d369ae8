"""A sharded L1 query gathered by the GPUs: each shard's device writes its rows and hit flags straight into the
one pinned host reply (under unified addressing pinned host memory is addressable by every device's kernels),
so no host pass copies rows. Import only where CuPy is installed; it routes nothing (sharded.py does).
"""

from __future__ import annotations

from typing import Any

import cupy as cp
import numpy as np

from hps_server.cache.gpu import pinned


class MappedReply:
    """A query's reply in one pinned host buffer: vectors [rows, dim] of `dtype`, then the hit flags."""

    def __init__(self, rows: int, dim: int, dtype: np.dtype) -> None:
        self.rows, self.dim, self.dtype = rows, dim, dtype
        self.vector_bytes = rows * dim * dtype.itemsize
        self.buffer = pinned(self.vector_bytes + rows)
        self.vectors = self.buffer[: self.vector_bytes].view(dtype).reshape(rows, dim)
        self.hit = self.buffer[self.vector_bytes :].view(np.bool_)

    def on_device(self, device: int) -> tuple[cp.ndarray, cp.ndarray]:
        """The same host memory as CuPy arrays (vectors, hit) for kernels on `device`."""
        memory = cp.cuda.UnownedMemory(self.buffer.ctypes.data, self.buffer.nbytes, self.buffer, device)
        start = cp.cuda.MemoryPointer(memory, 0)
        vectors = cp.ndarray((self.rows, self.dim), self.dtype, start)
        hit = cp.ndarray((self.rows,), cp.bool_, start + self.vector_bytes)
        return vectors, hit


def query_into(shard: Any, reply: MappedReply, keys: np.ndarray, tables: np.ndarray, positions: np.ndarray) -> None:
    """Queries a GPU shard (gpu.py) for keys[positions] on its device, whose kernels then write the rows and hit
    flags into `reply` at `positions`; returns once they are there."""
    with cp.cuda.Device(shard.device), shard.stream:
        keys_d = cp.asarray(keys[positions])
        tables_d = cp.asarray(tables[positions])
        positions_d = cp.asarray(positions)
        rows, hit = shard.query_device(keys_d, tables_d, dtype=reply.dtype)
        vectors_out, hit_out = reply.on_device(shard.device)
        vectors_out[positions_d] = rows
        hit_out[positions_d] = hit
        shard.stream.synchronize()
