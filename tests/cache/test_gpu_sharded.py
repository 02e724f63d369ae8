"""L1 on several GPUs: GPU shards against reference shards (same route, identical results), and a real server
with the model replicated or sharded over every GPU (warm-up fills each device, upserts reach each copy).

Runs where CuPy sees an NVIDIA GPU (the server tests: two or more); elsewhere every test skips, saying so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hps_client import Client
from hps_server import config as config_module
from hps_server.cache.reference import ReferenceEmbeddingCache, ReferenceStaticTable
from hps_server.cache.sharded import Gather, ShardedCache, split_rows
from hps_server.server import HpsServer
from tests.conftest import sample_raw_config, write_sample_tables

try:
    import cupy as cp

    GPUS = cp.cuda.runtime.getDeviceCount()
except Exception:  # no CuPy, or no driver/device
    GPUS = 0

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPUS, reason="needs an NVIDIA GPU with CuPy")]

if GPUS:
    from hps_server.cache.gpu import GpuEmbeddingCache, GpuStaticTable

# Shards over every GPU; on a one-GPU machine two shards on device 0 (built here directly: a config
# naming a device twice is refused), which still checks routing and gathering around the GPU caches.
DEVICES = list(range(GPUS)) if GPUS > 1 else [0, 0]
DIM = 8


def _rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal((n, DIM), dtype=np.float32)


@pytest.mark.parametrize("gather", ["host", "device"])
def test_gpu_shards_match_reference_shards_op_for_op(gather: Gather) -> None:
    rng = np.random.default_rng(0)
    capacities = [2_048, 256]
    gpu = ShardedCache([GpuEmbeddingCache(capacities, DIM, device=d) for d in DEVICES], gather=gather)
    ref = ShardedCache([ReferenceEmbeddingCache(capacities, DIM) for _ in DEVICES])
    for step in range(8):
        keys = rng.integers(0, 20_000, size=3_000)
        tables = rng.integers(0, 2, size=keys.size).astype(np.int32)
        rows = _rows(rng, keys.size)
        for cache in (gpu, ref):
            cache.replace(keys, rows, tables)
            cache.update(keys[::5], rows[::5] * 2, tables[::5])
            if step % 3 == 2:
                cache.invalidate(keys[::7], tables[::7])
        asked = rng.integers(0, 25_000, size=5_000)
        asked_tables = rng.integers(0, 2, size=asked.size).astype(np.int32)
        for dtype in (np.float32, np.float16):
            for got, want in zip(
                gpu.query(asked, asked_tables, dtype=dtype), ref.query(asked, asked_tables, dtype=dtype), strict=True
            ):
                np.testing.assert_array_equal(got, want)
    for table in (0, 1):
        for got, want in zip(gpu.dump(table), ref.dump(table), strict=True):
            np.testing.assert_array_equal(got, want)
    assert gpu.table_stats() == ref.table_stats()


@pytest.mark.parametrize("gather", ["host", "device"])
def test_gpu_sharded_static_table_serves_every_row_with_no_wrong_vector(gather: Gather) -> None:
    rng = np.random.default_rng(1)
    keys = rng.choice(10**9, size=200_000, replace=False).astype(np.int64)
    vectors = _rows(rng, keys.size)
    tables = np.zeros(keys.size, np.int32)
    gpu = ShardedCache(
        [
            GpuStaticTable(k, v, tables=t, num_tables=1, device=d)
            for (k, v, t), d in zip(split_rows(keys, vectors, tables, len(DEVICES)), DEVICES, strict=True)
        ],
        gather=gather,
    )
    whole = ReferenceStaticTable(keys, vectors)
    assert gpu.capacity == keys.size
    asked = np.concatenate([keys[rng.permutation(keys.size)], rng.integers(10**9, 2 * 10**9, size=1_000)])
    got, hit = gpu.query(asked)
    want, want_hit = whole.query(asked)
    np.testing.assert_array_equal(hit, want_hit)
    assert int(hit.sum()) == keys.size
    assert int(np.count_nonzero(np.any(got != want, axis=1))) == 0  # 0 wrong vectors


@pytest.mark.skipif(GPUS < 2, reason="needs two or more GPUs")
@pytest.mark.parametrize("placement", ["replicated", "sharded"])
def test_server_over_every_gpu_warms_each_device_and_upserts_reach_every_copy(tmp_path: Path, placement: str) -> None:
    truth = write_sample_tables(tmp_path)
    raw = sample_raw_config(initial_cache_rate=1.0)
    raw["models"][0].update(
        gpucache=True, gpucacheper=1.0, gpu_placement=placement, deployed_device_list=list(range(GPUS))
    )
    server = HpsServer(config_module.parse(raw, tmp_path))
    port = server.start()
    try:
        assert server.wait_ready(60)
        l1 = server.models.sessions["ctr"].tables["user"].l1
        assert l1 is not None
        per_device = l1.device_caches()
        assert sorted(c.device for c in per_device) == list(range(GPUS))  # type: ignore[attr-defined]
        assert all(c.table_stats()[l1.index].rows > 0 for c in per_device)  # warm-up filled every device
        keys, vectors = truth["user"]
        fresh = np.full((64, 16), 2.5, np.float32)
        with Client(f"127.0.0.1:{port}") as client:
            for _ in range(2 * GPUS):  # replicated: requests take turns over the devices
                np.testing.assert_array_equal(client.lookup("ctr", "user", keys[:256]), vectors[:256])
            assert client.upsert("ctr", "user", keys[:64], fresh) == 64
            for _ in range(2 * GPUS):
                np.testing.assert_array_equal(client.lookup("ctr", "user", keys[:64]), fresh)
        index = np.full(64, l1.index, np.int32)
        for cache in per_device:
            rows, held = cache.query(keys[:64], index)
            assert np.all(rows[held] == 2.5)  # no device kept an old copy
    finally:
        server.stop(grace=1)
