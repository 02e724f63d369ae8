"""The models one server hosts: opens the configured levels, ingests table files, warms the volatile level,
and loads, unloads and reloads models (to new table versions) while serving.

It builds one LookupSession per model and owns the levels' lifecycle (open, serve, close); it does not
answer requests itself and knows nothing of gRPC.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from hps_server import storage, transfer, warmup
from hps_server.cache import CacheStats, TableL1
from hps_server.cache.placement import build_caches
from hps_server.config import Config, ModelConfig, shown
from hps_server.handover import Handover
from hps_server.metrics import CacheOccupancy, LevelOccupancy, ServerMetrics
from hps_server.session import LookupSession, ServedTable, WriteRoute, WrittenHook
from hps_server.storage.base import StorageError, StorageLevel
from hps_server.tables import TableFileError
from hps_server.updates import UpdateFeed
from hps_server.write_epochs import WriteEpochs

log = logging.getLogger(__name__)

READ_ONLY_REASON = "server.read_only is set: this server refuses Upsert and Delete"

CacheFactory = Callable[[ModelConfig, Sequence[StorageLevel]], Mapping[str, TableL1]]
"""Places a model's tables in L1 (the caches per device holding each) from its config and its levels, top first."""

# A model loaded or reloaded while serving is warmed, and a replaced version dropped, in small chunks with a
# pause before each, so requests served meanwhile wait little for the level locks and the GIL.
CHANGE_PACE = warmup.Pace(chunk_rows=2048, pause_seconds=0.002)


@dataclass(frozen=True)
class GroupRole:
    """A server's part in the writes of a worker group (group_writes.py): the group's shared write epochs
    (one per table of every model, in config order), and either the route a worker's writes take or the
    writer's hook that refreshes the workers before a write (model, table, keys, vectors or None) is
    acknowledged. A group's model set is fixed (its lifecycle calls are refused)."""

    epochs: WriteEpochs
    route: WriteRoute | None = None
    on_written: Callable[[str, ServedTable, np.ndarray, np.ndarray | None], None] | None = None


class ModelExistsError(ValueError):
    """LoadModel of a model the server hosts already."""


class VersionMissingError(ValueError):
    """A reload names a table version the authoritative level does not hold (import it first)."""


@dataclass
class ConfigApplied:
    """What applying a config file did: `done` says "loaded m1", "reloaded m2", ..., `failed`
    "load m3", ..., one change each."""

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def run(self, what: tuple[str, str, str], change: Callable[[], object]) -> None:
        """Runs `change`, one of `what` = (verb, model, what a failure leaves), logging a failure and why."""
        verb, model, outcome = what
        try:
            change()
        except Exception as e:
            reason = e.without_path() if isinstance(e, TableFileError) else str(e)
            log.error("config reload: %sing %s failed, %s: %s", verb, model, outcome, reason)
            self.failed.append(f"{verb} {model}")
            return
        self.done.append(f"{verb}ed {model}")


@dataclass
class HostedModels:
    """The models served now and the levels under them. Models change while serving (load, unload, reload
    to new table versions): each change builds a whole new session beside the served one (its own tables,
    storage names, L1 caches), warms it, then swaps it in between two requests; the replaced session is
    closed, and the table versions it alone used dropped from the levels, once its last request is done."""

    config: Config
    volatile: StorageLevel | None
    persistent: StorageLevel | None
    sessions: dict[str, LookupSession]
    cache_factory: CacheFactory = build_caches
    metrics: ServerMetrics | None = None
    writes_refused: str = ""
    progress: bool = False
    group: GroupRole | None = None
    handover: Handover = field(default_factory=Handover)
    # Set when the server stops: a load or reload warming meanwhile gives up, leaving the model as it was.
    stopping: threading.Event = field(default_factory=threading.Event)
    # One change of the model set at a time; requests never wait for it.
    _changes: threading.Lock = field(default_factory=threading.Lock)
    _retiring: list[threading.Thread] = field(default_factory=list)
    # Storage names of table versions being dropped now (under _changes): no reload may switch to them.
    _dropping: set[str] = field(default_factory=set)
    # The update stream shared with the other replicas (and a trainer's feed), when one is configured.
    updates: UpdateFeed | None = None

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
        persistent = storage.open_persistent(config.persistent_db)
        volatile = None
        hosted = None
        try:
            volatile = storage.open_volatile(config.volatile_db)
            if volatile is not None and persistent is not None:
                volatile.serve_as_cache()
                if group is not None:  # the writer records what may be stale; its workers wait for its repair
                    epochs = group.epochs
                    if group.route is None:
                        volatile.share_staleness(None, epochs.mark_volatile_stale)
                    else:
                        volatile.share_staleness(epochs.volatile_stale, None)
            refused = READ_ONLY_REASON if config.server.read_only else ""
            hosted = cls(
                config, volatile, persistent, {}, cache_factory or build_caches, metrics, refused, progress, group
            )
            for model in config.models:
                hosted.sessions[model.name] = hosted._open_session(model)
                if metrics is not None:
                    metrics.record_model_event(model.name, "loaded")
            if config.updates.stream_address(config.volatile_db):
                served = hosted
                hosted.updates = UpdateFeed(config.updates, config.volatile_db, lambda: served.sessions, metrics)
                hosted.updates.start()
        except BaseException:
            if hosted is not None and hosted.updates is not None:
                try:
                    hosted.updates.close()
                except (StorageError, RuntimeError) as e:  # what failed the start stays the error raised
                    log.warning("closing the update stream after a failed start: %s", e)
            for session in hosted.sessions.values() if hosted is not None else ():
                session.close()
            for level in (volatile, persistent):
                if level is not None:
                    level.close()
            raise
        return hosted

    def _levels(self) -> list[StorageLevel]:
        return [level for level in (self.volatile, self.persistent) if level is not None]

    def _open_session(self, model: ModelConfig, previous: LookupSession | None = None) -> LookupSession:
        """A session of `model` over the levels, its tables created (and ingested from their source files
        when empty) and its L1 placed; not warmed, not served yet. previous: the session it will replace."""
        try:
            self._prepare_tables(model)
            caches = self.cache_factory(model, self._levels())
        except Exception:
            if self.metrics is not None:
                self.metrics.record_model_event(model.name, "failed")
            raise
        group = self.group
        session = LookupSession(
            model,
            self._levels(),
            caches,
            write_back=self.config.volatile_db.cache_missed_embeddings,
            metrics=self.metrics,
            writes_refused=self.writes_refused,
            previous=previous,
            epochs=group.epochs if group else None,
            first_epoch_slot=self._first_epoch_slot(model.name) if group else 0,
            route=group.route if group else None,
            on_written=_written_hook(group, model.name),
        )
        if self.updates is not None:  # the stream started before this model was loaded or reloaded
            session.announce = self.updates.publish
            if model.name in self.updates.missed_models:
                session.drop_copies(missed=True)  # its rows are not copied into the shared levels from now on
        log.info(
            "model %s ready: %d tables%s, levels %s",
            model.name,
            len(model.tables),
            _versions_shown(model),
            session.level_names(),
        )
        return session

    def _first_epoch_slot(self, model: str) -> int:
        """Where a model's tables' epochs start in a group's shared epochs: config order."""
        slot = 0
        for configured in self.config.models:
            if configured.name == model:
                return slot
            slot += len(configured.tables)
        raise KeyError(f"model {shown(model)} is not in the group's config")

    def session(self, model: str) -> LookupSession:
        """The model's session; KeyError naming the model when it is not hosted."""
        try:
            return self.sessions[model]
        except KeyError:
            raise KeyError(self.not_hosted(model)) from None

    def not_hosted(self, model: str, visible: Callable[[str], bool] = lambda name: True) -> str:
        """What a call naming `model`, which is not hosted, is told: the hosted models it may see."""
        hosted = sorted(name for name in self.sessions if visible(name))
        return f"no model {shown(model)} (hosted: {', '.join(hosted) or 'none'})"

    def serving(self, model: str) -> contextlib.AbstractContextManager[LookupSession]:
        """The model's session for one request, kept (with its table versions) until the block ends."""
        return self.handover.using(lambda: self.session(model))

    def writing(self, model: str) -> contextlib.AbstractContextManager[LookupSession]:
        """As serving(), for an Upsert or Delete: ModelChangingError while the model changes."""
        return self.handover.writing(model, lambda: self.session(model))

    # ---------------------------------------------------------------- lifecycle

    def load(self, model: ModelConfig) -> LookupSession:
        """Starts serving a model not hosted yet (ModelExistsError otherwise), once warm."""
        with self._changes:
            if model.name in self.sessions:
                raise ModelExistsError(f"model {model.name} is served already (ReloadModel changes it)")
            with self.handover.changing(model.name):
                session = self._warmed(self._open_session(model))
                self._install(model.name, session)
            if self.metrics is not None:
                self.metrics.record_model_event(model.name, "loaded")
            log.info("model %s loaded", model.name)
            return session

    def unload(self, name: str) -> None:
        """Stops serving a model (KeyError naming it when not hosted); requests already admitted finish. Its
        rows stay in the levels."""
        with self._changes:
            self.session(name)
            with self.handover.changing(name):
                old = self._install(name, None)
            assert old is not None
            self._retire(old, dropped=())
            if self.metrics is not None:
                self.metrics.record_model_event(name, "unloaded")
            log.info("model %s unloaded", name)

    def reload(
        self,
        name: str,
        versions: Mapping[str, str] | None = None,
        version: str = "",
        model: ModelConfig | None = None,
    ) -> LookupSession:
        """Serves the model at new table versions (`version` for every table, `versions` table -> version
        for some; each imported already), or as `model` says (a changed config), switching once the new
        session is warm. Nothing of these: rebuilt at its versions. A failure leaves it served as it was."""
        with self._changes:
            old = self.session(name)
            if model is None:
                every = {table.name: version for table in old.model.tables} if version else {}
                model = _at_versions(old.model, every | dict(versions or {}))
            self._check_versions(old.model, model)
            with self.handover.changing(name):
                session = self._warmed(self._open_session(model, previous=old), previous=old)
                self._install(name, session)
            kept = {table.storage_name for table in session.tables.values()}
            self._retire(old, dropped=[t.storage_name for t in old.tables.values() if t.storage_name not in kept])
            if self.metrics is not None:
                self.metrics.record_model_event(name, "reloaded")
            log.info("model %s reloaded%s", name, _versions_shown(model))
            return session

    def apply(self, config: Config) -> ConfigApplied:
        """Brings the served models in line with `config` (a config file read again): models it lacks are
        unloaded, new ones loaded, changed ones reloaded; one failing (logged) does not stop the others.
        Only `models` is applied; other sections need a restart."""
        for section in ("server", "volatile_db", "persistent_db"):
            if getattr(config, section) != getattr(self.config, section):
                log.warning("config reload: %s changed; only models are reloaded, restart to apply it", section)
        wanted = {model.name: model for model in config.models}
        applied = ConfigApplied()
        for name in sorted(set(self.sessions) - set(wanted)):
            applied.run(("unload", name, "it is still served"), functools.partial(self.unload, name))
        for name, model in wanted.items():
            served = self.sessions.get(name)
            if served is None:
                applied.run(("load", name, "it is not served"), functools.partial(self.load, model))
            elif served.model != model:
                change = functools.partial(self.reload, name, model=model)
                applied.run(("reload", name, "it is served as before"), change)
        return applied

    def _check_versions(self, served: ModelConfig, model: ModelConfig) -> None:
        """Every table version a reload switches to holds rows in the authoritative level, or has source files
        to ingest them from."""
        authoritative = self.persistent or self.volatile
        if authoritative is None:
            return
        present = set(authoritative.tables())
        served_versions = {table.name: table.version for table in served.tables}
        for after in model.tables:
            name = model.storage_name(after)
            switched = served_versions.get(after.name, after.version) != after.version
            if switched and name in self._dropping:
                raise VersionMissingError(
                    f"table {after.name}: version {after.version or '(unversioned)'} is being dropped (it was "
                    "replaced and its last request is done); import it again once the drop is logged"
                )
            if switched and after.source is None and (name not in present or authoritative.size(name) == 0):
                command = f"hps import --model {model.name} --table {after.name}"
                raise VersionMissingError(
                    f"table {after.name}: no version {after.version or '(unversioned)'} in {authoritative.kind} "
                    f"(import it first: {command}{f' --version {after.version}' if after.version else ''})"
                )

    def _warmed(self, session: LookupSession, previous: LookupSession | None = None) -> LookupSession:
        """Warms a session not served yet (first with the keys hot in the L1 of `previous`, the session it
        replaces); closes it and raises when the server stops meanwhile."""
        try:
            if previous is not None:
                warmup.carry_hot_keys(previous, session, self.stopping, CHANGE_PACE)
            rate = self.config.volatile_db.initial_cache_rate
            warmup.warm([session], self.volatile, self.persistent, rate, self.stopping, CHANGE_PACE)
            if self.stopping.is_set():
                raise RuntimeError(f"model {session.name}: the server is stopping")
        except BaseException:
            session.close()
            raise
        return session

    def _install(self, name: str, session: LookupSession | None) -> LookupSession | None:
        """Serves `session` as model `name` (None: no longer serves it), between two requests; returns the
        session it replaces. Only a change (holding _changes) writes `sessions`."""
        replaced = self.sessions.get(name)

        def change() -> None:
            # A new dict: readers iterating the old one (metrics, warm-up) are not disturbed.
            sessions = {other: served for other, served in self.sessions.items() if other != name}
            if session is not None:
                sessions[name] = session
            self.sessions = sessions
            self.config = replace(self.config, models=tuple(served.model for served in sessions.values()))

        self.handover.swap(change)
        return replaced

    def _retire(self, session: LookupSession, dropped: Sequence[str]) -> None:
        """Once no request uses `session`: closes it (its L1 goes with it) and drops from every writable
        level those of the table versions `dropped` that no served model uses by then (a reload back to a
        version before its drop keeps it), in a thread of its own."""

        def close() -> None:
            session.close()
            with self._changes:
                served = {table.storage_name for other in self.sessions.values() for table in other.tables.values()}
                doomed = [table for table in dropped if table not in served]
                self._dropping.update(doomed)
            try:
                self._drop(doomed)
            finally:
                with self._changes:
                    self._dropping.difference_update(doomed)
            if doomed:
                log.info("model %s: dropped %s, no longer served", session.name, ", ".join(doomed))

        def start() -> None:
            thread = threading.Thread(target=close, name=f"hps-retire-{session.name}", daemon=True)
            self._retiring = [*(other for other in self._retiring if other.is_alive()), thread]
            thread.start()

        self.handover.retire(session, start)

    def _prepare_tables(self, model: ModelConfig) -> None:
        """Creates each table of `model` in the levels and ingests its source files on first start. A failure
        drops the tables it created, so a corrected config (another dim, a source that reads) starts afresh."""
        levels = self._levels()
        before = [set(level.tables()) for level in levels]
        try:
            _create_and_ingest(model, self.volatile, self.persistent, self.progress)
        except BaseException:
            for level, held in zip(levels, before, strict=True):
                self._drop(sorted(set(level.tables()) - held), [level])
            raise

    def _drop(self, tables: Sequence[str], levels: Sequence[StorageLevel] | None = None) -> None:
        """Drops the table versions from every writable level (of `levels`; default: all); one that fails is
        logged and stays."""
        for level in self._levels() if levels is None else levels:
            if level.read_only:
                continue
            for table in tables:
                try:
                    level.drop_table(table, CHANGE_PACE.chunk_rows)
                except StorageError as e:
                    log.warning("could not drop %s from %s (it stays until dropped by hand): %s", table, level.kind, e)

    def cache_occupancy(self) -> list[CacheOccupancy]:
        """Every L1 cache of every model (each shard of a sharded one), with the device it lives on: its GPU, or
        `host` (`host:<shard>` for the reference shards of a sharded model without GPUs). Each cache is counted
        once, however many of a model's tables it holds (a count holds the cache's lock and reads all of it)."""
        counts: dict[int, list[CacheStats]] = {}  # by cache object
        occupancy = []
        for name, session in self.sessions.items():
            for table in session.tables.values():
                if table.l1 is None:
                    continue
                caches = table.l1.device_caches()
                for shard, cache in enumerate(caches):
                    if id(cache) not in counts:
                        counts[id(cache)] = cache.table_stats()
                    device = str(getattr(cache, "device", "host" if len(caches) == 1 else f"host:{shard}"))
                    stats = counts[id(cache)][table.l1.index]
                    occupancy.append(CacheOccupancy(name, table.name, device, stats, row_bytes=4 * table.dim))
        return occupancy

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

    def warm(self, stop: threading.Event) -> None:
        """Copies initial_cache_rate of each table into the volatile level and L1 (see warmup.py); a group's
        worker warms only its L1 (its writer warmed the volatile level all of them share)."""
        worker = self.group is not None and self.group.route is not None
        warmup.warm(
            list(self.sessions.values()),
            None if worker else self.volatile,
            self.persistent,
            self.config.volatile_db.initial_cache_rate,
            stop,
        )

    def close(self) -> None:
        """Stops the update stream, closes the sessions (waiting for those being retired), then every level
        even when one fails; raises the first StorageError (the stream's unpublished writes, then the levels')."""
        failures = []
        if self.updates is not None:
            try:
                self.updates.close()
            except StorageError as e:
                failures.append(e)
        for thread in self._retiring:
            thread.join()
        for session in self.sessions.values():
            session.close()
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


def _create_and_ingest(
    model: ModelConfig, volatile: StorageLevel | None, persistent: StorageLevel | None, progress: bool
) -> None:
    """Creates each table in the levels and ingests its source files into the tables the authority did not
    hold yet: RocksDB knows the tables it holds (one emptied by deletes stays empty); another authority
    (Redis, the hash map) is taken to lack a table that holds no row."""
    for table in model.tables:
        name = model.storage_name(table)
        authoritative = persistent or volatile
        if authoritative is None:
            raise ValueError(f"model {model.name}: both volatile_db and persistent_db are disabled")
        if persistent is None and not authoritative.read_only:
            authoritative.create_table(name, table.dim)
        # RocksDB lists the tables it holds on disk; other levels only those this process made. Asked only for
        # a table with files to ingest: a Redis that is down is then no reason not to start.
        if table.source is not None and not (
            name in persistent.tables() if persistent is not None else authoritative.size(name) > 0
        ):  # the ingest creates the table once its files are valid
            log.info("ingesting %s from the folder %r", name, table.source.name)
            rows = transfer.import_table(authoritative, name, table.source, table.dim, progress=progress)
            log.info("ingested %d rows into %s (%s)", rows, name, authoritative.kind)
        elif not authoritative.read_only:
            authoritative.create_table(name, table.dim)
        if volatile is not None and volatile is not authoritative:
            # Read-only volatile levels still need the table's dim to serve it (Redis: nothing is written).
            volatile.create_table(name, table.dim)


def _at_versions(model: ModelConfig, versions: Mapping[str, str]) -> ModelConfig:
    """`model` with the tables named in `versions` at those versions (KeyError naming an unknown table). A table
    switched to another version loses its `source`: those files are the served version's, not the new one's."""
    names = {table.name for table in model.tables}
    unknown = sorted(set(versions) - names)
    if unknown:
        raise KeyError(f"model {model.name} has no table {shown(unknown[0])} (tables: {', '.join(sorted(names))})")
    tables = tuple(
        replace(table, version=versions[table.name], source=None)
        if versions.get(table.name, table.version) != table.version
        else table
        for table in model.tables
    )
    return replace(model, tables=tables)


def _versions_shown(model: ModelConfig) -> str:
    versions = [f"{table.name}@{table.version}" for table in model.tables if table.version]
    return f" (versions {', '.join(versions)})" if versions else ""
