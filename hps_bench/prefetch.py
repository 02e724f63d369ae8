"""Benchmark: Prefetch against an `hps serve` with an L1 (CUDA where CuPy sees a GPU, else the NumPy reference)
over a hash map and RocksDB.

(a) interference: p99 of lookups of rows already in L1, alone and while another client process prefetches a
batch of cold keys every PREFETCH_EVERY_S, as a client prefetching its next batch would (the target: at most
1.2x; a process of its own, so that its calls do not take the measuring client's GIL); (b) benefit: p50 of
lookups of cold batches, plain and with each batch prefetched one batch ahead (MODEL_WORK_S of the model's
work between two batches in both).
Both from the same run, interleaved. --processes N serves with a worker group (the clients' connections land
on workers as the kernel spreads them). Prints a table (or --json).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import numpy as np

from hps_bench import report
from hps_bench.servers import L1Choice, free_port, hps_server, server_env, write_served_model
from hps_client import Client
from hps_server.cache.placement import gpus_available

DIM = 64
BATCH = 256
TARGET_P99_RATIO = 1.2
# The other client's pace, and the model's work between two batches of the prefetching-ahead client.
PREFETCH_EVERY_S = 0.010
MODEL_WORK_S = 0.010
# Lookups per round and case, and rounds: the p99 of 6,000 calls a case is their 60th slowest. With 800
# (500 x 2 before), the p99 ratio of one unchanged server moved by up to 0.4 between runs on the H200 host.
LOOKUPS = 1500
ROUNDS = 4


def _latencies(client: Client, batches: list[np.ndarray], ahead: bool = False, model_work: float = 0.0) -> np.ndarray:
    """Seconds of each batch's lookup; `ahead`: each batch prefetched while the one before it is served;
    `model_work`: seconds of the model's own work between two batches (both cold cases pause alike: a
    process idle that long answers its next call slower, prefetched or not)."""
    seconds = []
    for i, batch in enumerate(batches):
        if ahead and i + 1 < len(batches):
            client.prefetch("bench", {"table": batches[i + 1]})
        started = time.perf_counter()
        client.lookup("bench", "table", batch)
        seconds.append(time.perf_counter() - started)
        if model_work:
            time.sleep(model_work)  # while the next batch is prefetched, when it is
    return np.array(seconds)


def _ms(runs: list[np.ndarray], percentile: float) -> float:
    """The percentile of every round's call seconds, in milliseconds."""
    return 1000 * float(np.percentile(np.concatenate(runs), percentile))


def _prefetching(target: str, cold: np.ndarray, prefetching: Event, stop: Event) -> None:
    """The other client (a spawned process): prefetches until `stop`, `prefetching` set after its first call."""
    rng = np.random.default_rng(2)
    with Client(target) as client:
        while not stop.is_set():
            client.prefetch("bench", {"table": rng.choice(cold, BATCH)})
            prefetching.set()
            time.sleep(PREFETCH_EVERY_S)


def run(
    json_out: bool = False, rows: int = 100_000, lookups: int = LOOKUPS, rounds: int = ROUNDS, processes: int = 1
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    keys = rng.choice(2**40, size=rows, replace=False).astype(np.int64)
    vectors = rng.standard_normal((rows, DIM), dtype=np.float32)
    hot, cold = keys[: 4 * BATCH], keys[4 * BATCH :]
    spawn = multiprocessing.get_context("spawn")  # no child inherits this process's gRPC state
    with tempfile.TemporaryDirectory(prefix="hps-bench-prefetch-") as root:
        port = free_port()
        l1: L1Choice = "gpu" if gpus_available([0]) else "cpu"  # the L1 a server on this host picks
        served = {"table": (keys, vectors, 16)}
        options = {"processes": processes} if processes > 1 else None
        config = write_served_model(Path(root), port, "bench", served, BATCH, l1=l1, server_options=options)
        text = config.read_text().replace("initial_cache_rate: 1.0", "initial_cache_rate: 0.0")
        config.write_text(text.replace("gpucacheper: 1.0", "gpucacheper: 0.5"))
        with hps_server(config, port, server_env(l1)) as target, Client(target) as client:
            client.lookup("bench", "table", hot)
            alone, loaded, plain, ahead = [], [], [], []
            for _ in range(rounds):  # interleaved, so drift on a shared machine hits both alike
                hot_batches = [rng.choice(hot, BATCH) for _ in range(lookups)]
                alone.append(_latencies(client, hot_batches))
                prefetching, stop = spawn.Event(), spawn.Event()
                prefetcher = spawn.Process(target=_prefetching, args=(target, cold, prefetching, stop), daemon=True)
                prefetcher.start()
                try:
                    if not prefetching.wait(60):
                        raise RuntimeError("the prefetching client made no call within 60 s")
                    loaded.append(_latencies(client, hot_batches))
                finally:
                    stop.set()
                    prefetcher.join(30)
                cold_batches = [[rng.choice(cold, BATCH) for _ in range(lookups // 5)] for _ in range(2)]
                plain.append(_latencies(client, cold_batches[0], model_work=MODEL_WORK_S))
                ahead.append(_latencies(client, cold_batches[1], ahead=True, model_work=MODEL_WORK_S))
    cases = [
        ("L1 rows, lookups alone", alone),
        ("L1 rows, while another client prefetches", loaded),
        ("cold batches, plain", plain),
        ("cold batches, each prefetched one batch ahead", ahead),
    ]
    table = [{"case": case, "p50_ms": _ms(runs, 50), "p99_ms": _ms(runs, 99)} for case, runs in cases]
    ratio = _ms(loaded, 99) / _ms(alone, 99)
    extra = {
        "batch_keys": BATCH,
        "dim": DIM,
        "table_rows": rows,
        "l1": l1,
        "server_processes": processes,
        "p99_ratio_with_prefetch": round(ratio, 3),
        "target_p99_ratio": TARGET_P99_RATIO,
        "target_met": ratio <= TARGET_P99_RATIO,
        "cold_p50_ratio_prefetched_vs_plain": round(_ms(ahead, 50) / _ms(plain, 50), 3),
    }
    layout = "1 server process" if processes == 1 else f"{processes} server processes"
    title = f"Prefetch: lookups of {BATCH} keys, dim {DIM}, {l1} L1 over hash map and RocksDB, {layout}"
    report.emit(title, table, json_out, extra)
    return {"benchmark": title, "rows": table, **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hps bench prefetch", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the table")
    parser.add_argument("--lookups", type=int, default=LOOKUPS, help="lookups per round and case")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of the interleaved cases")
    parser.add_argument("--processes", type=int, default=1, help="server.processes of the served config")
    args = parser.parse_args(argv)
    run(json_out=args.json, rows=args.rows, lookups=args.lookups, rounds=args.rounds, processes=args.processes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
