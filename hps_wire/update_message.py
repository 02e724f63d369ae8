"""The messages of the update stream: one Redis Stream entry per batch of rows written to one table.

Shared by the publisher (hps_client.feed, a trainer) and the server that applies them; it encodes and
decodes field values only, and performs no I/O.

Fields of an entry (every value bytes):
  model, table   the model and table names, as DescribeModel lists them
  op             b"upsert" (keys + vectors), b"delete" (keys), or b"drop" (no keys: every cached row of
                 the table is to be dropped, for a publisher that could not send its messages in time)
  keys           packed little-endian int64
  vectors        upsert only: row-major len(keys) x dim little-endian float32
  origin         the id of the hps server whose Upsert or Delete this is; empty for a trainer's batch,
                 which every server applies to every level
  shared         b"1" when the origin wrote the rows into the shared levels (Redis) itself, so the
                 others write only their own levels; otherwise (Redis failed there) they write all
  version        the table version the rows were written to (empty: unversioned rows); a server applies
                 the message only where it serves that version. Absent (a trainer that names none): applied
                 to the version each server serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

Op = Literal["upsert", "delete", "drop"]
OPS: tuple[Op, ...] = ("upsert", "delete", "drop")


class BadUpdateMessageError(ValueError):
    """An entry that is not an update message; the message says which field is wrong. `unserved`: the
    (model, table) of a well-formed message naming a table not served here."""

    def __init__(self, message: str, unserved: tuple[str, str] | None = None) -> None:
        super().__init__(message)
        self.unserved = unserved


@dataclass(frozen=True)
class UpdateMessage:
    model: str
    table: str
    op: Op
    keys: np.ndarray  # int64 [n]
    vectors: np.ndarray | None  # float32 [n, dim] for upserts, else None
    origin: str = ""
    shared_written: bool = False
    version: str | None = None


def encode(message: UpdateMessage) -> dict[bytes, bytes]:
    """The entry's fields for XADD."""
    fields = {
        b"model": message.model.encode(),
        b"table": message.table.encode(),
        b"op": message.op.encode(),
        b"keys": np.ascontiguousarray(message.keys, "<i8").tobytes(),
        b"origin": message.origin.encode(),
        b"shared": b"1" if message.shared_written else b"0",
    }
    if message.vectors is not None:
        fields[b"vectors"] = np.ascontiguousarray(message.vectors, "<f4").tobytes()
    if message.version is not None:
        fields[b"version"] = message.version.encode()
    return fields


def decode(fields: dict[bytes, bytes], dims: dict[tuple[str, str], int]) -> UpdateMessage:
    """The message of an entry; `dims` gives each known (model, table)'s vector width. Raises
    BadUpdateMessageError naming the field for an entry that is not one, or names a table not in `dims`."""
    try:
        model, table, op = (fields[name].decode() for name in (b"model", b"table", b"op"))
    except KeyError as e:
        raise BadUpdateMessageError(f"{e.args[0].decode()}: missing") from None
    except UnicodeDecodeError:
        raise BadUpdateMessageError("model/table/op: not UTF-8") from None
    if op not in OPS:
        raise BadUpdateMessageError(f"op: must be one of {', '.join(OPS)}, got {op[:16]!r}")
    dim = dims.get((model, table))
    if dim is None:
        raise BadUpdateMessageError(f"model/table: {model[:64]!r}.{table[:64]!r} is not served here", (model, table))
    data = fields.get(b"keys", b"")
    if len(data) % 8:
        raise BadUpdateMessageError(f"keys: byte length {len(data)} is not a multiple of 8")
    keys = np.frombuffer(data, "<i8")
    vectors = None
    if op == "upsert":
        raw = fields.get(b"vectors", b"")
        if len(raw) != len(keys) * dim * 4:
            raise BadUpdateMessageError(f"vectors: {len(raw)} bytes for {len(keys)} keys of dim {dim}")
        vectors = np.frombuffer(raw, "<f4").reshape(len(keys), dim)
        if not np.all(np.isfinite(vectors)):
            raise BadUpdateMessageError("vectors: contains NaN or infinity")
    origin = fields.get(b"origin", b"").decode(errors="replace")
    version = fields.get(b"version")
    return UpdateMessage(
        model,
        table,
        cast(Op, op),
        keys,
        vectors,
        origin,
        fields.get(b"shared") == b"1",
        None if version is None else version.decode(errors="replace"),
    )
