"""Where the TensorFlow and PyTorch layers find their server and table: address, shared Client, table by index.

Framework-free (the layers import it; it imports neither TensorFlow nor PyTorch) and it never looks vectors up.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hps_client.client import Client
from hps_wire.security import TLS, token_from_environment

# What `hps serve` listens on when its config names no server.address.
DEFAULT_ADDRESS = "127.0.0.1:8500"
_ANY_HOST = ("0.0.0.0:", "[::]:")

_lock = threading.Lock()
_clients: dict[tuple[str, TLS | None, str | None], Client] = {}
_tables: dict[tuple[str, str, int], TableRef] = {}


@dataclass(frozen=True)
class TableRef:
    """One model table as the layers address it: HPS's (model_name, table_id) resolved to the served name."""

    model: str
    table: str
    dim: int


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


def table_ref(
    address: str, model: str, table_id: int, emb_vec_size: int, tls: TLS | None = None, token: str | None = None
) -> TableRef:
    """The served table at index `table_id` of `model` (HPS addresses tables by index), checked against its size."""
    key = (address, model, table_id)
    ref = _tables.get(key)
    if ref is None:
        tables = shared_client(address, tls, token).describe(model).tables
        if not 0 <= table_id < len(tables):
            raise IndexError(
                f"table_id: model {model!r} has {len(tables)} tables (0..{len(tables) - 1}), got {table_id}"
            )
        info = tables[table_id]
        ref = TableRef(model, info.name, info.dim)
        _tables[key] = ref
    if ref.dim != emb_vec_size:
        raise ValueError(
            f"emb_vec_size: table {table_id} ({ref.table!r}) of model {model!r} has dim {ref.dim}, got {emb_vec_size}"
        )
    return ref
