"""Prefetch: keys sent ahead (the Prefetch RPC, or LookupRequest.prefetch on a stream) are in L1 for the
lookup that follows, counted as L1 hits; bad prefetches are refused like bad lookups.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from hps_client import Client, NotFoundError, wire
from hps_server import config as config_module
from hps_server.server import HpsServer
from hps_wire._proto import hps_pb2, hps_pb2_grpc
from tests.conftest import ServedModel, sample_raw_config, write_sample_tables


@pytest.fixture
def served_with_l1(tmp_path: Path) -> Iterator[ServedModel]:
    truth = write_sample_tables(tmp_path)
    raw = sample_raw_config()
    raw["models"][0].update(gpucache=True, gpucacheper=1.0)
    config = config_module.parse(raw, tmp_path)
    server = HpsServer(config)
    port = server.start()
    assert server.wait_ready(30)
    yield ServedModel(server, f"127.0.0.1:{port}", config, truth)
    server.stop(grace=1)


def _l1(served: ServedModel, table: str) -> tuple[int, int]:
    stats = served.server.models.sessions["ctr"].cache_stats()[table]
    return stats.hits, stats.misses


def test_prefetched_keys_are_l1_hits_on_the_next_lookup(served_with_l1: ServedModel) -> None:
    served = served_with_l1
    users, items = served.truth["user"][0][:200], served.truth["item"][0][:100]
    session = served.server.models.sessions["ctr"]
    with Client(served.target) as client:
        assert client.prefetch("ctr", {"user": users, "item": items}) == 300
        assert session.wait_prefetched(10)
        user_before, item_before = _l1(served, "user"), _l1(served, "item")
        got = client.lookup_tables("ctr", {"user": users, "item": items})
        np.testing.assert_array_equal(got["user"].vectors, served.expected("user", users))
        np.testing.assert_array_equal(got["item"].vectors, served.expected("item", items))
        assert _l1(served, "user") == (user_before[0] + 200, user_before[1])
        assert _l1(served, "item") == (item_before[0] + 100, item_before[1])


def test_a_stream_carries_prefetches_with_its_lookups(served_with_l1: ServedModel) -> None:
    served = served_with_l1
    first, following = served.truth["user"][0][:100], served.truth["user"][0][100:300]
    session = served.server.models.sessions["ctr"]
    with grpc.insecure_channel(served.target) as channel:
        stub = hps_pb2_grpc.LookupServiceStub(channel)
        request = wire.tables_request("ctr", {"user": first})
        request.prefetch.CopyFrom(wire.packed_query({"user": following}))
        replies = stub.StreamLookup(iter([request]))
        for reply in replies:
            assert reply.packed.tables == ["user"]
        assert session.wait_prefetched(10)
        before = _l1(served, "user")
        reply = stub.StreamLookup(iter([wire.tables_request("ctr", {"user": following})]))
        (answer,) = list(reply)
    vectors = np.frombuffer(answer.packed.vectors, "<f4").reshape(-1, 16)
    np.testing.assert_array_equal(vectors, served.expected("user", following))
    assert _l1(served, "user") == (before[0] + 200, before[1])


def test_bad_prefetches_are_refused_naming_the_field(served_with_l1: ServedModel) -> None:
    served = served_with_l1
    with Client(served.target) as client:
        with pytest.raises(NotFoundError, match="no table 'nope'"):
            client.prefetch("ctr", {"nope": [1, 2]})
        with pytest.raises(NotFoundError, match="no model"):
            client.prefetch("absent", {"user": [1]})
        with grpc.insecure_channel(served.target) as channel:
            stub = hps_pb2_grpc.LookupServiceStub(channel)
            bad = hps_pb2.PrefetchRequest(model="ctr", packed=hps_pb2.PackedQuery(tables=["user"], keys=b"123"))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Prefetch(bad)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "packed.keys" in (refused.value.details() or "")
            request = wire.tables_request("ctr", {"user": [1]})
            request.prefetch.CopyFrom(hps_pb2.PackedQuery(tables=["user"], keys=b"", counts=b"\x01" + b"\0" * 7))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Lookup(request)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "prefetch.counts" in (refused.value.details() or "")
        assert client.lookup("ctr", "user", [1]).shape == (1, 16)  # still serving
