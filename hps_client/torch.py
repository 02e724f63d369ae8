"""PyTorch modules that look embeddings up in an hps server (HPS's Torch LookupLayer, and a pooled one) through
the ops hps::lookup and hps::lookup_combined, which torch.jit and torch.export record as calls, never as results.
Inference only: no parameters, no gradient. `import hps_client` does not import it.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import torch

from hps_client import endpoint
from hps_client.client import Client
from hps_client.wire import Combiner
from hps_wire.security import TLS

# Tokens of this process's layers, by the random handle their ops carry: a traced, scripted or exported module
# holds the handle, never the token; where the handle is unknown (another process) the op uses HPS_TOKEN.
_tokens: dict[str, str] = {}


def _check_keys(keys: torch.Tensor, field: str = "keys") -> np.ndarray:
    if keys.dtype.is_floating_point or keys.dtype.is_complex or keys.dtype == torch.bool:
        raise TypeError(f"{field}: must be integers, got {keys.dtype}")
    return keys.detach().to("cpu", torch.int64).numpy()


def _on_device_of(vectors: np.ndarray, keys: torch.Tensor) -> torch.Tensor:
    # The reply is a read-only view of the received bytes; torch wants memory it may write.
    out = torch.from_numpy(np.array(vectors))
    return out if keys.device.type == "cpu" else out.to(keys.device)


def _tls_text(tls: TLS | None) -> str:
    """TLS as the ops take it (a traced op takes no list of strings): "" (the HPS_TLS_* variables decide) or
    its four fields as a JSON list."""
    if tls is None:
        return ""
    fields = (tls.root_ca_file, tls.cert_file, tls.key_file, tls.server_name)
    return json.dumps([None if value is None else str(value) for value in fields])


def _served(
    address: str, model_name: str, table_id: int, emb_vec_size: int, tls: str, token_handle: str, fetch: endpoint.Fetch
) -> np.ndarray:
    tls_config = TLS(*json.loads(tls)) if tls else None
    return endpoint.lookup(address, model_name, table_id, emb_vec_size, fetch, tls_config, _tokens.get(token_handle))


def _lookup(
    keys: torch.Tensor, address: str, model_name: str, table_id: int, emb_vec_size: int, tls: str, token_handle: str
) -> torch.Tensor:
    host_keys = _check_keys(keys)

    def fetch(client: Client, table: str) -> np.ndarray:
        return client.lookup(model_name, table, host_keys)

    return _on_device_of(_served(address, model_name, table_id, emb_vec_size, tls, token_handle, fetch), keys)


def _lookup_combined(
    keys: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    address: str,
    model_name: str,
    table_id: int,
    emb_vec_size: int,
    combiner: Combiner,
    max_norm: float | None,
    tls: str,
    token_handle: str,
) -> torch.Tensor:
    host_keys = _check_keys(keys)
    if host_keys.ndim == 2 and offsets is None:
        bags, width = host_keys.shape
        row_splits = np.arange(bags + 1, dtype=np.int64) * width
    elif host_keys.ndim == 1 and offsets is not None:
        row_splits = np.append(_check_keys(offsets, "offsets"), len(host_keys))
    else:
        raise ValueError(f"keys: give 1-D keys with offsets or 2-D keys without, got {host_keys.ndim}-D keys")
    weights = None if per_sample_weights is None else per_sample_weights.detach().to("cpu", torch.float32).numpy()

    def fetch(client: Client, table: str) -> np.ndarray:
        return client.lookup_combined(
            model_name, table, host_keys, row_splits, combiner=combiner, weights=weights, max_norm=max_norm
        )

    return _on_device_of(_served(address, model_name, table_id, emb_vec_size, tls, token_handle, fetch), keys)


def _lookup_shape(
    keys: torch.Tensor, address: str, model: str, table_id: int, emb_vec_size: int, *_: str
) -> torch.Tensor:
    """The output's shape and dtype without a call, for torch.compile and torch.export (which trace with fakes)."""
    return keys.new_empty((*keys.shape, emb_vec_size), dtype=torch.float32)


def _lookup_combined_shape(
    keys: torch.Tensor,
    offsets: torch.Tensor | None,
    per_sample_weights: torch.Tensor | None,
    address: str,
    model: str,
    table_id: int,
    emb_vec_size: int,
    *_: object,
) -> torch.Tensor:
    bags = keys.shape[0] if offsets is None else offsets.shape[0]
    return keys.new_empty((bags, emb_vec_size), dtype=torch.float32)


# The ops, defined with torch.library's low-level API: a CompositeExplicitAutograd kernel costs ~5 us a call,
# where torch.library.custom_op's Python autograd wrapper costs ~140 us, and tracing records it all the same.
_TABLE = "str address, str model_name, int table_id, int emb_vec_size"
_CREDENTIALS = "str tls, str token_handle"
_library = torch.library.Library("hps", "DEF")
_library.define(f"lookup(Tensor keys, {_TABLE}, {_CREDENTIALS}) -> Tensor")
_library.define(
    f"lookup_combined(Tensor keys, Tensor? offsets, Tensor? per_sample_weights, {_TABLE}, str combiner, "
    f"float? max_norm, {_CREDENTIALS}) -> Tensor"
)
for _name, _kernel, _shape in (
    ("lookup", _lookup, _lookup_shape),
    ("lookup_combined", _lookup_combined, _lookup_combined_shape),
):
    _library.impl(_name, _kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"hps::{_name}", _shape, lib=_library)


class LookupLayer(torch.nn.Module):
    """Dense lookup like `hps_torch.LookupLayer`: int64 keys of any shape -> keys.shape + (emb_vec_size,).

    The server is `address` if given, else the one `ps_config_file` (HPS ps.json or hps YAML) implies.
    `table_id` indexes the model's tables in the server's order. Keys no level holds get the table's
    default vector. Output is float32. `tls` and `token` reach a server with TLS or auth on (default: the
    HPS_TLS_* and HPS_TOKEN environment variables).
    """

    def __init__(
        self,
        ps_config_file: str | Path | None = None,
        model_name: str = "",
        table_id: int = 0,
        emb_vec_size: int = 0,
        *,
        address: str | None = None,
        tls: TLS | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__()
        target = endpoint.resolve_address(ps_config_file, address)
        if target is None:
            raise ValueError("LookupLayer: give ps_config_file or address")
        if not model_name:
            raise ValueError("model_name: required")
        if int(emb_vec_size) < 1:
            raise ValueError(f"emb_vec_size: must be >= 1, got {emb_vec_size}")
        endpoint.forget(target, model_name)
        self.address = target
        self.model_name = model_name
        self.table_id = int(table_id)
        self.emb_vec_size = int(emb_vec_size)
        # What a traced or scripted module keeps besides the table: TLS files, and a handle, never the token.
        self._tls = _tls_text(tls)
        self._token_handle = ""
        if token:
            self._token_handle = secrets.token_hex(16)
            _tokens[self._token_handle] = token

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.ops.hps.lookup(
            keys, self.address, self.model_name, self.table_id, self.emb_vec_size, self._tls, self._token_handle
        )

    def extra_repr(self) -> str:
        fields = {"address": self.address, "model_name": self.model_name, "table_id": self.table_id}
        return ", ".join(f"{k}={v!r}" for k, v in fields.items()) + f", emb_vec_size={self.emb_vec_size}"


class SparseLookupLayer(LookupLayer):
    """Pooled lookup like torch.nn.EmbeddingBag, reduced on the server: one vector per bag.

    forward(keys, offsets=None, per_sample_weights=None): 1-D keys with `offsets` (where each bag starts, as
    EmbeddingBag takes them), or 2-D keys with one bag per row. `combiner` is sum, mean or sqrtn; `max_norm`
    clips each key's vector before pooling. Empty bags give zero vectors.
    """

    def __init__(
        self,
        ps_config_file: str | Path | None = None,
        model_name: str = "",
        table_id: int = 0,
        emb_vec_size: int = 0,
        *,
        combiner: Combiner = "mean",
        max_norm: float | None = None,
        address: str | None = None,
        tls: TLS | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(ps_config_file, model_name, table_id, emb_vec_size, address=address, tls=tls, token=token)
        if combiner not in ("sum", "mean", "sqrtn"):
            raise ValueError(f"combiner: must be sum, mean or sqrtn, got {combiner!r}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm: must be > 0 (or None for no clipping), got {max_norm}")
        self.combiner: Combiner = combiner
        self.max_norm = max_norm

    def forward(  # type: ignore[override]
        self, keys: torch.Tensor, offsets: torch.Tensor | None = None, per_sample_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        return torch.ops.hps.lookup_combined(
            keys,
            offsets,
            per_sample_weights,
            self.address,
            self.model_name,
            self.table_id,
            self.emb_vec_size,
            self.combiner,
            self.max_norm,
            self._tls,
            self._token_handle,
        )
