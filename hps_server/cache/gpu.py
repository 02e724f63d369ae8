"""L1 on an NVIDIA GPU: the set-associative LRU cache and the static table as CuPy RawKernels (kernels/cache.cu).

Same algorithm and results as reference.py, several tables per structure included: one call, whatever
its tables, is one host-to-device copy, one launch per kernel of the algorithm, one synchronization and
(for a lookup) one device-to-host copy (two when its vectors go into the caller's buffer). Every
operation on one cache runs on that cache's own stream in the order callers took its lock, so results
are those of some serial order. A cache can also live in device memory that several processes share
(gpu_sharing.py): the kernels that read or write its state then hold a lock across processes until they
are done (a lookup's upload and reply copy, a write's upload and de-duplication stay outside it), which
costs a lookup a second synchronization. Import only where CuPy is installed; nothing here knows of
storage levels or the session.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import cupy as cp
import cupyx
import numpy as np
import numpy.typing as npt

from hps_server.cache import CacheStats
from hps_server.cache.gpu_sharing import SharedState
from hps_server.cache.layout import (
    MAX_WAYS,
    TableSets,
    as_tables,
    check_dim,
    check_dtype,
    check_table,
    last_occurrences,
    query_destination,
    static_table_count,
)
from hps_server.storage.base import as_keys, as_vectors

_SOURCE = Path(__file__).with_name("kernels") / "cache.cu"
_THREADS = 256
_HIT_COUNTERS = 64  # HIT_COUNTERS in cache.cu
_FP_LINE = 32  # FP_LINE in cache.cu: fingerprints per set, whatever its ways
_GROUP_SPAN = 8  # GROUP_SPAN in cache.cu: batch positions per warp when new keys are inserted
_GROUP_MEMBERS = 8  # GROUP_MEMBERS in cache.cu: keys a set's group of new keys holds in its own slots
# Keys x dim up to which a cache lookup is one kernel (query_impl in cache.cu), beyond which two passes are faster.
_ONE_PASS_ELEMENTS = 1 << 25
# Kernel name suffixes per element type (rows held, rows replied), keyed by dtype (its .name costs microseconds).
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}
# Bytes of staging a structure keeps between host calls, host and device each (see _Staging).
_STAGING_KEPT = 32 << 20
# Bytes of a host query's reply (beside an `out`) it copies out of the staging; a larger one gets pinned memory.
_COPIED_REPLY = 64 << 10
_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context

Address: TypeAlias = cp.ndarray | np.uint64
"""Device memory as a kernel argument: an array, or its address (a CuPy view of a buffer costs microseconds)."""


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


@functools.cache
def _kernel(device: int, name: str) -> Any:
    return _module(device).get_function(name)


def _blocks(n: int) -> int:
    """Blocks for n threads: a thread per key, or a warp per 32 keys."""
    return (n + _THREADS - 1) // _THREADS


def _warp_blocks(n: int, per_warp: int) -> int:
    """Blocks for a warp per `per_warp` of n keys."""
    return _blocks(-(-n // per_warp) * 32)


def _aligned(array: cp.ndarray, dtype: Any) -> cp.ndarray:
    """C-contiguous, of `dtype`, 16-byte aligned (the row copies use 16-byte loads): `array` itself where it is
    (a conversion that copies nothing still costs microseconds before the launch)."""
    if array.dtype != dtype or not array.flags.c_contiguous:
        array = cp.ascontiguousarray(array, dtype=dtype)
    return array if array.data.ptr % 16 == 0 else array.copy()


def _round16(size: int) -> int:
    return (size + 15) & ~15


def _rounded(size: int) -> int:
    """`size` rounded up to one of 8 sizes per power of two (at most 1/8 more)."""
    step = 1 << max(9, size.bit_length() - 4)
    return -(-size // step) * step


def pin_host(address: int, size: int) -> Callable[[], None]:
    """Page-locks `size` bytes of host memory at `address` for every context's copies (a reply buffer the
    device copies into by DMA); returns what unlocks them."""
    cp.cuda.runtime.hostRegister(address, size, _HOST_REGISTER_PORTABLE)
    return functools.partial(cp.cuda.runtime.hostUnregister, address)


def pinned(size: int) -> np.ndarray:
    """`size` bytes of pinned host memory from CuPy's pool. The pool reuses a freed block only for a request
    of exactly its size, and batches vary in size from call to call: the block asked for is _rounded, so a
    freed one serves the next call of about its size instead of a fresh cudaHostAlloc (milliseconds for a
    large reply)."""
    return cupyx.empty_pinned(_rounded(size), np.uint8)[:size]


def _layout(arrays: Sequence[np.ndarray]) -> tuple[list[int], int]:
    """Offsets of the arrays end to end (each at a 16-byte boundary, for the row copies' loads), and the total."""
    *offsets, size = itertools.accumulate((_round16(a.nbytes) for a in arrays), initial=0)
    return offsets, size


class _Staging:
    """A structure's buffers for host calls, reused call after call: pinned host memory the inputs are
    gathered into, and device memory for the inputs and a query's reply. Creating them costs more than a
    small call's GPU work, so they are kept, up to _STAGING_KEPT bytes each; a larger call gets its own.
    Only used inside the structure's lock, by calls that synchronize before letting it go."""

    def __init__(self) -> None:
        self._host = np.zeros(0, np.uint8)
        self._device = cp.zeros(0, cp.uint8)

    def host(self, size: int) -> np.ndarray:
        if size > _STAGING_KEPT:
            return pinned(size)
        if self._host.size < size:
            self._host = pinned(_rounded(size))
        return self._host

    def device(self, size: int) -> cp.ndarray:
        if size > _STAGING_KEPT:
            return cp.empty(size, cp.uint8)
        if self._device.size < size:
            self._device = cp.empty(_rounded(size), cp.uint8)
        return self._device


@dataclass(frozen=True)
class _Uploaded:
    """A host call's inputs on the device (_OnDevice._upload): the staging buffers, to keep until the call has
    synchronized; the inputs' device addresses (kernels take them as pointers: a CuPy view of the buffer costs
    microseconds); the address of the reply's device memory; and the host staging the reply may come back to."""

    host: np.ndarray
    device: cp.ndarray
    addresses: list[np.uint64]
    reply: int
    staged_reply: np.ndarray


class _OnDevice:
    """What both GPU structures share: the device, one stream, one lock, host<->device staging, counters.

    launches, copies_to_device, copies_to_host and syncs count this module's kernel launches, copies and
    host synchronizations (CuPy's own kernels, such as the sort inside replace, are not counted): a
    lookup costs the same calls whatever the number of tables it asks.
    """

    dim: int
    num_tables: int
    # Page-locks a caller's buffer this structure's lookups copy into (a reply buffer: reply_buffers.py).
    pin_host = staticmethod(pin_host)

    def __init__(self, device: int, num_tables: int, shared: SharedState | None = None) -> None:
        if not available(device):
            raise ValueError(f"device: CUDA device {device} is not available")
        self.device = device
        self.num_tables = num_tables
        self.shared = shared
        self._device = cp.cuda.Device(device)
        with self._device:
            self._stream = cp.cuda.Stream(non_blocking=True)
            # [table][0: hits, 1: keys asked][counter], as in cache.cu
            self._counts = cp.zeros((num_tables, 2, _HIT_COUNTERS), cp.uint64)
            self._zeros = cp.zeros(0, cp.int32)
            self._staging = _Staging()
        self._lock = threading.Lock()
        self.launches = 0
        self.copies_to_device = 0
        self.copies_to_host = 0
        self.syncs = 0

    def _state(self, shapes: Sequence[tuple[tuple[int, ...], Any]]) -> list[cp.ndarray]:
        """The structure's state arrays, zeroed: this process's own, or the shared block (as its owner left it)."""
        if self.shared is not None:
            return self.shared.arrays(shapes, self.device)
        return [cp.zeros(shape, dtype) for shape, dtype in shapes]

    def _held(self, exclusive: bool) -> contextlib.AbstractContextManager[None]:
        """Around the part of an operation that reads (shared) or writes (exclusive) the structure's state,
        inside the lock: with shared state, the processes' lock too, kept until that GPU work is done. What
        touches only the call's own buffers (its inputs' upload, its scratch, its reply's copy back) stays
        outside, so that other processes wait for the state's kernels alone."""
        if self.shared is None:
            return contextlib.nullcontext()
        return self.shared.hold(exclusive, self._clear, self._finish)

    def _clear(self) -> None:
        """Empties the structure (on self._stream): a process died while writing it."""
        raise NotImplementedError

    @property
    def stream(self) -> cp.cuda.Stream:
        """The stream every operation of this structure runs on; work issued on it needs no extra ordering."""
        return self._stream

    def _launch(self, name: str, blocks: int, args: tuple[Any, ...]) -> None:
        _kernel(self.device, name)((blocks,), (_THREADS,), args)
        self.launches += 1

    def _enter(self, caller: cp.cuda.Stream) -> None:
        """Our stream waits for the caller's work on the arrays it hands us."""
        if caller.ptr != self._stream.ptr:
            self._stream.wait_event(caller.record())

    def _leave(self, caller: cp.cuda.Stream) -> None:
        """The caller's stream waits for our results."""
        if caller.ptr != self._stream.ptr:
            caller.wait_event(self._stream.record())

    def _get(self, array: cp.ndarray) -> np.ndarray:
        """A small device array on the host, for inspection (not on the lookup path); inside the lock."""
        self.copies_to_host += 1
        self.syncs += 1
        return array.get(stream=self._stream)

    def _table_stats(self, rows_per_table: cp.ndarray, capacities: Sequence[int]) -> list[CacheStats]:
        """The stats of each table, given its rows held (uint64, on our stream)."""
        with self._device, self._lock, self._held(False), self._stream:
            counts = self._get(cp.concatenate([self._counts.sum(axis=2).ravel(), rows_per_table]))
        hits, queried = counts[: 2 * self.num_tables].reshape(self.num_tables, 2).T
        rows = counts[2 * self.num_tables :]
        return [
            CacheStats(hits=int(h), misses=int(q - h), rows=int(r), capacity=int(c))
            for h, q, r, c in zip(hits, queried, rows, capacities, strict=True)
        ]

    def stats(self) -> CacheStats:
        return CacheStats.total(self.table_stats())

    def table_stats(self) -> list[CacheStats]:
        raise NotImplementedError

    def _upload(self, arrays: Sequence[np.ndarray], reply_bytes: int = 0, staged_reply: int = 0) -> _Uploaded:
        """One host-to-device copy of the arrays (C-contiguous), inside the lock, on our stream, with
        `reply_bytes` of device memory after them for a query's reply and `staged_reply` bytes of pinned
        host staging after them to copy (some of) that reply back into."""
        offsets, size = _layout(arrays)
        host = self._staging.host(size + staged_reply)
        at = host.ctypes.data
        for array, offset in zip(arrays, offsets, strict=True):
            ctypes.memmove(at + offset, array.ctypes.data, array.nbytes)
        device = self._staging.device(size + reply_bytes)
        base = device.data.ptr
        cp.cuda.runtime.memcpyAsync(base, at, size, cp.cuda.runtime.memcpyHostToDevice, self._stream.ptr)
        self.copies_to_device += 1
        addresses = [np.uint64(base + offset) for offset in offsets]
        return _Uploaded(host, device, addresses, base + size, host[size : size + staged_reply])

    def _finish(self) -> None:
        """Waits for our stream, inside the lock: the staging buffers are free again once it returns."""
        self._stream.synchronize()
        self.syncs += 1

    def _host_query(
        self, keys: np.ndarray, tables: np.ndarray | None, dtype: npt.DTypeLike, out: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = as_keys(keys)
        tables = as_tables(tables, keys.size, self.num_tables)
        wanted = check_dtype(dtype)
        n = keys.size
        if out is not None:
            query_destination(out, n, self.dim, wanted)  # checks it
        if not n:
            return np.zeros((0, self.dim), wanted) if out is None else out, np.zeros(0, bool), np.zeros(0, np.int64)
        # The reply, vectors then hit flags, comes back in one copy into pinned memory: a small one into the
        # staging, after the inputs, copied out before the next call reuses it (cheaper than pinned memory of
        # its own), a larger one into pinned memory of its own. With `out`, the vectors go there (by DMA
        # where it is page-locked) and only the flags into pinned memory.
        vector_bytes = n * self.dim * wanted.itemsize
        back = n if out is not None else vector_bytes + n
        own = pinned(back) if back > _COPIED_REPLY else None
        with self._device, self._lock, self._stream:
            uploaded = self._upload((keys, tables), vector_bytes + n, back if own is None else 0)
            reply = uploaded.staged_reply if own is None else own
            (keys_at, tables_at), reply_at, hit_at = uploaded.addresses, uploaded.reply, uploaded.reply + vector_bytes
            self._query(n, keys_at, tables_at, np.uint64(reply_at), np.uint64(hit_at), wanted)
            if out is not None:
                self._copy_to_host(out.ctypes.data, reply_at, vector_bytes)
                self._copy_to_host(reply.ctypes.data, hit_at, n)
            else:
                self._copy_to_host(reply.ctypes.data, reply_at, vector_bytes + n)
            self._finish()
            if own is None:  # the next call reuses the staging
                reply = reply.copy()
        hit = reply[-n:].view(np.bool_)
        vectors = out if out is not None else reply[:vector_bytes].view(wanted).reshape(n, self.dim)
        return vectors, hit, np.flatnonzero(~hit)

    def _copy_to_host(self, host: int, device: int, size: int) -> None:
        cp.cuda.runtime.memcpyAsync(host, device, size, cp.cuda.runtime.memcpyDeviceToHost, self._stream.ptr)
        self.copies_to_host += 1

    def _host_write(self, keys: np.ndarray, vectors: np.ndarray | None, tables: np.ndarray | None, op: str) -> None:
        keys = as_keys(keys)
        tables = as_tables(tables, keys.size, self.num_tables)
        inputs = [keys, tables] if vectors is None else [keys, tables, as_vectors(vectors, keys.size, self.dim)]
        if not keys.size:
            return
        with self._device, self._lock, self._stream:
            uploaded = self._upload(inputs)
            getattr(self, op)(keys.size, *uploaded.addresses)
            self._finish()

    def _device_call(self, op: str, n: int, *arrays: Any) -> Any:
        caller = cp.cuda.get_current_stream()
        with self._device, self._lock, self._stream:
            self._enter(caller)
            result = getattr(self, op)(n, *arrays)
            self._leave(caller)
        return result

    def _device_keys(self, keys: cp.ndarray) -> cp.ndarray:
        if keys.ndim != 1 or keys.dtype.kind not in "iu":
            raise ValueError(f"keys: must be a 1-D integer array, got shape {keys.shape} dtype {keys.dtype}")
        return _aligned(keys, cp.int64)

    def _device_tables(self, tables: cp.ndarray | None, rows: int) -> cp.ndarray:
        """int32 table indices on the device for `rows` keys (when None: zeros, at least `rows` of them, which
        only our kernels read); values are checked by the kernels, not here."""
        if tables is None:
            return self._zero_tables(rows)
        if tables.shape != (rows,) or tables.dtype.kind not in "iu":
            raise ValueError(
                f"tables: must be a 1-D integer array of one index per key ({rows}), "
                f"got shape {tables.shape} dtype {tables.dtype}"
            )
        if tables.dtype == cp.int32:
            return cp.ascontiguousarray(tables)
        # Out of range before the narrowing, so that no index wraps around onto a real table.
        return cp.where((tables < 0) | (tables >= self.num_tables), -1, tables).astype(cp.int32)

    def _zero_tables(self, rows: int) -> cp.ndarray:
        """At least `rows` table indices 0: one zeroed array kept and grown by doubling, whole (a slice costs
        microseconds), so that a call without tables allocates and launches nothing for them; only our
        kernels, on our stream, read it, each its first `rows`."""
        if self._zeros.size < rows:
            with self._device, self._stream:
                self._zeros = cp.zeros(max(rows, 2 * self._zeros.size), cp.int32)
        return self._zeros

    def _device_vectors(self, vectors: cp.ndarray, rows: int) -> cp.ndarray:
        if vectors.shape != (rows, self.dim):
            raise ValueError(
                f"vectors: must have shape ({rows}, {self.dim}) to match keys and dim, got {vectors.shape}"
            )
        return _aligned(vectors, cp.float32)

    def _work(
        self, n: int, tables: int, per_entry: int = 0
    ) -> tuple[cp.ndarray, list[np.uint64], np.uint64, list[np.uint64], np.uint32]:
        """A write's scratch from one allocation and one memset: `tables` open-addressing tables of int32
        entries, every bit set (-1, or NO_SET in cache.cu), at most half full with n keys; `per_entry`
        int32 per entry, not set; three int32 arrays of n; and the tables' index mask. The tables have
        fewer than 4n entries: replace's 5 tables and 8 per entry take under 220 bytes a key. Returned as
        the buffer, then the arrays' device addresses, which the kernels take as pointers (a CuPy view of
        the buffer costs microseconds, nine of them a replace): keep the buffer until they are launched."""
        size = 1 << max(1, (2 * n - 1).bit_length())
        marked = tables * size
        keyed = marked + per_entry * size
        buffer = cp.empty(keyed + 3 * n, cp.int32)
        base = buffer.data.ptr
        cp.cuda.runtime.memsetAsync(base, 0xFF, marked * 4, self._stream.ptr)
        spans = [np.uint64(base + 4 * k * size) for k in range(tables)]
        per_key = [np.uint64(base + 4 * (keyed + k * n)) for k in range(3)]
        return buffer, spans, np.uint64(base + 4 * marked), per_key, np.uint32(size - 1)

    def _dedupe(
        self, n: int, keys: Address, tables: Address, claim: np.uint64, last: np.uint64, pos: np.uint64, mask: Any
    ) -> None:
        """Fills last and pos: key i is its (table, key) pair's last occurrence in the batch where last[pos[i]] == i."""
        self._launch("dedupe", _blocks(n), (keys, tables, np.int64(n), claim, last, pos, mask))

    # Subclasses implement these on n keys in device memory, inside the lock, on self._stream, holding _held
    # around their work on the state. vectors are [n, dim] (of dtype for a query's reply, else float32).
    def _query(self, n: int, keys: Address, tables: Address, vectors: Address, hit: Address, dtype: np.dtype) -> None:
        raise NotImplementedError

    def _replace(self, n: int, keys: Address, tables: Address, vectors: Address) -> None:
        raise NotImplementedError

    def _update(self, n: int, keys: Address, tables: Address, vectors: Address) -> None:
        raise NotImplementedError

    def _invalidate(self, n: int, keys: Address, tables: Address) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ the public surface

    def query(
        self,
        keys: np.ndarray,
        tables: np.ndarray | None = None,
        *,
        dtype: npt.DTypeLike = np.float32,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [n, dim] of `dtype`, zero rows for misses, hit bool[n]), arrays of their own (a large reply:
        views of one pinned host buffer), or the vectors in `out` when given."""
        vectors, hit, _ = self._host_query(keys, tables, dtype, out)
        return vectors, hit

    def query_misses(
        self,
        keys: np.ndarray,
        tables: np.ndarray | None = None,
        *,
        dtype: npt.DTypeLike = np.float32,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """query() plus the indices of the misses (int64, ascending)."""
        return self._host_query(keys, tables, dtype, out)

    def replace(self, keys: np.ndarray, vectors: np.ndarray, tables: np.ndarray | None = None) -> None:
        self._host_write(keys, vectors, tables, "_replace")

    def update(self, keys: np.ndarray, vectors: np.ndarray, tables: np.ndarray | None = None) -> None:
        self._host_write(keys, vectors, tables, "_update")

    def invalidate(self, keys: np.ndarray, tables: np.ndarray | None = None) -> None:
        self._host_write(keys, None, tables, "_invalidate")

    def query_device(
        self, keys: cp.ndarray, tables: cp.ndarray | None = None, *, dtype: npt.DTypeLike = np.float32
    ) -> tuple[cp.ndarray, cp.ndarray]:
        """query() on device arrays: (vectors [n, dim] of `dtype`, hit bool[n]), ordered after the caller's stream."""
        keys = self._device_keys(keys)
        tables = self._device_tables(tables, keys.size)
        # Allocated on the caller's stream, so the pool recycles them in the caller's order.
        vectors = cp.empty((keys.size, self.dim), check_dtype(dtype))
        hit = cp.empty(keys.size, cp.bool_)
        if keys.size:
            self._device_call("_query", keys.size, keys, tables, vectors, hit, vectors.dtype)
        return vectors, hit

    def replace_device(self, keys: cp.ndarray, vectors: cp.ndarray, tables: cp.ndarray | None = None) -> None:
        keys = self._device_keys(keys)
        if keys.size:
            vectors = self._device_vectors(vectors, keys.size)
            self._device_call("_replace", keys.size, keys, self._device_tables(tables, keys.size), vectors)

    def update_device(self, keys: cp.ndarray, vectors: cp.ndarray, tables: cp.ndarray | None = None) -> None:
        keys = self._device_keys(keys)
        if keys.size:
            vectors = self._device_vectors(vectors, keys.size)
            self._device_call("_update", keys.size, keys, self._device_tables(tables, keys.size), vectors)

    def invalidate_device(self, keys: cp.ndarray, tables: cp.ndarray | None = None) -> None:
        keys = self._device_keys(keys)
        if keys.size:
            self._device_call("_invalidate", keys.size, keys, self._device_tables(tables, keys.size))


@dataclass(frozen=True)
class _Deduped:
    """A replace's or update's batch prepared for the cache's passes (the names of write_present in cache.cu):
    last/pos mark each (table, key) pair's last occurrence; groups are group_sets, group_sizes, group_heads
    and members, with their table's index mask; leader and link are written by pass 1. All of them live in
    `scratch`, given by their device addresses (see _OnDevice._work)."""

    scratch: cp.ndarray
    last: np.uint64
    pos: np.uint64
    groups: tuple[np.uint64, ...]
    mask: np.uint32
    leader: np.uint64
    link: np.uint64


class GpuEmbeddingCache(_OnDevice):
    """A bounded LRU cache of one or several tables' rows on one GPU (see reference.py for the algorithm)."""

    def __init__(
        self,
        capacity: int | Sequence[int],
        dim: int,
        *,
        ways: int = MAX_WAYS,
        dtype: str = "float32",
        device: int = 0,
        shared: SharedState | None = None,
    ) -> None:
        """shared: keep the rows in this shared state (gpu_sharing.py) instead of this process's memory."""
        self.layout = TableSets(capacity, ways)
        super().__init__(device, self.layout.num_tables, shared)
        self.geometries = self.layout.geometries
        self.capacities = tuple(g.capacity for g in self.geometries)
        self.capacity = sum(self.capacities)
        self.dim = check_dim(dim)
        self.dtype = check_dtype(dtype)
        # The LRU clock: shared by the processes of a shared cache (an increment lost to a race only makes
        # two stamps equal).
        self._clock = shared.words[:1] if shared is not None else np.zeros(1, np.int64)
        self._suffix = _SUFFIX[self.dtype]
        slots = self.layout.total_sets * self.layout.stride
        with self._device, self._stream:
            # A fingerprint line of _FP_LINE per set (16-byte aligned: the block's arrays start at such
            # boundaries); (key, stamp) per slot, as Slot in cache.cu.
            fps = ((self.layout.total_sets * _FP_LINE,), cp.uint16)
            self._fps, self._slots, self._rows = self._state(
                [fps, ((slots, 2), cp.int64), ((slots, self.dim), self.dtype)]
            )
            self._first_set = cp.asarray(self.layout.first_set.astype(np.uint32))
            self._num_sets = cp.asarray(self.layout.num_sets.astype(np.uint32))
            self._table_ways = cp.asarray(self.layout.ways.astype(np.int32))
        # Kernel arguments every call passes, built once (each costs a fraction of a microsecond per launch).
        self._table_args = (self._first_set, self._num_sets, np.int32(self.num_tables))
        self._stride = np.int32(self.layout.stride)
        self._dim = np.int32(self.dim)
        self._stream.synchronize()
        _module(device)

    @property
    def clock(self) -> int:
        return int(self._clock[0])

    @clock.setter
    def clock(self, value: int) -> None:
        self._clock[0] = value

    def _clear(self) -> None:
        with self._stream:
            self._fps.fill(0)

    def _query(self, n: int, keys: Address, tables: Address, vectors: Address, hit: Address, dtype: np.dtype) -> None:
        """One kernel up to _ONE_PASS_ELEMENTS (keys x dim); above, the slots found, then their rows copied."""
        rows_as = f"{self._suffix}_{_SUFFIX[dtype]}"
        found = cp.empty(n, cp.int64) if n * self.dim > _ONE_PASS_ELEMENTS else None
        with self._held(False):
            self.clock += 1
            search = (keys, tables, np.int64(n), *self._table_args, self._fps, self._slots, self._stride,
                      np.int64(self.clock))  # fmt: skip
            if found is None:
                self._launch(
                    f"query_{rows_as}", _blocks(n), (*search, self._rows, self._dim, vectors, hit, self._counts)
                )
            else:
                self._launch("find", _blocks(n), (*search, found, hit, self._counts))
                self._launch(f"copy_rows_{rows_as}", _blocks(n), (self._rows, found, np.int64(n), self._dim, vectors))

    def _deduped(self, n: int, keys: Address, tables: Address) -> _Deduped:
        """A write's scratch, its batch de-duplicated: work on the batch alone, so it runs before _held."""
        scratch, (claim, last, *groups), members, (pos, leader, link), mask = self._work(n, 5, _GROUP_MEMBERS)
        self._dedupe(n, keys, tables, claim, last, pos, mask)
        return _Deduped(scratch, last, pos, (*groups, members), mask, leader, link)

    def _write_present(
        self, n: int, keys: Address, tables: Address, vectors: Address, clock: int, batch: _Deduped
    ) -> None:
        """Pass 1 of replace (clock > 0) and update (clock 0), with no sort and no host synchronization:
        fills batch's groups (the sets of the keys to insert, each with its keys, as pass 2 reads them:
        join_group in cache.cu), leader and link. Inside _held."""
        self._launch(
            f"write_present_{self._suffix}",
            _blocks(n),
            (keys, tables, vectors, np.int64(n), batch.last, batch.pos, *self._table_args, self._fps,
             self._slots, self._rows, self._stride, self._dim, np.int64(clock),
             *batch.groups, batch.mask, batch.leader, batch.link),
        )  # fmt: skip

    def _replace(self, n: int, keys: Address, tables: Address, vectors: Address) -> None:
        batch = self._deduped(n, keys, tables)
        with self._held(True):
            touched, inserted = self.clock + 1, self.clock + 2
            self.clock += 2
            self._write_present(n, keys, tables, vectors, touched, batch)
            self._launch(
                f"insert_groups_{self._suffix}",
                _warp_blocks(n, _GROUP_SPAN),
                (keys, tables, vectors, np.int64(n), batch.leader, *batch.groups,
                 batch.link, self._table_ways, self._fps, self._slots, self._rows, self._stride,
                 self._dim, np.int64(touched), np.int64(inserted)),
            )  # fmt: skip

    def _update(self, n: int, keys: Address, tables: Address, vectors: Address) -> None:
        batch = self._deduped(n, keys, tables)
        with self._held(True):
            self._write_present(n, keys, tables, vectors, 0, batch)

    def _invalidate(self, n: int, keys: Address, tables: Address) -> None:
        with self._held(True):
            self._launch(
                "invalidate",
                _blocks(n),
                (keys, tables, np.int64(n), *self._table_args, self._fps, self._slots, self._stride),
            )  # fmt: skip

    def dump(self, table: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys ascending, vectors float32, stamps) of every row `table` holds, as reference.py's dump()."""
        table = check_table(table, self.num_tables)
        stride = self.layout.stride
        first = int(self.layout.first_set[table])
        end = first + int(self.layout.num_sets[table])
        with self._device, self._lock, self._held(False), self._stream:
            held = cp.flatnonzero(self._fps.reshape(-1, _FP_LINE)[first:end, :stride]) + first * stride
            keys = self._slots[held, 0]
            order = cp.argsort(keys)
            held = held[order]
            result = (
                self._get(keys[order]),
                self._get(self._rows[held].astype(cp.float32)),
                self._get(self._slots[held, 1]),
            )
        return result

    def table_stats(self) -> list[CacheStats]:
        """Hits, misses, rows held and capacity of each table, in table order (equal to the reference's)."""
        sets = self.layout.total_sets
        with self._device, self._stream:
            held = cp.zeros(self.num_tables, cp.uint64)
            self._launch(
                "cache_rows_held",
                _blocks(sets),
                (self._fps, np.int64(sets), self._first_set, np.int32(self.num_tables), held),
            )
        return self._table_stats(held, self.capacities)


@dataclass(frozen=True)
class StaticLayout:
    """What sizes a static table's device arrays: each table's row range in (table, key) order (table t's rows
    are [bounds[t], bounds[t + 1])), the hash slots, the vector width and the dtype held. Picklable: another
    process opens a shared static table from it."""

    bounds: tuple[int, ...]
    slots: int
    dim: int
    dtype: str

    @property
    def rows(self) -> int:
        return self.bounds[-1]


class GpuStaticTable(_OnDevice):
    """Fixed key sets of one or several tables held whole on one GPU; same behaviour as ReferenceStaticTable.

    With `shared` (gpu_sharing.py) its arrays live in that state, once per device for a worker group:
    the owner builds them, other processes open them (GpuStaticTable.open) and query and write them under
    the state's lock, as a shared cache is."""

    def __init__(
        self,
        keys: np.ndarray,
        vectors: np.ndarray,
        *,
        tables: np.ndarray | None = None,
        num_tables: int | None = None,
        dtype: str = "float32",
        device: int = 0,
        shared: SharedState | None = None,
    ) -> None:
        keys = as_keys(keys)
        array = np.asarray(vectors)
        if array.ndim != 2 or array.shape[1] < 1:
            raise ValueError(f"vectors: must be a 2-D array [rows, dim], got shape {array.shape}")
        dim = check_dim(array.shape[1])
        vectors = as_vectors(array, keys.size, dim)
        count = static_table_count(tables, num_tables)
        tables = as_tables(tables, keys.size, count)
        # Rows in (table, key) order, as the reference holds them.
        distinct, owners, last = last_occurrences(keys, tables)
        slots = 1 << max(1, (2 * max(1, distinct.size) - 1).bit_length())
        bounds = tuple(int(b) for b in np.searchsorted(owners, np.arange(count + 1)))
        self._allocate(StaticLayout(bounds, slots, dim, check_dtype(dtype).name), device, shared)
        with self._device, self._stream:
            self._row_keys[...] = cp.asarray(distinct)
            self._rows[...] = cp.asarray(vectors[last].astype(self.dtype))
            self._entries[:, 3] = -1
            if distinct.size:
                self._launch(
                    "static_build",
                    _blocks(distinct.size),
                    (self._row_keys, cp.asarray(owners), np.int64(distinct.size), self._entries, self._mask),
                )
        self._stream.synchronize()
        with self._device:  # the build's copies of the rows went back to CuPy's pool: hand them back
            cp.get_default_memory_pool().free_all_blocks()

    @classmethod
    def open(cls, layout: StaticLayout, device: int, shared: SharedState) -> GpuStaticTable:
        """The static table another process built in `shared` with this layout, as that process left it."""
        table = cls.__new__(cls)
        table._allocate(layout, device, shared)
        return table

    def _allocate(self, layout: StaticLayout, device: int, shared: SharedState | None) -> None:
        """The device arrays for `layout`: this process's own (zeroed) or the shared state's."""
        count = len(layout.bounds) - 1
        super().__init__(device, count, shared)
        self.layout = layout
        self.dim = layout.dim
        self.dtype = check_dtype(layout.dtype)
        self._suffix = _SUFFIX[self.dtype]
        self._bounds = np.array(layout.bounds, np.int64)
        self.capacities = tuple(int(c) for c in np.diff(self._bounds))
        self.capacity = layout.rows
        self._mask = np.uint32(layout.slots - 1)
        with self._device, self._stream:
            # Entry in cache.cu, one per slot as 4 int32: key (2 words), table (top bit: dead), row (-1: empty).
            self._row_keys, self._rows, self._entries = self._state(
                [((layout.rows,), cp.int64), ((layout.rows, layout.dim), self.dtype), ((layout.slots, 4), cp.int32)]
            )
        self._index_args = (np.int32(count), self._entries, self._mask)
        self._dim = np.int32(layout.dim)
        _module(device)

    def _clear(self) -> None:
        """Every row dead (a process died writing some): each key misses, and is revived by the next fill."""
        with self._stream:
            self._entries[:, 2] |= np.int32(-(2**31))

    def _live(self) -> cp.ndarray:
        """Whether each row is live (not invalidated), from the entries; on our stream."""
        held = self._entries[self._entries[:, 3] >= 0]
        live = cp.zeros(self.capacity, cp.bool_)
        live[held[:, 3]] = held[:, 2] >= 0
        return live

    def _query(self, n: int, keys: Address, tables: Address, vectors: Address, hit: Address, dtype: np.dtype) -> None:
        with self._held(False):
            self._launch(
                f"static_query_{self._suffix}_{_SUFFIX[dtype]}",
                _blocks(n),
                (keys, tables, np.int64(n), *self._index_args, self._rows, self._dim, vectors, hit, self._counts),
            )

    def _write(self, n: int, keys: Address, tables: Address, vectors: Address, revive: int) -> None:
        _scratch, (claim, last), _, (pos, _, _), mask = self._work(n, 2)  # kept until both launches
        self._dedupe(n, keys, tables, claim, last, pos, mask)
        with self._held(True):
            self._launch(
                f"static_write_{self._suffix}",
                _blocks(n),
                (keys, tables, vectors, np.int64(n), last, pos, *self._index_args, self._rows, self._dim,
                 np.int32(revive)),
            )  # fmt: skip

    def _replace(self, n: int, keys: Address, tables: Address, vectors: Address) -> None:
        self._write(n, keys, tables, vectors, 1)

    def _update(self, n: int, keys: Address, tables: Address, vectors: Address) -> None:
        self._write(n, keys, tables, vectors, 0)

    def _invalidate(self, n: int, keys: Address, tables: Address) -> None:
        with self._held(True):
            self._launch("static_invalidate", _blocks(n), (keys, tables, np.int64(n), *self._index_args))

    def dump(self, table: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(keys ascending, vectors float32) of `table`'s live rows."""
        table = check_table(table, self.num_tables)
        first, end = int(self._bounds[table]), int(self._bounds[table + 1])
        with self._device, self._lock, self._held(False), self._stream:
            live = cp.flatnonzero(self._live()[first:end]) + first
            result = (self._get(self._row_keys[live]), self._get(self._rows[live].astype(cp.float32)))
        return result

    def table_stats(self) -> list[CacheStats]:
        """Hits, misses, live rows and rows held of each table, in table order (equal to the reference's)."""
        with self._device, self._stream:
            live = cp.zeros(self.num_tables, cp.uint64)
            self._launch(
                "static_rows_live", _blocks(self.layout.slots), (self._entries, np.int64(self.layout.slots), live)
            )
        return self._table_stats(live, self.capacities)


def gather(table: cp.ndarray, index: cp.ndarray) -> cp.ndarray:
    """out[i] = table[index[i]] with the cache's own row copy: the ceiling a cache query is measured against."""
    n, dim = index.size, table.shape[1]
    out = cp.empty((n, dim), cp.float32)
    device = cp.cuda.Device().id
    _kernel(device, "copy_rows_f32_f32")(
        (_blocks(n),), (_THREADS,), (_aligned(table, cp.float32), _aligned(index, cp.int64), np.int64(n),
                                         np.int32(dim), out),
    )  # fmt: skip
    return out
