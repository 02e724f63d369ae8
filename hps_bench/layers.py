"""`hps bench layers`: per-request overhead of the TensorFlow and PyTorch layers over the bare Client call they make.

Serves a small model with `hps serve`; for each batch, blocks of layer calls alternate with blocks of the same
Client call, so both see the same machine load. Reports p50 latencies, the overhead in ms and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hps_bench import report, servers
from hps_client import Client

MODEL = "bench"
ROWS = 20_000
BLOCKS = 5


@dataclass(frozen=True)
class Case:
    name: str
    table: str
    dim: int
    samples: int
    keys_per_sample: int
    pooled: bool  # SparseLookupLayer / lookup_combined (mean) instead of LookupLayer / lookup
    requests: int


def _cases(scale: float) -> list[Case]:
    def requests(n: int) -> int:
        return max(BLOCKS * 2, int(n * scale))

    return [
        Case("dense: 32 keys, dim 16", "d16", 16, 32, 1, False, requests(400)),
        Case("dense: 1,024 x 4 keys, dim 128", "d128", 128, 1024, 4, False, requests(60)),
        Case("pooled: 256 samples x 8 keys, dim 16", "d16", 16, 256, 8, True, requests(300)),
    ]


def _write_model(directory: Path, port: int) -> Path:
    rng = np.random.default_rng(5)
    keys = np.arange(ROWS, dtype=np.int64)
    served = {
        name: (keys, rng.standard_normal((ROWS, dim), dtype=np.float32), 8)
        for name, dim in (("d16", 16), ("d128", 128))
    }
    return servers.write_served_model(directory, port, MODEL, served, max_batch_size=1024)


def _paths(
    case: Case, client: Client, frameworks: list[str]
) -> tuple[Callable[[], object], dict[str, Callable[[], Any]]]:
    """The bare Client call for the case's batch, and each layer path making that same call."""
    rng = np.random.default_rng(case.samples)
    keys = rng.integers(0, ROWS, (case.samples, case.keys_per_sample), dtype=np.int64)
    table_id = ["d16", "d128"].index(case.table)
    target = client.target
    paths: dict[str, Callable[[], Any]] = {}
    if case.pooled:
        row_splits = np.arange(case.samples + 1, dtype=np.int64) * case.keys_per_sample
        flat = keys.reshape(-1)

        def baseline() -> object:
            return client.lookup_combined(MODEL, case.table, flat, row_splits, combiner="mean")
    else:

        def baseline() -> object:
            return client.lookup(MODEL, case.table, keys)

    if "tf" in frameworks:
        import tensorflow as tf

        from hps_client import tf as hps_tf

        if case.pooled:
            sparse = hps_tf.SparseLookupLayer(MODEL, table_id, case.dim, tf.float32, address=target)
            ragged = tf.RaggedTensor.from_tensor(tf.constant(keys))
            graph = tf.function(lambda ids: sparse(ids, combiner="mean"))
            paths["tf eager"] = lambda: sparse(ragged, combiner="mean")
            paths["tf.function"] = lambda: graph(ragged)
        else:
            dense = hps_tf.LookupLayer(MODEL, table_id, case.dim, tf.float32, address=target)
            ids = tf.constant(keys)
            dense_graph = tf.function(dense)
            paths["tf eager"] = lambda: dense(ids)
            paths["tf.function"] = lambda: dense_graph(ids)
    if "torch" in frameworks:
        import torch

        from hps_client import torch as hps_torch

        torch_keys = torch.from_numpy(keys)
        if case.pooled:
            bag = hps_torch.SparseLookupLayer(
                model_name=MODEL, table_id=table_id, emb_vec_size=case.dim, address=target
            )
            paths["torch"] = lambda: bag(torch_keys)
        else:
            lookup = hps_torch.LookupLayer(model_name=MODEL, table_id=table_id, emb_vec_size=case.dim, address=target)
            paths["torch"] = lambda: lookup(torch_keys)
    return baseline, paths


def _measure(case: Case, client: Client, frameworks: list[str]) -> list[dict[str, float | str]]:
    baseline, paths = _paths(case, client, frameworks)
    rows: list[dict[str, float | str]] = []
    per_block = max(1, case.requests // BLOCKS)
    for name, path in paths.items():
        for call in (baseline, path):  # warm: channel, table resolution, graph tracing
            report.timed(call, 3)
        layer: list[float] = []
        bare: list[float] = []
        for _ in range(BLOCKS):
            layer += report.timed(path, per_block)
            bare += report.timed(baseline, per_block)
        layer_p50, bare_p50 = float(np.percentile(layer, 50)), float(np.percentile(bare, 50))
        rows.append(
            {
                "case": case.name,
                "path": name,
                "layer_p50_ms": layer_p50 * 1e3,
                "client_p50_ms": bare_p50 * 1e3,
                "overhead_ms": (layer_p50 - bare_p50) * 1e3,
                "ratio": layer_p50 / bare_p50,
            }
        )
    return rows


def tf_function_dispatch_ms(calls: int = 300) -> float:
    """p50 of calling a tf.function that does no work: paid once per model call, not per layer."""
    import tensorflow as tf

    ids = tf.zeros([1024, 4], tf.int64)
    noop = tf.function(lambda x: tf.reshape(x, [-1]))
    report.timed(lambda: noop(ids), 3)
    return float(np.percentile(report.timed(lambda: noop(ids), calls), 50)) * 1e3


def run(scale: float = 1.0, frameworks: list[str] | None = None) -> list[dict[str, float | str]]:
    frameworks = frameworks or ["tf", "torch"]
    with tempfile.TemporaryDirectory(prefix="hps-bench-") as tmp:
        port = servers.free_port()
        config = _write_model(Path(tmp), port)
        with servers.hps_server(config, port) as target, Client(target) as client:
            return [row for case in _cases(scale) for row in _measure(case, client, frameworks)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hps bench layers", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of requests")
    parser.add_argument("--frameworks", nargs="+", choices=["tf", "torch"], default=["tf", "torch"])
    args = parser.parse_args(argv)
    rows = run(args.scale, args.frameworks)
    extra: dict[str, float] = {"max_overhead_ms": round(max(float(r["overhead_ms"]) for r in rows), 3)}
    if "tf" in args.frameworks:
        extra["tf_function_dispatch_ms"] = round(tf_function_dispatch_ms(), 3)
    report.emit(
        "Layer call vs the bare Client call it makes (p50 latency, one thread, sequential calls)",
        rows,
        args.json,
        extra=extra,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
