"""response_codec against the generated protobuf code: byte-identical encoding, equal decoding."""

from __future__ import annotations

import numpy as np
import pytest

from hps_wire._proto import hps_pb2
from hps_wire.response_codec import (
    LookupResult,
    PackedLookup,
    PackedReplyLayout,
    decode_lookup_response,
    encode_lookup_response,
)


def _results(rng: np.random.Generator) -> list[LookupResult]:
    return [
        LookupResult("user", rng.standard_normal((300, 16), dtype=np.float32), rng.random(300) < 0.5),
        LookupResult("item", rng.standard_normal((2, 3)).astype("<f2"), np.array([True, False])),
        LookupResult("empty", np.zeros((0, 8), np.float32), np.zeros(0, bool)),
        LookupResult("ünïcode", np.ones((1, 200), np.float32), np.ones(1, bool)),
    ]


def _message(model: str, results: list[LookupResult], request_id: str) -> hps_pb2.LookupResponse:
    return hps_pb2.LookupResponse(
        model=model,
        request_id=request_id,
        results=[
            hps_pb2.TableResult(
                table=r.table,
                vectors=r.vectors.tobytes(),
                rows=r.vectors.shape[0],
                dim=r.vectors.shape[1],
                dtype=hps_pb2.VECTOR_DTYPE_FLOAT16 if r.vectors.dtype == np.float16 else hps_pb2.VECTOR_DTYPE_FLOAT32,
                found=r.found.astype(np.uint8).tobytes(),
            )
            for r in results
        ],
    )


@pytest.mark.parametrize(("model", "request_id"), [("ctr", "req-7"), ("", ""), ("m" * 300, "x")])
def test_encoding_is_byte_identical_to_protobuf(model: str, request_id: str) -> None:
    results = _results(np.random.default_rng(1))
    encoded = encode_lookup_response(model, results, request_id)
    assert encoded == _message(model, results, request_id).SerializeToString(deterministic=True)


def test_decoding_gives_the_arrays_protobuf_holds() -> None:
    results = _results(np.random.default_rng(2))
    message = _message("ctr", results, "r1")
    model, decoded, request_id = decode_lookup_response(message.SerializeToString())
    assert (model, request_id) == ("ctr", "r1")
    assert [d.table for d in decoded] == [r.table for r in results]
    for got, want in zip(decoded, results, strict=True):
        assert got.vectors.dtype == want.vectors.dtype
        np.testing.assert_array_equal(got.vectors, want.vectors)
        np.testing.assert_array_equal(got.found, want.found)


def test_decoding_skips_unknown_fields_and_reads_defaults() -> None:
    message = hps_pb2.LookupResponse(results=[hps_pb2.TableResult(table="t")])
    data = message.SerializeToString() + bytes([0x78, 0x05]) + bytes([0x81, 0x01]) + bytes(8)  # fields 15 and 16
    model, decoded, _ = decode_lookup_response(data)
    assert model == ""
    assert decoded[0].vectors.shape == (0, 0) and decoded[0].found.shape == (0,)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes([0x12, 0x05, 0x0A]), "runs past the end"),
        (bytes([0x12]), "truncated varint"),
        (
            hps_pb2.LookupResponse(results=[hps_pb2.TableResult(rows=2, dim=2, vectors=b"\0" * 4)]).SerializeToString(),
            "4 vector bytes for 2 x 2",
        ),
        (hps_pb2.LookupResponse(results=[hps_pb2.TableResult(dtype=7)]).SerializeToString(), "unknown vector dtype"),
    ],
)
def test_malformed_replies_raise(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_lookup_response(data)


def _packed_message(segments: list[LookupResult], dtype: int) -> hps_pb2.PackedResult:
    return hps_pb2.PackedResult(
        tables=[s.table for s in segments],
        counts=np.array([len(s.found) for s in segments], "<i8").tobytes(),
        dims=np.array([s.vectors.shape[1] for s in segments], "<i8").tobytes(),
        vectors=b"".join(s.vectors.tobytes() for s in segments),
        dtype=dtype,
        found=b"".join(s.found.astype(np.uint8).tobytes() for s in segments),
    )


@pytest.mark.parametrize("dtype", ["<f4", "<f2"])
def test_packed_results_are_byte_identical_to_protobuf_and_decode_to_views(dtype: str) -> None:
    rng = np.random.default_rng(3)
    segments = [
        LookupResult(f"t{i}", rng.standard_normal((n, dim)).astype(dtype), rng.random(n) < 0.5)
        for i, (n, dim) in enumerate([(32, 128), (0, 128), (5, 16), (32, 128)])
    ]
    plain = _results(rng)[:2]
    wire_dtype = hps_pb2.VECTOR_DTYPE_FLOAT16 if dtype == "<f2" else hps_pb2.VECTOR_DTYPE_FLOAT32
    packed = PackedLookup(
        [s.table for s in segments],
        np.array([len(s.found) for s in segments]),
        np.array([s.vectors.shape[1] for s in segments]),
        [s.vectors for s in segments],
        [s.found for s in segments],
    )
    encoded = encode_lookup_response("ctr", plain, "r", packed, np.dtype(dtype))
    message = _message("ctr", plain, "r")
    message.packed.CopyFrom(_packed_message(segments, wire_dtype))
    assert encoded == message.SerializeToString(deterministic=True)
    _, decoded, _ = decode_lookup_response(encoded)
    assert [d.table for d in decoded] == [*(p.table for p in plain), *(s.table for s in segments)]
    for got, want in zip(decoded[2:], segments, strict=True):
        assert got.vectors.dtype == np.dtype(dtype) and got.vectors.shape == want.vectors.shape
        np.testing.assert_array_equal(got.vectors, want.vectors)
        np.testing.assert_array_equal(got.found, want.found)


@pytest.mark.parametrize("dtype", ["<f4", "<f2"])
@pytest.mark.parametrize("request_id", ["", "req-7"])
def test_a_reply_laid_out_before_its_lookup_is_byte_identical_once_filled(dtype: str, request_id: str) -> None:
    rng = np.random.default_rng(4)
    shapes = [(300, 128), (0, 16), (7, 16), (1000, 8)]
    segments = [
        LookupResult(f"table-{i}", rng.standard_normal((n, dim)).astype(dtype), rng.random(n) < 0.7)
        for i, (n, dim) in enumerate(shapes)
    ]
    counts, dims = np.array([n for n, _ in shapes]), np.array([dim for _, dim in shapes])
    layout = PackedReplyLayout.of("ctr", request_id, [s.table for s in segments], counts, dims, np.dtype(dtype))
    buffer = np.full(layout.size, 0xAB, np.uint8)  # whatever a reused buffer held before
    layout.write_frame(buffer)
    buffer[layout.vectors_at : layout.vectors_at + layout.vector_bytes] = np.concatenate(
        [s.vectors.ravel() for s in segments]
    ).view(np.uint8)
    buffer[layout.found_at : layout.found_at + layout.keys] = np.concatenate([s.found for s in segments])
    packed = PackedLookup([s.table for s in segments], counts, dims, [s.vectors for s in segments],
                          [s.found for s in segments])  # fmt: skip
    assert buffer.tobytes() == encode_lookup_response("ctr", [], request_id, packed, np.dtype(dtype))


def test_a_packed_result_whose_bytes_disagree_with_its_counts_is_refused() -> None:
    segment = LookupResult("t", np.ones((2, 4), np.float32), np.ones(2, bool))
    message = hps_pb2.LookupResponse()
    message.packed.CopyFrom(_packed_message([segment], hps_pb2.VECTOR_DTYPE_FLOAT32))
    message.packed.vectors = message.packed.vectors[:-4]
    with pytest.raises(ValueError, match="do not match its counts and dims"):
        decode_lookup_response(message.SerializeToString())
