"""LookupResponse in protobuf wire format, written from and read into NumPy arrays without copying vectors.

The generated protobuf code copies every `bytes` field on build, serialize, parse and access: three to
four copies of up to hundreds of MB per reply. This codec writes the reply in one join of array buffers
and reads it as array views over the received bytes. Output is byte-identical to SerializeToString and
tests/test_response_codec.py holds it to that; any message the generated code reads, this reads too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from hps_wire._proto import hps_pb2

# NumPy element type of each VectorDtype (UNSPECIFIED means float32).
WIRE_NUMPY: dict[int, np.dtype] = {
    hps_pb2.VECTOR_DTYPE_UNSPECIFIED: np.dtype("<f4"),
    hps_pb2.VECTOR_DTYPE_FLOAT32: np.dtype("<f4"),
    hps_pb2.VECTOR_DTYPE_FLOAT16: np.dtype("<f2"),
}
_WIRE_DTYPE = {np.dtype("<f4"): hps_pb2.VECTOR_DTYPE_FLOAT32, np.dtype("<f2"): hps_pb2.VECTOR_DTYPE_FLOAT16}
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
FLOAT32 = np.dtype("<f4")


@dataclass(frozen=True)
class LookupResult:
    """One TableResult (or one segment of a PackedResult) as arrays: vectors (rows x dim, float32 or
    float16) and one found flag per key."""

    table: str
    vectors: np.ndarray
    found: np.ndarray


@dataclass(frozen=True)
class PackedLookup:
    """A PackedResult as arrays: each segment's table, key count and dim, and the vectors and found flags of
    all segments as a few arrays laid end to end (vectors row-major, one dtype)."""

    tables: Sequence[str]
    counts: np.ndarray
    dims: np.ndarray
    vectors: Sequence[np.ndarray]
    found: Sequence[np.ndarray]


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL_VARINTS = tuple(bytes((value,)) for value in range(0x80))


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _length_delimited(field: int, size: int) -> bytes:
    return _tag(field, _LENGTH_DELIMITED) + _varint(size)


@functools.lru_cache(maxsize=4096)
def _encoded_string(field: int, text: str) -> bytes:
    # Table and model names recur in every reply: encode each once.
    data = text.encode()
    return _length_delimited(field, len(data)) + data


def _string_field(field: int, text: str) -> list[bytes]:
    return [_encoded_string(field, text)] if text else []


def _varint_field(field: int, value: int) -> list[bytes]:
    return [_tag(field, _VARINT) + _varint(value)] if value else []


def _buffer_field(field: int, array: np.ndarray) -> list[bytes | memoryview]:
    if not array.nbytes:
        return []
    return [_length_delimited(field, array.nbytes), np.ascontiguousarray(array).data.cast("B")]


def _table_result(result: LookupResult) -> list[bytes | memoryview]:
    rows, dim = result.vectors.shape
    body: list[bytes | memoryview] = [
        *_string_field(1, result.table),
        *_buffer_field(2, result.vectors),
        *_varint_field(3, rows),
        *_varint_field(4, dim),
        *_varint_field(5, _WIRE_DTYPE[result.vectors.dtype]),
        *_buffer_field(6, result.found.view(np.uint8)),
    ]
    return [_length_delimited(2, sum(len(piece) for piece in body)), *body]


class Hole:
    """`size` bytes of a reply left for its caller to fill (a PackedReplyLayout's vectors or found flags)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


Piece = bytes | memoryview | Hole


def _bytes_field(field: int, pieces: Sequence[np.ndarray | Hole]) -> list[Piece]:
    """One length-delimited field whose value is the pieces' bytes end to end (each copied once, by the join)."""
    views = [
        piece if isinstance(piece, Hole) else np.ascontiguousarray(piece).data.cast("B")
        for piece in pieces
        if (piece.size if isinstance(piece, Hole) else piece.nbytes)
    ]
    size = sum(len(view) for view in views)
    return [_length_delimited(field, size), *views] if size else []


def _packed_result(
    tables: Sequence[str],
    counts: np.ndarray,
    dims: np.ndarray,
    vectors: Sequence[np.ndarray | Hole],
    found: Sequence[np.ndarray | Hole],
    dtype: np.dtype,
) -> list[Piece]:
    body: list[Piece] = [_encoded_string(1, table) for table in tables if table]
    body += [
        *_buffer_field(2, np.ascontiguousarray(counts, "<i8")),
        *_buffer_field(3, np.ascontiguousarray(dims, "<i8")),
        *_bytes_field(4, vectors),
        *_varint_field(5, _WIRE_DTYPE[dtype]),
        *_bytes_field(6, found),
    ]
    return [_length_delimited(4, sum(len(piece) for piece in body)), *body]


def encode_lookup_response(
    model: str,
    results: Sequence[LookupResult],
    request_id: str = "",
    packed: PackedLookup | None = None,
    packed_dtype: np.dtype = FLOAT32,
) -> bytes:
    """The serialized LookupResponse: `results` as TableResults, `packed` (vectors of packed_dtype) as its
    PackedResult; vector bytes are copied once, into the reply."""
    pieces: list[bytes | memoryview] = [*_string_field(1, model)]
    for result in results:
        pieces.extend(_table_result(result))
    pieces.extend(_string_field(3, request_id))
    if packed is not None:
        found = [found.view(np.uint8) for found in packed.found]
        body = _packed_result(packed.tables, packed.counts, packed.dims, packed.vectors, found, packed_dtype)
        pieces.extend(cast(list[bytes | memoryview], body))  # no Hole: every piece was given
    return b"".join(pieces)


@dataclass(frozen=True)
class PackedReplyLayout:
    """A LookupResponse holding only a PackedResult, laid out before its lookup: `size` bytes in all, the
    vectors of every segment end to end at [vectors_at, vectors_at + vector_bytes), one found flag per key
    at [found_at, found_at + keys). write_frame() writes everything else; the reply is then byte-identical
    to encode_lookup_response's for the same results."""

    size: int
    vectors_at: int
    vector_bytes: int
    found_at: int
    keys: int
    _pieces: tuple[Piece, ...]

    @classmethod
    def of(
        cls, model: str, request_id: str, tables: Sequence[str], counts: np.ndarray, dims: np.ndarray, dtype: np.dtype
    ) -> PackedReplyLayout:
        keys = int(np.sum(counts))
        vectors, found = Hole(int(np.dot(counts, dims)) * dtype.itemsize), Hole(keys)
        pieces = (
            *_string_field(1, model),
            *_string_field(3, request_id),
            *_packed_result(tables, counts, dims, [vectors], [found], dtype),
        )
        at = vectors_at = found_at = 0
        for piece in pieces:
            if piece is vectors:
                vectors_at = at
            elif piece is found:
                found_at = at
            at += len(piece)
        return cls(at, vectors_at, vectors.size, found_at, keys, pieces)

    def write_frame(self, buffer: np.ndarray) -> None:
        """Writes the reply's bytes other than vectors and found flags into `buffer` (uint8, `size` long)."""
        at = 0
        for piece in self._pieces:
            if not isinstance(piece, Hole):
                buffer[at : at + len(piece)] = np.frombuffer(piece, np.uint8)
            at += len(piece)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("LookupResponse: truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, start: int, end: int):  # type: ignore[no-untyped-def]
    """Yields (field, wire_type, value or (offset, length)) for each field in data[start:end]."""
    pos = start
    while pos < end:
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
            yield field, wire_type, value
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _read_varint(data, pos)
            if pos + length > end:
                raise ValueError("LookupResponse: field runs past the end of its message")
            yield field, wire_type, (pos, length)
            pos += length
        elif wire_type in (_FIXED64, _FIXED32):
            pos += 8 if wire_type == _FIXED64 else 4
        else:
            raise ValueError(f"LookupResponse: unsupported wire type {wire_type}")
    if pos != end:
        raise ValueError("LookupResponse: truncated field")


def _numpy_dtype(dtype: int) -> np.dtype:
    wire_dtype = WIRE_NUMPY.get(dtype)
    if wire_dtype is None:
        raise ValueError(f"LookupResponse: unknown vector dtype {dtype}")
    return wire_dtype


def _read_table_result(data: bytes, start: int, end: int) -> LookupResult:
    table, rows, dim, dtype = "", 0, 0, 0
    vectors_at = found_at = (start, 0)
    for field, wire_type, value in _fields(data, start, end):
        if wire_type == _LENGTH_DELIMITED:
            if field == 1:
                table = data[value[0] : value[0] + value[1]].decode()
            elif field == 2:
                vectors_at = value
            elif field == 6:
                found_at = value
        elif wire_type == _VARINT:
            if field == 3:
                rows = value
            elif field == 4:
                dim = value
            elif field == 5:
                dtype = value
    wire_dtype = _numpy_dtype(dtype)
    if vectors_at[1] != rows * dim * wire_dtype.itemsize:
        raise ValueError(f"LookupResponse: table {table!r} has {vectors_at[1]} vector bytes for {rows} x {dim}")
    vectors = np.frombuffer(data, wire_dtype, rows * dim, vectors_at[0]).reshape(rows, dim)
    found = np.frombuffer(data, np.bool_, found_at[1], found_at[0])
    return LookupResult(table, vectors, found)


def _read_packed_result(data: bytes, start: int, end: int) -> list[LookupResult]:
    tables: list[str] = []
    dtype = 0
    counts_at = dims_at = vectors_at = found_at = (start, 0)
    for field, wire_type, value in _fields(data, start, end):
        if wire_type == _LENGTH_DELIMITED:
            if field == 1:
                tables.append(data[value[0] : value[0] + value[1]].decode())
            elif field == 2:
                counts_at = value
            elif field == 3:
                dims_at = value
            elif field == 4:
                vectors_at = value
            elif field == 6:
                found_at = value
        elif wire_type == _VARINT and field == 5:
            dtype = value
    wire_dtype = _numpy_dtype(dtype)
    counts = np.frombuffer(data, "<i8", counts_at[1] // 8, counts_at[0])
    dims = np.frombuffer(data, "<i8", dims_at[1] // 8, dims_at[0])
    if not len(counts) == len(dims) == len(tables):
        raise ValueError(
            f"LookupResponse: packed result has {len(tables)} tables, {len(counts)} counts, {len(dims)} dims"
        )
    sizes = counts * dims
    if int(sizes.sum()) * wire_dtype.itemsize != vectors_at[1] or int(counts.sum()) != found_at[1]:
        raise ValueError("LookupResponse: packed result's vector or found bytes do not match its counts and dims")
    vector_starts = np.concatenate(([0], np.cumsum(sizes))).tolist()
    found_starts = np.concatenate(([0], np.cumsum(counts))).tolist()
    vectors = np.frombuffer(data, wire_dtype, vectors_at[1] // wire_dtype.itemsize, vectors_at[0])
    found = np.frombuffer(data, np.bool_, found_at[1], found_at[0])
    return [
        LookupResult(
            table,
            vectors[vector_starts[i] : vector_starts[i + 1]].reshape(-1, dim),
            found[found_starts[i] : found_starts[i + 1]],
        )
        for i, (table, dim) in enumerate(zip(tables, dims.tolist(), strict=True))
    ]


def decode_lookup_response(data: bytes) -> tuple[str, list[LookupResult], str]:
    """(model, results, request_id) with arrays viewing `data` (read-only, no copy); a PackedResult's
    segments follow the TableResults, in order."""
    model, request_id, results, packed = "", "", [], []
    for field, wire_type, value in _fields(data, 0, len(data)):
        if wire_type != _LENGTH_DELIMITED:
            continue
        offset, length = value
        if field == 1:
            model = data[offset : offset + length].decode()
        elif field == 2:
            results.append(_read_table_result(data, offset, offset + length))
        elif field == 3:
            request_id = data[offset : offset + length].decode()
        elif field == 4:
            packed = _read_packed_result(data, offset, offset + length)
    return model, results + packed, request_id
