"""L1 on an NVIDIA GPU: the set-associative LRU cache and the static table as CuPy RawKernels (kernels/cache.cu).

Same algorithm and results as reference.py. Every operation on one cache runs on that cache's own
stream in the order callers took its lock, so results are those of some serial order. Import only
where CuPy is installed; nothing here knows of storage levels or the session.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import cupy as cp
import cupyx
import numpy as np

from hps_server.cache import CacheStats
from hps_server.cache.layout import (
    MAX_WAYS,
    Geometry,
    check_dim,
    check_dtype,
    last_occurrences,
)
from hps_server.storage.base import as_keys, as_vectors

_SOURCE = Path(__file__).with_name("kernels") / "cache.cu"
_THREADS = 256
_HIT_COUNTERS = 64  # HIT_COUNTERS in cache.cu


def available(device: int = 0) -> bool:
    """Whether `device` is a CUDA device this process can use."""
    try:
        return 0 <= device < cp.cuda.runtime.getDeviceCount()
    except cp.cuda.runtime.CUDARuntimeError:
        return False


@functools.cache
def _module(device: int) -> cp.RawModule:
    """The kernels, compiled once per process and device (CuPy also caches the binary on disk)."""
    with cp.cuda.Device(device):
        module = cp.RawModule(code=_SOURCE.read_text(), options=("--std=c++17",))
        module.compile()
        return module


def _kernel(device: int, name: str) -> Any:
    return _module(device).get_function(name)


def _grid_per_group(n: int) -> tuple[int]:
    """Blocks for kernels where a warp serves 32 keys."""
    return ((n + _THREADS - 1) // _THREADS,)


def _aligned(array: cp.ndarray, dtype: Any) -> cp.ndarray:
    """C-contiguous, of `dtype`, 16-byte aligned (the row copies use 16-byte loads)."""
    array = cp.ascontiguousarray(array, dtype=dtype)
    return array if array.data.ptr % 16 == 0 else array.copy()


def _to_pinned(array: np.ndarray) -> np.ndarray:
    pinned = cupyx.empty_pinned(array.shape, array.dtype)
    pinned[...] = array
    return pinned


class _OnDevice:
    """What both GPU structures share: the device, one stream, one lock, and host<->device staging."""

    dim: int

    def __init__(self, device: int) -> None:
        if not available(device):
            raise ValueError(f"device: CUDA device {device} is not available")
        self.device = device
        self._device = cp.cuda.Device(device)
        with self._device:
            self._stream = cp.cuda.Stream(non_blocking=True)
            self._hit_count = cp.zeros(_HIT_COUNTERS, cp.uint64)
        self._lock = threading.Lock()
        self._queried = 0

    @property
    def stream(self) -> cp.cuda.Stream:
        """The stream every operation of this structure runs on; work issued on it needs no extra ordering."""
        return self._stream

    def _enter(self, caller: cp.cuda.Stream) -> None:
        """Our stream waits for the caller's work on the arrays it hands us."""
        if caller.ptr != self._stream.ptr:
            self._stream.wait_event(caller.record())

    def _leave(self, caller: cp.cuda.Stream) -> None:
        """The caller's stream waits for our results."""
        if caller.ptr != self._stream.ptr:
            caller.wait_event(self._stream.record())

    def _stats(self, rows: cp.ndarray, capacity: int) -> CacheStats:
        with self._device, self._lock, self._stream:
            hits = int(self._hit_count.get(stream=self._stream).sum())
            held = int(rows.get(stream=self._stream))
            queried = self._queried
        return CacheStats(hits=hits, misses=queried - hits, rows=held, capacity=capacity)

    def _host_query(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = as_keys(keys)
        n = keys.size
        if not n:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, bool), np.zeros(0, np.int64)
        staged = _to_pinned(keys)
        vectors = cupyx.empty_pinned((n, self.dim), np.float32)
        hit = cupyx.empty_pinned(n, np.bool_)
        with self._device, self._lock, self._stream:
            keys_d = cp.empty(n, cp.int64)
            keys_d.set(staged, stream=self._stream)
            vectors_d = cp.empty((n, self.dim), cp.float32)
            hit_d = cp.empty(n, cp.bool_)
            self._query(keys_d, vectors_d, hit_d)
            vectors_d.get(stream=self._stream, out=vectors, blocking=False)
            hit_d.get(stream=self._stream, out=hit, blocking=False)
            done = self._stream.record()
        done.synchronize()
        return vectors, hit, np.flatnonzero(~hit)

    def _host_write(self, keys: np.ndarray, vectors: np.ndarray, op: str) -> None:
        keys = as_keys(keys)
        vectors = as_vectors(vectors, keys.size, self.dim)
        if not keys.size:
            return
        staged_keys, staged_vectors = _to_pinned(keys), _to_pinned(vectors)
        with self._device, self._lock, self._stream:
            keys_d = cp.empty(keys.size, cp.int64)
            vectors_d = cp.empty(vectors.shape, cp.float32)
            keys_d.set(staged_keys, stream=self._stream)
            vectors_d.set(staged_vectors, stream=self._stream)
            getattr(self, op)(keys_d, vectors_d)
            done = self._stream.record()
        done.synchronize()

    def _host_invalidate(self, keys: np.ndarray) -> None:
        keys = as_keys(keys)
        if not keys.size:
            return
        staged = _to_pinned(keys)
        with self._device, self._lock, self._stream:
            keys_d = cp.empty(keys.size, cp.int64)
            keys_d.set(staged, stream=self._stream)
            self._invalidate(keys_d)
            done = self._stream.record()
        done.synchronize()

    def _device_call(self, op: str, *arrays: cp.ndarray) -> Any:
        caller = cp.cuda.get_current_stream()
        with self._device, self._lock, self._stream:
            self._enter(caller)
            result = getattr(self, op)(*arrays)
            self._leave(caller)
        return result

    def _device_keys(self, keys: cp.ndarray) -> cp.ndarray:
        if keys.ndim != 1 or keys.dtype.kind not in "iu":
            raise ValueError(f"keys: must be a 1-D integer array, got shape {keys.shape} dtype {keys.dtype}")
        return _aligned(keys, cp.int64)

    def _device_vectors(self, vectors: cp.ndarray, rows: int) -> cp.ndarray:
        if vectors.shape != (rows, self.dim):
            raise ValueError(
                f"vectors: must have shape ({rows}, {self.dim}) to match keys and dim, got {vectors.shape}"
            )
        return _aligned(vectors, cp.float32)

    def _dedupe(self, keys: cp.ndarray) -> tuple[cp.ndarray, cp.ndarray]:
        """(last, pos): key i is its key's last occurrence in the batch where last[pos[i]] == i."""
        n = keys.size
        size = 1 << max(1, (2 * n - 1).bit_length())
        claim = cp.full(size, -1, cp.int32)
        last = cp.full(size, -1, cp.int32)
        pos = cp.empty(n, cp.int32)
        _kernel(self.device, "dedupe")(
            ((n + _THREADS - 1) // _THREADS,), (_THREADS,), (keys, np.int64(n), claim, last, pos, np.uint32(size - 1))
        )
        return last, pos

    # Subclasses implement these on device arrays, inside the lock, on self._stream.
    def _query(self, keys: cp.ndarray, vectors: cp.ndarray, hit: cp.ndarray) -> None:
        raise NotImplementedError

    def _invalidate(self, keys: cp.ndarray) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ the public surface

    def query(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors float32[n, dim], zero rows for misses, hit bool[n]), in pinned host memory."""
        vectors, hit, _ = self._host_query(keys)
        return vectors, hit

    def query_misses(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """query() plus the indices of the misses (int64, ascending)."""
        return self._host_query(keys)

    def replace(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self._host_write(keys, vectors, "_replace")

    def update(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self._host_write(keys, vectors, "_update")

    def invalidate(self, keys: np.ndarray) -> None:
        self._host_invalidate(keys)

    def query_device(self, keys: cp.ndarray) -> tuple[cp.ndarray, cp.ndarray]:
        """query() on device arrays: (vectors float32[n, dim], hit bool[n]), ordered after the caller's stream."""
        keys = self._device_keys(keys)
        # Allocated on the caller's stream, so the pool recycles them in the caller's order.
        vectors = cp.empty((keys.size, self.dim), cp.float32)
        hit = cp.empty(keys.size, cp.bool_)
        if keys.size:
            self._device_call("_query", keys, vectors, hit)
        return vectors, hit

    def replace_device(self, keys: cp.ndarray, vectors: cp.ndarray) -> None:
        keys = self._device_keys(keys)
        if keys.size:
            self._device_call("_replace", keys, self._device_vectors(vectors, keys.size))

    def update_device(self, keys: cp.ndarray, vectors: cp.ndarray) -> None:
        keys = self._device_keys(keys)
        if keys.size:
            self._device_call("_update", keys, self._device_vectors(vectors, keys.size))

    def invalidate_device(self, keys: cp.ndarray) -> None:
        keys = self._device_keys(keys)
        if keys.size:
            self._device_call("_invalidate", keys)


class GpuEmbeddingCache(_OnDevice):
    """A bounded LRU cache of one table's rows on one GPU (see reference.py for the algorithm)."""

    def __init__(
        self, capacity: int, dim: int, *, ways: int = MAX_WAYS, dtype: str = "float32", device: int = 0
    ) -> None:
        super().__init__(device)
        self.geometry = Geometry.for_capacity(capacity, ways)
        self.dim = check_dim(dim)
        self.dtype = check_dtype(dtype)
        self.capacity = self.geometry.capacity
        self.clock = 0
        self._suffix = "f32" if self.dtype == np.float32 else "f16"
        with self._device, self._stream:
            self._fps = cp.zeros(self.capacity, cp.uint16)
            self._slots = cp.zeros((self.capacity, 2), cp.int64)  # (key, stamp) per slot, as Slot in cache.cu
            self._rows = cp.zeros((self.capacity, self.dim), self.dtype)
        self._stream.synchronize()
        _module(device)

    @property
    def _shape_args(self) -> tuple[np.uint32, np.int32, np.int32]:
        return np.uint32(self.geometry.num_sets), np.int32(self.geometry.ways), np.int32(self.dim)

    def _query(self, keys: cp.ndarray, vectors: cp.ndarray, hit: cp.ndarray) -> None:
        n = keys.size
        self.clock += 1
        self._queried += n
        _kernel(self.device, f"query_{self._suffix}")(
            _grid_per_group(n),
            (_THREADS,),
            (keys, np.int64(n), self._fps, self._slots, self._rows, *self._shape_args,
             np.int64(self.clock), vectors, hit, self._hit_count),
        )  # fmt: skip

    def _write_present(self, keys: cp.ndarray, vectors: cp.ndarray, clock: int) -> cp.ndarray:
        """Pass 1 of replace and update; returns each key's set where it is to be inserted, else NO_SET."""
        n = keys.size
        last, pos = self._dedupe(keys)
        absent = cp.empty(n, cp.uint32)
        _kernel(self.device, f"write_present_{self._suffix}")(
            _grid_per_group(n),
            (_THREADS,),
            (keys, vectors, np.int64(n), last, pos, self._fps, self._slots, self._rows,
             *self._shape_args, np.int64(clock), absent),
        )  # fmt: skip
        return absent

    def _replace(self, keys: cp.ndarray, vectors: cp.ndarray) -> None:
        touched, inserted = self.clock + 1, self.clock + 2
        self.clock += 2
        absent = self._write_present(keys, vectors, touched)
        order = cp.argsort(absent)  # a set's keys to insert become one run, for one warp
        _kernel(self.device, f"insert_absent_{self._suffix}")(
            _grid_per_group(keys.size),
            (_THREADS,),
            (keys, vectors, np.int64(keys.size), absent[order], order, self._fps, self._slots, self._rows,
             np.int32(self.geometry.ways), np.int32(self.dim), np.int64(touched), np.int64(inserted)),
        )  # fmt: skip

    def _update(self, keys: cp.ndarray, vectors: cp.ndarray) -> None:
        self._write_present(keys, vectors, 0)

    def _invalidate(self, keys: cp.ndarray) -> None:
        num_sets, ways, _ = self._shape_args
        _kernel(self.device, "invalidate")(
            _grid_per_group(keys.size),
            (_THREADS,),
            (keys, np.int64(keys.size), self._fps, self._slots, num_sets, ways),
        )

    def dump(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys ascending, vectors float32, stamps) of every row held, as reference.py's dump()."""
        with self._device, self._lock, self._stream:
            held = cp.flatnonzero(self._fps)
            keys = self._slots[held, 0]
            order = cp.argsort(keys)
            held = held[order]
            result = (keys[order].get(), self._rows[held].astype(cp.float32).get(), self._slots[held, 1].get())
        return result

    def stats(self) -> CacheStats:
        with self._device, self._stream:
            rows = cp.count_nonzero(self._fps)
        return self._stats(rows, self.capacity)


class GpuStaticTable(_OnDevice):
    """A fixed key set held whole on one GPU (use_static_table); same behaviour as ReferenceStaticTable."""

    def __init__(self, keys: np.ndarray, vectors: np.ndarray, *, dtype: str = "float32", device: int = 0) -> None:
        super().__init__(device)
        keys = as_keys(keys)
        array = np.asarray(vectors)
        if array.ndim != 2 or array.shape[1] < 1:
            raise ValueError(f"vectors: must be a 2-D array [rows, dim], got shape {array.shape}")
        self.dim = check_dim(array.shape[1])
        vectors = as_vectors(array, keys.size, self.dim)
        self.dtype = check_dtype(dtype)
        self._suffix = "f32" if self.dtype == np.float32 else "f16"
        distinct, _, last = last_occurrences(keys, np.zeros(keys.size, np.int32))
        self.capacity = int(distinct.size)
        slots = 1 << max(1, (2 * max(1, distinct.size) - 1).bit_length())
        self._mask = np.uint32(slots - 1)
        with self._device, self._stream:
            self._row_keys = cp.asarray(distinct)
            self._rows = cp.asarray(vectors[last].astype(self.dtype))
            self._live = cp.ones(distinct.size, cp.bool_)
            self._slot_keys = cp.zeros(slots, cp.int64)
            self._slot_rows = cp.full(slots, -1, cp.int32)
            if distinct.size:
                _kernel(device, "static_build")(
                    ((distinct.size + _THREADS - 1) // _THREADS,),
                    (_THREADS,),
                    (self._row_keys, np.int64(distinct.size), self._slot_keys, self._slot_rows, self._mask),
                )
        self._stream.synchronize()

    def _query(self, keys: cp.ndarray, vectors: cp.ndarray, hit: cp.ndarray) -> None:
        n = keys.size
        self._queried += n
        _kernel(self.device, f"static_query_{self._suffix}")(
            _grid_per_group(n),
            (_THREADS,),
            (keys, np.int64(n), self._slot_keys, self._slot_rows, self._live, self._mask, self._rows,
             np.int32(self.dim), vectors, hit, self._hit_count),
        )  # fmt: skip

    def _write(self, keys: cp.ndarray, vectors: cp.ndarray, revive: int) -> None:
        last, pos = self._dedupe(keys)
        _kernel(self.device, f"static_write_{self._suffix}")(
            _grid_per_group(keys.size),
            (_THREADS,),
            (keys, vectors, np.int64(keys.size), last, pos, self._slot_keys, self._slot_rows, self._live,
             self._mask, self._rows, np.int32(self.dim), np.int32(revive)),
        )  # fmt: skip

    def _replace(self, keys: cp.ndarray, vectors: cp.ndarray) -> None:
        self._write(keys, vectors, 1)

    def _update(self, keys: cp.ndarray, vectors: cp.ndarray) -> None:
        self._write(keys, vectors, 0)

    def _invalidate(self, keys: cp.ndarray) -> None:
        _kernel(self.device, "static_invalidate")(
            ((keys.size + _THREADS - 1) // _THREADS,),
            (_THREADS,),
            (keys, np.int64(keys.size), self._slot_keys, self._slot_rows, self._live, self._mask),
        )

    def dump(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys ascending, vectors float32) of the live rows."""
        with self._device, self._lock, self._stream:
            live = cp.flatnonzero(self._live)
            result = (self._row_keys[live].get(), self._rows[live].astype(cp.float32).get())
        return result

    def stats(self) -> CacheStats:
        with self._device, self._stream:
            rows = cp.count_nonzero(self._live)
        return self._stats(rows, self.capacity)


def gather(table: cp.ndarray, index: cp.ndarray) -> cp.ndarray:
    """out[i] = table[index[i]] with the cache's own row copy: the ceiling a cache query is measured against."""
    n, dim = index.size, table.shape[1]
    out = cp.empty((n, dim), cp.float32)
    device = cp.cuda.Device().id
    _kernel(device, "gather_f32")(
        _grid_per_group(n), (_THREADS,), (_aligned(table, cp.float32), _aligned(index, cp.int64), np.int64(n),
                                         np.int32(dim), out),
    )  # fmt: skip
    return out
