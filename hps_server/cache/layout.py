"""How a cache lays keys out: the key hash, the set geometry of each table, and the argument checks both caches share.

The CUDA kernels repeat the hash and the set rule bit for bit (kernels/cache.cu); this module holds no cache state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

MAX_WAYS = 32
"""Ways per set: one warp compares all of them at once."""

DTYPES = ("float32", "float16")
_DTYPES = frozenset(np.dtype(name) for name in DTYPES)  # a dtype's .name costs microseconds: compared as dtypes

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix(keys: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over int64 keys, as uint64 (the same function as mix() in cache.cu)."""
    x = keys.astype(np.int64, copy=False).view(np.uint64)
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def set_of(hashes: np.ndarray, num_sets: int | np.ndarray) -> np.ndarray:
    """Set index of each hash: the high 32 bits scaled onto [0, num_sets), no division (Lemire's reduction).

    num_sets is one count for all hashes or one per hash (each key's own table).
    """
    scale = np.asarray(num_sets, dtype=np.uint64)
    return (((hashes >> np.uint64(32)) * scale) >> np.uint64(32)).astype(np.int64)


@dataclass(frozen=True)
class Geometry:
    """num_sets sets of `ways` slots each; capacity = num_sets * ways never exceeds the rows asked for."""

    num_sets: int
    ways: int

    @property
    def capacity(self) -> int:
        return self.num_sets * self.ways

    @classmethod
    def for_capacity(cls, capacity: int, ways: int = MAX_WAYS) -> Geometry:
        if isinstance(capacity, bool) or not isinstance(capacity, int | np.integer) or capacity < 1:
            raise ValueError(f"capacity: must be an integer >= 1, got {capacity!r}")
        if isinstance(ways, bool) or not isinstance(ways, int | np.integer) or not 1 <= ways <= MAX_WAYS:
            raise ValueError(f"ways: must be an integer in [1, {MAX_WAYS}], got {ways!r}")
        ways = min(int(ways), int(capacity))
        num_sets = int(capacity) // ways
        if num_sets >= 2**32:
            raise ValueError(f"capacity: at most {2**32 - 1} sets, got {num_sets}")
        return cls(num_sets=num_sets, ways=ways)


class TableSets:
    """Several tables' sets laid end to end: table t owns global sets [first_set[t], first_set[t] + num_sets[t]).

    Each table keeps the geometry it would have alone (Geometry.for_capacity of its own capacity), so
    set ranges are disjoint and tables never compete for a slot. Every set spans `stride` slots, the
    most ways any table has; a table with fewer ways (capacity below `ways`) never uses its sets' last
    slots.
    """

    def __init__(self, capacity: int | Sequence[int], ways: int = MAX_WAYS) -> None:
        capacities = list(capacity) if isinstance(capacity, Sequence | np.ndarray) else [capacity]
        if not capacities:
            raise ValueError("capacity: needs at least one table's capacity, got an empty sequence")
        self.geometries = tuple(Geometry.for_capacity(c, ways) for c in capacities)
        self.num_sets = np.array([g.num_sets for g in self.geometries], np.int64)
        self.ways = np.array([g.ways for g in self.geometries], np.int64)
        self.first_set = np.cumsum(self.num_sets) - self.num_sets
        self.total_sets = int(self.num_sets.sum())
        # The kernels hold global set indices in 32 bits and keep 2**32 - 1 as "no set".
        if self.total_sets >= 2**32 - 1:
            raise ValueError(f"capacity: at most {2**32 - 2} sets over all tables, got {self.total_sets}")
        self.stride = int(self.ways.max())

    @property
    def num_tables(self) -> int:
        return len(self.geometries)

    def sets_of(self, keys: np.ndarray, tables: np.ndarray) -> np.ndarray:
        """Global set of each key of table tables[i]: its table's first set + its set inside the table."""
        return self.first_set[tables] + set_of(mix(keys), self.num_sets[tables])

    def per_table(self, per_set: np.ndarray) -> np.ndarray:
        """Sums of a per-set count over each table's sets (every table has at least one set)."""
        ends = np.cumsum(per_set)[self.first_set + self.num_sets - 1]
        return np.diff(ends, prepend=0)


def as_tables(tables: object, rows: int, num_tables: int) -> np.ndarray:
    """Per-key table indices as int32 (all 0 when None), or ValueError naming `tables`."""
    if tables is None:
        return np.zeros(rows, np.int32)
    array = np.asarray(tables)
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"tables: must be integers, got dtype {array.dtype}")
    if array.ndim != 1 or array.size != rows:
        raise ValueError(f"tables: must be 1-D with one index per key ({rows}), got shape {array.shape}")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= num_tables):
        raise ValueError(f"tables: indices must lie in [0, {num_tables}), got {int(array.min())} to {int(array.max())}")
    return array.astype(np.int32)


def static_table_count(tables: object, num_tables: int | None) -> int:
    """num_tables as given (an integer >= 1), else one more than the largest index in `tables` (1 without any)."""
    if num_tables is not None:
        if isinstance(num_tables, bool) or not isinstance(num_tables, int | np.integer) or num_tables < 1:
            raise ValueError(f"num_tables: must be an integer >= 1, got {num_tables!r}")
        return int(num_tables)
    given = np.asarray(tables) if tables is not None else np.zeros(0, np.int64)
    # Out-of-range or non-integer indices are refused by as_tables, naming `tables`.
    return max(1, int(given.max()) + 1) if given.size and given.dtype.kind in "iu" else 1


def check_table(table: int, num_tables: int) -> int:
    """One table index, or ValueError naming `table`."""
    if isinstance(table, bool) or not isinstance(table, int | np.integer) or not 0 <= table < num_tables:
        raise ValueError(f"table: must be an integer in [0, {num_tables}), got {table!r}")
    return int(table)


def check_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
        raise ValueError(f"dim: must be an integer >= 1, got {dim!r}")
    return int(dim)


def check_dtype(dtype: npt.DTypeLike) -> np.dtype:
    """float32 or float16 (rows held, or rows replied), or ValueError naming `dtype`."""
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved not in _DTYPES:
        raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return resolved


def query_destination(out: np.ndarray | None, rows: int, dim: int, dtype: np.dtype) -> np.ndarray:
    """Where a query writes its vectors: `out` when given (a writable C-contiguous [rows, dim] array of
    `dtype`, such as a region of a reply buffer), else a new zeroed array."""
    if out is None:
        return np.zeros((rows, dim), dtype)
    if out.shape != (rows, dim) or out.dtype != dtype or not out.flags.writeable or not out.flags.c_contiguous:
        raise ValueError(
            f"out: must be a writable C-contiguous {dtype} array of shape ({rows}, {dim}), got {out.dtype} {out.shape}"
        )
    return out


def last_occurrences(keys: np.ndarray, tables: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct keys, their tables, index of each (table, key) pair's last occurrence), ordered by (table, key).

    Pairs are compared exactly: the same key in two tables is two rows; a repeated pair's last row wins.
    """
    order = np.lexsort((keys, tables))  # stable: a pair's occurrences stay in batch order
    keys_sorted, tables_sorted = keys[order], tables[order]
    ends_run = np.ones(keys.size, bool)
    ends_run[:-1] = (keys_sorted[1:] != keys_sorted[:-1]) | (tables_sorted[1:] != tables_sorted[:-1])
    last = order[ends_run]
    return keys[last], tables[last], last
