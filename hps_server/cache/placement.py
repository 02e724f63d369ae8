"""Builds a model's L1 from its config: per table, one cache (or static table) per device (warmup.py fills them).

The CUDA implementation where CuPy sees every device in deployed_device_list, the NumPy reference
otherwise. It reads the storage levels once, at start, and never serves lookups itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from hps_server.cache import EmbeddingCache
from hps_server.cache.layout import MAX_WAYS
from hps_server.cache.reference import ReferenceEmbeddingCache, ReferenceStaticTable
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


def build_caches(model: ModelConfig, levels: Sequence[StorageLevel]) -> dict[str, list[EmbeddingCache]]:
    """Per table, one L1 per device in deployed_device_list ({} when gpucache is off).

    Without GPUs there is one reference cache per table: splitting host memory between pretend
    devices would only lower the hit rate. Static tables are loaded whole from the lowest level.
    """
    if not model.gpucache or not levels:
        return {}
    on_gpu = gpus_available(model.deployed_device_list)
    if not on_gpu:
        log.info("model %s: no usable GPU among %s, L1 is the NumPy reference", model.name, model.deployed_device_list)
    devices: Sequence[int | None] = model.deployed_device_list if on_gpu else (None,)
    caches: dict[str, list[EmbeddingCache]] = {}
    for table in model.tables:
        name = f"{model.name}.{table.name}"
        if model.use_static_table:
            keys, vectors = _all_rows(levels[-1], name, table.dim)
            caches[table.name] = [_static(keys, vectors, model.gpucache_dtype, device) for device in devices]
            log.info("model %s: %s held whole in L1 (%d rows)", model.name, table.name, keys.size)
            continue
        capacity = _capacity(model, table, levels[-1].size(name))
        built = [_cache(capacity, table.dim, model.gpucache_dtype, device) for device in devices]
        caches[table.name] = built
        log.info(
            "model %s: L1 for %s holds %d rows on %s",
            model.name,
            table.name,
            built[0].capacity,
            f"GPUs {list(model.deployed_device_list)}" if on_gpu else "the host",
        )
    return caches


def _capacity(model: ModelConfig, table: TableConfig, rows: int) -> int:
    """gpucacheper of the table's rows, and at least one full request's keys."""
    return max(math.ceil(rows * model.gpucacheper), model.max_keys(table), MAX_WAYS)


def _cache(capacity: int, dim: int, dtype: str, device: int | None) -> EmbeddingCache:
    if device is None:
        return ReferenceEmbeddingCache(capacity, dim, dtype=dtype)
    from hps_server.cache.gpu import GpuEmbeddingCache

    return GpuEmbeddingCache(capacity, dim, dtype=dtype, device=device)


def _static(keys: np.ndarray, vectors: np.ndarray, dtype: str, device: int | None) -> EmbeddingCache:
    if device is None:
        return ReferenceStaticTable(keys, vectors, dtype=dtype)
    from hps_server.cache.gpu import GpuStaticTable

    return GpuStaticTable(keys, vectors, dtype=dtype, device=device)


def _all_rows(level: StorageLevel, table: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    chunks = list(level.dump(table))
    if not chunks:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return np.concatenate([k for k, _ in chunks]), np.concatenate([v for _, v in chunks])
