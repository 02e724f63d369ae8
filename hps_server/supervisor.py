"""`hps serve --processes N`: a supervisor and N worker processes, each a whole HpsServer, on one port.

The supervisor claims the address, spawns the workers (never forks: a forked gRPC process is unsafe),
restarts one that dies, and drains them all on SIGTERM/SIGINT. It serves no client, but it is the group's
one writer (group_writes.py): it opens the levels read-write, prepares the tables and warms the volatile
level once, and applies every worker's Upserts, Deletes and write-backs, refreshing every worker's L1
before a write is acknowledged. With volatile_db.type hash_map it creates that level in shared memory,
passes its name to the workers (who attach and warm only their L1) and unlinks it at exit. On GPUs the
writer also makes one L1 cache per device that every worker maps (shared_l1.py). Workers open RocksDB
read-only and follow the writer's commits.
Every worker serves the config's TLS and checks its tokens itself; the supervisor only checks the files first.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_handles
from multiprocessing.process import BaseProcess
from types import FrameType

from hps_server import addresses, logs
from hps_server.allocator import keep_large_blocks_in_heap
from hps_server.cache.shared_l1 import OpenedGpuCaches
from hps_server.config import Config
from hps_server.group_writes import GroupAddress, GroupWriter, WriterLink
from hps_server.logs import LogFormat
from hps_server.server import HpsServer, security, serve_until_signalled
from hps_server.stop_signals import STOP_SIGNALS, StartInterrupted, StartSignals, ignore_stop_signals
from hps_server.storage.base import StorageError
from hps_server.storage.hashmap import HashMapLevel

log = logging.getLogger(__name__)

# A dead worker is restarted after this long, doubled for each exit of one that never served, up to
# RESTART_BACKOFF_MAX: a worker that cannot start is retried slowly instead of spinning.
RESTART_BACKOFF_FIRST = 0.5
RESTART_BACKOFF_MAX = 30.0
# On a drain, workers get shutdown_grace_seconds for in-flight calls plus this long to close their
# levels; what is left after that is killed.
CLOSE_SECONDS = 5.0
# How often the supervisor looks at its workers between their messages.
POLL_SECONDS = 0.2
# A serving worker is asked for a sign of life this often, and killed (then restarted) when it has answered
# none for UNRESPONSIVE_SECONDS: a stopped or wedged worker would otherwise keep its share of the port's
# connections unanswered while nothing else notices it (writes notice only when there are writes).
HEARTBEAT_SECONDS = 1.0
UNRESPONSIVE_SECONDS = 10.0
# A worker still loading its models is given longer: a long NumPy call or CUDA's set-up holds its GIL a while.
STARTING_UNRESPONSIVE_SECONDS = 30.0
# A gap this long between two of the supervisor's own rounds (it runs one every POLL_SECONDS) means it was
# not running itself: its workers' silence over that gap is not counted.
STALL_SECONDS = 2.0


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is started with (pickled into it by the spawn context)."""

    index: int
    processes: int
    config: Config  # the worker's own: see worker_config
    group: GroupAddress
    log_level: int
    log_format: LogFormat


def serve_workers(config: Config, log_format: LogFormat) -> int:
    """Runs config.server.processes workers on config.server.address until SIGTERM or SIGINT; the exit code:
    0 after a drain, 1 when a worker exited before every worker was serving or the writer's final flush
    failed. OSError naming the address when another program holds it; StartInterrupted after a stop signal
    that came before the workers were started (the levels closed, the shared memory unlinked)."""
    signals = StartSignals()
    security(config)  # a bad certificate or tokens file stops the group here, not each worker at its start
    check_metrics_addresses(config)  # so do busy addresses, before the tables are ingested
    held, port = claim_address(config.server.address)
    try:
        with shared_volatile(config) as config:
            writer = GroupWriter(config, config.server.processes)
            try:
                writer.warm(threading.Event())
                group = WorkerGroup(config, port, log_format, writer.address)
                writer.on_unresponsive = group.kill
                code = group.run(hangup_pending=signals.hangup_pending)
            finally:
                try:
                    writer.close()
                except StorageError as e:
                    log.error("closing the levels failed: %s", e)
                    code = 1
            return code
    finally:
        held.close()


@contextlib.contextmanager
def shared_volatile(config: Config) -> Iterator[Config]:
    """With a hash_map volatile level: creates it in shared memory for the workers, yields the config naming
    it, and unlinks it on the way out (workers still running keep their mappings until they exit). Other
    volatile levels are shared already (Redis) or absent: the config is yielded as it is."""
    if config.volatile_db.type != "hash_map":
        yield config
        return
    owner = HashMapLevel.create_shared(config.volatile_db)
    try:
        log.info("hash_map in shared memory %s for %d workers", owner.shared_name, config.server.processes)
        yield replace(config, volatile_db=replace(config.volatile_db, shared_memory=owner.shared_name))
    finally:
        owner.close()


def claim_address(address: str) -> tuple[socket.socket, int]:
    """Checks that no other program holds `address` and holds it for the workers; returns the held
    socket (bound, not listening: it takes no connections) and the port (port 0 picks a free one)."""
    port = addresses.check_free(address, "server.address")
    family, kind, proto, where = addresses.resolve(address, "server.address")
    # Then the group holds the port for its lifetime, with SO_REUSEPORT so its workers can bind it too: a
    # program that does not share ports cannot take it, even while every worker is being restarted.
    held = socket.socket(family, kind, proto)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections of a server before in TIME_WAIT
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        held.bind((where[0], port, *where[2:]))
    except OSError as e:
        held.close()
        raise addresses.cannot_bind("server.address", address, e.strerror) from e
    return held, port


def check_metrics_addresses(config: Config) -> None:
    """Checks every worker's /metrics address free, and none the group's own port, before the group's
    start (OSError or ValueError naming the field)."""
    server = config.server
    addresses.check_apart(server.address, server.metrics_address, server.processes)
    for index in range(config.server.processes):
        address = _metrics_address(config.server.metrics_address, index)
        if address:
            addresses.check_free(address, "server.metrics_address", addresses.METRICS_DEFAULT_HOST)


def _worker_address(address: str, port: int) -> str:
    host, _, _ = address.rpartition(":")
    return f"{host}:{port}"


def _metrics_address(address: str, index: int) -> str:
    """Worker `index`'s /metrics: the configured port + index (port 0: each picks a free one)."""
    if not address:
        return ""
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + index}" if port.isdigit() and port != "0" else address


def worker_config(config: Config, port: int, index: int) -> Config:
    """A worker's config: the group's port, RocksDB read-only (the group's writer writes it), its own
    /metrics port, and no update stream: the writer reads it for the group and applies its messages like
    the workers' own writes (every level, then every worker's L1)."""
    server = replace(
        config.server,
        address=_worker_address(config.server.address, port),
        metrics_address=_metrics_address(config.server.metrics_address, index),
    )
    return replace(
        config,
        server=server,
        persistent_db=replace(config.persistent_db, read_only=True),
        updates=replace(config.updates, enabled=False),
    )


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"{code} ({signal.Signals(-code).name})"
    return str(code)


@dataclass
class _Worker:
    """One running worker process and the supervisor's end of its pipe."""

    process: BaseProcess
    pipe: Connection
    talking: bool = False  # it said "started": from then on it answers heartbeats, starting or serving
    warm: bool = False
    serving: bool = False
    # When it last answered a heartbeat (or said it started), and when it was last asked (monotonic).
    answered: float = 0.0
    asked: float = 0.0


def _tell(worker: _Worker, message: str) -> None:
    with contextlib.suppress(OSError):  # it exited meanwhile: _watch sees it
        worker.pipe.send(message)


class WorkerGroup:
    """The supervisor's side: starts, watches, restarts and drains the workers of one port.

    Each worker has a pipe of its own to the supervisor (it says "warm", is told "serve", then says
    "serving"), so no lock is shared between processes: a worker killed at any instant blocks no other.
    """

    def __init__(self, config: Config, port: int, log_format: LogFormat, writer: GroupAddress) -> None:
        self.config = config
        self.port = port
        self._writer = writer
        self.size = config.server.processes
        self._log_format = log_format
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * self.size
        self._backoff = [RESTART_BACKOFF_FIRST] * self.size
        self._restart_at: dict[int, float] = {}
        # Every worker was warm once: from then on a (restarted) worker serves as soon as it is warm.
        self._all_warm = False
        self._group_serving = False
        # Set by the signal handler; a plain attribute, since a handler must not take locks the loop may hold.
        self._stop_signal = 0
        self._hangup = False  # SIGHUP came: told in the loop that it is refused
        self._heartbeats_checked = time.monotonic()
        # Signals wake the loop at once (signal.set_wakeup_fd writes to it): a drain starts without a poll's delay.
        self._wakeup, self._wakeup_write = socket.socketpair()
        for end in (self._wakeup, self._wakeup_write):
            end.setblocking(False)

    def run(self, hangup_pending: bool = False) -> int:
        """Serves until a signal or a failed start, then drains every worker; returns the exit code.
        hangup_pending: a SIGHUP came while the group was starting."""
        self._hangup = hangup_pending
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)
        previous_wakeup = signal.set_wakeup_fd(self._wakeup_write.fileno())
        try:
            return self._serve()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            self._wakeup.close()
            self._wakeup_write.close()

    def _serve(self) -> int:
        for index in range(self.size):
            self._start(index)
        failed = False
        while not self._stop_signal and not failed:
            self._receive()
            if self._hangup:
                self._hangup = False
                log.warning(
                    "SIGHUP: reloading the config is not supported with %d worker processes (each serves its own "
                    "copy of the models); restart to apply a changed config",
                    self.size,
                )
            failed = not self._watch()
            now = time.monotonic()
            self._check_heartbeats(now)
            for index, due in list(self._restart_at.items()):
                if due <= now:
                    del self._restart_at[index]
                    self._start(index)
        if self._stop_signal:
            log.info("received %s, draining %d workers", signal.Signals(self._stop_signal).name, self.size)
        self._drain()
        return 1 if failed else 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _on_hangup(self, signum: int, frame: FrameType | None) -> None:
        self._hangup = True

    def _start(self, index: int) -> None:
        spec = WorkerSpec(
            index,
            self.size,
            worker_config(self.config, self.port, index),
            self._writer,
            logging.getLogger().getEffectiveLevel(),
            self._log_format,
        )
        temporary = self._writer.temporary(index)
        shutil.rmtree(temporary, ignore_errors=True)  # the process this one replaces was killed
        temporary.mkdir()
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=run_worker, args=(spec, theirs), name=f"hps-worker-{index}", daemon=True)
        process.start()
        theirs.close()  # the worker holds it now; at its exit our end reads EOF
        self._workers[index] = _Worker(process, ours)
        log.info("worker %d started (pid %d)", index, process.pid)

    def kill(self, index: int) -> None:
        """Kills worker `index` (it is restarted as after any exit); safe from any thread."""
        worker = self._workers[index]
        if worker is not None:
            worker.process.kill()

    def _receive(self) -> None:
        """Takes what the workers say within POLL_SECONDS (returning early when one says something or exits)."""
        pipes = {worker.pipe: index for index, worker in enumerate(self._workers) if worker is not None}
        sentinels = [worker.process.sentinel for worker in self._workers if worker is not None]
        for ready in wait_for_handles([*pipes, *sentinels, self._wakeup], timeout=POLL_SECONDS):
            if ready is self._wakeup:
                with contextlib.suppress(BlockingIOError):
                    self._wakeup.recv(64)  # the signals' numbers: the handlers have noted them already
                continue
            if not isinstance(ready, Connection):
                continue  # a sentinel: _watch sees the exit
            index = pipes[ready]
            try:
                said = ready.recv()
            except (EOFError, OSError):  # it exited (reset: killed with our messages unread); _watch sees it
                continue
            worker = self._workers[index]
            assert worker is not None
            if said == "started":
                worker.talking = True
                worker.answered = time.monotonic()
                log.info("worker %d (pid %d) loading its models", index, worker.process.pid)
            elif said == "warm":
                worker.warm = True
                if self._all_warm:
                    _tell(worker, "serve")
                elif all(w is not None and w.warm for w in self._workers):
                    self._all_warm = True
                    for w in self._workers:
                        assert w is not None
                        _tell(w, "serve")
            elif said == "serving":
                self._serving(index, worker)
            elif said == "alive":
                worker.answered = time.monotonic()

    def _serving(self, index: int, worker: _Worker) -> None:
        worker.serving = True
        worker.answered = time.monotonic()
        self._backoff[index] = RESTART_BACKOFF_FIRST
        if self._group_serving:
            log.info("worker %d (pid %d) serving again", index, worker.process.pid)
            return
        log.info("worker %d (pid %d) serving", index, worker.process.pid)
        if all(w is not None and w.serving for w in self._workers):
            self._group_serving = True
            log.info("serving %d workers on port %d", self.size, self.port)

    def _check_heartbeats(self, now: float) -> None:
        """Asks each worker that started (warming or serving) for a sign of life; kills one silent for
        UNRESPONSIVE_SECONDS, STARTING_UNRESPONSIVE_SECONDS while it is not serving yet (before the group
        first served, that fails its start rather than wait forever). Time the supervisor itself did not
        run (stopped, starved of CPU) is no worker's silence: after such a gap every worker gets a fresh
        allowance."""
        stalled = now - self._heartbeats_checked > STALL_SECONDS
        self._heartbeats_checked = now
        for index, worker in enumerate(self._workers):
            if worker is None or not worker.talking:
                continue
            if stalled:
                worker.answered = now
            allowed = UNRESPONSIVE_SECONDS if worker.serving else STARTING_UNRESPONSIVE_SECONDS
            if now - worker.answered > allowed:
                log.error(
                    "worker %d (pid %d) answered no heartbeat for %.0f s; killing it",
                    index,
                    worker.process.pid,
                    allowed,
                )
                worker.process.kill()
                worker.talking = worker.serving = False  # _watch restarts it once it has exited
            elif now - worker.asked >= HEARTBEAT_SECONDS:
                worker.asked = now
                _tell(worker, "alive?")

    def _watch(self) -> bool:
        """Schedules the restart of each worker that exited; False when one exited before the group served."""
        for index, worker in enumerate(self._workers):
            if worker is None or worker.process.exitcode is None:
                continue
            self._workers[index] = None
            worker.pipe.close()
            pid, code = worker.process.pid, _exit_text(worker.process.exitcode)
            if not self._all_warm:
                log.error("worker %d (pid %d) exited with code %s before every worker was serving", index, pid, code)
                return False
            delay = self._backoff[index]
            self._backoff[index] = min(RESTART_BACKOFF_MAX, delay * 2)
            log.warning("worker %d (pid %d) exited with code %s; restarting it in %.1f s", index, pid, code, delay)
            self._restart_at[index] = time.monotonic() + delay
        return True

    def _drain(self) -> None:
        """SIGTERM to every worker, then waits for them to drain; kills what is left after the grace."""
        self._restart_at.clear()
        running = [worker.process for worker in self._workers if worker is not None and worker.process.is_alive()]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + self.config.server.shutdown_grace_seconds + CLOSE_SECONDS
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.warning("%s (pid %d) still running after the grace; killing it", process.name, process.pid)
                process.kill()
                process.join()
        for worker in self._workers:
            if worker is not None:
                worker.pipe.close()
        log.info("all %d workers stopped", self.size)


def run_worker(spec: WorkerSpec, supervisor: Connection) -> None:
    """A worker process: serves its config on the shared port until SIGTERM, SIGINT or the supervisor's end."""
    logs.configure(spec.log_level, spec.log_format, worker=spec.index)
    keep_large_blocks_in_heap()
    signals = StartSignals()  # a drain while this worker starts stops it cleanly
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a SIGHUP to the group is the supervisor's to refuse
    # Its temporary folders (RocksDB's secondary log) inside the group's, which the supervisor empties as it
    # starts the next process of this index and removes at exit: a worker that is killed cannot remove its own.
    tempfile.tempdir = str(spec.group.temporary(spec.index))
    writer = WriterLink(spec.group, spec.index)
    try:
        code = _serve_as_worker(spec, supervisor, writer, signals)
    except StartInterrupted:
        code = 0
    finally:
        ignore_stop_signals()
        writer.close()
    if code:
        sys.exit(1)  # closing the levels failed: the supervisor logs the exit code


def _serve_as_worker(spec: WorkerSpec, supervisor: Connection, writer: WriterLink, signals: StartSignals) -> int:
    sending = threading.Lock()  # the warm-up, the serving report and the heartbeats share the pipe
    told_to_serve = threading.Event()

    def send(message: str) -> None:
        with sending, contextlib.suppress(OSError):  # the supervisor is gone: leave_with_the_supervisor drains
            supervisor.send(message)

    def answer_the_supervisor() -> None:
        # Heartbeats ("alive?") from the start on, and "serve" once every worker is warm. This thread answers
        # as long as the process runs Python code at all, so a worker that is stopped or holds the GIL for
        # long is found out, while it warms up too.
        send("started")
        with contextlib.suppress(EOFError, OSError):
            while True:
                if supervisor.recv() == "serve":
                    told_to_serve.set()
                else:
                    send("alive")

    def wait_for_the_others(stopped: threading.Event) -> None:
        send("warm")
        # Health stays NOT_SERVING until every worker is warm: a probe answered by any of them then
        # means the whole group serves. A restarted worker is told to serve at once.
        while not stopped.is_set() and not told_to_serve.wait(POLL_SECONDS):
            pass

    threading.Thread(target=answer_the_supervisor, name="hps-heartbeats", daemon=True).start()

    server = HpsServer(
        spec.config,
        OpenedGpuCaches(spec.group.l1).factory,
        shared_port=True,
        group=writer.role(),
        before_serving=wait_for_the_others,
    )
    writer.models = server.models

    def report_serving() -> None:
        server.wait_ready()
        send("serving")

    def leave_with_the_supervisor() -> None:
        # A supervisor killed outright cannot drain its workers: they stop themselves rather than linger.
        parent = multiprocessing.parent_process()
        if parent is not None:
            wait_for_handles([parent.sentinel])
            log.warning("worker %d: the supervisor is gone, draining", spec.index)
            server.stop()

    threading.Thread(target=report_serving, name="hps-report", daemon=True).start()
    threading.Thread(target=leave_with_the_supervisor, name="hps-orphan", daemon=True).start()
    return serve_until_signalled(server, signals)
