"""The hash map in shared memory across real processes: rows seen by every process, growth while another
process reads, overflow eviction, a holder SIGKILLed, segments unlinked by the owner.

The contract suite runs on the shared level too (tests/storage/conftest.py); here only what needs processes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest

from hps_server.config import VolatileDbConfig
from hps_server.storage import segments
from hps_server.storage.base import StorageError
from hps_server.storage.hashmap import HashMapLevel

SPAWN = multiprocessing.get_context("spawn")
TABLE = "m.t"


def rows(keys: np.ndarray, dim: int) -> np.ndarray:
    return (keys[:, None] % 65521 + np.arange(dim)[None, :]).astype(np.float32)


def attached(owner: HashMapLevel, **settings: object) -> HashMapLevel:
    return HashMapLevel.from_config(replace(VolatileDbConfig(**settings), shared_memory=owner.shared_name))  # type: ignore[arg-type]


@pytest.fixture
def owner() -> Iterator[HashMapLevel]:
    level = HashMapLevel.create_shared(VolatileDbConfig())
    yield level
    level.close()


def _serve_requests(name: str, settings: dict[str, object], pipe: Connection) -> None:
    """A second process: runs (method, args) requests on an attached level until told "stop"."""
    level = HashMapLevel.from_config(replace(VolatileDbConfig(**settings), shared_memory=name))  # type: ignore[arg-type]
    while (request := pipe.recv()) != "stop":
        method, args = request
        pipe.send(getattr(level, method)(*args))
    level.close()


class Other:
    """Another process attached to the level, called like a level."""

    def __init__(self, owner: HashMapLevel, **settings: object) -> None:
        self._pipe, theirs = SPAWN.Pipe()
        self.process = SPAWN.Process(target=_serve_requests, args=(owner.shared_name, settings, theirs))
        self.process.start()
        theirs.close()

    def call(self, method: str, *args: object) -> object:
        self._pipe.send((method, args))
        return self._pipe.recv()

    def stop(self) -> None:
        self._pipe.send("stop")
        self.process.join(60)
        assert self.process.exitcode == 0


def test_a_row_inserted_by_one_process_is_found_by_another(owner: HashMapLevel) -> None:
    here = attached(owner)
    here.create_table(TABLE, 4)
    other = Other(owner)
    try:
        keys = np.arange(100, dtype=np.int64)
        other.call("insert", TABLE, keys[:50], rows(keys[:50], 4))
        vectors, found = here.fetch(TABLE, keys)
        np.testing.assert_array_equal(found, keys < 50)
        np.testing.assert_array_equal(vectors[:50], rows(keys[:50], 4))
        here.insert(TABLE, keys[50:], rows(keys[50:], 4))
        # A table the other process creates is known here by its name alone.
        other.call("create_table", "m.u", 4)
        other.call("insert", "m.u", keys[:3], rows(keys[:3], 4) + 1)
        got, found = other.call("fetch", TABLE, keys)  # type: ignore[misc]
        assert found.all()
        np.testing.assert_array_equal(got, rows(keys, 4))
        assert here.size("m.u") == 3 and sorted(here.tables()) == [TABLE, "m.u"]
        np.testing.assert_array_equal(here.fetch("m.u", keys[:3])[0], rows(keys[:3], 4) + 1)
    finally:
        other.stop()
        here.close()


def _read_while_written(name: str, written: object, acked: object, bad: object) -> None:
    """Reads every row written so far, over and over, until `written` is -1; counts wrong rows in `bad`."""
    level = HashMapLevel.from_config(replace(VolatileDbConfig(), shared_memory=name))
    keys = np.arange(20_000, dtype=np.int64) * 7
    while (upto := written.value) >= 0:  # type: ignore[attr-defined]
        vectors, found = level.fetch(TABLE, keys[:upto])
        bad.value += int((~found).sum()) + int((vectors != rows(keys[:upto], 4)).any(axis=1).sum())  # type: ignore[attr-defined]
        acked.value = upto  # type: ignore[attr-defined]
    level.close()


def test_growth_past_several_reallocations_while_another_process_reads(owner: HashMapLevel) -> None:
    owner.create_table(TABLE, 4)
    written, acked, bad = SPAWN.Value("q", 0), SPAWN.Value("q", -1), SPAWN.Value("q", 0)
    reader = SPAWN.Process(target=_read_while_written, args=(owner.shared_name, written, acked, bad))
    reader.start()
    try:
        keys = np.arange(20_000, dtype=np.int64) * 7
        generations = set()
        for end in range(1000, len(keys) + 1, 1000):
            owner.insert(TABLE, keys[end - 1000 : end], rows(keys[end - 1000 : end], 4))
            generations.add(int(owner._table(TABLE).pool.state[segments.ROWS_GEN]))
            written.value = end
            # Each batch is read in full by the other process before the next (no timing: a handshake).
            while acked.value < end and reader.is_alive():
                time.sleep(0.001)
        assert len(generations) >= 5, "the dense arrays were reallocated several times"
        assert bad.value == 0
        assert owner.size(TABLE) == len(keys)
    finally:
        written.value = -1
        reader.join(60)
    assert reader.exitcode == 0


@pytest.mark.parametrize("policy", ["evict_oldest", "evict_random"])
def test_overflow_eviction_per_table_across_processes(policy: str) -> None:
    settings: dict[str, object] = {
        "overflow_margin": 100,
        "overflow_policy": policy,
        "overflow_resolution_target": 0.5,
    }
    owner = HashMapLevel.create_shared(VolatileDbConfig(**settings))  # type: ignore[arg-type]
    here = attached(owner, **settings)
    other = Other(owner, **settings)
    try:
        for table in ("m.a", "m.b"):
            here.create_table(table, 4)
        keys = np.arange(100, dtype=np.int64)
        here.insert("m.b", keys, rows(keys, 4))
        here.insert("m.a", keys, rows(keys, 4))
        other.call("fetch", "m.a", keys[:10])  # these become the most recently used
        other.call("insert", "m.a", np.array([100]), rows(np.array([100]), 4))  # over the margin
        assert here.size("m.a") == 50 and here.size("m.b") == 100
        vectors, found = here.fetch("m.a", np.arange(101))
        np.testing.assert_array_equal(vectors[found], rows(np.arange(101)[found], 4))
        if policy == "evict_oldest":
            assert found[:10].all() and found[100]
        assert here.contains("m.b", keys).all()
    finally:
        other.stop()
        here.close()
        owner.close()


def _hold_the_write_lock(name: str, pipe: Connection) -> None:
    level = HashMapLevel.from_config(replace(VolatileDbConfig(), shared_memory=name))
    with level._table(TABLE).pool.writing():
        pipe.send("holding")
        signal.pause()  # until SIGKILLed, the lock held and the pool marked as being written


def test_a_process_killed_holding_the_lock_wedges_no_other(owner: HashMapLevel) -> None:
    owner.create_table(TABLE, 4)
    keys = np.arange(10, dtype=np.int64)
    owner.insert(TABLE, keys, rows(keys, 4))
    ours, theirs = SPAWN.Pipe()
    holder = SPAWN.Process(target=_hold_the_write_lock, args=(owner.shared_name, theirs))
    holder.start()
    assert ours.recv() == "holding"
    os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
    holder.join(60)
    # The kernel let go of its lock; what it may have half-written is dropped, never served.
    assert not owner.contains(TABLE, keys).any()
    assert owner.size(TABLE) == 0
    owner.insert(TABLE, keys, rows(keys, 4))
    vectors, found = owner.fetch(TABLE, keys)
    assert found.all()
    np.testing.assert_array_equal(vectors, rows(keys, 4))


def test_segments_are_unlinked_when_the_owner_closes() -> None:
    owner = HashMapLevel.create_shared(VolatileDbConfig())
    name = owner.shared_name
    assert len(name) <= 30 and name.startswith(f"hps{os.getpid()}_")
    here = attached(owner)
    here.create_table(TABLE, 4)
    here.create_table("m.wide", 64)
    for start in range(0, 20_000, 1000):
        keys = np.arange(start, start + 1000, dtype=np.int64)
        here.insert(TABLE, keys, rows(keys, 4))
    present = sorted(path.name for path in Path("/dev/shm").glob(f"{name}*"))
    # One generation of rows and of slots per pool: older ones were unlinked as they were replaced.
    segments_of_rows = [path for path in present if "r" in path.removeprefix(name)]
    assert segments_of_rows == [f"{name}p0r{_gen(here, TABLE)}", f"{name}p1r1"]
    assert _gen(here, TABLE) > 5
    here.close()
    assert sorted(path.name for path in Path("/dev/shm").glob(f"{name}*")) == present  # only the owner unlinks
    owner.close()
    assert not list(Path("/dev/shm").glob(f"{name}*"))


def _gen(level: HashMapLevel, table: str) -> int:
    return int(level._table(table).pool.state[segments.ROWS_GEN])


def test_names_are_not_the_pid_alone() -> None:
    """A supervisor killed outright leaves its segments; in a container its successor has the same pid (1),
    and must not find its new names taken."""
    command = [sys.executable, "-c", "from hps_server.storage.segments import unique_name; print(unique_name())"]
    names = [subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip() for _ in range(2)]
    parts = [name.partition("_")[2] for name in names]  # what follows "hps<pid>_"
    assert parts[0] != parts[1]


def test_a_dev_shm_without_room_for_the_shared_hash_map_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    full = os.statvfs_result((4096, 4096, 100, 0, 0, 0, 0, 0, 0, 255))  # a tmpfs with no block free
    monkeypatch.setattr(segments.os, "statvfs", lambda folder: full)
    with pytest.raises(StorageError, match=r"/dev/shm has 0 MiB free, the shared hash map needs"):
        HashMapLevel.create_shared(VolatileDbConfig())


_KILLED_OWNER = """
import time
from hps_server.config import VolatileDbConfig
from hps_server.storage.hashmap import HashMapLevel
level = HashMapLevel.create_shared(VolatileDbConfig())
level.create_table("m.t", 4)
print(level.shared_name, flush=True)
time.sleep(60)
"""


def test_the_shared_memory_of_a_process_killed_outright_is_removed_by_the_next_one() -> None:
    owner = subprocess.Popen([sys.executable, "-c", _KILLED_OWNER], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip()  # it made its hash map
        (alive,) = Path("/dev/shm").glob(f"hps{owner.pid}_*.alive")
        prefix = alive.name.removesuffix(".alive")  # the process's part of its names: hps<pid>_<random>
        assert len(list(Path("/dev/shm").glob(f"{prefix}*"))) >= 3  # header, lock, alive at least
        assert prefix not in segments.remove_dead()  # alive: its lock is held
        owner.kill()
        owner.wait(30)
        assert prefix in segments.remove_dead()  # as the next supervisor does when it first names something
        assert not list(Path("/dev/shm").glob(f"{prefix}*"))
    finally:
        if owner.poll() is None:
            owner.kill()
