"""The models one server hosts: opens the configured levels, ingests table files, warms the volatile level.

It builds one LookupSession per model and owns the levels' lifecycle (open, serve, close); it does not
answer requests itself and knows nothing of gRPC.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from hps_server import storage, transfer, warmup
from hps_server.cache import TableL1
from hps_server.cache.placement import build_caches
from hps_server.config import Config, ModelConfig, shown
from hps_server.metrics import CacheOccupancy, ServerMetrics
from hps_server.session import LookupSession
from hps_server.storage.base import StorageError, StorageLevel
from hps_server.updates import UpdateFeed

log = logging.getLogger(__name__)

CacheFactory = Callable[[ModelConfig, Sequence[StorageLevel]], Mapping[str, TableL1]]
"""Places a model's tables in L1 (the caches per device holding each) from its config and its levels, top first."""


@dataclass
class HostedModels:
    config: Config
    volatile: StorageLevel | None
    persistent: StorageLevel | None
    sessions: dict[str, LookupSession]
    # The update stream shared with the other replicas (and a trainer's feed), when one is configured.
    updates: UpdateFeed | None = None

    @classmethod
    def open(
        cls,
        config: Config,
        cache_factory: CacheFactory | None = None,
        progress: bool = False,
        metrics: ServerMetrics | None = None,
        writes_refused: str = "",
    ) -> HostedModels:
        """Opens the levels and prepares every model (ingesting table files on first start); a failure
        closes what was opened. cache_factory defaults to placement.build_caches. Warm-up is separate: warm().
        writes_refused: why the sessions refuse Upsert and Delete (empty: they take them where a level can)."""
        cache_factory = cache_factory or build_caches
        persistent = storage.open_persistent(config.persistent_db)
        volatile = None
        sessions: dict[str, LookupSession] = {}
        updates = None
        try:
            volatile = storage.open_volatile(config.volatile_db)
            levels = [level for level in (volatile, persistent) if level is not None]
            if volatile is not None and persistent is not None:
                volatile.serve_as_cache()
            for model in config.models:
                try:
                    _prepare_tables(model, volatile, persistent, progress)
                    caches = cache_factory(model, levels)
                except Exception:
                    if metrics is not None:
                        metrics.record_model_event(model.name, "failed")
                    raise
                sessions[model.name] = LookupSession(
                    model,
                    levels,
                    caches,
                    write_back=config.volatile_db.cache_missed_embeddings,
                    metrics=metrics,
                    writes_refused=writes_refused,
                )
                if metrics is not None:
                    metrics.record_model_event(model.name, "loaded")
                log.info(
                    "model %s ready: %d tables, levels %s",
                    model.name,
                    len(model.tables),
                    sessions[model.name].level_names(),
                )
            if config.updates.stream_address(config.volatile_db):
                updates = UpdateFeed(config.updates, config.volatile_db, sessions, metrics)
                updates.start()
        except BaseException:
            if updates is not None:
                updates.close()
            for session in sessions.values():
                session.close()
            for level in (volatile, persistent):
                if level is not None:
                    level.close()
            raise
        return cls(config, volatile, persistent, sessions, updates)

    def session(self, model: str) -> LookupSession:
        """The model's session; KeyError naming the model when it is not hosted."""
        try:
            return self.sessions[model]
        except KeyError:
            raise KeyError(f"no model {shown(model)} (hosted: {', '.join(sorted(self.sessions)) or 'none'})") from None

    def cache_occupancy(self) -> list[CacheOccupancy]:
        """Every L1 cache of every model, with the device it lives on."""
        return [
            CacheOccupancy(name, table.name, str(getattr(cache, "device", "host")), cache.table_stats()[table.l1.index])
            for name, session in self.sessions.items()
            for table in session.tables.values()
            if table.l1 is not None
            for cache in table.l1.caches
        ]

    def level_states(self) -> list[tuple[str, bool]]:
        """(kind, whether its writes fail now) of each level."""
        return [(level.kind, level.writes_failing) for level in (self.volatile, self.persistent) if level is not None]

    def warm(self, stop: threading.Event, volatile: bool = True) -> None:
        """Copies initial_cache_rate of each table into the volatile level (unless `volatile` is False) and
        L1 (see warmup.py)."""
        warmup.warm(
            list(self.sessions.values()),
            self.volatile if volatile else None,
            self.persistent,
            self.config.volatile_db.initial_cache_rate,
            stop,
        )

    def close(self) -> None:
        """Stops the update stream, closes the sessions, then every level even when one fails; raises the
        first level's StorageError."""
        if self.updates is not None:
            self.updates.close()
        for session in self.sessions.values():
            session.close()
        failures = []
        for level in (self.volatile, self.persistent):
            if level is not None:
                try:
                    level.close()
                except StorageError as e:
                    failures.append(e)
        if failures:
            raise failures[0]


def prepare_levels(config: Config, progress: bool = False, warm_volatile: bool = False) -> None:
    """Creates every model's tables in the levels and ingests their files on first start, then closes the
    levels: done once before several processes open them, so they do not race on first-start ingestion.
    warm_volatile: also copy initial_cache_rate of each table into the volatile level (one shared by them)."""
    persistent = storage.open_persistent(config.persistent_db)
    try:
        volatile = storage.open_volatile(config.volatile_db)
        try:
            for model in config.models:
                _prepare_tables(model, volatile, persistent, progress)
            if warm_volatile and volatile is not None and persistent is not None:
                names = [model.storage_name(table) for model in config.models for table in model.tables]
                warmup.fill_level(volatile, persistent, names, config.volatile_db.initial_cache_rate)
        finally:
            if volatile is not None:
                volatile.close()
    finally:
        if persistent is not None:
            persistent.close()


def _prepare_tables(
    model: ModelConfig, volatile: StorageLevel | None, persistent: StorageLevel | None, progress: bool
) -> None:
    """Creates each table in the levels and ingests its source files on first start."""
    for table in model.tables:
        name = model.storage_name(table)
        authoritative = persistent or volatile
        if authoritative is None:
            raise ValueError(f"model {model.name}: both volatile_db and persistent_db are disabled")
        if not authoritative.read_only:
            authoritative.create_table(name, table.dim)
        if table.source is not None and authoritative.size(name) == 0:
            log.info("ingesting %s from the folder %r", name, table.source.name)
            rows = transfer.import_table(authoritative, name, table.source, table.dim, progress=progress)
            log.info("ingested %d rows into %s (%s)", rows, name, authoritative.kind)
        if volatile is not None and volatile is not authoritative:
            # Read-only volatile levels still need the table's dim to serve it (Redis: nothing is written).
            volatile.create_table(name, table.dim)
