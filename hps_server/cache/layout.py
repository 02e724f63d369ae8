"""How a cache lays keys out: the key hash, the set geometry, and the argument checks both caches share.

The CUDA kernels repeat the hash bit for bit (kernels/cache.cu); this module holds no cache state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_WAYS = 32
"""Ways per set: one warp compares all of them at once."""

DTYPES = ("float32", "float16")

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


def set_of(hashes: np.ndarray, num_sets: int) -> np.ndarray:
    """Set index of each hash: the high 32 bits scaled onto [0, num_sets), no division (Lemire's reduction)."""
    return (((hashes >> np.uint64(32)) * np.uint64(num_sets)) >> np.uint64(32)).astype(np.int64)


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


def check_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
        raise ValueError(f"dim: must be an integer >= 1, got {dim!r}")
    return int(dim)


def check_dtype(dtype: str) -> np.dtype:
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return np.dtype(str(dtype))


def last_occurrences(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys ascending, index of each one's last occurrence): a repeated key's last row wins."""
    distinct, first_from_end = np.unique(keys[::-1], return_index=True)
    return distinct, keys.size - 1 - first_from_end
