"""The models one server hosts: opens the configured levels, ingests table files, warms the volatile level.

It builds one LookupSession per model and owns the levels' lifecycle (open, serve, close); it does not
answer requests itself and knows nothing of gRPC.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hps_server import storage, transfer, warmup
from hps_server.cache import TableL1
from hps_server.cache.placement import build_caches
from hps_server.config import Config, ModelConfig, shown
from hps_server.metrics import CacheOccupancy, LevelOccupancy, ServerMetrics
from hps_server.session import LookupSession, ServedTable, WriteRoute, WrittenHook
from hps_server.storage.base import StorageError, StorageLevel
from hps_server.write_epochs import WriteEpochs

log = logging.getLogger(__name__)

READ_ONLY_REASON = "server.read_only is set: this server refuses Upsert and Delete"

CacheFactory = Callable[[ModelConfig, Sequence[StorageLevel]], Mapping[str, TableL1]]
"""Places a model's tables in L1 (the caches per device holding each) from its config and its levels, top first."""


@dataclass(frozen=True)
class GroupRole:
    """A server's part in the writes of a worker group (group_writes.py): the group's shared write epochs
    (one per table of every model, in config order), and either the route a worker's writes take or the
    writer's hook that refreshes the workers before a write (model, table, keys, vectors or None) is
    acknowledged."""

    epochs: WriteEpochs
    route: WriteRoute | None = None
    on_written: Callable[[str, ServedTable, np.ndarray, np.ndarray | None], None] | None = None


@dataclass
class HostedModels:
    config: Config
    volatile: StorageLevel | None
    persistent: StorageLevel | None
    sessions: dict[str, LookupSession]

    @classmethod
    def open(
        cls,
        config: Config,
        cache_factory: CacheFactory | None = None,
        progress: bool = False,
        metrics: ServerMetrics | None = None,
        group: GroupRole | None = None,
    ) -> HostedModels:
        """Opens the levels and prepares every model (ingesting table files on first start); a failure
        closes what was opened. cache_factory defaults to placement.build_caches. Warm-up is separate: warm().
        group: its part in a worker group's writes (None: a server of its own). With server.read_only the
        sessions refuse Upsert and Delete."""
        cache_factory = cache_factory or build_caches
        persistent = storage.open_persistent(config.persistent_db)
        volatile = None
        sessions: dict[str, LookupSession] = {}
        try:
            volatile = storage.open_volatile(config.volatile_db)
            levels = [level for level in (volatile, persistent) if level is not None]
            if volatile is not None and persistent is not None:
                volatile.serve_as_cache()
            epochs = group.epochs if group else WriteEpochs(sum(len(model.tables) for model in config.models))
            slot = 0
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
                    writes_refused=READ_ONLY_REASON if config.server.read_only else "",
                    epochs=epochs,
                    first_epoch_slot=slot,
                    route=group.route if group else None,
                    on_written=_written_hook(group, model.name),
                )
                slot += len(model.tables)
                if metrics is not None:
                    metrics.record_model_event(model.name, "loaded")
                log.info(
                    "model %s ready: %d tables, levels %s",
                    model.name,
                    len(model.tables),
                    sessions[model.name].level_names(),
                )
        except BaseException:
            for session in sessions.values():
                session.close()
            for level in (volatile, persistent):
                if level is not None:
                    level.close()
            raise
        return cls(config, volatile, persistent, sessions)

    def session(self, model: str) -> LookupSession:
        """The model's session; KeyError naming the model when it is not hosted."""
        try:
            return self.sessions[model]
        except KeyError:
            raise KeyError(f"no model {shown(model)} (hosted: {', '.join(sorted(self.sessions)) or 'none'})") from None

    def cache_occupancy(self) -> list[CacheOccupancy]:
        """Every L1 cache of every model, with the device it lives on."""
        return [
            CacheOccupancy(
                name,
                table.name,
                str(getattr(cache, "device", "host")),
                cache.table_stats()[table.l1.index],
                row_bytes=4 * table.dim,
            )
            for name, session in self.sessions.items()
            for table in session.tables.values()
            if table.l1 is not None
            for cache in table.l1.caches
        ]

    def level_occupancy(self) -> list[LevelOccupancy]:
        """Rows and bytes each level below L1 holds of each served table, asked of the levels now (at scrape
        time). A level that cannot answer (Redis down) is left out of this scrape rather than failing it."""
        found = []
        for level in (self.volatile, self.persistent):
            if level is None:
                continue
            try:
                for name, session in self.sessions.items():
                    for table in session.tables.values():
                        rows, stored = level.occupancy(table.storage_name)
                        found.append(LevelOccupancy(name, table.name, level.kind, rows, stored))
            except StorageError as e:
                log.debug("%s occupancy not read this scrape: %s", level.kind, e)
        return found

    def retry_writes(self) -> None:
        """Lets each level whose writes failed try again (RocksDB reopens once its folder takes files)."""
        for level in (self.volatile, self.persistent):
            if level is not None:
                level.retry_writes()

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
        """Closes the sessions, then every level even when one fails; raises the first level's StorageError."""
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


def _written_hook(group: GroupRole | None, model: str) -> WrittenHook | None:
    """The writer's refresh of the workers, for one model's session."""
    if group is None or group.on_written is None:
        return None
    return functools.partial(group.on_written, model)


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
