"""Builds hps.v1 requests from NumPy arrays and turns replies back into arrays, without per-key work.

Shared by the sync and asyncio clients; it performs no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np

from hps_wire._proto import hps_pb2

Dtype = Literal["float32", "float16"]
Combiner = Literal["sum", "mean", "sqrtn"]

_DTYPES: dict[str, hps_pb2.VectorDtype] = {
    "float32": hps_pb2.VECTOR_DTYPE_FLOAT32,
    "float16": hps_pb2.VECTOR_DTYPE_FLOAT16,
}
_COMBINERS: dict[str, hps_pb2.Combiner] = {
    "sum": hps_pb2.COMBINER_SUM,
    "mean": hps_pb2.COMBINER_MEAN,
    "sqrtn": hps_pb2.COMBINER_SQRTN,
}


_INT64_MAX = np.iinfo(np.int64).max


def int64_keys(keys: object, field: str = "keys") -> np.ndarray:
    """Keys of any shape and integer dtype as a flat little-endian int64 array: TypeError for values that are
    not integers, ValueError for integers int64 cannot hold (never wrapped around onto other keys)."""
    array = np.asarray(keys)
    if array.size and array.dtype == object:  # Python integers past uint64
        raise ValueError(f"{field}: must be integers that fit int64 (NumPy made them dtype object)")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{field}: must be integers, got dtype {array.dtype}")
    if array.size and array.dtype.kind == "u" and array.itemsize == 8 and int(array.max()) > _INT64_MAX:
        raise ValueError(f"{field}: {int(array.max())} does not fit int64 (keys are signed 64-bit)")
    return np.ascontiguousarray(array.reshape(-1), dtype="<i8")


def pack_keys(keys: object, field: str = "keys") -> bytes:
    return int64_keys(keys, field).tobytes()


def table_query(
    table: str,
    keys: object,
    row_splits: object | None = None,
    weights: object | None = None,
    combiner: Combiner | None = None,
    max_norm: float | None = None,
) -> hps_pb2.TableQuery:
    query = hps_pb2.TableQuery(table=table, keys=pack_keys(keys))
    if max_norm is not None:
        if not max_norm > 0:
            raise ValueError(f"max_norm: must be > 0 (or None for no clipping), got {max_norm}")
        query.max_norm = max_norm
    if combiner is not None or row_splits is not None:
        if combiner not in _COMBINERS or row_splits is None:
            raise ValueError(f"combiner: a ragged query needs row_splits and one of {sorted(_COMBINERS)}")
        query.combiner = _COMBINERS[combiner]
        query.row_splits = pack_keys(row_splits, "row_splits")
        if weights is not None:
            query.weights = np.ascontiguousarray(np.asarray(weights).reshape(-1), dtype="<f4").tobytes()
    return query


def _wire_dtype(dtype: Dtype) -> hps_pb2.VectorDtype:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def lookup_request(
    model: str, queries: Iterable[hps_pb2.TableQuery], dtype: Dtype = "float32", request_id: str = ""
) -> hps_pb2.LookupRequest:
    return hps_pb2.LookupRequest(model=model, queries=list(queries), dtype=_wire_dtype(dtype), request_id=request_id)


def packed_query(keys_by_table: Mapping[str, object]) -> hps_pb2.PackedQuery:
    """Plain keys of several tables in packed form: one keys buffer and one counts buffer, however many tables."""
    arrays = [int64_keys(keys, f"keys of {table}") for table, keys in keys_by_table.items()]
    counts = np.fromiter((array.size for array in arrays), "<i8", len(arrays))
    keys = np.concatenate(arrays) if arrays else np.zeros(0, "<i8")
    return hps_pb2.PackedQuery(tables=list(keys_by_table), keys=keys.tobytes(), counts=counts.tobytes())


def tables_request(model: str, keys_by_table: Mapping[str, object], dtype: Dtype = "float32") -> hps_pb2.LookupRequest:
    """Plain keys of several tables in packed form (the server answers with one PackedResult)."""
    return hps_pb2.LookupRequest(model=model, packed=packed_query(keys_by_table), dtype=_wire_dtype(dtype))
