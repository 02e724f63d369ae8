"""The levels below the L1 cache, chosen by the `type` string in config and registered here.

Adding a backend is adding one module and one line to a registry below.
"""

from __future__ import annotations

from collections.abc import Callable

from hps_server.config import PersistentDbConfig, VolatileDbConfig
from hps_server.storage.base import StorageLevel


def _hash_map(config: VolatileDbConfig) -> StorageLevel:
    from hps_server.storage.hashmap import HashMapLevel

    return HashMapLevel.from_config(config)


def _redis_cluster(config: VolatileDbConfig) -> StorageLevel:
    from hps_server.storage.redis_cluster import RedisClusterLevel

    return RedisClusterLevel.from_config(config)


def _rocksdb(config: PersistentDbConfig) -> StorageLevel:
    from hps_server.storage.rocksdb import RocksDBLevel

    return RocksDBLevel.from_config(config)


VOLATILE_LEVELS: dict[str, Callable[[VolatileDbConfig], StorageLevel]] = {
    "hash_map": _hash_map,
    "redis_cluster": _redis_cluster,
}
PERSISTENT_LEVELS: dict[str, Callable[[PersistentDbConfig], StorageLevel]] = {
    "rocksdb": _rocksdb,
}


def open_volatile(config: VolatileDbConfig) -> StorageLevel | None:
    """The configured volatile level, or None when it is disabled."""
    return None if config.type == "disabled" else VOLATILE_LEVELS[config.type](config)


def open_persistent(config: PersistentDbConfig) -> StorageLevel | None:
    """The configured persistent level, or None when it is disabled."""
    return None if config.type == "disabled" else PERSISTENT_LEVELS[config.type](config)
