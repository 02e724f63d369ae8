"""gRPC servicers for hps.v1: decode and check requests, coalesce concurrent Lookups into one pass of the
models' sessions (a reply large enough for a reply buffer is laid out first and its request walks alone,
writing its vectors in place), encode the replies; the model admin calls (behind one gate, ModelServicer._admin).

Every bad input becomes a status code with a message naming the field, before any level work; nothing here
touches a level directly, and no per-key Python runs (a packed request costs O(1) NumPy calls, a request of
TableQueries a few per query).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np

from hps_server import malformed
from hps_server.admission import AdmissionPool, bounded
from hps_server.auth import Authorizer, AuthRefusedError, Caller
from hps_server.coalescing import Coalescer, QueueFullError
from hps_server.combiners import CombinerName, check_row_splits, clip_norms, combine
from hps_server.config import ConfigError, ModelConfig, ServerConfig, parse_model, shown
from hps_server.config import version as version_str
from hps_server.handover import ModelChangingError
from hps_server.log_limits import RateLimitedWarning
from hps_server.metrics import name_call_model
from hps_server.models import HostedModels, ModelExistsError, VersionMissingError
from hps_server.reply_buffers import ReplyBuffers
from hps_server.session import FLOAT32, KeyQuery, LookupSession, Outcome, ServedTable, TableLookup
from hps_server.storage.base import LevelUnavailableError, StorageError
from hps_server.streams import StreamGuard, StreamsFullError
from hps_server.tables import TableFileError
from hps_wire._proto import hps_pb2, hps_pb2_grpc
from hps_wire.response_codec import (
    WIRE_NUMPY,
    LookupResult,
    PackedLookup,
    PackedReplyLayout,
    encode_lookup_response,
)

log = logging.getLogger(__name__)
# Bytes a reply spends per table result (and once per reply) on fields and framing beside its arrays: a bound,
# names included (each at most a few hundred bytes).
REPLY_FRAMING_BYTES = 512

T = TypeVar("T")

WARN_INTERVAL_SECONDS = 30
# Packed table lists a Lookups keeps resolved per session (distinct lists its clients send).
SPLITS_KEPT = 256

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
class _TableSplit:
    """A packed query's tables as one session serves them: each one's key limit and width, and the runs of
    consecutive tables of one width and L1 placement ([a, b) ranges), each of which goes down as one query
    (one for a DLRM-shaped request)."""

    tables: tuple[ServedTable, ...]
    limits: np.ndarray
    dims: np.ndarray
    runs: list[tuple[int, int]]

    @classmethod
    def of(cls, session: LookupSession, tables: Sequence[ServedTable]) -> _TableSplit:
        limits = np.fromiter((session.model.max_keys(t.config) for t in tables), np.int64, len(tables))
        dims = np.fromiter((table.dim for table in tables), np.int64, len(tables))
        groups = [table.group for table in tables]
        cuts = [i for i in range(1, len(tables)) if groups[i] != groups[i - 1]]
        runs = [(a, b) for a, b in itertools.pairwise([0, *cuts, len(tables)]) if a < b]
        return cls(tuple(tables), limits, dims, runs)


@dataclass(frozen=True)
class _Packed:
    """A PackedQuery, decoded and checked: its segments' tables and key counts, and the runs of segments
    that share a width and an L1 placement (one query of the pass each; one for a DLRM-shaped request)."""

    names: Sequence[str]
    counts: np.ndarray
    dims: np.ndarray
    runs: list[KeyQuery]


@dataclass(frozen=True)
class _Reply:
    """A reply laid out in a reply buffer before its lookup (reply_buffers.py, PackedReplyLayout): the
    packed runs' vectors are written into it by the request's own pass, their found flags once it is done."""

    data: bytes
    found: np.ndarray  # the reply's found flags, all segments end to end

    def filled(self, runs: Sequence[TableLookup]) -> bytes:
        at = 0
        for run in runs:
            self.found[at : at + len(run.found)] = run.found
            at += len(run.found)
        return self.data


@dataclass(frozen=True)
class _Prepared:
    """A LookupRequest ready for a pass: nothing left in it can be refused for its content."""

    session: LookupSession
    wire_dtype: np.dtype
    queries: list[_Query]
    packed: _Packed | None
    prefetch: list[KeyQuery]
    reply: _Reply | None = None

    def key_queries(self) -> list[KeyQuery]:
        """Its TableQueries, then its packed runs. Reductions need float32; plain queries get their reply
        dtype straight from the levels."""
        plain = [
            KeyQuery.of(q.table, q.keys, FLOAT32 if q.combiner or q.max_norm else self.wire_dtype) for q in self.queries
        ]
        return plain if self.packed is None else plain + self.packed.runs


class Lookups:
    """Request decoding, limits, batching and reply encoding shared by the unary and streaming Lookup."""

    def __init__(
        self, models: HostedModels, limits: ServerConfig | None = None, authorizer: Authorizer | None = None
    ) -> None:
        self.models = models
        self.limits = limits or ServerConfig()
        self.authorizer = authorizer or Authorizer(None)
        self.streams = StreamGuard(self.limits.streams_allowed, self.limits.stream_idle_seconds)
        self.coalescer: Coalescer[_Prepared, list[Outcome]] = Coalescer(
            self._pass,
            self.limits.batch_window_us / 1e6,
            self.limits.max_queued_requests,
            "server.max_queued_requests",
        )
        self.replies = ReplyBuffers()
        self._splits: weakref.WeakKeyDictionary[LookupSession, dict[tuple[str, ...], _TableSplit]] = (
            weakref.WeakKeyDictionary()
        )

    def caller(self, context: grpc.ServicerContext) -> Caller:
        """Who makes this call: AuthRefusedError (UNAUTHENTICATED) when its credentials are missing or bad. A
        handler then checks what it needs, `caller.require("admin", model)`, before touching anything; inside
        _guarded a refusal becomes the call's status (PERMISSION_DENIED)."""
        return self.authorizer.identify(context)

    @contextlib.contextmanager
    def serving(self, model: str, caller: Caller, write: bool = False) -> Iterator[LookupSession]:
        """The model's session for one request, held to its end (one table version per reply); NOT_FOUND for
        a model not hosted (naming the hosted models `caller` may read), and for a write UNAVAILABLE while
        the model changes."""
        with contextlib.ExitStack() as held:
            try:
                session = held.enter_context(self.models.writing(model) if write else self.models.serving(model))
            except KeyError:
                message = self.models.not_hosted(model, functools.partial(caller.allows, "read"))
                raise RequestError(grpc.StatusCode.NOT_FOUND, message) from None
            except ModelChangingError as e:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
            yield session

    def table(self, session: LookupSession, name: str) -> ServedTable:
        try:
            return session.table(name)
        except KeyError as e:
            raise RequestError(grpc.StatusCode.NOT_FOUND, e.args[0]) from None

    def answer(self, request: hps_pb2.LookupRequest, caller: Caller) -> bytes:
        """The serialized LookupResponse (see response_codec: vectors are copied once, into the reply). The
        caller's read permission on the model is checked once, before admission and any decoding."""
        _parsed(request)
        caller.require("read", request.model)
        self._admit(request)
        with self.serving(request.model, caller) as session:
            prepared = self.prepare(request, session)
            if prepared.reply is not None:
                # Its own pass, in this thread: in a pass of several requests its vectors would be copied
                # into its reply once more, and batching a request this large saves little else.
                outcomes = self._pass([prepared])[0]
            else:
                try:
                    outcomes = self.coalescer.submit(prepared)
                except QueueFullError as e:
                    raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
            if prepared.prefetch and not any(isinstance(outcome, StorageError) for outcome in outcomes):
                session.prefetch(prepared.prefetch)
        for outcome in outcomes:
            if isinstance(outcome, StorageError):
                raise outcome
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
        if prepared.reply is not None:
            return prepared.reply.filled(runs)
        reply = PackedLookup(
            packed.names, packed.counts, packed.dims, [r.vectors for r in runs], [r.found for r in runs]
        )
        return encode_lookup_response(request.model, results, request.request_id, reply, prepared.wire_dtype)

    def prepare(self, request: hps_pb2.LookupRequest, session: LookupSession) -> _Prepared:
        """Decodes and checks every query of a request admitted for `session`, so a bad request costs no
        level work and fails alone."""
        wire_dtype = WIRE_NUMPY.get(request.dtype)
        if wire_dtype is None:
            raise _invalid(f"dtype: unknown VectorDtype value {request.dtype}")
        queries = [self._decode(session, query, f"queries[{i}]") for i, query in enumerate(request.queries)]
        packed = self._decode_packed(session, request.packed, wire_dtype) if request.HasField("packed") else None
        _check_repeated_tables(session, queries, packed)
        prefetch = self.prefetch_queries(session, request.prefetch, "prefetch") if request.HasField("prefetch") else []
        rows_by_dim = sum((len(q.row_splits) - 1 if q.combiner else len(q.keys)) * q.table.dim for q in queries)
        keys = sum(len(q.keys) for q in queries)
        segments = len(queries)
        if packed is not None:
            rows_by_dim += int(np.dot(packed.counts, packed.dims))
            keys, segments = keys + int(packed.counts.sum()), segments + len(packed.counts)
        reply_bytes = rows_by_dim * wire_dtype.itemsize
        # The whole message: vectors, one found byte per key, and the fields and framing around them.
        message_bytes = reply_bytes + keys + REPLY_FRAMING_BYTES * (1 + segments) + len(request.request_id.encode())
        limit = self.limits.max_message_mb * 1024 * 1024
        if message_bytes > limit:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request: its reply would take {message_bytes / 2**20:.2f} MiB ({reply_bytes / 2**20:.2f} MiB of "
                f"vectors), over server.max_message_mb {self.limits.max_message_mb} (ask for fewer keys per "
                "request, or float16)",
            )
        if packed is None or queries or reply_bytes < self.replies.min_bytes:
            return _Prepared(session, wire_dtype, queries, packed, prefetch)
        reply, packed = self._laid_out(request, session, packed, wire_dtype)
        return _Prepared(session, wire_dtype, queries, packed, prefetch, reply)

    def _laid_out(
        self, request: hps_pb2.LookupRequest, session: LookupSession, packed: _Packed, dtype: np.dtype
    ) -> tuple[_Reply | None, _Packed]:
        """A packed-only request's reply in a reply buffer, each run given its region of the vectors to fill;
        (None, packed) where the pool gives none (over its budget)."""
        layout = PackedReplyLayout.of(
            request.model, request.request_id, packed.names, packed.counts, packed.dims, dtype
        )
        taken = self.replies.take(layout.size, session.pin_host)
        if taken is None:
            return None, packed
        data, buffer = taken
        layout.write_frame(buffer)
        vectors = buffer[layout.vectors_at : layout.vectors_at + layout.vector_bytes]
        runs, at = [], 0
        for run in packed.runs:
            rows, dim = len(run.keys), run.tables[0].dim
            size = rows * dim * dtype.itemsize
            runs.append(replace(run, out=vectors[at : at + size].view(dtype).reshape(rows, dim)))
            at += size
        found = buffer[layout.found_at : layout.found_at + layout.keys].view(np.bool_)
        return _Reply(data, found), replace(packed, runs=runs)

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
        if len(counts) and int(counts.max()) > len(keys):  # and so their sum cannot wrap around
            i = int(counts.argmax())
            raise _invalid(f"{field}.counts[{i}]: {int(counts[i])} keys, but {field}.keys holds {len(keys)}")
        if int(counts.sum()) != len(keys):
            raise _invalid(f"{field}.counts: they sum to {int(counts.sum())}, but {field}.keys holds {len(keys)} keys")
        split = self._split_of(session, tuple(packed.tables))
        over = np.flatnonzero(counts > split.limits)
        if len(over):
            i = int(over[0])
            raise _too_many_keys(f"{field}.counts[{i}]", int(counts[i]), session, split.tables[i])
        if len(split.runs) == 1:
            runs = [KeyQuery(split.tables, keys, counts, dtype)]
        else:
            bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
            runs = [KeyQuery(split.tables[a:b], keys[bounds[a] : bounds[b]], counts[a:b], dtype) for a, b in split.runs]
        return _Packed(packed.tables, counts, split.dims, runs)

    def _split_of(self, session: LookupSession, names: tuple[str, ...]) -> _TableSplit:
        """A packed query's table list resolved for `session` (NOT_FOUND naming a table it lacks), kept per
        session for the next request naming the same list (the first SPLITS_KEPT lists seen; past them a
        list is resolved per request)."""
        kept = self._splits.setdefault(session, {})
        split = kept.get(names)
        if split is None:
            split = _TableSplit.of(session, [self.table(session, name) for name in names])
            if len(kept) < SPLITS_KEPT:
                kept[names] = split
        return split

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
            given = (
                "none" if query.combiner == hps_pb2.COMBINER_UNSPECIFIED else f"unknown Combiner value {query.combiner}"
            )
            raise _invalid(f"{field}.combiner: row_splits needs a combiner (SUM, MEAN or SQRTN), got {given}")
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


def _check_repeated_tables(session: LookupSession, queries: Sequence[_Query], packed: _Packed | None) -> None:
    """A table a request names more than once (several queries, a packed list repeating it) stays within its
    per-request limits in total: its keys within max_batch_size x max_keys_per_sample, its pooled samples
    within max_batch_size. Each query was checked alone as it was decoded."""
    names = [query.table.name for query in queries] + (list(packed.names) if packed is not None else [])
    if len(set(names)) == len(names):
        return
    keys: dict[str, int] = {}
    samples: dict[str, int] = {}
    for query in queries:
        keys[query.table.name] = keys.get(query.table.name, 0) + len(query.keys)
        if query.combiner is not None:
            samples[query.table.name] = samples.get(query.table.name, 0) + len(query.row_splits) - 1
    if packed is not None:
        for name, count in zip(packed.names, packed.counts.tolist(), strict=True):
            keys[name] = keys.get(name, 0) + count
    for name, total in keys.items():
        table = session.table(name)
        if total > session.model.max_keys(table.config):
            raise _too_many_keys(f"request (table {table.name} named {names.count(name)} times)", total, session, table)
    for name, total in samples.items():
        if total > session.model.max_batch_size:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request (table {name} named {names.count(name)} times): {total} pooled samples exceed "
                f"max_batch_size {session.model.max_batch_size}",
            )


def _too_many_keys(field: str, keys: int, session: LookupSession, table: ServedTable) -> RequestError:
    model = session.model
    return RequestError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{field}: {keys} keys for table {table.name} exceed the limit of {model.max_keys(table.config)} "
        f"(max_batch_size {model.max_batch_size} x max_keys_per_sample {table.config.max_keys_per_sample})",
    )


_storage_failures = RateLimitedWarning(log, WARN_INTERVAL_SECONDS)


def _parsed(request: object) -> None:
    """Refuses a request whose bytes did not parse (see malformed.py)."""
    refused = malformed.refusal(request)
    if refused is not None:
        raise _invalid(refused)


def _abort(context: grpc.ServicerContext, error: RequestError) -> NoReturn:
    context.abort(error.code, error.message)
    raise AssertionError("unreachable: context.abort raises")


def _guarded(context: grpc.ServicerContext, call: str, work):  # type: ignore[no-untyped-def]
    """Runs `work`, turning refusals and failures into a status with a message."""
    try:
        return work()
    except RequestError as e:
        _abort(context, e)
    except AuthRefusedError as e:
        _abort(context, RequestError(e.code, e.message))
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
        return _guarded(context, "Lookup", lambda: self.lookups.answer(request, self.lookups.caller(context)))

    def StreamLookup(
        self, request_iterator: Iterator[hps_pb2.LookupRequest], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        # A refused request ends the stream with its status; replies already sent stand. The caller is
        # identified before the stream opens and again for each request, against the grants of that moment, so
        # a token revoked while its stream is open ends it; each request's model is checked against its grant.
        _guarded(context, "StreamLookup", lambda: self.lookups.caller(context))
        try:
            with self.lookups.streams.opened(context) as stream:
                for request in request_iterator:
                    StreamGuard.touch(stream)
                    yield _guarded(
                        context,
                        "StreamLookup",
                        lambda request=request: self.lookups.answer(request, self.lookups.caller(context)),
                    )
        except StreamsFullError as e:
            _abort(context, RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)))

    def Upsert(self, request: hps_pb2.UpsertRequest, context: grpc.ServicerContext) -> hps_pb2.UpsertResponse:
        def work() -> hps_pb2.UpsertResponse:
            caller = self.lookups.caller(context)
            _parsed(request)
            caller.require("write", request.model)
            keys = self.lookups.write_keys(request.keys)
            vectors = _packed(request.vectors, "<f4", "vectors")
            if not np.all(np.isfinite(vectors)):
                raise _invalid("vectors: contains NaN or infinity")
            with self.lookups.serving(request.model, caller, write=True) as session:
                table = self.lookups.table(session, request.table)
                if len(vectors) != len(keys) * table.dim:
                    raise _invalid(
                        f"vectors: {len(vectors)} floats for {len(keys)} keys of dim {table.dim}; "
                        f"expected {len(keys) * table.dim}"
                    )
                try:
                    rows = session.upsert(table.name, keys, vectors.reshape(len(keys), table.dim))
                except PermissionError as e:
                    raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
            return hps_pb2.UpsertResponse(rows=rows)

        return _guarded(context, "Upsert", work)

    def Delete(self, request: hps_pb2.DeleteRequest, context: grpc.ServicerContext) -> hps_pb2.DeleteResponse:
        def work() -> hps_pb2.DeleteResponse:
            caller = self.lookups.caller(context)
            _parsed(request)
            caller.require("write", request.model)
            keys = self.lookups.write_keys(request.keys)
            with self.lookups.serving(request.model, caller, write=True) as session:
                table = self.lookups.table(session, request.table)
                try:
                    return hps_pb2.DeleteResponse(rows=session.delete(table.name, keys))
                except PermissionError as e:
                    raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None

        return _guarded(context, "Delete", work)

    def Prefetch(self, request: hps_pb2.PrefetchRequest, context: grpc.ServicerContext) -> hps_pb2.PrefetchResponse:
        def work() -> hps_pb2.PrefetchResponse:
            caller = self.lookups.caller(context)
            _parsed(request)
            caller.require("read", request.model)
            with self.lookups.serving(request.model, caller) as session:
                queries = self.lookups.prefetch_queries(session, request.packed, "packed")
                taken = session.prefetch(queries)
            return hps_pb2.PrefetchResponse(keys=sum(len(q.keys) for q in queries) if taken else 0)

        return _guarded(context, "Prefetch", work)


def service_handlers(
    lookups: Lookups, pool: AdmissionPool, model_pool: futures.Executor
) -> tuple[grpc.GenericRpcHandler, ...]:
    """Both services' handlers. Requests are parsed by malformed.tolerant (a malformed one is INVALID_ARGUMENT);
    Lookup and StreamLookup send the bytes response_codec already encoded. LookupService's calls run on
    `pool` (bounded queueing), ModelService's on `model_pool`, neither on the server's own with the health
    checks."""
    servicer, models = LookupServicer(lookups), ModelServicer(lookups)

    def method(
        kind: Callable[..., grpc.RpcMethodHandler],
        behaviour: Callable[..., object],
        request: type,
        response: type | None,
    ) -> grpc.RpcMethodHandler:
        return kind(
            behaviour,
            request_deserializer=malformed.tolerant(request),
            response_serializer=None if response is None else response.SerializeToString,  # type: ignore[attr-defined]
        )

    unary = grpc.unary_unary_rpc_method_handler
    lookup_service = grpc.method_handlers_generic_handler(
        hps_pb2.DESCRIPTOR.services_by_name["LookupService"].full_name,
        {
            "Lookup": method(unary, bounded(pool, servicer.Lookup), hps_pb2.LookupRequest, None),
            "StreamLookup": method(
                grpc.stream_stream_rpc_method_handler,
                bounded(pool, servicer.StreamLookup, streaming=True),
                hps_pb2.LookupRequest,
                None,
            ),
            "Upsert": method(unary, bounded(pool, servicer.Upsert), hps_pb2.UpsertRequest, hps_pb2.UpsertResponse),
            "Delete": method(unary, bounded(pool, servicer.Delete), hps_pb2.DeleteRequest, hps_pb2.DeleteResponse),
            "Prefetch": method(
                unary, bounded(pool, servicer.Prefetch), hps_pb2.PrefetchRequest, hps_pb2.PrefetchResponse
            ),
        },
    )

    def models_call(
        behaviour: Callable[[Any, grpc.ServicerContext], Any],
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        @functools.wraps(behaviour)
        def on_model_pool(request: Any, context: grpc.ServicerContext) -> Any:
            return behaviour(request, context)

        on_model_pool.experimental_thread_pool = model_pool  # type: ignore[attr-defined]  # read by grpc's server
        return on_model_pool

    model_service = grpc.method_handlers_generic_handler(
        hps_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
        {
            "ListModels": method(
                unary, models_call(models.ListModels), hps_pb2.ListModelsRequest, hps_pb2.ListModelsResponse
            ),
            "DescribeModel": method(
                unary, models_call(models.DescribeModel), hps_pb2.DescribeModelRequest, hps_pb2.DescribeModelResponse
            ),
            "LoadModel": method(
                unary, models_call(models.LoadModel), hps_pb2.LoadModelRequest, hps_pb2.LoadModelResponse
            ),
            "UnloadModel": method(
                unary, models_call(models.UnloadModel), hps_pb2.UnloadModelRequest, hps_pb2.UnloadModelResponse
            ),
            "ReloadModel": method(
                unary, models_call(models.ReloadModel), hps_pb2.ReloadModelRequest, hps_pb2.ReloadModelResponse
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
            caller = self.lookups.caller(context)
            _parsed(request)
            readable = [model for model in self.lookups.models.sessions if caller.allows("read", model)]
            return hps_pb2.ListModelsResponse(models=sorted(readable))

        return _guarded(context, "ListModels", work)

    def DescribeModel(
        self, request: hps_pb2.DescribeModelRequest, context: grpc.ServicerContext
    ) -> hps_pb2.DescribeModelResponse:
        def work() -> hps_pb2.DescribeModelResponse:
            caller = self.lookups.caller(context)
            _parsed(request)
            caller.require("read", request.model)
            with self.lookups.serving(request.model, caller) as session:
                return described(session)

        return _guarded(context, "DescribeModel", work)

    # ---------------------------------------------------------------- admin

    def LoadModel(self, request: hps_pb2.LoadModelRequest, context: grpc.ServicerContext) -> hps_pb2.LoadModelResponse:
        def work() -> hps_pb2.LoadModelResponse:
            caller = self.lookups.caller(context)
            _parsed(request)
            # Before the config is read: a server without admin calls, or a caller with no admin grant, reads none.
            self._admin_calls_on("LoadModel")
            caller.require_some("admin")
            model = self._model_config(request.model_config)
            name_call_model(model.name)  # its request has no `model` field to count the call under
            self._admin(caller, "LoadModel", model.name)
            session = self._changing(lambda: self.lookups.models.load(model))
            return hps_pb2.LoadModelResponse(model=described(session))

        return _guarded(context, "LoadModel", work)

    def UnloadModel(
        self, request: hps_pb2.UnloadModelRequest, context: grpc.ServicerContext
    ) -> hps_pb2.UnloadModelResponse:
        def work() -> hps_pb2.UnloadModelResponse:
            caller = self.lookups.caller(context)
            _parsed(request)
            self._admin(caller, "UnloadModel", request.model)
            self._changing(lambda: self.lookups.models.unload(request.model))
            return hps_pb2.UnloadModelResponse()

        return _guarded(context, "UnloadModel", work)

    def ReloadModel(
        self, request: hps_pb2.ReloadModelRequest, context: grpc.ServicerContext
    ) -> hps_pb2.ReloadModelResponse:
        def work() -> hps_pb2.ReloadModelResponse:
            caller = self.lookups.caller(context)
            _parsed(request)
            self._admin(caller, "ReloadModel", request.model)
            versions = {}
            for table, version in sorted(request.table_versions.items()):
                versions[table] = _version(version, f"table_versions[{shown(table)}]")
            version = _version(request.version, "version") if request.version else ""
            model = None
            if request.model_config:
                if version or versions:
                    raise _invalid("model_config: give it or version/table_versions, not both")
                model = self._model_config(request.model_config)
                if model.name != request.model:
                    raise _invalid(f"model_config: names model {model.name}, the request {shown(request.model)}")
            session = self._changing(lambda: self.lookups.models.reload(request.model, versions, version, model))
            return hps_pb2.ReloadModelResponse(model=described(session))

        return _guarded(context, "ReloadModel", work)

    def _admin(self, caller: Caller, method: str, model: str) -> None:
        """Refuses a model admin call the server is not set up to take, or the caller may not make (the
        admin permission on `model`, when tokens are configured). The one place admin calls are authorized."""
        self._admin_calls_on(method)
        caller.require("admin", model)

    def _admin_calls_on(self, method: str) -> None:
        limits = self.lookups.limits
        if not limits.admin:
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method}: model admin calls are off on this server; start it with server.admin: true to allow them",
            )
        if limits.processes > 1:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{method}: not available with server.processes {limits.processes} (each worker process serves "
                "its own copy of the models); change the config and restart, or serve with one process",
            )

    @staticmethod
    def _model_config(text: str) -> ModelConfig:
        try:
            return parse_model(text, Path.cwd(), "model_config")
        except ConfigError as e:
            raise _invalid(str(e)) from None

    @staticmethod
    def _changing(change: Callable[[], T]) -> T:
        """Runs a change of the model set, its refusals as status codes."""
        try:
            return change()
        except KeyError as e:
            raise RequestError(grpc.StatusCode.NOT_FOUND, e.args[0]) from None
        except ModelExistsError as e:
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS, str(e)) from None
        except (VersionMissingError, TableFileError) as e:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, _without_paths(e)) from None
        except LevelUnavailableError:
            raise  # UNAVAILABLE: a level the change needs is down, safe to retry
        except StorageError as e:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"storage: {e}") from None
        except MemoryError:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "not enough memory for the model's caches on this server"
            ) from None
        except OSError as e:  # its file name is a server path: only what failed goes to the client
            log.warning("a model change failed: %s", e.strerror or type(e).__name__)
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, f"the change failed: {e.strerror or type(e).__name__}"
            ) from None


def _version(text: str, field: str) -> str:
    try:
        return version_str(text, field)
    except ConfigError as e:
        raise _invalid(str(e)) from None


def _without_paths(error: Exception) -> str:
    """A model change's refusal for a client and the log: a table-file error names its file, not its path."""
    if isinstance(error, TableFileError):
        message = f"table files could not be read: {error.without_path()}"
        log.warning("a model change failed: %s", message)
        return message
    return str(error)


def described(session: LookupSession) -> hps_pb2.DescribeModelResponse:
    """What DescribeModel says of a session: its tables, levels and table versions."""
    model = session.model
    versions = {table.name: table.version for table in model.tables if table.version}
    shared = {table.version for table in model.tables}
    return hps_pb2.DescribeModelResponse(
        model=session.name,
        tables=[
            hps_pb2.TableInfo(
                name=table.name,
                dim=table.dim,
                rows=session.rows(table.name),
                default_value=table.default_value,
                max_keys_per_request=model.max_keys(table),
            )
            for table in model.tables
        ],
        levels=session.level_names(),
        writes_refused=session.write_refusal(),
        version=shared.pop() if len(shared) == 1 else "",
        table_versions=versions,
    )
