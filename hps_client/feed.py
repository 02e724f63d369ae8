"""A trainer's side of the update feed: appends batches of (table, keys, vectors) to the Redis Stream that
hps servers read (updates.stream in their config), so every server applies them to all its levels and L1.

It only appends messages (hps_wire.update_message) with redis-py; it never talks to an hps server.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from redis.cluster import ClusterNode, RedisCluster

from hps_client.wire import int64_keys
from hps_wire.update_message import UpdateMessage, encode

DEFAULT_STREAM = "hps_updates"
DEFAULT_MAX_LEN = 10_000
# Rows per stream entry: large enough to cost little per row, small enough for one Redis reply (dim 64: 1 MiB).
DEFAULT_ROWS_PER_MESSAGE = 4096
_MESSAGES_PER_ROUND = 8


def _nodes(address: str) -> list[ClusterNode]:
    nodes = []
    for item in address.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address: expected host:port[,host:port...], got {address!r}")
        nodes.append(ClusterNode(host, int(port)))
    return nodes


class UpdatePublisher:
    """Appends update messages to `stream` on the Redis Cluster at `address` (host:port seeds).

    `max_len` must match the servers' updates.max_len (the stream is trimmed to about that many
    messages); each call returns once Redis has the messages. Writes larger than `rows_per_message` are
    split into several messages, in order."""

    def __init__(
        self,
        address: str,
        *,
        stream: str = DEFAULT_STREAM,
        max_len: int = DEFAULT_MAX_LEN,
        rows_per_message: int = DEFAULT_ROWS_PER_MESSAGE,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        timeout: float = 10.0,
    ) -> None:
        if rows_per_message < 1:
            raise ValueError(f"rows_per_message: must be >= 1, got {rows_per_message}")
        self.stream = stream
        self.max_len = max_len
        self.rows_per_message = rows_per_message
        self._client = RedisCluster(
            startup_nodes=_nodes(address),
            username=username,
            password=password,
            ssl=tls,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )

    def upsert(self, model: str, table: str, keys: object, vectors: object) -> int:
        """Publishes rows to be written; returns the messages appended."""
        keys_array = int64_keys(keys)
        rows = np.asarray(vectors, dtype=np.float32)
        if rows.ndim != 2 or len(rows) != len(keys_array):
            raise ValueError(f"vectors: expected [{len(keys_array)}, dim] for {len(keys_array)} keys, got {rows.shape}")
        if not np.all(np.isfinite(rows)):
            raise ValueError("vectors: contains NaN or infinity (the servers would skip the message)")
        step = self.rows_per_message
        return self._append(
            UpdateMessage(model, table, "upsert", keys_array[i : i + step], rows[i : i + step])
            for i in range(0, len(keys_array), step)
        )

    def delete(self, model: str, table: str, keys: object) -> int:
        """Publishes keys to be removed; returns the messages appended."""
        keys_array = int64_keys(keys)
        step = self.rows_per_message
        return self._append(
            UpdateMessage(model, table, "delete", keys_array[i : i + step], None)
            for i in range(0, len(keys_array), step)
        )

    def _append(self, messages: Iterable[UpdateMessage]) -> int:
        """XADDs the messages in order, pipelined a few at a time (a few MiB per round trip)."""
        pipe = self._client.pipeline(transaction=False)
        count = 0
        for message in messages:
            pipe.xadd(self.stream, encode(message), maxlen=self.max_len, approximate=True)  # type: ignore[arg-type]
            count += 1
            if count % _MESSAGES_PER_ROUND == 0:
                pipe.execute()
        if count % _MESSAGES_PER_ROUND:
            pipe.execute()
        return count

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> UpdatePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DEFAULT_MAX_LEN", "DEFAULT_STREAM", "UpdatePublisher"]
