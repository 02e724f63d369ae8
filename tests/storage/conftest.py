"""Backend factories the storage contract tests run against, one entry per backend.

Fixtures that start real services (Redis, ...) live in tests/conftest.py; factories here only open levels on them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from hps_server.config import VolatileDbConfig
from hps_server.storage.base import StorageLevel
from hps_server.storage.hashmap import HashMapLevel
from hps_server.storage.redis_cluster import RedisClusterLevel
from hps_server.storage.rocksdb import RocksDBLevel


def _redis_cluster(request: pytest.FixtureRequest, config: VolatileDbConfig | None = None) -> StorageLevel:
    """A level on the session's cluster, emptied first: contract tests reuse table names."""
    cluster = request.getfixturevalue("redis_cluster_processes")
    cluster.flush()
    # One partition: overflow_margin counts per partition in Redis and per table in the contract.
    config = replace(config or VolatileDbConfig(), address=cluster.seed, num_partitions=1, timeout_ms=2000)
    return RedisClusterLevel.from_config(config)


def _shared_hash_map(request: pytest.FixtureRequest, config: VolatileDbConfig | None = None) -> StorageLevel:
    """A level attached to a shared-memory one this test owns (the owner closes at teardown)."""
    config = config or VolatileDbConfig()
    owner = HashMapLevel.create_shared(config)
    request.addfinalizer(owner.close)
    return HashMapLevel.from_config(replace(config, shared_memory=owner.shared_name))


LevelFactory = Callable[[pytest.FixtureRequest], StorageLevel]
BoundedLevelFactory = Callable[[pytest.FixtureRequest, VolatileDbConfig], StorageLevel]

# Every backend: the contract suite runs once per entry.
LEVELS: dict[str, LevelFactory] = {
    "hash_map": lambda request: HashMapLevel(),
    "shared_hash_map": _shared_hash_map,
    "rocksdb": lambda request: RocksDBLevel(request.getfixturevalue("tmp_path") / "rocksdb"),
    "redis_cluster": _redis_cluster,
}

# Backends that enforce overflow_margin / overflow_policy themselves.
BOUNDED_LEVELS: dict[str, BoundedLevelFactory] = {
    "hash_map": lambda request, config: HashMapLevel.from_config(config),
    "shared_hash_map": _shared_hash_map,
    "redis_cluster": _redis_cluster,
}


@pytest.fixture(params=sorted(LEVELS))
def level(request: pytest.FixtureRequest) -> Iterator[StorageLevel]:
    opened = LEVELS[request.param](request)
    yield opened
    opened.close()


@pytest.fixture(params=sorted(BOUNDED_LEVELS))
def bounded_level(request: pytest.FixtureRequest) -> Iterator[Callable[[VolatileDbConfig], StorageLevel]]:
    """Opens a level of this backend with the overflow settings of the config it is given."""
    opened: list[StorageLevel] = []

    def open_level(config: VolatileDbConfig) -> StorageLevel:
        opened.append(BOUNDED_LEVELS[request.param](request, config))
        return opened[-1]

    yield open_level
    for level in opened:
        level.close()


@pytest.fixture(autouse=True)
def no_leaked_shared_memory() -> Iterator[None]:
    """Fails a test that leaves shared-memory segments of this process's levels behind, and removes them."""
    yield
    # This process's `.alive` file stays while it runs (segments.remove_dead reads it).
    leaked = sorted(path for path in Path("/dev/shm").glob(f"hps{os.getpid()}_*") if not path.name.endswith(".alive"))
    for path in leaked:
        path.unlink()
    assert not leaked, f"shared memory left behind: {[path.name for path in leaked]}"
