"""The key layout of the Triton lookup model: several requests' KEYS regrouped per table for one Lookup RPC.

Pure NumPy with no Triton or gRPC imports, so it is tested in any interpreter; it performs no I/O.

Layout (as HugeCTR's HPS backend): KEYS is int64 [samples, k]; each row holds table 0's keys, then table 1's,
and so on. NUMKEYS is int32 [samples, tables]: how many keys each row carries per table, the same in every row
of a request. The reply OUTPUT0 is float32 [samples, sum(numkeys[t] * dim[t])]: each key's vector in key order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


class KeyLayoutError(ValueError):
    """KEYS and NUMKEYS of one request do not fit together; the message names the input at fault."""


def key_counts(keys: np.ndarray, numkeys: np.ndarray, tables: int) -> np.ndarray:
    """Keys per table (int64[tables]) of one request, after checking the request's shapes and dtypes."""
    if keys.dtype != np.int64:
        raise KeyLayoutError(f"KEYS: must be INT64, got {keys.dtype}")
    if not np.issubdtype(numkeys.dtype, np.integer):
        raise KeyLayoutError(f"NUMKEYS: must be integers, got {numkeys.dtype}")
    if keys.ndim != 2 or numkeys.ndim != 2:
        raise KeyLayoutError(
            f"KEYS and NUMKEYS: must be [samples, n] tensors, got shapes {list(keys.shape)} and {list(numkeys.shape)}"
        )
    if numkeys.shape != (keys.shape[0], tables):
        raise KeyLayoutError(
            f"NUMKEYS: shape must be [{keys.shape[0]}, {tables}] (one row per sample, one count per table), "
            f"got {list(numkeys.shape)}"
        )
    if not len(numkeys):
        return np.zeros(tables, dtype=np.int64)
    counts = numkeys[0].astype(np.int64)
    if (numkeys != numkeys[0]).any():
        raise KeyLayoutError("NUMKEYS: every row of a request must be equal (one key layout per request)")
    if (counts < 0).any():
        raise KeyLayoutError(f"NUMKEYS: counts must be >= 0, got {counts.tolist()}")
    if counts.sum() != keys.shape[1]:
        raise KeyLayoutError(
            f"NUMKEYS: counts {counts.tolist()} add up to {int(counts.sum())}, "
            f"but KEYS has {keys.shape[1]} keys per sample"
        )
    return counts


class LookupBatch:
    """The valid requests of one Triton batch: their keys per table for one RPC, and the replies split back."""

    def __init__(self, tables: Sequence[str], requests: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        """`requests`: (KEYS, counts from key_counts) per request, in order."""
        self.tables = list(tables)
        self._requests = requests
        self._offsets = [np.concatenate(([0], np.cumsum(counts))) for _, counts in requests]

    def keys_by_table(self) -> dict[str, np.ndarray]:
        """Each table's keys of all requests, request after request, row after row."""
        pairs = list(zip((keys for keys, _ in self._requests), self._offsets, strict=True))
        return {
            table: np.concatenate([keys[:, offsets[t] : offsets[t + 1]].reshape(-1) for keys, offsets in pairs])
            for t, table in enumerate(self.tables)
        }

    def outputs(self, vectors: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """OUTPUT0 of each request (float32 [samples, sum(counts * dim)]) from each table's vectors."""
        starts = dict.fromkeys(self.tables, 0)
        out = []
        for keys, counts in self._requests:
            samples = keys.shape[0]
            parts = []
            for table, count in zip(self.tables, counts.tolist(), strict=True):
                rows = samples * count
                rows_of_table = vectors[table][starts[table] : starts[table] + rows]
                parts.append(rows_of_table.reshape(samples, count * rows_of_table.shape[1]))
                starts[table] += rows
            out.append(np.concatenate(parts, axis=1, dtype=np.float32) if parts else np.zeros((samples, 0), np.float32))
        return out
