"""A worker group's GPU caches and static tables: the group's writer makes one per (model, vector width,
device) in memory every worker maps (gpu_sharing.py); each worker opens those, so L1 is held once per GPU,
not per process.

The NumPy reference (no GPU) stays per process. It decides nothing about placement (placement.py does) and
imports CuPy only when a GPU structure is made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hps_server.cache import EmbeddingCache, TableL1
from hps_server.cache.placement import Rows, build_caches, gpus_available
from hps_server.config import ModelConfig
from hps_server.storage.base import StorageLevel

CacheKey = tuple[str, int, int]  # (model, dim, device)


@dataclass(frozen=True)
class SharedCacheSpec:
    """How a worker opens one shared cache (picklable): the owner's layout and its state's spec."""

    capacities: tuple[int, ...]
    dtype: str
    state: Any  # gpu_sharing.SharedStateSpec (kept untyped here: that module imports CuPy)


@dataclass(frozen=True)
class SharedStaticSpec:
    """How a worker opens one shared static table (picklable): its layout and its state's spec."""

    layout: Any  # gpu.StaticLayout
    state: Any  # gpu_sharing.SharedStateSpec


Specs = dict[CacheKey, SharedCacheSpec | SharedStaticSpec]


def shares_l1(specs: Specs, model: str) -> bool:
    """Whether the writer made shared caches for `model` (then every worker maps them; else each has its own)."""
    return any(key[0] == model for key in specs)


class OwnedGpuCaches:
    """The writer's side: makes each shared cache and remembers how to open it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.specs: Specs = {}

    def _state(self) -> Any:
        from hps_server.cache.gpu_sharing import SharedState

        return SharedState(self.folder, f"l1-{len(self.specs)}")

    def cache(self, model: str, capacities: list[int], dim: int, dtype: str, device: int) -> EmbeddingCache:
        from hps_server.cache.gpu import GpuEmbeddingCache

        state = self._state()
        cache = GpuEmbeddingCache(capacities, dim, dtype=dtype, device=device, shared=state)
        self.specs[(model, dim, device)] = SharedCacheSpec(tuple(capacities), dtype, state.spec)
        return cache

    def static(
        self, model: str, rows: Callable[[], Rows], tables: int, dim: int, dtype: str, device: int
    ) -> EmbeddingCache:
        from hps_server.cache.gpu import GpuStaticTable

        keys, vectors, table_of = rows()
        state = self._state()
        table = GpuStaticTable(
            keys, vectors, tables=table_of, num_tables=tables, dtype=dtype, device=device, shared=state
        )
        self.specs[(model, dim, device)] = SharedStaticSpec(table.layout, state.spec)
        return table

    def factory(self, model: ModelConfig, levels: Sequence[StorageLevel]) -> dict[str, TableL1]:
        """The writer's L1 (a CacheFactory): the shared GPU caches or static tables, or none where the
        workers' caches are their own (no GPU)."""
        if not model.gpucache or not gpus_available(model.deployed_device_list):
            return {}
        return build_caches(model, levels, self)


class OpenedGpuCaches:
    """A worker's side: opens the caches the writer made (with the writer's layout, whatever this
    process would compute from the levels now)."""

    def __init__(self, specs: Specs) -> None:
        self.specs = specs

    def cache(self, model: str, capacities: list[int], dim: int, dtype: str, device: int) -> EmbeddingCache:
        from hps_server.cache.gpu import GpuEmbeddingCache
        from hps_server.cache.gpu_sharing import SharedState

        spec = self.specs[(model, dim, device)]
        assert isinstance(spec, SharedCacheSpec), "the writer made a cache for a model that has one"
        state = SharedState.open(spec.state)
        return GpuEmbeddingCache(list(spec.capacities), dim, dtype=spec.dtype, device=device, shared=state)

    def static(
        self, model: str, rows: Callable[[], Rows], tables: int, dim: int, dtype: str, device: int
    ) -> EmbeddingCache:
        """The writer's static table, opened: its rows are not read again here."""
        from hps_server.cache.gpu import GpuStaticTable
        from hps_server.cache.gpu_sharing import SharedState

        spec = self.specs[(model, dim, device)]
        assert isinstance(spec, SharedStaticSpec), "the writer made a static table for a model that has one"
        return GpuStaticTable.open(spec.layout, device, SharedState.open(spec.state))

    def factory(self, model: ModelConfig, levels: Sequence[StorageLevel]) -> dict[str, TableL1]:
        """A worker's L1 (a CacheFactory): the shared caches where the writer made them, its own elsewhere."""
        return build_caches(model, levels, self if shares_l1(self.specs, model.name) else None)
