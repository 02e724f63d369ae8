"""`hps bench connections`: Lookup latency and refusals with many concurrent connections, bounded queueing
(server.max_queued_requests) against a same-run unbounded queue, and health checks answered meanwhile.

Each connection is its own channel (its own TCP connection) running a closed loop of Lookups from a few
client processes with asyncio; a refused call (RESOURCE_EXHAUSTED) is counted and retried after an
exponential backoff, as a gRPC retry policy would. Every reply is checked against the table's true rows. It asserts
no speed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hps_bench import report, servers
from hps_client import wire
from hps_client.client import LOOKUP_METHOD
from hps_wire._proto import hps_pb2

MODEL = "bench"
TABLE = "t"
SEED = 11
ROWS = 100_000
DIM = 32
KEYS = 64
CONNECTIONS = (100, 500)
# What a refused client waits before its next call, doubled at each refusal in a row up to the last (a gRPC
# retry policy's exponential backoff; a success starts it again from the first).
BACKOFF_SECONDS = (0.05, 0.1, 0.2, 0.4, 0.8)
# The unbounded baseline: more than any run here can queue.
UNBOUNDED = 1_000_000
HEALTH_PERIOD_SECONDS = 0.1


def _table() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    keys = rng.permutation(ROWS * 4)[:ROWS].astype(np.int64)
    return keys, rng.standard_normal((ROWS, DIM), dtype=np.float32)


async def _connection(
    channel: grpc.aio.Channel, seed: int, stop: float, keys: np.ndarray, vectors: np.ndarray
) -> dict[str, Any]:
    """One channel's closed loop of Lookups until `stop` (time.time); its figures."""
    rng = np.random.default_rng(seed)
    lookup = channel.unary_unary(LOOKUP_METHOD, request_serializer=hps_pb2.LookupRequest.SerializeToString)
    latencies: list[float] = []
    refusals: list[float] = []
    wrong = failed = refused_in_a_row = 0
    while time.time() < stop:
        rows = rng.integers(0, len(keys), KEYS)
        query = hps_pb2.TableQuery(table=TABLE, keys=wire.pack_keys(keys[rows]))
        began = time.perf_counter()
        try:
            reply = hps_pb2.LookupResponse.FromString(
                await lookup(hps_pb2.LookupRequest(model=MODEL, queries=[query]), timeout=60)
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                refusals.append(time.perf_counter() - began)
                await asyncio.sleep(BACKOFF_SECONDS[min(refused_in_a_row, len(BACKOFF_SECONDS) - 1)])
                refused_in_a_row += 1
            else:
                failed += 1
            continue
        latencies.append(time.perf_counter() - began)
        refused_in_a_row = 0
        got = np.frombuffer(reply.results[0].vectors, np.float32)
        wrong += not np.array_equal(got, vectors[rows].ravel())
    return {"latencies": latencies, "refusals": refusals, "wrong": wrong, "failed": failed}


def _client_process(target: str, connections: int, seed: int, seconds: float, start: Any, out: Any) -> None:
    """Opens its connections, says so on `out`, waits for the parent to set `start` (time.time), runs."""
    keys, vectors = _table()
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, not one shared by channels

    async def run() -> list[dict[str, Any]]:
        channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        out.put("ready")
        while not start.value:
            await asyncio.sleep(0.01)
        await asyncio.sleep(max(0.0, start.value - time.time()))
        stop = start.value + seconds
        try:
            return await asyncio.gather(
                *(_connection(c, seed * 100_000 + i, stop, keys, vectors) for i, c in enumerate(channels))
            )
        finally:
            await asyncio.gather(*(channel.close() for channel in channels))

    results = asyncio.run(run())
    out.put(
        {
            "latencies": [x for r in results for x in r["latencies"]],
            "refusals": [x for r in results for x in r["refusals"]],
            "wrong": sum(r["wrong"] for r in results),
            "failed": sum(r["failed"] for r in results),
        }
    )


def _health_probe(target: str, stop: float) -> dict[str, float]:
    """Health checks every HEALTH_PERIOD_SECONDS until `stop`: the slowest answer and how many got none."""
    slowest, unanswered, checks = 0.0, 0, 0
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.time() < stop:
            began = time.perf_counter()
            checks += 1
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                slowest = max(slowest, time.perf_counter() - began)
            except grpc.RpcError:
                unanswered += 1
            time.sleep(HEALTH_PERIOD_SECONDS)
    return {"health_checks": checks, "health_unanswered": unanswered, "health_slowest_ms": slowest * 1e3}


def _measure(target: str, connections: int, processes: int, seconds: float) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start = context.Value("d", 0.0)
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    children = [
        context.Process(target=_client_process, args=(target, share, i + 1, seconds, start, out), daemon=True)
        for i, share in enumerate(shares)
        if share
    ]
    for child in children:
        child.start()
    for _ in children:
        if out.get(timeout=300) != "ready":
            raise RuntimeError("a client process failed to open its connections")
    start.value = time.time() + 0.5
    health = _health_probe(target, start.value + seconds)
    parts = [out.get(timeout=seconds + 300) for _ in children]
    for child in children:
        child.join(timeout=60)
    latencies = np.array([x for p in parts for x in p["latencies"]]) * 1e3
    refusals = np.array([x for p in parts for x in p["refusals"]]) * 1e3
    answered = len(latencies) + len(refusals)
    return {
        "connections": connections,
        "ok_rpc_per_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
        "refused": len(refusals),
        "refused_share": len(refusals) / answered if answered else 0.0,
        "refusal_p99_ms": float(np.percentile(refusals, 99)) if len(refusals) else None,
        "wrong": sum(p["wrong"] for p in parts),
        "failed": sum(p["failed"] for p in parts),
        **health,
    }


def run(
    json_out: bool, seconds: float, processes: int, connections: Sequence[int], max_queued: int, workers: int
) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        keys, vectors = _table()
        for queue, limit in (("unbounded", UNBOUNDED), ("bounded", max_queued)):
            directory = Path(tmp) / queue
            directory.mkdir()
            port = servers.free_port()
            config = servers.write_served_model(
                directory,
                port,
                MODEL,
                {TABLE: (keys, vectors, KEYS)},
                1,
                server_options={"max_queued_requests": limit, "workers": workers},
            )
            with servers.hps_server(config, port) as target:
                for count in connections:
                    rows.append({"queue": queue, "max_queued": limit, **_measure(target, count, processes, seconds)})
    by = {(r["queue"], r["connections"]): r for r in rows}
    low, high = min(connections), max(connections)
    targets = {}
    for queue in ("unbounded", "bounded"):
        if by[queue, low]["p99_ms"] and by[queue, high]["p99_ms"]:
            targets[f"{queue}_p99_ratio_{high}_to_{low}"] = by[queue, high]["p99_ms"] / by[queue, low]["p99_ms"]
    targets["bounded_p99_ratio_target"] = 3.0
    targets["wrong"] = sum(r["wrong"] for r in rows)
    targets["health_unanswered"] = sum(r["health_unanswered"] for r in rows)
    report.emit(
        "hps bench connections: Lookups of many connections, bounded queue vs unbounded",
        rows,
        json_out,
        {
            "request": f"1 table, {KEYS} keys, dim {DIM}, float32",
            "seconds_per_case": seconds,
            "client_processes": processes,
            "workers": workers,
            "targets": targets,
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hps bench connections", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per case")
    parser.add_argument("--processes", type=int, default=2, help="client processes sharing the connections")
    parser.add_argument(
        "--connections", type=int, nargs="+", default=list(CONNECTIONS), help="concurrent connections per case"
    )
    parser.add_argument("--max-queued", type=int, default=None, help="server.max_queued_requests of the bounded case")
    parser.add_argument("--workers", type=int, default=None, help="server.workers")
    args = parser.parse_args(argv)
    from hps_server.config import ServerConfig

    defaults = ServerConfig()
    run(
        json_out=args.json,
        seconds=args.seconds,
        processes=args.processes,
        connections=args.connections,
        max_queued=args.max_queued or defaults.max_queued_requests,
        workers=args.workers or defaults.workers,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
