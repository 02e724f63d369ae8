"""Reply buffers: a buffer is handed out only while no one else holds it, sizes recur without new buffers,
the byte budget drops the least recently used sizes, page locks come on second use and go with the buffer;
through a real server, concurrent packed lookups written in place are each exactly right."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from hps_client import Client
from hps_server.reply_buffers import ReplyBuffers
from hps_server.server import HpsServer
from tests.conftest import ServedModel, sample_config, write_sample_tables

MIB = 1 << 20


def test_a_buffer_is_handed_out_again_only_once_its_holder_let_go() -> None:
    replies = ReplyBuffers(min_bytes=1)
    taken = replies.take(MIB)
    assert taken is not None
    first, view = taken
    assert len(first) == MIB and view.size == MIB
    view[:4] = [1, 2, 3, 4]
    assert first[:4] == b"\x01\x02\x03\x04"  # the view writes the bytes object's own storage
    second = replies.take(MIB)
    assert second is not None and second[0] is not first  # still held: another buffer
    first_id = id(first)
    del first, taken
    third = replies.take(MIB)
    assert third is not None and id(third[0]) == first_id  # let go of: the same buffer again
    assert replies.made == 2


def test_small_replies_and_replies_over_the_budget_get_no_buffer() -> None:
    replies = ReplyBuffers(budget_bytes=4 * MIB, min_bytes=MIB)
    assert replies.take(MIB - 1) is None
    assert replies.take(4 * MIB + 1) is None
    assert replies.made == 0


def test_past_the_budget_the_least_recently_used_sizes_are_dropped() -> None:
    replies = ReplyBuffers(budget_bytes=3 * MIB + 6, min_bytes=1)
    for size in (MIB + 1, MIB + 2, MIB + 3):
        replies.take(size)  # each let go of at once
    replies.take(MIB + 1)  # the first size is the most recently used again
    assert (replies.held_bytes(), replies.made) == (3 * MIB + 6, 3)
    replies.take(MIB)  # room made by dropping MIB + 2, the least recently used
    assert replies.held_bytes() == 3 * MIB + 4
    replies.take(MIB + 1)
    replies.take(MIB + 3)
    assert replies.made == 4  # both kept
    replies.take(MIB + 2)
    assert replies.made == 5  # dropped: made again


def test_a_buffer_is_page_locked_on_its_second_use_and_unlocked_when_dropped() -> None:
    locked: list[tuple[int, int]] = []
    unlocked: list[int] = []

    def pin(address: int, size: int) -> Callable[[], None]:
        locked.append((address, size))
        return lambda: unlocked.append(address)

    replies = ReplyBuffers(budget_bytes=2 * MIB, min_bytes=1)
    replies.take(MIB, pin)
    assert not locked  # a size seen once costs no registration
    taken = replies.take(MIB, pin)
    assert taken is not None and locked == [(taken[1].ctypes.data, MIB)]
    replies.take(MIB, pin)  # held above: another buffer, its first use
    assert len(locked) == 1
    del taken
    replies.take(2 * MIB)  # room for it only once both free buffers of MIB go
    assert unlocked == [locked[0][0]]
    replies.close()


def test_a_buffer_that_cannot_be_page_locked_still_serves(caplog: pytest.LogCaptureFixture) -> None:
    def refuse(address: int, size: int) -> Callable[[], None]:
        raise RuntimeError("out of lockable memory")

    replies = ReplyBuffers(min_bytes=1)
    replies.take(MIB, refuse)
    taken = replies.take(MIB, refuse)
    assert taken is not None and len(taken[0]) == MIB
    assert "could not be page-locked: out of lockable memory" in caplog.text


# ---------------------------------------------------------------- through a server


@pytest.fixture
def served_in_place(tmp_path) -> Iterator[ServedModel]:  # type: ignore[no-untyped-def]
    """The sample model twice (ctr: no L1, ads: the NumPy L1), every reply written into a reply buffer."""
    truth = write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    ctr = config.models[0]
    ads = dataclasses.replace(ctr, name="ads", gpucache=True, gpucacheper=0.2, deployed_device_list=(10**6,))
    server = HpsServer(dataclasses.replace(config, models=(ctr, ads)))
    server.lookups.replies = ReplyBuffers(min_bytes=1)
    port = server.start()
    assert server.wait_ready(30)
    yield ServedModel(server, f"127.0.0.1:{port}", config, truth)
    server.stop(grace=1)


def test_concurrent_lookups_written_in_place_are_each_exactly_right(served_in_place: ServedModel) -> None:
    served = served_in_place
    user_keys, item_keys = served.truth["user"][0], served.truth["item"][0]

    def calls(seed: int) -> int:
        rng = np.random.default_rng(seed)
        with Client(served.target) as client:
            for i in range(40):
                keys = {
                    "user": np.concatenate([rng.choice(user_keys, 200), [10**9]]),
                    "item": rng.choice(item_keys, 55),
                }
                model, dtype = ("ctr", "ads")[i % 2], ("float32", "float16")[i // 2 % 2]
                got = client.lookup_tables(model, keys, dtype=dtype)  # type: ignore[arg-type]
                for table, asked in keys.items():
                    np.testing.assert_array_equal(got[table].vectors, served.expected(table, asked).astype(dtype))
                    np.testing.assert_array_equal(got[table].found, asked != 10**9)
        return 40

    with ThreadPoolExecutor(8) as pool:
        replies = sum(pool.map(calls, range(8)))
    # Two reply sizes (float32, float16), each held by at most the calls in flight at once.
    assert 2 <= served.server.lookups.replies.made <= 2 * 8 < replies
