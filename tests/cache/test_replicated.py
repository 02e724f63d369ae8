"""L1 replicated over several devices (gpu_placement: replicated), checked on the CPU with two NumPy reference
caches standing in for two GPUs behind a real server: warm-up fills each, requests take turns over them, an
Upsert or Delete reaches each copy before it returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hps_client import Client
from hps_server import config as config_module
from hps_server.cache import EmbeddingCache, TableL1, placement
from hps_server.cache.reference import ReferenceEmbeddingCache
from hps_server.config import ModelConfig
from hps_server.server import HpsServer
from hps_server.storage.base import StorageLevel
from tests.conftest import sample_raw_config, write_sample_tables


def _two_replicas(model: ModelConfig, levels: Sequence[StorageLevel]) -> dict[str, TableL1]:
    """build_caches' reference L1, and a second cache of the same layout per dim: two pretend devices."""
    placed = placement.build_caches(dataclasses.replace(model, deployed_device_list=(10**6,)), levels)
    replicas: dict[int, tuple[EmbeddingCache, ...]] = {}
    for l1 in placed.values():
        (cache,) = l1.caches
        replicas.setdefault(id(cache), (cache, ReferenceEmbeddingCache(list(cache.capacities), cache.dim)))
    return {name: TableL1(replicas[id(l1.caches[0])], l1.index) for name, l1 in placed.items()}


def test_replicas_are_warmed_take_turns_and_all_take_each_write(tmp_path: Path) -> None:
    write_sample_tables(tmp_path)
    raw = sample_raw_config(initial_cache_rate=1.0)
    raw["models"][0].update(gpucache=True, gpucacheper=0.5, deployed_device_list=[0, 1])
    server = HpsServer(config_module.parse(raw, tmp_path), cache_factory=_two_replicas)
    port = server.start()
    try:
        assert server.wait_ready(30)
        l1 = server.models.sessions["ctr"].tables["user"].l1
        assert l1 is not None and len(l1.caches) == 2
        first, second = (cache.table_stats()[l1.index] for cache in l1.caches)
        assert first.rows == second.rows > 2_000  # warm-up filled both, the same rows
        held = l1.caches[0].dump(l1.index)[0][:100]
        index = np.full(held.size, l1.index, np.int32)
        with Client(f"127.0.0.1:{port}") as client:
            for _ in range(4):
                client.lookup("ctr", "user", held)
            hits = [cache.table_stats()[l1.index].hits for cache in l1.caches]
            assert hits == [200, 200]  # four requests, two on each device
            fresh = np.full((held.size, 16), -4.0, np.float32)
            assert client.upsert("ctr", "user", held, fresh) == held.size
            for cache in l1.caches:  # before Upsert returned, every copy was rewritten
                rows, found = cache.query(held, index)
                assert found.all() and np.all(rows == -4.0)
            assert client.delete("ctr", "user", held[:10]) == 10
            for cache in l1.caches:
                assert not cache.query(held[:10], index[:10])[1].any()
            for _ in range(2):  # each device answers the same: new rows, and defaults for the deleted keys
                got = client.lookup("ctr", "user", held)
                np.testing.assert_array_equal(got[10:], fresh[10:])
                assert not got[:10].any()
    finally:
        server.stop(grace=1)
