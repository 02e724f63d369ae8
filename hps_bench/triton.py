"""`hps bench triton`: a DLRM-shaped workload (13 dense features, 26 one-hot tables) through Triton's ensemble
(hps lookup model -> dense model) and, in the same run, through the hps client with the same dense part in-process.

The hps server runs as a child process, tritonserver as another; calls alternate between the paths in blocks so
both see the same machine load. Figures are ratios of Triton to the client path (the overhead Triton adds).
"""

from __future__ import annotations

import os

# One BLAS thread here and in the servers started below: on a small shared machine OpenBLAS's thread pool fights
# the servers' threads and the dense part's timings swing tenfold. Set before NumPy is imported to take effect.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import contextlib
import itertools
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc

from hps_bench import report, servers
from hps_bench.triton_ensemble import repository
from hps_bench.triton_ensemble.dense_forward import DenseForward
from hps_client import Client
from hps_client.triton import running, setup

MODEL = "bench"
DENSE_FEATURES = 13
BATCHES = (32, 256, 2048, 8192)
CLIENT_THREADS = 4


@dataclass(frozen=True)
class Workload:
    tables: int = 26
    rows: int = 10_000
    dim: int = 16
    max_batch_size: int = max(BATCHES)

    @property
    def names(self) -> list[str]:
        return [f"t{i:02d}" for i in range(self.tables)]


def _write_model(folder: Path, port: int, workload: Workload) -> tuple[Path, list[np.ndarray]]:
    """Tables and the hps config serving them; returns the config path and each table's keys."""
    rng = np.random.default_rng(5)
    served = {}
    for name in workload.names:
        keys = rng.permutation(workload.rows * 4)[: workload.rows].astype(np.int64)
        served[name] = (keys, rng.standard_normal((workload.rows, workload.dim), dtype=np.float32) * 0.1, 1)
    path = servers.write_served_model(folder, port, MODEL, served, workload.max_batch_size)
    return path, [keys for keys, _, _ in served.values()]


def _write_dense_weights(path: Path, workload: Workload) -> Path:
    """Random weights in the layout dissect.py writes: bottom 13 -> 64 -> dim, top (dim + pairs) -> 64 -> 1."""
    rng = np.random.default_rng(6)
    rows, cols = np.triu_indices(workload.tables + 1, k=1)
    shapes = {"bottom": [DENSE_FEATURES, 64, workload.dim], "top": [workload.dim + len(rows), 64, 1]}
    arrays: dict[str, Any] = {}
    for prefix, sizes in shapes.items():
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            arrays[f"{prefix}_w{i}"] = (rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
            arrays[f"{prefix}_b{i}"] = np.zeros(fan_out, np.float32)
    np.savez(path, **arrays, pair_rows=rows, pair_cols=cols)
    return path


def _tensor(name: str, array: np.ndarray, datatype: str) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _concurrent(make_call: Callable[[], Callable[[], object]], threads: int, calls: int) -> float:
    """Calls per second with `threads` threads, each with its own client, sharing `calls` calls."""
    per_thread = max(1, calls // threads)
    ready = [make_call() for _ in range(threads)]

    def worker(call: Callable[[], object]) -> None:
        for _ in range(per_thread):
            call()

    pool = [threading.Thread(target=worker, args=(call,)) for call in ready]
    start = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return per_thread * threads / (time.perf_counter() - start)


@contextlib.contextmanager
def _deployed(
    workload: Workload, instances: int, reply_dtype: str, queue_delay_us: int
) -> Iterator[tuple[str, str, list[np.ndarray], DenseForward]]:
    """hps server and tritonserver over the same tables; yields (hps target, Triton gRPC target, keys, dense)."""
    with tempfile.TemporaryDirectory(prefix="hps-bench-triton-") as tmp:
        folder = Path(tmp)
        port = servers.free_port()
        config, key_sets = _write_model(folder, port, workload)
        weights = _write_dense_weights(folder / "dense.npz", workload)
        with servers.hps_server(config, port) as target:
            repository.write_repository(
                folder / "models",
                target,
                weights,
                max_batch_size=workload.max_batch_size,
                queue_delay_us=queue_delay_us,
                instances=instances,
                reply_dtype=reply_dtype,
                hps_model=MODEL,
                tables=workload.names,
                dense_features=DENSE_FEATURES,
            )
            with running(setup(), folder / "models", log_dir=folder) as triton:
                yield target, triton.grpc_target, key_sets, DenseForward(weights)


def _percentiles(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def _measure(
    batch: int,
    hps_target: str,
    triton_target: str,
    key_sets: list[np.ndarray],
    forward: DenseForward,
    workload: Workload,
    scale: float,
    reply_dtype: str,
    blocks: int = 3,
) -> dict[str, float | int]:
    rng = np.random.default_rng(batch)
    keys = np.stack([rng.choice(k, size=batch) for k in key_sets], axis=1)
    dense = rng.standard_normal((batch, DENSE_FEATURES), dtype=np.float32)
    keys_by_table = {name: keys[:, i] for i, name in enumerate(workload.names)}
    numkeys = np.ones(keys.shape, np.int32)
    names = workload.names

    def hps_call(client: Client) -> Callable[[], np.ndarray]:
        def call() -> np.ndarray:
            results = client.lookup_tables(MODEL, keys_by_table, dtype=reply_dtype)  # type: ignore[arg-type]
            vectors = np.stack([results[n].vectors for n in names], axis=1).astype(np.float32, copy=False)
            return forward(dense, vectors, keys)

        return call

    def triton_call(client: triton_grpc.InferenceServerClient, model: str) -> Callable[[], np.ndarray]:
        def call() -> np.ndarray:
            inputs = [_tensor("KEYS", keys, "INT64"), _tensor("NUMKEYS", numkeys, "INT32")]
            if model == repository.ENSEMBLE:
                inputs.append(_tensor("DENSE", dense, "FP32"))
            output = "PREDICTION" if model == repository.ENSEMBLE else "OUTPUT0"
            return client.infer(model, inputs).as_numpy(output)

        return call

    per_block = max(3, int(scale * 512 / batch**0.5))
    with contextlib.ExitStack() as stack:
        hps_client = stack.enter_context(Client(hps_target))
        triton = stack.enter_context(triton_grpc.InferenceServerClient(triton_target))
        paths = {
            "hps": hps_call(hps_client),
            "ensemble": triton_call(triton, repository.ENSEMBLE),
            "lookup": triton_call(triton, repository.LOOKUP),
        }
        difference = float(np.abs(paths["ensemble"]() - paths["hps"]()).max())
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(blocks):
            for name, call in paths.items():
                times[name] += report.timed(call, per_block)

        def triton_maker() -> Callable[[], object]:
            return triton_call(
                stack.enter_context(triton_grpc.InferenceServerClient(triton_target)), repository.ENSEMBLE
            )

        calls = per_block * 2
        hps_rate = _concurrent(lambda: hps_call(hps_client), CLIENT_THREADS, calls)
        triton_rate = _concurrent(triton_maker, CLIENT_THREADS, calls)
    hps_p50, hps_p99 = _percentiles(times["hps"])
    ens_p50, ens_p99 = _percentiles(times["ensemble"])
    lookup_p50, _ = _percentiles(times["lookup"])
    # Sequential samples/s at the median call: the shared machine's stalls go to p99, not to the rate.
    hps_seq, ens_seq = batch / hps_p50 * 1e3, batch / ens_p50 * 1e3
    return {
        "batch": batch,
        "calls": len(times["hps"]),
        "hps_samples_per_s": hps_seq,
        "triton_samples_per_s": ens_seq,
        "seq_ratio": ens_seq / hps_seq,
        "hps_conc_samples_per_s": hps_rate * batch,
        "triton_conc_samples_per_s": triton_rate * batch,
        "conc_ratio": triton_rate / hps_rate,
        "hps_p50_ms": hps_p50,
        "triton_p50_ms": ens_p50,
        "p50_ratio": ens_p50 / hps_p50,
        "hps_p99_ms": hps_p99,
        "triton_p99_ms": ens_p99,
        "p99_ratio": ens_p99 / hps_p99,
        "triton_lookup_p50_ms": lookup_p50,
        "max_abs_diff": difference,
    }


def run(
    batches: Sequence[int] = BATCHES,
    *,
    scale: float = 1.0,
    instances: int = 1,
    reply_dtype: str = "float32",
    queue_delay_us: int = 100,
    workload: Workload | None = None,
) -> list[dict[str, float | int]]:
    workload = workload or Workload(max_batch_size=max(batches))
    with _deployed(workload, instances, reply_dtype, queue_delay_us) as (hps_target, triton_target, key_sets, forward):
        return [
            _measure(b, hps_target, triton_target, key_sets, forward, workload, scale, reply_dtype) for b in batches
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hps bench triton", description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of calls")
    parser.add_argument("--instances", type=int, default=1, help="instances of each Triton model")
    parser.add_argument("--reply-dtype", choices=("float32", "float16"), default="float32", help="hps -> Triton")
    parser.add_argument("--queue-delay-us", type=int, default=100, help="Triton dynamic batching delay")
    args = parser.parse_args(argv)
    rows = run(
        [int(b) for b in args.batches.split(",")],
        scale=args.scale,
        instances=args.instances,
        reply_dtype=args.reply_dtype,
        queue_delay_us=args.queue_delay_us,
    )
    workload = Workload()
    report.emit(
        "Triton ensemble (hps lookup model -> dense model) vs hps client + the same dense part in-process "
        f"(samples/s: one client at p50; conc: {CLIENT_THREADS} client threads; ratios: Triton / client)",
        rows,
        args.json,
        extra={
            "workload": f"{DENSE_FEATURES} dense features, {workload.tables} tables x dim {workload.dim}, 1 key each",
            "instances": args.instances,
            "reply_dtype": args.reply_dtype,
            "queue_delay_us": args.queue_delay_us,
            "blas_threads": os.environ["OPENBLAS_NUM_THREADS"],
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
