"""`hps bench lookup`: the Lookup service path as users call it (Client.lookup_tables), as ratios to a same-run
raw-bytes gRPC echo with the same process layout and the same request and reply byte sizes.

Serves a generated model with `hps serve` (L1 per --l1, over a warm in-process hash map over RocksDB) and the
echo server; hps and echo blocks alternate so both see the same machine load, and every 10th reply is checked
against the tables' true rows. Case d also runs the echo copying each reply once (the least a server that
builds its replies does) and gives hps's ratio to that too. With --tls both serve TLS (throwaway certificates
made for the run), with --token hps checks a bearer token every call (the echo gets the same metadata). It
asserts no speed and never states an absolute figure without its ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import operator
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from hps_bench import echo_server, report, servers
from hps_client import Client, wire
from hps_client.client import LOOKUP_METHOD
from hps_client.wire import Dtype
from hps_server.config import ServerConfig
from hps_wire._proto import hps_pb2
from hps_wire.response_codec import LookupResult

MODEL = "bench"
SEED = 7
KEYS_PER_SAMPLE = 26
WIDE = tuple(f"t{i:02d}" for i in range(26))
DTYPES: tuple[Dtype, ...] = ("float32", "float16")
# Client threads for the throughput of cases a-c (their latencies come from one thread's sequential calls).
CLIENT_THREADS = 4
CHECK_EVERY = 10
# Distinct key batches each client cycles through, so replies are not one batch served over and over.
BATCHES = 4
# Alternating hps/echo blocks per figure: a-c, and each (clients, dtype) of d.
BLOCKS = 5
ROUNDS = 3
# Seconds a client process may take to start or to answer one block before the run is abandoned.
TIMEOUT = 600.0


# ---------------------------------------------------------------- tables and batches


@dataclass(frozen=True)
class Table:
    keys: np.ndarray
    vectors: np.ndarray
    max_keys_per_sample: int


def _tables(rows: int, names: Sequence[str] | None = None) -> dict[str, Table]:
    """The served tables, regenerated from SEED: client processes rebuild the true rows instead of reading files."""
    specs = {"d128": (rows, 128, KEYS_PER_SAMPLE), "d16": (rows, 16, KEYS_PER_SAMPLE)}
    specs |= {name: (max(1, rows // 25), 128, 1) for name in WIDE}
    tables = {}
    for index, (name, (table_rows, dim, per_sample)) in enumerate(specs.items()):
        if names is None or name in names:
            rng = np.random.default_rng([SEED, index])  # one stream per table, so a subset regenerates alike
            keys = rng.permutation(table_rows * 4)[:table_rows].astype(np.int64)
            tables[name] = Table(keys, rng.standard_normal((table_rows, dim), dtype=np.float32), per_sample)
    return tables


@dataclass(frozen=True)
class Batch:
    """One request's keys per table, and the row of the table each key names (to check the reply)."""

    keys: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]

    @property
    def vectors(self) -> int:
        return sum(rows.size for rows in self.rows.values())


def _batches(tables: Mapping[str, Table], shape: Mapping[str, int], rng: np.random.Generator) -> list[Batch]:
    """BATCHES batches of `shape` (keys per table) drawn uniformly from the tables' keys."""
    batches = []
    for _ in range(BATCHES):
        rows = {name: rng.integers(0, tables[name].keys.size, n) for name, n in shape.items()}
        batches.append(Batch({name: tables[name].keys[r] for name, r in rows.items()}, rows))
    return batches


def _wrong(tables: Mapping[str, Table], batch: Batch, reply: Mapping[str, LookupResult], dtype: Dtype) -> int:
    """Vectors of `reply` that are not the true row (float16: the float32 row cast to float16) or not found."""
    wrong = 0
    for name, rows in batch.rows.items():
        result = reply[name]
        expected = tables[name].vectors[rows].astype(dtype)
        wrong += int(np.count_nonzero(~(result.vectors == expected).all(axis=1) | ~result.found))
    return wrong


# ---------------------------------------------------------------- timed calls


@dataclass(frozen=True)
class Outcome:
    """One client's block: each call's seconds, its monotonic start and end, and the replies it checked."""

    seconds: list[float]
    start: float
    end: float
    checked: int
    wrong: int


def _run(call: Callable[[int], Any], calls: int, check: Callable[[int, Any], tuple[int, int]] | None) -> Outcome:
    """`calls` sequential calls; every CHECK_EVERY-th reply is kept and checked after the clock stops, so
    checking costs the figures nothing."""
    kept = []
    seconds = []
    start = time.monotonic()  # CLOCK_MONOTONIC: comparable between the processes of one host
    for i in range(calls):
        began = time.perf_counter()
        reply = call(i)
        seconds.append(time.perf_counter() - began)
        if check is not None and i % CHECK_EVERY == 0:
            kept.append((i, reply))
    end = time.monotonic()
    checked = wrong = 0
    for i, reply in kept:
        assert check is not None
        vectors, bad = check(i, reply)
        checked += vectors
        wrong += bad
    return Outcome(seconds, start, end, checked, wrong)


@dataclass(frozen=True)
class Paths:
    """The two services a client calls: hps through its own Client, and the echo with the same sizes."""

    client: Client
    echo_stub: Callable[[bytes], bytes]
    tables: Mapping[str, Table]

    def hps(self, batches: Sequence[Batch], dtype: Dtype, calls: int) -> Outcome:
        def call(i: int) -> dict[str, LookupResult]:
            return self.client.lookup_tables(MODEL, batches[i % len(batches)].keys, dtype=dtype)

        def check(i: int, reply: dict[str, LookupResult]) -> tuple[int, int]:
            batch = batches[i % len(batches)]
            return batch.vectors, _wrong(self.tables, batch, reply, dtype)

        return _run(call, calls, check)

    def echo(self, request: bytes, calls: int) -> Outcome:
        return _run(lambda _: self.echo_stub(request), calls, None)


@dataclass
class Tally:
    """Outcomes of one path over several blocks: wall time adds up block by block (first start to last end)."""

    calls: int = 0
    wall: float = 0.0
    seconds: list[float] = field(default_factory=list)
    checked: int = 0
    wrong: int = 0

    def add(self, outcomes: Sequence[Outcome]) -> None:
        self.wall += max(o.end for o in outcomes) - min(o.start for o in outcomes)
        for o in outcomes:
            self.calls += len(o.seconds)
            self.seconds += o.seconds
            self.checked += o.checked
            self.wrong += o.wrong

    def calls_per_s(self) -> float:
        return self.calls / self.wall

    def ms(self, percentile: float) -> float:
        return float(np.percentile(self.seconds, percentile) * 1e3)


def _threads(run: Callable[[], Outcome], threads: int) -> list[Outcome]:
    """`run` in `threads` threads at once (they share one Client, as an application's threads would)."""
    outcomes: list[Outcome] = []
    pool = [threading.Thread(target=lambda: outcomes.append(run())) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return outcomes


# ---------------------------------------------------------------- client processes (case d)


@dataclass(frozen=True)
class Block:
    """What every client process does between two barriers; processes numbered `active` and up sit it out."""

    path: Literal["hps", "echo", "fresh"]  # fresh: the echo copying each reply (echo_server.request)
    dtype: Dtype
    calls: int
    active: int
    echo_sizes: tuple[int, int]  # (reply bytes, request bytes) of the hps exchange the echo stands in for


def _client_process(
    index: int,
    targets: tuple[str, str],
    credentials: servers.Credentials,
    rows: int,
    commands: multiprocessing.Queue[Block | None],
    results: multiprocessing.Queue[Outcome | str],
    barrier: Barrier,
) -> None:
    """One client process of case d: its own tables, keys and Client; runs blocks until told to stop."""
    tables = _tables(rows, WIDE)
    batches = _batches(tables, dict.fromkeys(WIDE, 1024), np.random.default_rng([SEED, 1000 + index]))
    hps_target, echo_target = targets
    with (
        Client(hps_target, tls=credentials.tls, token=credentials.token) as client,
        credentials.channel(echo_target, echo_server.OPTIONS) as channel,
    ):
        paths = Paths(client, credentials.unary(channel, echo_server.METHOD), tables)
        results.put("ready")
        while (block := commands.get()) is not None:
            barrier.wait(TIMEOUT)
            if index >= block.active:
                continue
            if block.path == "hps":
                results.put(paths.hps(batches, block.dtype, block.calls))
            else:
                request = echo_server.request(*block.echo_sizes, fresh=block.path == "fresh")
                results.put(paths.echo(request, block.calls))


class ClientProcesses:
    """Client processes (spawned, so none inherits this process's gRPC state) started together by a barrier."""

    def __init__(self, count: int, targets: tuple[str, str], credentials: servers.Credentials, rows: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._results: multiprocessing.Queue[Outcome | str] = context.Queue()
        self._commands: list[multiprocessing.Queue[Block | None]] = [context.Queue() for _ in range(count)]
        self._barrier = context.Barrier(count + 1)  # and this process, which releases each block
        self._processes = [
            context.Process(
                target=_client_process,
                args=(i, targets, credentials, rows, self._commands[i], self._results, self._barrier),
                daemon=True,
            )
            for i in range(count)
        ]
        for process in self._processes:
            process.start()

    def wait_ready(self) -> None:
        """Returns once every process holds its tables and its Client."""
        for _ in self._processes:
            self._result()

    def _result(self) -> Outcome | str:
        """The next result; raises as soon as a client process has died instead of waiting for it."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                return self._results.get(timeout=1)
            dead = [p.exitcode for p in self._processes if not p.is_alive()]
            if dead:
                raise RuntimeError(f"a client process exited with {dead[0]} during the benchmark")
        raise TimeoutError(f"no client result within {TIMEOUT} s")

    def run(self, block: Block) -> list[Outcome]:
        for commands in self._commands:
            commands.put(block)
        self._barrier.wait(TIMEOUT)
        outcomes = [self._result() for _ in range(block.active)]
        return [o for o in outcomes if isinstance(o, Outcome)]

    def close(self) -> None:
        # Aborting the barrier frees processes left waiting on it by a block this process gave up on.
        self._barrier.abort()
        for commands in self._commands:
            commands.put(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


@contextlib.contextmanager
def client_processes(
    count: int, targets: tuple[str, str], credentials: servers.Credentials, rows: int
) -> Iterator[ClientProcesses]:
    pool = ClientProcesses(count, targets, credentials, rows)
    try:
        pool.wait_ready()
        yield pool
    finally:
        pool.close()


# ---------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    shape: dict[str, int]  # keys per table in one request
    samples: int
    calls: int


def _cases(scale: float) -> list[Case]:
    return [
        Case("a: 1,024 samples x 26 keys, dim 128", {"d128": 1024 * KEYS_PER_SAMPLE}, 1024, max(10, int(60 * scale))),
        Case("b: 1 sample x 26 keys, dim 16", {"d16": KEYS_PER_SAMPLE}, 1, max(50, int(3000 * scale))),
        Case("c: 32 samples x 26 tables, dim 128", dict.fromkeys(WIDE, 32), 32, max(50, int(2000 * scale))),
    ]


def _process_case(scale: float) -> Case:
    """Case d; `calls` is per client process and block."""
    return Case("d: 1,024 samples x 26 tables, dim 128", dict.fromkeys(WIDE, 1024), 1024, max(2, int(30 * scale)))


def _sizes(raw_lookup: Callable[[hps_pb2.LookupRequest], bytes], batch: Batch, dtype: Dtype) -> tuple[int, int]:
    """(reply bytes, request bytes) of one hps exchange, as sent on the wire."""
    request = wire.tables_request(MODEL, batch.keys, dtype)
    return len(raw_lookup(request)), request.ByteSize()


def _row(
    case: Case,
    clients: str,
    dtype: Dtype,
    reply_bytes: int,
    latency: tuple[Tally, Tally],
    throughput: tuple[Tally, Tally] | None = None,
) -> dict[str, Any]:
    """A case's figures from (hps, echo) tallies of latency and of throughput (None: the latency tallies,
    where the same concurrent calls gave both)."""
    hps, echo = latency
    tallies = latency if throughput is None else (*latency, *throughput)
    throughput = throughput or latency
    hps_rate, echo_rate = (t.calls_per_s() for t in throughput)
    return {
        "case": case.name,
        "clients": clients,
        "dtype": dtype,
        "reply_MB": reply_bytes / 1e6,
        "hps_samples_per_s": case.samples * hps_rate,
        "hps_MB_per_s": reply_bytes * hps_rate / 1e6,
        "echo_MB_per_s": reply_bytes * echo_rate / 1e6,
        "throughput_ratio": hps_rate / echo_rate,
        "hps_p50_ms": hps.ms(50),
        "echo_p50_ms": echo.ms(50),
        "p50_ratio": hps.ms(50) / echo.ms(50),
        "hps_p99_ms": hps.ms(99),
        "echo_p99_ms": echo.ms(99),
        "p99_ratio": hps.ms(99) / echo.ms(99),
        "checked_vectors": sum(t.checked for t in tallies),
        "wrong_vectors": sum(t.wrong for t in tallies),
    }


def _measure_in_process(
    case: Case, paths: Paths, raw_lookup: Callable[[hps_pb2.LookupRequest], bytes], rng: np.random.Generator
) -> dict[str, Any]:
    """Cases a-c: latency from this thread's sequential calls, throughput from CLIENT_THREADS threads."""
    batches = _batches(paths.tables, case.shape, rng)
    reply_bytes, request_bytes = _sizes(raw_lookup, batches[0], "float32")
    request = echo_server.request(reply_bytes, request_bytes)
    paths.hps(batches, "float32", 3)  # warm both paths
    paths.echo(request, 3)
    latency = Tally(), Tally()
    throughput = Tally(), Tally()
    per_block = max(1, case.calls // BLOCKS)
    per_thread = max(1, per_block // CLIENT_THREADS)
    for _ in range(BLOCKS):
        latency[0].add([paths.hps(batches, "float32", per_block)])
        latency[1].add([paths.echo(request, per_block)])
    for _ in range(BLOCKS):
        throughput[0].add(_threads(lambda: paths.hps(batches, "float32", per_thread), CLIENT_THREADS))
        throughput[1].add(_threads(lambda: paths.echo(request, per_thread), CLIENT_THREADS))
    return _row(case, f"{CLIENT_THREADS} threads", "float32", reply_bytes, latency, throughput)


def _measure_processes(
    case: Case,
    pool: ClientProcesses,
    clients: Sequence[int],
    sizes: Mapping[Dtype, tuple[int, int]],
) -> list[dict[str, Any]]:
    """Case d: for each client count and dtype, ROUNDS alternating blocks of every client: hps, the echo, and
    the echo copying each reply (the floor of a server that builds its replies, as a second ratio)."""
    for dtype in DTYPES:  # warm every client's connections and every path
        for path in ("hps", "echo", "fresh"):
            pool.run(Block(path, dtype, 2, max(clients), sizes[dtype]))
    rows = []
    for count in clients:
        for dtype in DTYPES:
            hps, echo, fresh = Tally(), Tally(), Tally()
            for _ in range(ROUNDS):
                hps.add(pool.run(Block("hps", dtype, case.calls, count, sizes[dtype])))
                echo.add(pool.run(Block("echo", dtype, case.calls, count, sizes[dtype])))
                fresh.add(pool.run(Block("fresh", dtype, case.calls, count, sizes[dtype])))
            clients_name = f"{count} process" if count == 1 else f"{count} processes"
            row = _row(case, clients_name, dtype, sizes[dtype][0], (hps, echo))
            row["fresh_echo_over_echo"] = fresh.calls_per_s() / echo.calls_per_s()
            row["hps_over_fresh_echo"] = hps.calls_per_s() / fresh.calls_per_s()
            rows.append(row)
    return rows


def run(
    scale: float = 1.0,
    rows: int = 100_000,
    l1: servers.L1Choice = "none",
    clients: Sequence[int] = (1, 4, 8, 16),
    server_options: Mapping[str, Any] | None = None,
    tls: bool = False,
    token: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows of cases a-c, rows of case d) measured against one hps server and one echo baseline; `tls`: both
    serve TLS, `token`: hps checks a bearer token on every call."""
    options = dict(server_options or {})
    tables = _tables(rows)
    with tempfile.TemporaryDirectory(prefix="hps-bench-") as tmp:
        port = servers.free_port()
        security = servers.throwaway_security(Path(tmp), tls, token)
        credentials = security.credentials
        served = {name: (t.keys, t.vectors, t.max_keys_per_sample) for name, t in tables.items()}
        config = servers.write_served_model(
            Path(tmp),
            port,
            MODEL,
            served,
            max_batch_size=1024,
            l1=l1,
            server_options={**options, **security.server_options},
        )
        echo_layout = {
            "workers": int(options.get("workers", ServerConfig().workers)),
            "processes": int(options.get("processes", 1)),
        }
        with (
            servers.hps_server(config, port, servers.server_env(l1), credentials.tls) as target,
            servers.echo_server(**echo_layout, tls_files=security.echo_files) as echo_target,
            Client(target, tls=credentials.tls, token=credentials.token) as client,
            credentials.channel(echo_target, echo_server.OPTIONS) as echo_channel,
            credentials.channel(target, echo_server.OPTIONS) as raw_channel,
        ):
            raw_lookup: Callable[[hps_pb2.LookupRequest], bytes] = credentials.unary(
                raw_channel, LOOKUP_METHOD, request_serializer=hps_pb2.LookupRequest.SerializeToString
            )
            paths = Paths(client, credentials.unary(echo_channel, echo_server.METHOD), tables)
            rng = np.random.default_rng([SEED, 999])
            single = [_measure_in_process(case, paths, raw_lookup, rng) for case in _cases(scale)]
            case = _process_case(scale)
            sample = _batches(tables, case.shape, rng)[0]
            sizes = {dtype: _sizes(raw_lookup, sample, dtype) for dtype in DTYPES}
            with client_processes(max(clients), (target, echo_target), credentials, rows) as pool:
                return single, _measure_processes(case, pool, clients, sizes)


# ---------------------------------------------------------------- targets and output

_COMPARE = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


def _target(value: float, compare: str, bound: float) -> dict[str, Any]:
    return {"value": round(value, 3), "target": f"{compare} {bound:g}", "met": bool(_COMPARE[compare](value, bound))}


def _targets(
    single: Sequence[Mapping[str, Any]], processes: Sequence[Mapping[str, Any]], group: bool = False
) -> dict[str, Any]:
    """The targets the figures are held to: one server process's, or, for a worker group (`group`), 0.8 of
    the echo at the most clients too (the fresh-reply echo's own ratio shows how far a server can get)."""
    a, b, c = single
    targets = {
        "a_bytes_ratio": _target(a["throughput_ratio"], ">=", 0.8),
        "b_p50_ratio": _target(b["p50_ratio"], "<=", 1.5),
        "c_p50_ratio": _target(c["p50_ratio"], "<=", 1.5),
        "c_p99_ratio": _target(c["p99_ratio"], "<=", 2),
    }
    by_dtype = {dtype: [r for r in processes if r["dtype"] == dtype] for dtype in DTYPES}
    for dtype, rows in by_dtype.items():
        fewest, most = rows[0], rows[-1]
        few, many = (r["clients"].split()[0] for r in (fewest, most))
        targets[f"d_{dtype}_samples_ratio_at_{few}"] = _target(fewest["throughput_ratio"], ">=", 0.8)
        targets[f"d_{dtype}_samples_ratio_at_{many}"] = _target(most["throughput_ratio"], ">=", 0.8 if group else 0.6)
        if len(rows) > 1:
            rates = [r["hps_samples_per_s"] for r in rows]
            targets[f"d_{dtype}_samples_{many}_vs_{few}_clients"] = _target(rates[-1] / rates[0], ">=", 1)
            steps = min(later / earlier for earlier, later in itertools.pairwise(rates))
            targets[f"d_{dtype}_samples_never_fall_as_clients_added"] = _target(steps, ">=", 1)
        targets[f"d_{dtype}_worst_p99_ratio"] = _target(max(r["p99_ratio"] for r in rows), "<=", 3)
    fp16_over_fp32 = min(
        half["hps_samples_per_s"] / full["hps_samples_per_s"]
        for full, half in zip(by_dtype["float32"], by_dtype["float16"], strict=True)
    )
    targets["d_float16_over_float32_samples"] = _target(fp16_over_fp32, ">=", 1)
    targets["wrong_vectors"] = _target(sum(r["wrong_vectors"] for r in (*single, *processes)), "==", 0)
    return targets


def _client_counts(text: str) -> list[int]:
    counts = sorted({int(n) for n in text.split(",")})
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"must be client counts >= 1, comma separated, got {text!r}")
    return counts


def _server_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE, got {text!r}")
    if key == "address":
        raise argparse.ArgumentTypeError("address: the benchmark picks the port itself")
    return key, yaml.safe_load(value)  # as the config file would read it: 8 is an int, true a bool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hps bench lookup", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of calls")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of each large table (the 26 small: 1/25)")
    parser.add_argument(
        "--l1",
        choices=servers.L1_CHOICES,
        default="none",
        help="none: warm hash map over RocksDB; cpu: NumPy reference L1; gpu: CUDA L1 on device 0; "
        "static: every table held whole on device 0 (use_static_table)",
    )
    parser.add_argument("--clients", type=_client_counts, default=[1, 4, 8, 16], help="client process counts of case d")
    parser.add_argument(
        "--server-option",
        type=_server_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="sets server.KEY in the served config (repeatable), e.g. workers=8",
    )
    parser.add_argument("--processes", type=int, help="server.processes of the served config (only if given)")
    parser.add_argument(
        "--tls", action="store_true", help="hps and the echo serve TLS (throwaway certificates made for the run)"
    )
    parser.add_argument("--token", action="store_true", help="hps checks a bearer token on every call (auth on)")
    args = parser.parse_args(argv)
    if servers.uses_gpu(args.l1):
        from hps_server.cache.placement import gpus_available

        if not gpus_available([0]):
            parser.error(
                f"--l1 {args.l1}: CuPy sees no GPU 0 on this host (install the cuda12 or cuda13 extra, or use cpu)"
            )
    options = dict(args.server_option)
    if args.processes is not None:
        options["processes"] = args.processes
    single, processes = run(args.scale, args.rows, args.l1, args.clients, options, args.tls, args.token)
    every = [*single, *processes]
    report.emit(
        "Lookup vs raw gRPC echo of the same sizes and process layout (a-c: latency from one thread's sequential "
        f"calls, throughput from {CLIENT_THREADS} threads; d: both from N client processes)",
        every,
        args.json,
        extra={
            "l1": args.l1,
            "server_options": options,
            "tls": args.tls,
            "token": args.token,
            "totals": {key: sum(r[key] for r in every) for key in ("checked_vectors", "wrong_vectors")},
            "targets": _targets(single, processes, group=options.get("processes", 1) != 1),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
