"""A worker group's GPU caches: the group's writer makes one per (model, vector width, device) in memory
every worker maps (gpu_sharing.py); each worker opens those, so L1 is held once per GPU, not per process.

Only plain GPU caches are shared: static tables and the NumPy reference stay per process. It decides
nothing about placement (placement.py does) and imports CuPy only when a GPU cache is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hps_server.cache import EmbeddingCache, TableL1
from hps_server.cache.placement import build_caches, gpus_available
from hps_server.config import ModelConfig
from hps_server.storage.base import StorageLevel

CacheKey = tuple[str, int, int]  # (model, dim, device)


@dataclass(frozen=True)
class SharedCacheSpec:
    """How a worker opens one shared cache (picklable): the owner's layout and its state's spec."""

    capacities: tuple[int, ...]
    dtype: str
    state: Any  # gpu_sharing.SharedStateSpec (kept untyped here: that module imports CuPy)


def shares_l1(specs: dict[CacheKey, SharedCacheSpec], model: str) -> bool:
    """Whether the writer made shared caches for `model` (then every worker maps them; else each has its own)."""
    return any(key[0] == model for key in specs)


class OwnedGpuCaches:
    """The writer's side: makes each shared cache and remembers how to open it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.specs: dict[CacheKey, SharedCacheSpec] = {}

    def cache(self, model: str, capacities: list[int], dim: int, dtype: str, device: int) -> EmbeddingCache:
        from hps_server.cache.gpu import GpuEmbeddingCache
        from hps_server.cache.gpu_sharing import SharedState

        state = SharedState(self.folder, f"l1-{len(self.specs)}")
        cache = GpuEmbeddingCache(capacities, dim, dtype=dtype, device=device, shared=state)
        self.specs[(model, dim, device)] = SharedCacheSpec(tuple(capacities), dtype, state.spec)
        return cache

    def factory(self, model: ModelConfig, levels: Sequence[StorageLevel]) -> dict[str, TableL1]:
        """The writer's L1 (a CacheFactory): the shared GPU caches, or none where the workers' caches are
        their own (no GPU, static tables)."""
        if not model.gpucache or model.use_static_table or not gpus_available(model.deployed_device_list):
            return {}
        return build_caches(model, levels, self)


class OpenedGpuCaches:
    """A worker's side: opens the caches the writer made (with the writer's layout, whatever this
    process would compute from the levels now)."""

    def __init__(self, specs: dict[CacheKey, SharedCacheSpec]) -> None:
        self.specs = specs

    def cache(self, model: str, capacities: list[int], dim: int, dtype: str, device: int) -> EmbeddingCache:
        from hps_server.cache.gpu import GpuEmbeddingCache
        from hps_server.cache.gpu_sharing import SharedState

        spec = self.specs[(model, dim, device)]
        state = SharedState.open(spec.state)
        return GpuEmbeddingCache(list(spec.capacities), dim, dtype=spec.dtype, device=device, shared=state)

    def factory(self, model: ModelConfig, levels: Sequence[StorageLevel]) -> dict[str, TableL1]:
        """A worker's L1 (a CacheFactory): the shared caches where the writer made them, its own elsewhere."""
        return build_caches(model, levels, self if shares_l1(self.specs, model.name) else None)
