"""One writer for the worker processes of `hps serve --processes N`: Upserts, Deletes and write-backs.

The supervisor's GroupWriter holds the levels read-write (RocksDB has one writing process) and the
shared write epochs; each worker's WriterLink sends it what the worker would have written and, on
the worker's own socket, takes the writer's refreshes: before a write is acknowledged every running
worker has caught its read-only RocksDB up and updated (or dropped) the keys in its L1. A worker that
does not confirm in time is killed (it restarts with an empty L1) rather than left serving old rows; one
that is not running holds no rows. Rows found below L2 are copied into it by the writer alone, checked
against the epochs, so no copy of a row older than an acknowledged write lands in a shared level.
Messages are pickled over Unix sockets in a folder only this user can enter, authenticated by a key
the supervisor hands its workers; nothing here answers clients.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import numpy as np

from hps_server.cache.shared_l1 import OwnedGpuCaches, Specs, shares_l1
from hps_server.config import Config
from hps_server.models import GroupRole, HostedModels
from hps_server.session import PrefetchKeys, ServedTable, WriteBack
from hps_server.storage.base import LevelUnavailableError, StorageError
from hps_server.storage.segments import unique_name
from hps_server.write_epochs import WriteEpochs

log = logging.getLogger(__name__)

# A worker that has not confirmed a refresh after this long is killed: it may be serving the old rows.
REFRESH_TIMEOUT_SECONDS = 10.0
# A worker gives up on the writer's answer after this long (the write may still land).
WRITER_TIMEOUT_SECONDS = 60.0
# How often the writer lets failed levels retry their writes.
WRITES_CHECK_SECONDS = 1.0
# After a failed accept (a peer gone mid-handshake), the next is tried this much later.
ACCEPT_RETRY_SECONDS = 0.05


@dataclass(frozen=True)
class GroupAddress:
    """Where a group's writer and workers meet (pickled into each worker)."""

    folder: Path
    authkey: bytes
    epochs: str  # the write epochs' shared-memory name
    tables: int  # how many epochs it holds
    l1: Specs  # the GPU caches and static tables every worker maps

    @property
    def writer(self) -> str:
        return str(self.folder / "writer")

    def worker(self, index: int) -> str:
        return str(self.folder / f"worker-{index}")

    def temporary(self, index: int) -> Path:
        """Worker `index`'s temporary folder (RocksDB's secondary log): made anew as each of its processes
        starts, so a killed one's is removed with the next."""
        return self.folder / f"tmp-{index}"


def _answer(connection: Connection, handle: Callable[..., Any]) -> None:
    """Answers one peer's messages until it hangs up: ("ok", value) or ("error", the exception)."""
    with contextlib.suppress(EOFError, OSError):
        while True:
            operation, *arguments = connection.recv()
            try:
                reply: tuple[str, Any] = ("ok", handle(operation, *arguments))
            except Exception as e:  # the caller re-raises it: it is the caller's error
                reply = ("error", e)
            try:
                connection.send(reply)
            except (EOFError, OSError):
                raise
            except Exception:  # an error that does not pickle: its text, as a storage error
                connection.send(("error", StorageError(f"group writer: {reply[1]}")))
    connection.close()


class _Accepting:
    """A Unix socket's peers (with the group's key), each answered by `handle` on a thread of its own,
    until close(). A peer that fails its handshake (killed while connecting, or without the key) is
    logged and the socket goes on accepting: one dying worker must not stop the group's writes."""

    def __init__(self, path: str, authkey: bytes, handle: Callable[..., Any], name: str) -> None:
        self._listener = Listener(path, "AF_UNIX", authkey=authkey)
        self._closed = threading.Event()
        threading.Thread(target=self._accept, args=(handle, name), name=name, daemon=True).start()

    def _accept(self, handle: Callable[..., Any], name: str) -> None:
        while True:
            try:
                connection = self._listener.accept()
            except Exception as e:
                if self._closed.is_set():
                    return
                log.warning("%s: refused a connection: %s", name, e or type(e).__name__)
                time.sleep(ACCEPT_RETRY_SECONDS)  # no busy loop where accepting itself fails (no fds left)
                continue
            threading.Thread(target=_answer, args=(connection, handle), name=f"{name}-peer", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(FileNotFoundError):  # the group's folder is gone with a supervisor that failed
            self._listener.close()


class GroupWriter:
    """The supervisor's side: the models' levels, and the GPU caches the workers share (no L1 where each
    worker's is its own), written for every worker."""

    def __init__(self, config: Config, workers: int) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="hps-group-"))  # mode 0700: only this user connects
        tables = sum(len(model.tables) for model in config.models)
        self.epochs = WriteEpochs(tables, unique_name() + "ep", create=True)
        self.on_unresponsive: Callable[[int], None] = lambda index: None
        self._refreshing = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hps-refresh")
        self._peers: list[_Peer] = []
        l1 = OwnedGpuCaches(self.folder)
        try:
            self.models = HostedModels.open(
                config,
                cache_factory=l1.factory,
                progress=True,
                group=GroupRole(self.epochs, on_written=self._refresh_workers),
            )
        except BaseException:
            self._release()
            raise
        self.address = GroupAddress(self.folder, secrets.token_bytes(32), self.epochs.shared_name, tables, l1.specs)
        self._peers = [_Peer(self.address.worker(index), self.address.authkey) for index in range(workers)]
        self._listener = _Accepting(self.address.writer, self.address.authkey, self._handle, "hps-writer")
        self._closed = threading.Event()
        self._retrying = threading.Thread(target=self._retry_writes, name="hps-writer-retry", daemon=True)
        self._retrying.start()

    def _retry_writes(self) -> None:
        """As a server does: failed levels retry their writes once a second, so they recover with no write."""
        while not self._closed.wait(WRITES_CHECK_SECONDS):
            self.models.retry_writes()

    def _handle(self, operation: str, model: str, *arguments: Any) -> Any:
        session = self.models.session(model)
        if operation == "upsert":
            return session.upsert(*arguments)
        if operation == "delete":
            return session.delete(*arguments)
        if operation == "write_back":
            return session.write_back_from(*arguments)
        if operation == "write_refusal":
            return session.write_refusal()
        if operation == "prefetch":
            return session.prefetch_from(*arguments)
        raise ValueError(f"group writer: unknown operation {operation!r}")

    def _refresh_workers(self, model: str, table: ServedTable, keys: np.ndarray, vectors: np.ndarray | None) -> None:
        """Every running worker updates its copies of the keys; one that does not confirm in time is killed."""
        message = ("refresh", model, table.name, keys, vectors)
        pending = {self._refreshing.submit(peer.refresh, message): index for index, peer in enumerate(self._peers)}
        done, late = futures.wait(pending, timeout=REFRESH_TIMEOUT_SECONDS)
        for future in late:
            index = pending[future]
            log.error("worker %d did not confirm a write of %s.%s in time; killing it", index, model, table.name)
            self.on_unresponsive(index)
        for future in done:
            future.result()

    def warm(self, stop: threading.Event) -> None:
        """Copies initial_cache_rate of each table into the volatile level and the shared GPU caches."""
        self.models.warm(stop)

    def close(self) -> None:
        """Stops taking writes and closes the levels; raises the persistent level's StorageError (a failed
        final flush) after releasing everything."""
        self._listener.close()
        self._closed.set()
        self._retrying.join()
        try:
            self.models.close()
        finally:
            self._release()

    def _release(self) -> None:
        self._refreshing.shutdown(wait=False, cancel_futures=True)
        for peer in self._peers:
            peer.close()
        self.epochs.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class _Peer:
    """The writer's connection to one worker's refresh socket, made when first needed."""

    def __init__(self, address: str, authkey: bytes) -> None:
        self._address = address
        self._authkey = authkey
        self._connection: Connection | None = None
        self._lock = threading.Lock()

    def refresh(self, message: tuple[Any, ...]) -> None:
        """Sends the refresh and waits until the worker has applied it. A connection that fails is made once
        more: the worker it reached may have exited since, and the worker started in its place, listening on
        the same path, may hold the rows already (it warms its L1 as it starts)."""
        with self._lock:
            for last_try in (False, True):
                try:
                    if self._connection is None:
                        self._connection = Client(self._address, "AF_UNIX", authkey=self._authkey)
                    self._connection.send(message)
                    status, value = self._connection.recv()
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    return  # not running, or not started yet: it holds no copies of any row
                except (EOFError, OSError):
                    self.close()
                    if last_try:
                        return  # it exited meanwhile, its L1 with it
        if status == "error":
            raise value

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class WriterLink:
    """A worker's side (session.WriteRoute): its writes go to the group's writer; the writer's refreshes
    come in on the worker's own socket and reach `models` once they are open."""

    def __init__(self, address: GroupAddress, index: int) -> None:
        self.address = address
        self.epochs = WriteEpochs(address.tables, address.epochs)
        self.models: HostedModels | None = None
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        path = address.worker(index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by the worker this one replaces
        # Listening before the levels open: a write made meanwhile is refreshed here (or found by
        # follow_writes), never missed.
        self._listener = _Accepting(path, address.authkey, self._refresh, f"hps-refresh-{index}")

    def role(self) -> GroupRole:
        return GroupRole(self.epochs, route=self)

    def _refresh(self, operation: str, model: str, table: str, keys: np.ndarray, vectors: np.ndarray | None) -> None:
        if operation != "refresh":
            raise ValueError(f"group worker: unknown operation {operation!r}")
        if self.models is not None:
            self.models.session(model).refresh(table, keys, vectors)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Connection]:
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            try:
                connection = Client(self.address.writer, "AF_UNIX", authkey=self.address.authkey)
            except OSError as e:
                raise LevelUnavailableError(f"the group's writer is unreachable: {e.strerror}") from None
        try:
            yield connection
        except (EOFError, OSError):
            connection.close()
            raise LevelUnavailableError("the group's writer did not answer the write; it may have landed") from None
        with self._lock:
            self._idle.append(connection)

    def _call(self, *message: Any) -> Any:
        with self._connection() as connection:
            connection.send(message)
            if not connection.poll(WRITER_TIMEOUT_SECONDS):
                raise OSError("no answer")  # the connection is dropped: a late answer would be misread
            status, value = connection.recv()
        if status == "error":
            raise value
        return value

    def upsert(self, model: str, table: str, keys: np.ndarray, vectors: np.ndarray) -> int:
        return int(self._call("upsert", model, table, keys, vectors))

    def delete(self, model: str, table: str, keys: np.ndarray) -> int:
        return int(self._call("delete", model, table, keys))

    def write_refusal(self, model: str) -> str:
        return str(self._call("write_refusal", model))

    def write_back(self, model: str, rows: WriteBack) -> None:
        self._call("write_back", model, rows)

    def holds_l1(self, model: str) -> bool:
        return shares_l1(self.address.l1, model)

    def prefetch(self, model: str, keys: list[PrefetchKeys]) -> None:
        self._call("prefetch", model, keys)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for connection in self._idle:
                connection.close()
            self._idle.clear()
        self.epochs.close()
