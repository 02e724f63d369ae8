"""Where the TensorFlow and PyTorch layers find their server and table: address, shared Client, table by index.

Framework-free (the layers import it; it imports neither TensorFlow nor PyTorch); the layers say what to look up.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hps_client.client import Client, TableInfo
from hps_client.errors import NotFoundError
from hps_wire.security import TLS, token_from_environment

# What `hps serve` listens on when its config names no server.address.
DEFAULT_ADDRESS = "127.0.0.1:8500"
_ANY_HOST = ("0.0.0.0:", "[::]:")

# What a layer looks up: fetch(client, table name) -> its vectors, dim last.
Fetch = Callable[[Client, str], np.ndarray]

_lock = threading.Lock()
_clients: dict[tuple[str, TLS | None, str | None], Client] = {}
# Each model's tables in the server's order as this process last described them, by (address, model). Only
# single dict operations touch it (atomic), so lookups take no lock.
_tables: dict[tuple[str, str], tuple[TableInfo, ...]] = {}


def config_address(ps_config_file: str | Path) -> str:
    """The address a server started with this config (HPS ps.json or hps YAML) is reachable at locally.

    A config without `server.address` gets the server's default; a wildcard host (0.0.0.0, [::]) becomes
    loopback, since a process on the same machine connects there.
    """
    path = Path(ps_config_file)
    try:
        text = path.read_text()
    except OSError as e:
        raise FileNotFoundError(f"ps_config_file: cannot read {path}: {e.strerror}") from e
    try:
        raw: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"ps_config_file: {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}") from e
    server = raw.get("server") if isinstance(raw, dict) else None
    address = server.get("address") if isinstance(server, dict) else None
    if address is None:
        return DEFAULT_ADDRESS
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"ps_config_file: server.address must be 'host:port', got {address!r}")
    for wildcard in _ANY_HOST:
        if address.startswith(wildcard):
            return "127.0.0.1:" + address[len(wildcard) :]
    return address


def resolve_address(ps_config_file: str | Path | None, address: str | None) -> str | None:
    """`address` if given, else the one `ps_config_file` implies, else None."""
    if address is not None:
        return address
    return None if ps_config_file is None else config_address(ps_config_file)


def shared_client(address: str, tls: TLS | None = None, token: str | None = None) -> Client:
    """One Client per address and credentials for the whole process: gRPC channels are thread-safe and costly
    to open. Without `tls` the HPS_TLS_* variables say whether to use TLS; without `token`, HPS_TOKEN."""
    key = (address, tls or TLS.from_environment(), token or token_from_environment())
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = Client(address, tls=key[1], token=key[2])
        return client


def forget(address: str, model: str) -> None:
    """A layer of `model` is being built: the next lookup of every layer of it resolves table ids again, so a
    model reloaded since (tables reordered, renamed, resized) is read as it is served now."""
    _tables.pop((address, model), None)


def lookup(
    address: str,
    model: str,
    table_id: int,
    emb_vec_size: int,
    fetch: Fetch,
    tls: TLS | None = None,
    token: str | None = None,
) -> np.ndarray:
    """`fetch`'s vectors from the table at index `table_id` of `model` (HPS addresses tables by index).

    The index is resolved against this process's last DescribeModel of the model, and described again, once,
    when the server says the model changed since: NOT_FOUND for the table (dropped or renamed), or a dim other
    than emb_vec_size. A table served at another dim than emb_vec_size is a ValueError naming both.
    """
    client = shared_client(address, tls, token)
    known = _described(client, address, model)
    table = _indexed(known, model, table_id)
    if table.dim == emb_vec_size:
        try:
            vectors = fetch(client, table.name)
        except NotFoundError:
            pass
        else:
            if vectors.shape[-1] == emb_vec_size:
                return vectors
    table = _indexed(_described(client, address, model, stale=known), model, table_id)
    _check_dim(model, table_id, table.name, table.dim, emb_vec_size)
    vectors = fetch(client, table.name)
    _check_dim(model, table_id, table.name, vectors.shape[-1], emb_vec_size)  # reloaded once more meanwhile
    return vectors


def _described(
    client: Client, address: str, model: str, stale: tuple[TableInfo, ...] | None = None
) -> tuple[TableInfo, ...]:
    """`model`'s tables as last described; described now when unknown or `stale` (unless another thread has
    described them again since)."""
    tables = _tables.get((address, model))
    if tables is None or tables is stale:
        tables = _tables[(address, model)] = client.describe(model).tables
    return tables


def _indexed(tables: tuple[TableInfo, ...], model: str, table_id: int) -> TableInfo:
    if not 0 <= table_id < len(tables):
        raise IndexError(f"table_id: model {model!r} has {len(tables)} tables (0..{len(tables) - 1}), got {table_id}")
    return tables[table_id]


def _check_dim(model: str, table_id: int, table: str, dim: int, emb_vec_size: int) -> None:
    if dim != emb_vec_size:
        raise ValueError(
            f"emb_vec_size: table {table_id} ({table!r}) of model {model!r} has dim {dim}, got {emb_vec_size}"
        )
