"""Builds a model's L1 from its config: per vector width, one cache (or static table) per device holding all of
the model's tables of that width (replicated), or one shard of them per device behind a ShardedCache (sharded).

The CUDA implementation where CuPy sees every device in deployed_device_list, the NumPy reference
otherwise. It reads the storage levels once, at start, and never serves lookups itself (warmup.py fills them).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from hps_server.cache import EmbeddingCache, TableL1
from hps_server.cache.layout import MAX_WAYS
from hps_server.cache.reference import ReferenceEmbeddingCache, ReferenceStaticTable
from hps_server.cache.sharded import ShardedCache, split_rows
from hps_server.config import ModelConfig, TableConfig
from hps_server.storage.base import StorageLevel

log = logging.getLogger(__name__)


def gpus_available(devices: Sequence[int]) -> bool:
    """Whether CuPy is installed and sees every one of `devices`."""
    try:
        from hps_server.cache import gpu
    except ImportError:
        return False
    return all(gpu.available(device) for device in devices)


Rows = tuple[np.ndarray, np.ndarray, np.ndarray]  # keys, vectors, each row's table index


class SharedGpuCaches(Protocol):
    """Where a worker group's GPU caches and static tables come from (shared_l1.py): made once, mapped by
    every process."""

    def cache(self, model: str, capacities: list[int], dim: int, dtype: str, device: int) -> EmbeddingCache: ...

    def static(
        self, model: str, rows: Callable[[], Rows], tables: int, dim: int, dtype: str, device: int
    ) -> EmbeddingCache:
        """The static table of `rows` (called only where the table is built, not where it is opened)."""
        ...


def build_caches(
    model: ModelConfig, levels: Sequence[StorageLevel], shared: SharedGpuCaches | None = None
) -> dict[str, TableL1]:
    """Each table's place in L1 ({} when gpucache is off): the model's tables of one dim share one cache
    per device in deployed_device_list, so a request's tables are answered in one call (one launch).

    Without GPUs a replicated model has one reference cache per dim: splitting host memory between pretend
    devices would only lower the hit rate; a sharded one has a reference shard per listed device, routed
    as the GPU shards would be. Static tables are loaded whole from the lowest level (split by the same
    route when sharded), once, and only where they are built. `shared` gives the GPU caches and static
    tables of a worker group, one per device for all its processes. Sharded, each shard holds 1/N of the
    table's L1 capacity (rounded up).
    """
    if not model.gpucache or not levels:
        return {}
    on_gpu = gpus_available(model.deployed_device_list)
    if not on_gpu:
        log.info("model %s: no usable GPU among %s, L1 is the NumPy reference", model.name, model.deployed_device_list)
    sharded = model.gpu_placement == "sharded"
    devices: Sequence[int | None] = (
        model.deployed_device_list if on_gpu else (None,) * (len(model.deployed_device_list) if sharded else 1)
    )
    by_dim: dict[int, list[TableConfig]] = {}
    for table in model.tables:
        by_dim.setdefault(table.dim, []).append(table)
    placed: dict[str, TableL1] = {}
    for dim, tables in by_dim.items():
        names = [model.storage_name(table) for table in tables]
        if model.use_static_table:
            every = functools.cache(functools.partial(_all_rows, levels[-1], names, dim))
            caches: tuple[EmbeddingCache, ...] = tuple(
                shared.static(model.name, part, len(tables), dim, model.gpucache_dtype, device)
                if shared is not None and device is not None
                else _static(*part(), len(tables), model.gpucache_dtype, device)
                for part, device in zip(_parts(every, len(devices), sharded), devices, strict=True)
            )
        else:
            capacities = [
                _capacity(model, table, levels[-1].size(name)) for table, name in zip(tables, names, strict=True)
            ]
            if sharded:
                capacities = [math.ceil(capacity / len(devices)) for capacity in capacities]
            caches = tuple(
                shared.cache(model.name, capacities, dim, model.gpucache_dtype, device)
                if shared is not None and device is not None
                else _cache(capacities, dim, model.gpucache_dtype, device)
                for device in devices
            )
        if sharded:
            caches = (ShardedCache(caches),)
        for index, table in enumerate(tables):
            placed[table.name] = TableL1(caches, index)
        log.info(
            "model %s: L1 for %d tables of dim %d holds %s rows on %s%s%s",
            model.name,
            len(tables),
            dim,
            caches[0].capacities,
            f"GPUs {list(model.deployed_device_list)}" if on_gpu else "the host",
            f" (sharded over {len(devices)})" if sharded else "",
            " (static: whole tables)" if model.use_static_table else "",
        )
    return placed


def _parts(every: Callable[[], Rows], count: int, sharded: bool) -> list[Callable[[], Rows]]:
    """Each device's rows of a static table, read when first asked for: all of them (replicated) or the
    device's share (sharded, by ShardedCache's route)."""
    if not sharded:
        return [every] * count
    split = functools.cache(lambda: split_rows(*every(), count))
    return [functools.partial(lambda i: split()[i], i) for i in range(count)]


def _capacity(model: ModelConfig, table: TableConfig, rows: int) -> int:
    """gpucacheper of the table's rows, and at least one full request's keys."""
    return max(math.ceil(rows * model.gpucacheper), model.max_keys(table), MAX_WAYS)


def _cache(capacities: list[int], dim: int, dtype: str, device: int | None) -> EmbeddingCache:
    if device is None:
        return ReferenceEmbeddingCache(capacities, dim, dtype=dtype)
    from hps_server.cache.gpu import GpuEmbeddingCache

    return GpuEmbeddingCache(capacities, dim, dtype=dtype, device=device)


def _static(
    keys: np.ndarray, vectors: np.ndarray, table_of: np.ndarray, tables: int, dtype: str, device: int | None
) -> EmbeddingCache:
    if device is None:
        return ReferenceStaticTable(keys, vectors, tables=table_of, num_tables=tables, dtype=dtype)
    from hps_server.cache.gpu import GpuStaticTable

    return GpuStaticTable(keys, vectors, tables=table_of, num_tables=tables, dtype=dtype, device=device)


def _all_rows(level: StorageLevel, tables: Sequence[str], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row of `tables` (keys, vectors, each row's index into `tables`), read from the lowest level."""
    keys, vectors, table_of = [np.zeros(0, np.int64)], [np.zeros((0, dim), np.float32)], [np.zeros(0, np.int32)]
    for index, table in enumerate(tables):
        for chunk_keys, chunk_vectors in level.dump(table):
            keys.append(chunk_keys)
            vectors.append(chunk_vectors)
            table_of.append(np.full(len(chunk_keys), index, np.int32))
    return np.concatenate(keys), np.concatenate(vectors), np.concatenate(table_of)
