"""Sync and asyncio clients for an hps server: NumPy arrays in, NumPy arrays out.

Thin by design: requests are built and replies decoded by wire.py; gRPC errors become HpsError subclasses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from hps_client import wire
from hps_client.errors import from_rpc_error
from hps_client.wire import Combiner, Dtype
from hps_wire import security
from hps_wire._proto import hps_pb2, hps_pb2_grpc
from hps_wire.response_codec import LookupResult, decode_lookup_response
from hps_wire.security import TLS

DEFAULT_TIMEOUT = 30.0
MAX_MESSAGE_MB = 256
MAX_RECONNECT_BACKOFF_MS = 1000
LOOKUP_METHOD = "/hps.v1.LookupService/Lookup"


def _lookup_results(reply: bytes) -> list[LookupResult]:
    return decode_lookup_response(reply)[1]


@dataclass(frozen=True)
class TableInfo:
    name: str
    dim: int
    rows: int
    default_value: float
    max_keys_per_request: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    tables: tuple[TableInfo, ...]
    levels: tuple[str, ...]
    # Why Upsert and Delete are refused now (RocksDB failing its writes, server.read_only); "" while taken.
    writes_refused: str = ""
    # The version every table is served at ("" when unversioned or mixed), and each versioned table's.
    version: str = ""
    table_versions: Mapping[str, str] = field(default_factory=dict)


# The channels' gRPC service config. round_robin: a target naming several addresses (dns:/// of a headless
# Service) gets its calls spread over all of them, not only the first. Retries, by gRPC itself with backoff,
# on UNAVAILABLE (a replica restarting or draining, a level briefly down) and CANCELLED (a call that reached
# a server just as its shutdown began, before its GOAWAY reached the client: gRPC's server cancels those
# without running them) for the calls that change nothing: Lookup and the model service's reads.
# StreamLookup is left out (a stream that already got replies is not replayed). Upsert and Delete are not
# retried: a repeat of a write the server applied before failing could land after another client's newer
# write of the same keys and undo it, and a repeated Delete would report 0 rows; callers that know their
# writes are alone may retry them. Nor are the model admin calls (a repeated LoadModel that landed would
# answer ALREADY_EXISTS).
SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [
                {"service": "hps.v1.LookupService", "method": "Lookup"},
                {"service": "hps.v1.ModelService", "method": "ListModels"},
                {"service": "hps.v1.ModelService", "method": "DescribeModel"},
            ],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
            },
        }
    ],
}


def _channel_options(max_message_mb: int) -> list[tuple[str, Any]]:
    size = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        # gRPC's default backoff grows to 120 s: after a long outage a client would keep failing that
        # long after the server is back. A serving client finds it again within about a second (its calls
        # fail fast meanwhile: at 5 s, clients kept across a restart failed for 3.4 s after it served).
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        # Each client its own connections: gRPC otherwise shares one connection per address among a
        # process's channels, so a client made after its server restarted on the same address would
        # inherit an older client's failed connection and fail at once until that one's backoff ends.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def _model_info(response: hps_pb2.DescribeModelResponse) -> ModelInfo:
    return ModelInfo(
        name=response.model,
        tables=tuple(
            TableInfo(t.name, t.dim, t.rows, t.default_value, t.max_keys_per_request) for t in response.tables
        ),
        levels=tuple(response.levels),
        writes_refused=response.writes_refused,
        version=response.version,
        table_versions=dict(response.table_versions),
    )


def _model_config(model_config: str | Mapping[str, Any]) -> str:
    """A model entry for LoadModel/ReloadModel: YAML or JSON text as given, a mapping as JSON."""
    return model_config if isinstance(model_config, str) else json.dumps(model_config, default=str)


def _reload_request(
    model: str, version: str, table_versions: Mapping[str, str] | None, model_config: str | Mapping[str, Any] | None
) -> hps_pb2.ReloadModelRequest:
    return hps_pb2.ReloadModelRequest(
        model=model,
        version=version,
        table_versions=dict(table_versions or {}),
        model_config="" if model_config is None else _model_config(model_config),
    )


def _shaped(result: LookupResult, keys: object) -> np.ndarray:
    """Vectors shaped like the keys plus a trailing dim axis."""
    return result.vectors.reshape(*np.asarray(keys).shape, result.vectors.shape[1])


def _upsert_request(model: str, table: str, keys: object, vectors: object) -> hps_pb2.UpsertRequest:
    data = np.ascontiguousarray(vectors, dtype="<f4")
    return hps_pb2.UpsertRequest(model=model, table=table, keys=wire.pack_keys(keys), vectors=data.tobytes())


class Client:
    """A blocking client. `timeout` (seconds) applies to every call unless a call passes its own.

    `tls`: connect with TLS (see security.TLS; None: plaintext); `token`: sent as `authorization: Bearer <token>`
    with every call, for a server with server.auth on.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_message_mb: int = MAX_MESSAGE_MB,
        tls: TLS | None = None,
        token: str | None = None,
    ):
        self.target = target
        self.timeout = timeout
        self._metadata = security.call_metadata(token)
        self._channel = security.channel(target, tls, _channel_options(max_message_mb))
        self._lookups = hps_pb2_grpc.LookupServiceStub(self._channel)
        self._models = hps_pb2_grpc.ModelServiceStub(self._channel)
        # Replies are decoded by response_codec into array views, not by the generated message class.
        self._lookup = self._channel.unary_unary(
            LOOKUP_METHOD, request_serializer=hps_pb2.LookupRequest.SerializeToString, response_deserializer=None
        )

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def lookup(
        self, model: str, table: str, keys: object, *, dtype: Dtype = "float32", timeout: float | None = None
    ) -> np.ndarray:
        """Vectors for `keys` (any shape of integers), shaped keys.shape + (dim,)."""
        request = wire.lookup_request(model, [wire.table_query(table, keys)], dtype)
        return _shaped(_lookup_results(self._call(self._lookup, request, timeout))[0], keys)

    def lookup_tables(
        self,
        model: str,
        keys_by_table: Mapping[str, object],
        *,
        dtype: Dtype = "float32",
        timeout: float | None = None,
    ) -> dict[str, LookupResult]:
        """One RPC for several tables; results carry the per-key found mask."""
        response = self._call(self._lookup, wire.tables_request(model, keys_by_table, dtype), timeout)
        return {result.table: result for result in _lookup_results(response)}

    def lookup_combined(
        self,
        model: str,
        table: str,
        keys: object,
        row_splits: object,
        *,
        combiner: Combiner = "mean",
        weights: object | None = None,
        max_norm: float | None = None,
        dtype: Dtype = "float32",
        timeout: float | None = None,
    ) -> np.ndarray:
        """One vector per sample: keys[row_splits[i]:row_splits[i+1]] reduced on the server.

        `max_norm` clips each key's vector to that L2 norm before reducing (as tf.nn.embedding_lookup_sparse).
        """
        request = wire.lookup_request(
            model, [wire.table_query(table, keys, row_splits, weights, combiner, max_norm)], dtype
        )
        return _lookup_results(self._call(self._lookup, request, timeout))[0].vectors

    def upsert(self, model: str, table: str, keys: object, vectors: object, *, timeout: float | None = None) -> int:
        response = self._call(self._lookups.Upsert, _upsert_request(model, table, keys, vectors), timeout)
        return int(response.rows)

    def delete(self, model: str, table: str, keys: object, *, timeout: float | None = None) -> int:
        request = hps_pb2.DeleteRequest(model=model, table=table, keys=wire.pack_keys(keys))
        return int(self._call(self._lookups.Delete, request, timeout).rows)

    def prefetch(self, model: str, keys_by_table: Mapping[str, object], *, timeout: float | None = None) -> int:
        """Asks the server to load these keys into L1 in the background, for lookups to come; returns at once
        with the keys it took (0: its prefetch backlog was full and it dropped them)."""
        request = hps_pb2.PrefetchRequest(model=model, packed=wire.packed_query(keys_by_table))
        return int(self._call(self._lookups.Prefetch, request, timeout).keys)

    def list_models(self, *, timeout: float | None = None) -> list[str]:
        return list(self._call(self._models.ListModels, hps_pb2.ListModelsRequest(), timeout).models)

    def describe(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        return _model_info(self._call(self._models.DescribeModel, hps_pb2.DescribeModelRequest(model=model), timeout))

    # Model admin (the server needs server.admin: true); each returns once the change is served.

    def load_model(self, model_config: str | Mapping[str, Any], *, timeout: float | None = None) -> ModelInfo:
        """Serves a new model, given as an entry of a config file's `models:` (YAML/JSON text or a mapping)."""
        request = hps_pb2.LoadModelRequest(model_config=_model_config(model_config))
        return _model_info(self._call(self._models.LoadModel, request, timeout).model)

    def unload_model(self, model: str, *, timeout: float | None = None) -> None:
        self._call(self._models.UnloadModel, hps_pb2.UnloadModelRequest(model=model), timeout)

    def reload_model(
        self,
        model: str,
        version: str = "",
        *,
        table_versions: Mapping[str, str] | None = None,
        model_config: str | Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> ModelInfo:
        """Switches the model to `version` (every table) and/or `table_versions`, or to a new `model_config`."""
        request = _reload_request(model, version, table_versions, model_config)
        return _model_info(self._call(self._models.ReloadModel, request, timeout).model)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of Client (grpc.aio); create and use it inside a running event loop."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_message_mb: int = MAX_MESSAGE_MB,
        tls: TLS | None = None,
        token: str | None = None,
    ):
        self.target = target
        self.timeout = timeout
        self._metadata = security.call_metadata(token)
        self._channel = security.aio_channel(target, tls, _channel_options(max_message_mb))
        self._lookups = hps_pb2_grpc.LookupServiceStub(self._channel)
        self._models = hps_pb2_grpc.ModelServiceStub(self._channel)
        self._lookup = self._channel.unary_unary(
            LOOKUP_METHOD, request_serializer=hps_pb2.LookupRequest.SerializeToString, response_deserializer=None
        )

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def lookup(
        self, model: str, table: str, keys: object, *, dtype: Dtype = "float32", timeout: float | None = None
    ) -> np.ndarray:
        request = wire.lookup_request(model, [wire.table_query(table, keys)], dtype)
        return _shaped(_lookup_results(await self._call(self._lookup, request, timeout))[0], keys)

    async def lookup_tables(
        self,
        model: str,
        keys_by_table: Mapping[str, object],
        *,
        dtype: Dtype = "float32",
        timeout: float | None = None,
    ) -> dict[str, LookupResult]:
        response = await self._call(self._lookup, wire.tables_request(model, keys_by_table, dtype), timeout)
        return {result.table: result for result in _lookup_results(response)}

    async def lookup_combined(
        self,
        model: str,
        table: str,
        keys: object,
        row_splits: object,
        *,
        combiner: Combiner = "mean",
        weights: object | None = None,
        max_norm: float | None = None,
        dtype: Dtype = "float32",
        timeout: float | None = None,
    ) -> np.ndarray:
        request = wire.lookup_request(
            model, [wire.table_query(table, keys, row_splits, weights, combiner, max_norm)], dtype
        )
        return _lookup_results(await self._call(self._lookup, request, timeout))[0].vectors

    async def upsert(
        self, model: str, table: str, keys: object, vectors: object, *, timeout: float | None = None
    ) -> int:
        response = await self._call(self._lookups.Upsert, _upsert_request(model, table, keys, vectors), timeout)
        return int(response.rows)

    async def delete(self, model: str, table: str, keys: object, *, timeout: float | None = None) -> int:
        request = hps_pb2.DeleteRequest(model=model, table=table, keys=wire.pack_keys(keys))
        return int((await self._call(self._lookups.Delete, request, timeout)).rows)

    async def prefetch(self, model: str, keys_by_table: Mapping[str, object], *, timeout: float | None = None) -> int:
        request = hps_pb2.PrefetchRequest(model=model, packed=wire.packed_query(keys_by_table))
        return int((await self._call(self._lookups.Prefetch, request, timeout)).keys)

    async def list_models(self, *, timeout: float | None = None) -> list[str]:
        return list((await self._call(self._models.ListModels, hps_pb2.ListModelsRequest(), timeout)).models)

    async def describe(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        request = hps_pb2.DescribeModelRequest(model=model)
        return _model_info(await self._call(self._models.DescribeModel, request, timeout))

    async def load_model(self, model_config: str | Mapping[str, Any], *, timeout: float | None = None) -> ModelInfo:
        request = hps_pb2.LoadModelRequest(model_config=_model_config(model_config))
        return _model_info((await self._call(self._models.LoadModel, request, timeout)).model)

    async def unload_model(self, model: str, *, timeout: float | None = None) -> None:
        await self._call(self._models.UnloadModel, hps_pb2.UnloadModelRequest(model=model), timeout)

    async def reload_model(
        self,
        model: str,
        version: str = "",
        *,
        table_versions: Mapping[str, str] | None = None,
        model_config: str | Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> ModelInfo:
        request = _reload_request(model, version, table_versions, model_config)
        return _model_info((await self._call(self._models.ReloadModel, request, timeout)).model)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
