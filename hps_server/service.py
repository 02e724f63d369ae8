"""gRPC servicers for hps.v1: decode and check requests, coalesce concurrent Lookups into one pass of the
models' sessions, encode the replies.

Every bad input becomes a status code with a message naming the field, before any level work; nothing here
touches a level directly, and no per-key Python runs (a packed request costs O(1) NumPy calls, a request of
TableQueries a few per query).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from hps_server.coalescing import Coalescer, QueueFullError
from hps_server.combiners import CombinerName, check_row_splits, clip_norms, combine
from hps_server.config import ServerConfig
from hps_server.log_limits import RateLimitedWarning
from hps_server.models import HostedModels
from hps_server.session import FLOAT32, KeyQuery, LookupSession, Outcome, ServedTable, TableLookup
from hps_server.storage.base import LevelUnavailableError, StorageError
from hps_server.streams import StreamGuard, StreamsFullError
from hps_wire._proto import hps_pb2, hps_pb2_grpc
from hps_wire.response_codec import WIRE_NUMPY, LookupResult, PackedLookup, encode_lookup_response

log = logging.getLogger(__name__)

WARN_INTERVAL_SECONDS = 30

_COMBINERS: dict[int, CombinerName] = {
    hps_pb2.COMBINER_SUM: "sum",
    hps_pb2.COMBINER_MEAN: "mean",
    hps_pb2.COMBINER_SQRTN: "sqrtn",
}


class RequestError(Exception):
    """A request the server refuses: carries the gRPC status code and the message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _packed(data: bytes, dtype: str, field: str) -> np.ndarray:
    width = np.dtype(dtype).itemsize
    if len(data) % width:
        raise _invalid(f"{field}: byte length {len(data)} is not a multiple of {width}")
    return np.frombuffer(data, dtype=dtype)


def decode_keys(keys: bytes, key_list: Sequence[int], field: str) -> np.ndarray:
    if keys and len(key_list):
        raise _invalid(f"{field}: set keys (packed bytes) or key_list, not both")
    if keys:
        return _packed(keys, "<i8", f"{field}.keys")
    return np.array(key_list, dtype=np.int64)


@dataclass(frozen=True)
class _Query:
    """One TableQuery, decoded and checked: its table resolved, its keys and reduction as arrays."""

    table: ServedTable
    keys: np.ndarray
    row_splits: np.ndarray
    weights: np.ndarray | None
    combiner: CombinerName | None
    max_norm: float


@dataclass(frozen=True)
class _Packed:
    """A PackedQuery, decoded and checked: its segments' tables and key counts, and the runs of segments
    that share a width and an L1 placement (one query of the pass each; one for a DLRM-shaped request)."""

    names: Sequence[str]
    counts: np.ndarray
    dims: np.ndarray
    runs: list[KeyQuery]


@dataclass(frozen=True)
class _Prepared:
    """A LookupRequest ready for a pass: nothing left in it can be refused for its content."""

    session: LookupSession
    wire_dtype: np.dtype
    queries: list[_Query]
    packed: _Packed | None
    prefetch: list[KeyQuery]

    def key_queries(self) -> list[KeyQuery]:
        """Its TableQueries, then its packed runs. Reductions need float32; plain queries get their reply
        dtype straight from the levels."""
        plain = [
            KeyQuery.of(q.table, q.keys, FLOAT32 if q.combiner or q.max_norm else self.wire_dtype) for q in self.queries
        ]
        return plain if self.packed is None else plain + self.packed.runs


class Lookups:
    """Request decoding, limits, batching and reply encoding shared by the unary and streaming Lookup."""

    def __init__(self, models: HostedModels, limits: ServerConfig | None = None) -> None:
        self.models = models
        self.limits = limits or ServerConfig()
        self.streams = StreamGuard(self.limits.streams_allowed, self.limits.stream_idle_seconds)
        self.coalescer: Coalescer[_Prepared, list[Outcome]] = Coalescer(
            self._pass,
            self.limits.batch_window_us / 1e6,
            self.limits.max_queued_requests,
            "server.max_queued_requests",
        )

    def session(self, model: str) -> LookupSession:
        try:
            return self.models.session(model)
        except KeyError as e:
            raise RequestError(grpc.StatusCode.NOT_FOUND, e.args[0]) from None

    def table(self, session: LookupSession, name: str) -> ServedTable:
        try:
            return session.table(name)
        except KeyError as e:
            raise RequestError(grpc.StatusCode.NOT_FOUND, e.args[0]) from None

    def answer(self, request: hps_pb2.LookupRequest) -> bytes:
        """The serialized LookupResponse (see response_codec: vectors are copied once, into the reply)."""
        _parsed(request)
        prepared = self.prepare(request)
        try:
            outcomes = self.coalescer.submit(prepared)
        except QueueFullError as e:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        for outcome in outcomes:
            if isinstance(outcome, StorageError):
                raise outcome
        if prepared.prefetch:
            prepared.session.prefetch(prepared.prefetch)
        results = []
        for query, outcome in zip(prepared.queries, outcomes, strict=False):  # the packed runs follow
            assert isinstance(outcome, TableLookup)
            vectors = outcome.vectors
            if query.max_norm:
                vectors = clip_norms(vectors, query.max_norm)
            if query.combiner is not None:
                vectors = combine(vectors, query.row_splits, query.combiner, query.weights)
            vectors = vectors.astype(prepared.wire_dtype, copy=False)
            results.append(LookupResult(query.table.name, vectors, outcome.found))
        packed = prepared.packed
        if packed is None:
            return encode_lookup_response(request.model, results, request.request_id)
        runs = [outcome for outcome in outcomes[len(results) :] if isinstance(outcome, TableLookup)]
        reply = PackedLookup(
            packed.names, packed.counts, packed.dims, [r.vectors for r in runs], [r.found for r in runs]
        )
        return encode_lookup_response(request.model, results, request.request_id, reply, prepared.wire_dtype)

    def prepare(self, request: hps_pb2.LookupRequest) -> _Prepared:
        """Decodes and checks every query, so a bad request costs no level work and fails alone."""
        self._admit(request)
        session = self.session(request.model)
        wire_dtype = WIRE_NUMPY.get(request.dtype)
        if wire_dtype is None:
            raise _invalid(f"dtype: unknown VectorDtype value {request.dtype}")
        queries = [self._decode(session, query, f"queries[{i}]") for i, query in enumerate(request.queries)]
        packed = self._decode_packed(session, request.packed, wire_dtype) if request.HasField("packed") else None
        prefetch = self.prefetch_queries(session, request.prefetch, "prefetch") if request.HasField("prefetch") else []
        rows_by_dim = sum((len(q.row_splits) - 1 if q.combiner else len(q.keys)) * q.table.dim for q in queries)
        if packed is not None:
            rows_by_dim += int(np.dot(packed.counts, packed.dims))
        reply_bytes = rows_by_dim * wire_dtype.itemsize
        limit = self.limits.max_message_mb * 1024 * 1024
        if reply_bytes > limit:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request: its reply would hold {reply_bytes / 2**20:.1f} MiB of vectors, over server.max_message_mb "
                f"{self.limits.max_message_mb} (ask for fewer keys per request, or float16)",
            )
        return _Prepared(session, wire_dtype, queries, packed, prefetch)

    def _admit(self, request: hps_pb2.LookupRequest) -> None:
        """Refuses a request over the per-request limits from its declared sizes, before decoding any query."""
        queries = len(request.queries) + len(request.packed.tables)
        if queries > self.limits.max_queries_per_request:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request: {queries} table queries exceed server.max_queries_per_request "
                f"{self.limits.max_queries_per_request}",
            )
        keys = len(request.packed.keys) // 8 + sum(len(q.keys) // 8 + len(q.key_list) for q in request.queries)
        if keys > self.limits.max_keys_per_request:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request: {keys} keys exceed server.max_keys_per_request {self.limits.max_keys_per_request}",
            )

    def prefetch_queries(self, session: LookupSession, packed: hps_pb2.PackedQuery, field: str) -> list[KeyQuery]:
        """The keys of a prefetch, checked like a Lookup's packed keys (field names the request field)."""
        keys = len(packed.keys) // 8
        if keys > self.limits.max_keys_per_request:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{field}: {keys} keys exceed server.max_keys_per_request {self.limits.max_keys_per_request}",
            )
        if len(packed.tables) > self.limits.max_queries_per_request:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{field}: {len(packed.tables)} tables exceed server.max_queries_per_request "
                f"{self.limits.max_queries_per_request}",
            )
        return self._decode_packed(session, packed, FLOAT32, field).runs

    def write_keys(self, data: bytes) -> np.ndarray:
        """The keys of an Upsert or Delete, within server.max_keys_per_write."""
        keys = _packed(data, "<i8", "keys")
        if len(keys) > self.limits.max_keys_per_write:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"keys: {len(keys)} keys exceed server.max_keys_per_write {self.limits.max_keys_per_write}",
            )
        return keys

    def _decode_packed(
        self, session: LookupSession, packed: hps_pb2.PackedQuery, dtype: np.dtype, field: str = "packed"
    ) -> _Packed:
        keys = _packed(packed.keys, "<i8", f"{field}.keys")
        counts = _packed(packed.counts, "<i8", f"{field}.counts")
        if len(counts) != len(packed.tables):
            raise _invalid(f"{field}.counts: {len(counts)} counts for {len(packed.tables)} tables; give one per table")
        if len(counts) and int(counts.min()) < 0:
            raise _invalid(f"{field}.counts: must be >= 0")
        if int(counts.sum()) != len(keys):
            raise _invalid(f"{field}.counts: they sum to {int(counts.sum())}, but {field}.keys holds {len(keys)} keys")
        tables = [self.table(session, name) for name in packed.tables]
        limits = np.fromiter((session.model.max_keys(t.config) for t in tables), np.int64, len(tables))
        over = np.flatnonzero(counts > limits)
        if len(over):
            i = int(over[0])
            raise _too_many_keys(f"{field}.counts[{i}]", int(counts[i]), session, tables[i])
        # Consecutive segments of one width and placement go down as one query: a split only where that changes.
        groups = [table.group for table in tables]
        cuts = [i for i in range(1, len(tables)) if groups[i] != groups[i - 1]]
        bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
        runs = [
            KeyQuery(tuple(tables[a:b]), keys[bounds[a] : bounds[b]], counts[a:b], dtype)
            for a, b in itertools.pairwise([0, *cuts, len(tables)])
            if a < b
        ]
        dims = np.fromiter((table.dim for table in tables), np.int64, len(tables))
        return _Packed(packed.tables, counts, dims, runs)

    @staticmethod
    def _pass(batch: Sequence[_Prepared]) -> list[list[Outcome]]:
        """One pass for every request coalesced: each model's session answers all its queries at once."""
        by_session: dict[LookupSession, list[int]] = {}
        for i, prepared in enumerate(batch):
            by_session.setdefault(prepared.session, []).append(i)
        answers: list[list[Outcome]] = [[] for _ in batch]
        for session, members in by_session.items():
            queries = [batch[i].key_queries() for i in members]
            outcomes = iter(session.lookup_many([query for asked in queries for query in asked]))
            for i, asked in zip(members, queries, strict=True):
                answers[i] = [next(outcomes) for _ in asked]
        return answers

    def _decode(self, session: LookupSession, query: hps_pb2.TableQuery, field: str) -> _Query:
        table = self.table(session, query.table)
        keys = decode_keys(query.keys, query.key_list, field)
        if not 0 <= query.max_norm < math.inf:
            raise _invalid(f"{field}.max_norm: must be finite and >= 0 (0: no clipping), got {query.max_norm}")
        if len(keys) > session.model.max_keys(table.config):
            raise _too_many_keys(field, len(keys), session, table)
        if not query.row_splits:
            if query.combiner != hps_pb2.COMBINER_UNSPECIFIED:
                raise _invalid(f"{field}.combiner: needs row_splits (one offset per sample plus one)")
            if query.weights:
                raise _invalid(f"{field}.weights: only used with row_splits and a combiner")
            return _Query(table, keys, _NO_SPLITS, None, None, query.max_norm)
        combiner = _COMBINERS.get(query.combiner)
        if combiner is None:
            raise _invalid(f"{field}.combiner: row_splits needs a combiner (SUM, MEAN or SQRTN), got {query.combiner}")
        row_splits = _packed(query.row_splits, "<i8", f"{field}.row_splits")
        samples = len(row_splits) - 1
        if samples > session.model.max_batch_size:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{field}.row_splits: {samples} samples exceed max_batch_size {session.model.max_batch_size}",
            )
        weights = _packed(query.weights, "<f4", f"{field}.weights") if query.weights else None
        if weights is not None and len(weights) != len(keys):
            raise _invalid(f"{field}.weights: {len(weights)} weights for {len(keys)} keys; give one per key")
        if weights is not None and not np.all(np.isfinite(weights)):
            raise _invalid(f"{field}.weights: contains NaN or infinity")
        try:
            check_row_splits(row_splits, len(keys))
        except ValueError as e:
            raise _invalid(f"{field}.{e}") from None
        return _Query(table, keys, row_splits, weights, combiner, query.max_norm)


_NO_SPLITS = np.empty(0, np.int64)


def _too_many_keys(field: str, keys: int, session: LookupSession, table: ServedTable) -> RequestError:
    model = session.model
    return RequestError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{field}: {keys} keys for table {table.name} exceed the limit of {model.max_keys(table.config)} "
        f"(max_batch_size {model.max_batch_size} x max_keys_per_sample {table.config.max_keys_per_sample})",
    )


class _Malformed:
    """Stands for a request whose bytes do not parse as its message; the handler refuses it."""

    model = ""  # what the metrics interceptor reads of a request

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(message: Any) -> Callable[[bytes], object]:
    """A request deserializer that never raises: gRPC would answer a parse failure with INTERNAL and a
    traceback in the log per request; this hands the handler a _Malformed to refuse with INVALID_ARGUMENT."""
    name = message.DESCRIPTOR.full_name

    def parse(data: bytes) -> object:
        try:
            return message.FromString(data)
        except DecodeError:
            return _Malformed(name)

    return parse


_malformed_warning = RateLimitedWarning(log, WARN_INTERVAL_SECONDS)
_storage_failures = RateLimitedWarning(log, WARN_INTERVAL_SECONDS)


def _parsed(request: object) -> None:
    """Refuses a request whose bytes did not parse (logged at most once per interval, with a count)."""
    if isinstance(request, _Malformed):
        _malformed_warning.warn("refused malformed requests (not valid %s messages)", request.message)
        raise _invalid(f"request: not a valid {request.message} message")


def _abort(context: grpc.ServicerContext, error: RequestError) -> NoReturn:
    context.abort(error.code, error.message)
    raise AssertionError("unreachable: context.abort raises")


def _guarded(context: grpc.ServicerContext, call: str, work):  # type: ignore[no-untyped-def]
    """Runs `work`, turning refusals and failures into a status with a message."""
    try:
        return work()
    except RequestError as e:
        _abort(context, e)
    except ValueError as e:
        _abort(context, _invalid(str(e)))
    except LevelUnavailableError as e:
        # The level a reply cannot do without is down: the call is safe to retry.
        _abort(context, RequestError(grpc.StatusCode.UNAVAILABLE, str(e)))
    except StorageError as e:
        _storage_failures.warn("%s failed in a storage level: %s", call, e)
        _abort(context, RequestError(grpc.StatusCode.INTERNAL, f"storage error: {e}"))


class LookupServicer(hps_pb2_grpc.LookupServiceServicer):
    def __init__(self, lookups: Lookups) -> None:
        self.lookups = lookups

    def Lookup(self, request: hps_pb2.LookupRequest, context: grpc.ServicerContext) -> bytes:
        return _guarded(context, "Lookup", lambda: self.lookups.answer(request))

    def StreamLookup(
        self, request_iterator: Iterator[hps_pb2.LookupRequest], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        # A refused request ends the stream with its status; replies already sent stand.
        try:
            with self.lookups.streams.opened(context) as stream:
                for request in request_iterator:
                    StreamGuard.touch(stream)
                    yield _guarded(context, "StreamLookup", lambda request=request: self.lookups.answer(request))
        except StreamsFullError as e:
            _abort(context, RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)))

    def Upsert(self, request: hps_pb2.UpsertRequest, context: grpc.ServicerContext) -> hps_pb2.UpsertResponse:
        def work() -> hps_pb2.UpsertResponse:
            _parsed(request)
            session = self.lookups.session(request.model)
            table = self.lookups.table(session, request.table)
            keys = self.lookups.write_keys(request.keys)
            vectors = _packed(request.vectors, "<f4", "vectors")
            if len(vectors) != len(keys) * table.dim:
                raise _invalid(
                    f"vectors: {len(vectors)} floats for {len(keys)} keys of dim {table.dim}; "
                    f"expected {len(keys) * table.dim}"
                )
            if not np.all(np.isfinite(vectors)):
                raise _invalid("vectors: contains NaN or infinity")
            try:
                rows = session.upsert(table.name, keys, vectors.reshape(len(keys), table.dim))
            except PermissionError as e:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
            return hps_pb2.UpsertResponse(rows=rows)

        return _guarded(context, "Upsert", work)

    def Delete(self, request: hps_pb2.DeleteRequest, context: grpc.ServicerContext) -> hps_pb2.DeleteResponse:
        def work() -> hps_pb2.DeleteResponse:
            _parsed(request)
            session = self.lookups.session(request.model)
            table = self.lookups.table(session, request.table)
            keys = self.lookups.write_keys(request.keys)
            try:
                return hps_pb2.DeleteResponse(rows=session.delete(table.name, keys))
            except PermissionError as e:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None

        return _guarded(context, "Delete", work)

    def Prefetch(self, request: hps_pb2.PrefetchRequest, context: grpc.ServicerContext) -> hps_pb2.PrefetchResponse:
        def work() -> hps_pb2.PrefetchResponse:
            _parsed(request)
            session = self.lookups.session(request.model)
            queries = self.lookups.prefetch_queries(session, request.packed, "packed")
            taken = session.prefetch(queries)
            return hps_pb2.PrefetchResponse(keys=sum(len(q.keys) for q in queries) if taken else 0)

        return _guarded(context, "Prefetch", work)


def service_handlers(lookups: Lookups) -> tuple[grpc.GenericRpcHandler, ...]:
    """Both services' handlers. Requests are parsed by _tolerant (a malformed one is INVALID_ARGUMENT);
    Lookup and StreamLookup send the bytes response_codec already encoded."""
    servicer, models = LookupServicer(lookups), ModelServicer(lookups)

    def method(
        kind: Callable[..., grpc.RpcMethodHandler],
        behaviour: Callable[..., object],
        request: type,
        response: type | None,
    ) -> grpc.RpcMethodHandler:
        return kind(
            behaviour,
            request_deserializer=_tolerant(request),
            response_serializer=None if response is None else response.SerializeToString,  # type: ignore[attr-defined]
        )

    unary = grpc.unary_unary_rpc_method_handler
    lookup_service = grpc.method_handlers_generic_handler(
        hps_pb2.DESCRIPTOR.services_by_name["LookupService"].full_name,
        {
            "Lookup": method(unary, servicer.Lookup, hps_pb2.LookupRequest, None),
            "StreamLookup": method(
                grpc.stream_stream_rpc_method_handler, servicer.StreamLookup, hps_pb2.LookupRequest, None
            ),
            "Upsert": method(unary, servicer.Upsert, hps_pb2.UpsertRequest, hps_pb2.UpsertResponse),
            "Delete": method(unary, servicer.Delete, hps_pb2.DeleteRequest, hps_pb2.DeleteResponse),
            "Prefetch": method(unary, servicer.Prefetch, hps_pb2.PrefetchRequest, hps_pb2.PrefetchResponse),
        },
    )
    model_service = grpc.method_handlers_generic_handler(
        hps_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
        {
            "ListModels": method(unary, models.ListModels, hps_pb2.ListModelsRequest, hps_pb2.ListModelsResponse),
            "DescribeModel": method(
                unary, models.DescribeModel, hps_pb2.DescribeModelRequest, hps_pb2.DescribeModelResponse
            ),
        },
    )
    return lookup_service, model_service


class ModelServicer(hps_pb2_grpc.ModelServiceServicer):
    def __init__(self, lookups: Lookups) -> None:
        self.lookups = lookups

    def ListModels(
        self, request: hps_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> hps_pb2.ListModelsResponse:
        def work() -> hps_pb2.ListModelsResponse:
            _parsed(request)
            return hps_pb2.ListModelsResponse(models=sorted(self.lookups.models.sessions))

        return _guarded(context, "ListModels", work)

    def DescribeModel(
        self, request: hps_pb2.DescribeModelRequest, context: grpc.ServicerContext
    ) -> hps_pb2.DescribeModelResponse:
        def work() -> hps_pb2.DescribeModelResponse:
            _parsed(request)
            session = self.lookups.session(request.model)
            return hps_pb2.DescribeModelResponse(
                model=session.name,
                tables=[
                    hps_pb2.TableInfo(
                        name=table.name,
                        dim=table.dim,
                        rows=session.rows(table.name),
                        default_value=table.default_value,
                        max_keys_per_request=session.model.max_keys(table),
                    )
                    for table in session.model.tables
                ],
                levels=session.level_names(),
            )

        return _guarded(context, "DescribeModel", work)
