"""`hps demo`: the main job on the embedded default, from nothing to a serving model in one command.

Makes a Criteo-like sample model in HPS table format (first run only), serves it, drives a skewed (Zipf)
client workload, prints per-level hit rates and latency percentiles, then keeps serving until interrupted.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from hps_client import Client, HpsError
from hps_server import config as config_module
from hps_server import tables
from hps_server.server import HpsServer

MODEL = "criteo_demo"


@dataclass(frozen=True)
class SampleTable:
    name: str
    rows: int
    dim: int


# Cardinalities and dims shaped like Criteo's categorical features: a few huge tables, some small.
SAMPLE_TABLES = (
    SampleTable("user_id", 600_000, 16),
    SampleTable("item_id", 300_000, 32),
    SampleTable("site_id", 90_000, 64),
    SampleTable("ad_category", 10_000, 128),
)
SAMPLES_PER_REQUEST = 256
CLIENT_THREADS = 4
ZIPF_ALPHA = 1.1


def sample_keys(table: SampleTable) -> np.ndarray:
    """The table's keys: spread over the int64 range (as hashed feature ids are), the same every run."""
    rng = np.random.default_rng(len(table.name) * 1_000_003 + table.rows)
    return np.unique(rng.integers(-(2**62), 2**62, size=int(table.rows * 1.01)))[: table.rows]


def sample_vectors(table: SampleTable, keys: np.ndarray) -> np.ndarray:
    """A vector per key, derived from the key so any process can check a reply against it."""
    base = (keys % 10_007).astype(np.float32)[:, None] / 10_007
    return base + np.arange(table.dim, dtype=np.float32)[None, :] / table.dim


def make_sample_model(directory: Path) -> Path:
    """Writes the sample tables and a config serving them; returns the config path. Idempotent."""
    config_path = directory / "hps.yaml"
    if config_path.exists():
        return config_path
    # A run interrupted while writing leaves partial tables without a config: start them afresh.
    shutil.rmtree(directory / "tables", ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    for table in tqdm(SAMPLE_TABLES, desc="making sample tables", unit="table"):
        keys = sample_keys(table)
        tables.write_table(directory / "tables" / table.name, [(keys, sample_vectors(table, keys))], table.dim)
    document = {
        "server": {"address": "127.0.0.1:8500"},
        # Keep a fraction of each table in RAM so the workload shows all three levels at work.
        "volatile_db": {
            "type": "hash_map",
            "initial_cache_rate": 0.0,
            "overflow_margin": 100_000,
            "overflow_policy": "evict_oldest",
        },
        "persistent_db": {"type": "rocksdb", "path": "rocksdb"},
        "models": [
            {
                "name": MODEL,
                "max_batch_size": SAMPLES_PER_REQUEST,
                # A small L1 (the NumPy reference cache without a GPU) for the hottest rows.
                "gpucacheper": 0.02,
                "tables": [{"name": t.name, "dim": t.dim, "source": f"tables/{t.name}"} for t in SAMPLE_TABLES],
            }
        ],
    }
    config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    return config_path


@dataclass
class WorkloadResult:
    latencies_ms: np.ndarray
    seconds: float
    keys: int
    wrong: int
    error: str | None = None  # the first refused request's error; a client thread stops at its first


def zipf_keys(rng: np.random.Generator, keys: np.ndarray, n: int) -> np.ndarray:
    """n keys drawn with Zipf-distributed popularity (rank 1 most popular); ranks past the table wrap."""
    ranks = (rng.zipf(ZIPF_ALPHA, size=n) - 1) % len(keys)
    return keys[ranks]


def run_workload(target: str, seconds: float) -> WorkloadResult:
    """CLIENT_THREADS threads sending multi-table lookups for `seconds`, checking every vector."""
    key_sets = {t.name: sample_keys(t) for t in SAMPLE_TABLES}
    latencies: list[float] = []
    totals = {"keys": 0, "wrong": 0}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client_thread(seed: int) -> None:
        rng = np.random.default_rng(seed)
        mine: list[float] = []
        keys_sent = wrong = 0
        with Client(target) as client:
            while time.perf_counter() < deadline:
                batch = {name: zipf_keys(rng, keys, SAMPLES_PER_REQUEST) for name, keys in key_sets.items()}
                start = time.perf_counter()
                try:
                    results = client.lookup_tables(MODEL, batch)
                except HpsError as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    break
                mine.append((time.perf_counter() - start) * 1000)
                for table in SAMPLE_TABLES:
                    expected = sample_vectors(table, batch[table.name])
                    wrong += int(np.count_nonzero(np.any(results[table.name].vectors != expected, axis=1)))
                    keys_sent += len(batch[table.name])
        with lock:
            latencies.extend(mine)
            totals["keys"] += keys_sent
            totals["wrong"] += wrong

    started = time.perf_counter()
    threads = [threading.Thread(target=client_thread, args=(seed,)) for seed in range(CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return WorkloadResult(np.array(latencies), elapsed, totals["keys"], totals["wrong"], errors[0] if errors else None)


def print_summary(server: HpsServer, result: WorkloadResult) -> None:
    if not len(result.latencies_ms):
        why = (
            f"every request failed, the first with {result.error}"
            if result.error
            else "--seconds ran out before a request"
        )
        print(f"\nworkload: no replies in {result.seconds:.1f} s ({why}); nothing to summarise")
        return
    if result.error:
        print(f"\nsome requests failed, the first with {result.error}")
    session = server.models.session(MODEL)
    print(
        f"\nworkload: {len(result.latencies_ms)} requests ({CLIENT_THREADS} client threads, "
        f"{len(SAMPLE_TABLES)} tables x {SAMPLES_PER_REQUEST} keys, Zipf alpha {ZIPF_ALPHA}) "
        f"in {result.seconds:.1f} s: {result.keys / result.seconds:,.0f} keys/s, wrong vectors: {result.wrong}"
    )
    p50, p90, p99 = np.percentile(result.latencies_ms, [50, 90, 99])
    print(f"latency ms: p50 {p50:.2f}  p90 {p90:.2f}  p99 {p99:.2f}\n")
    levels = [*session.level_names(), "default"]
    print(f"{'table':<14}" + "".join(f"{level:>12}" for level in levels) + "   (share of keys answered by level)")
    for table, counts in session.counts().items():
        total = sum(counts.by_level.values()) or 1
        shares = "".join(f"{counts.by_level.get(level, 0) / total:>12.1%}" for level in levels)
        print(f"{table:<14}{shares}")


def run_demo(directory: Path, port: int, seconds: float, once: bool) -> int:
    config_path = make_sample_model(directory)
    config = config_module.load(config_path)
    config = replace(config, server=replace(config.server, address=f"127.0.0.1:{port}"))
    if config.persistent_db.path.exists():
        print("starting the server...")
    else:
        print("starting the server (this first start ingests the sample tables into RocksDB)...")
    server = HpsServer(config, progress=True)
    bound = server.start()
    target = f"127.0.0.1:{bound}"
    try:
        result = run_workload(target, seconds)
        print_summary(server, result)
        if once:
            return 1 if result.wrong or result.error or not len(result.latencies_ms) else 0
        print(f"\nserving {MODEL} on {target} (health checking and reflection on); Ctrl-C stops.")
        print(f"try: grpcurl -plaintext {target} list")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()
        return 0
    finally:
        server.stop()
