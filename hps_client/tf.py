"""TensorFlow (Keras 3) layers that look embeddings up in an hps server, with HugeCTR HPS's TF plugin API.

Each layer call is one Lookup RPC through a tf.numpy_function bridge, eager or inside tf.function; the layers
hold no weights and compute no gradients (inference only), and refuse a SavedModel export, which cannot hold the
bridge (a .keras file can). Import it explicitly: `import hps_client` does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from hps_client import endpoint
from hps_client.client import Client
from hps_client.wire import Combiner, Dtype
from hps_wire.security import TLS

_WIRE_DTYPES: dict[tf.DType, Dtype] = {tf.float32: "float32", tf.float16: "float16"}
_COMBINERS = ("mean", "sum", "sqrtn")

# Why a SavedModel export is refused, and what to do instead (README, "Exporting models with the layers").
_NO_SAVED_MODEL = (
    "{layer}: a SavedModel cannot hold this layer's lookup: it calls the hps server through a Python bridge "
    "(tf.numpy_function) that is not serialized, so the export would fail when loaded in another process "
    "('Could not find callback with key=pyfunc_...'). Save the Keras model as a .keras file instead "
    "(model.save('model.keras'); keras.models.load_model rebuilds the layers, pointing at the same server), or "
    "export a model without the lookup layers that takes the embedding vectors as inputs."
)

_defaults: dict[str, Any] = {"address": None, "global_batch_size": None, "tls": None, "token": None}


def Init(  # the name HPS users call
    global_batch_size: int,
    ps_config_file: str | Path | None = None,
    *,
    address: str | None = None,
    tls: TLS | None = None,
    token: str | None = None,
) -> str:
    """Points every layer built without its own ps_config_file/address at one server, like `hps.Init`.

    The address is `address` if given, else the one the config's `server.address` implies (an HPS ps.json
    or an hps YAML; loopback for a wildcard host, 127.0.0.1:8500 when absent). `tls` and `token` reach a
    server with TLS or auth on (default: the HPS_TLS_* and HPS_TOKEN environment variables). Returns "OK"
    as HPS does.
    """
    if int(global_batch_size) < 1:
        raise ValueError(f"global_batch_size: must be >= 1, got {global_batch_size}")
    target = endpoint.resolve_address(ps_config_file, address)
    if target is None:
        raise ValueError("Init: give ps_config_file or address")
    _defaults.update(address=target, global_batch_size=int(global_batch_size), tls=tls, token=token)
    return "OK"


def _wire_dtype(emb_vec_dtype: Any) -> tuple[tf.DType, Dtype]:
    dtype = tf.as_dtype(emb_vec_dtype)
    if dtype not in _WIRE_DTYPES:
        raise TypeError(f"emb_vec_dtype: must be tf.float32 or tf.float16, got {dtype.name}")
    return dtype, _WIRE_DTYPES[dtype]


class _ServedTable(keras.layers.Layer):
    """What both layers share: which server and table they read, and the HPS constructor arguments."""

    def __init__(
        self,
        model_name: str,
        table_id: int,
        emb_vec_size: int,
        emb_vec_dtype: Any = tf.float32,
        ps_config_file: str | Path | None = None,
        global_batch_size: int | None = None,
        *,
        address: str | None = None,
        tls: TLS | dict[str, Any] | None = None,
        token: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("trainable", None)  # nothing here trains, whatever a saved config says
        super().__init__(trainable=False, **kwargs)
        if int(emb_vec_size) < 1:
            raise ValueError(f"emb_vec_size: must be >= 1, got {emb_vec_size}")
        self.model_name = model_name
        self.table_id = int(table_id)
        self.emb_vec_size = int(emb_vec_size)
        self.emb_vec_dtype, self._wire_dtype = _wire_dtype(emb_vec_dtype)
        self.ps_config_file = None if ps_config_file is None else str(ps_config_file)
        self.global_batch_size = global_batch_size
        # Resolved now, as HPS initialises at construction; Init after building a layer does not move it.
        target = endpoint.resolve_address(ps_config_file, address) or _defaults["address"]
        if target is None:
            raise ValueError(
                f"{type(self).__name__}: no server; call hps_client.tf.Init(...) first or pass ps_config_file/address"
            )
        self.address: str = target
        endpoint.forget(target, model_name)
        # A saved model keeps its TLS files (get_config) but never its token: that comes from Init,
        # the argument or HPS_TOKEN again where it is loaded.
        self.tls: TLS | None = TLS(**tls) if isinstance(tls, dict) else tls or _defaults["tls"]
        self._token: str | None = token or _defaults["token"]

    def _served(self, fetch: endpoint.Fetch) -> np.ndarray:
        return endpoint.lookup(
            self.address, self.model_name, self.table_id, self.emb_vec_size, fetch, self.tls, self._token
        )

    def _trackable_children(self, save_type: Any = "checkpoint", **kwargs: Any) -> dict[str, Any]:
        # tf.saved_model.save and Keras model.export walk the objects they save with save_type "savedmodel"
        # (checkpoints with "checkpoint"): refusing here fails the export before anything is written. Not a
        # TypeError: Keras's export skips objects whose walk raises one.
        if save_type == "savedmodel":
            raise ValueError(_NO_SAVED_MODEL.format(layer=f"hps_client.tf.{type(self).__name__} {self.name!r}"))
        return super()._trackable_children(save_type, **kwargs)  # type: ignore[no-any-return]

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "model_name": self.model_name,
            "table_id": self.table_id,
            "emb_vec_size": self.emb_vec_size,
            "emb_vec_dtype": self.emb_vec_dtype.name,
            "ps_config_file": self.ps_config_file,
            "global_batch_size": self.global_batch_size,
            "address": self.address,
            "tls": None if self.tls is None else {k: None if v is None else str(v) for k, v in vars(self.tls).items()},
        }


@keras.saving.register_keras_serializable(package="hps")
class LookupLayer(_ServedTable):
    """Dense lookup (tf.nn.embedding_lookup): integer ids of any shape -> ids.shape + [emb_vec_size].

    Keys no level of the server holds get the table's default vector.
    """

    def _lookup(self, keys: np.ndarray) -> np.ndarray:
        return _writable(
            self._served(lambda client, table: client.lookup(self.model_name, table, keys, dtype=self._wire_dtype))
        )

    def call(self, inputs: Any) -> tf.Tensor:
        ids = tf.convert_to_tensor(inputs)
        if not ids.dtype.is_integer:
            raise TypeError(f"inputs: ids must be integers, got {ids.dtype.name}")
        flat = tf.reshape(tf.cast(ids, tf.int64), [-1])
        vectors = tf.numpy_function(self._lookup, [flat], self.emb_vec_dtype, stateful=True, name="hps_lookup")
        out = tf.reshape(vectors, tf.concat([tf.shape(ids, out_type=tf.int32), [self.emb_vec_size]], 0))
        out.set_shape(ids.shape.concatenate([self.emb_vec_size]))
        return out

    def compute_output_shape(self, input_shape: Any) -> tuple[int | None, ...]:
        return (*tuple(input_shape), self.emb_vec_size)


@keras.saving.register_keras_serializable(package="hps")
class SparseLookupLayer(_ServedTable):
    """Pooled lookup (tf.nn.embedding_lookup_sparse), reduced on the server: one vector per row of sp_ids.

    Rows with no ids give zero vectors (the batch keeps every row). Each id's vector is clipped to `max_norm`
    before the combiner when it is given.
    """

    def _combined(
        self, keys: np.ndarray, row_splits: np.ndarray, weights: np.ndarray, combiner: Combiner, max_norm: float
    ) -> np.ndarray:

        def fetch(client: Client, table: str) -> np.ndarray:
            return client.lookup_combined(
                self.model_name,
                table,
                keys,
                row_splits,
                combiner=combiner,
                weights=weights if weights.size else None,
                max_norm=max_norm or None,
                dtype=self._wire_dtype,
            )

        return _writable(self._served(fetch))

    def call(
        self,
        sp_ids: tf.SparseTensor | tf.RaggedTensor,
        sp_weights: tf.SparseTensor | tf.RaggedTensor | None = None,
        name: str | None = None,
        combiner: Combiner | None = None,
        max_norm: float | None = None,
    ) -> tf.Tensor:
        combiner = combiner or "mean"
        if combiner not in _COMBINERS:
            raise ValueError(f"combiner: must be one of {_COMBINERS}, got {combiner!r}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm: must be > 0 (or None for no clipping), got {max_norm}")
        ids = _ragged(sp_ids, "sp_ids")
        keys = tf.cast(ids.values, tf.int64)
        if sp_weights is None:
            weights = tf.zeros([0], tf.float32)  # empty: every weight is 1
        else:
            weights = tf.cast(_ragged(sp_weights, "sp_weights").values, tf.float32)
        vectors = tf.numpy_function(
            lambda k, s, w: self._combined(k, s, w, combiner, max_norm or 0.0),
            [keys, tf.cast(ids.row_splits, tf.int64), weights],
            self.emb_vec_dtype,
            stateful=True,
            name=name or "hps_sparse_lookup",
        )
        out = tf.reshape(vectors, [-1, self.emb_vec_size])
        out.set_shape([ids.shape[0], self.emb_vec_size])
        return out

    def compute_output_spec(self, sp_ids: Any, *args: Any, **kwargs: Any) -> keras.KerasTensor:
        # Keras cannot trace call() with a symbolic ragged input; the output spec needs only the batch size.
        return keras.KerasTensor((sp_ids.shape[0], self.emb_vec_size), dtype=self.emb_vec_dtype.name)


def _writable(vectors: np.ndarray) -> np.ndarray:
    """Replies are read-only views of the received bytes; TensorFlow takes a writable array over faster than it
    copies a read-only one (measured by hps_bench/layers.py)."""
    return np.array(vectors)


def _ragged(tensor: Any, field: str) -> tf.RaggedTensor:
    """A 2-D SparseTensor (indices in row-major order, as TensorFlow requires) or RaggedTensor as ragged rows."""
    if isinstance(tensor, tf.SparseTensor):
        if tensor.shape.rank is not None and tensor.shape.rank != 2:
            raise ValueError(f"{field}: must be 2-D (samples x ids), got rank {tensor.shape.rank}")
        return tf.RaggedTensor.from_sparse(tensor)
    if isinstance(tensor, tf.RaggedTensor):
        if tensor.ragged_rank != 1 or tensor.shape.rank != 2:
            raise ValueError(f"{field}: must be a 2-D RaggedTensor (samples x ids), got shape {tensor.shape}")
        return tensor
    raise TypeError(f"{field}: must be a tf.SparseTensor or tf.RaggedTensor, got {type(tensor).__name__}")
