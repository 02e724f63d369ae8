"""The TensorFlow layers against a real server: shapes, dtypes, defaults, combiners, graphs, errors and exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from hps_client import TLS, Client
from hps_client import tf as hps
from tests.conftest import CONSTANT_KEYS, READER, TABLE_SPECS, SecuredModel, ServedModel, write_constant_table

USER, ITEM = 0, 1  # table_id: the model's tables in config order


@pytest.fixture(scope="module")
def address(served: ServedModel) -> str:
    hps.Init(global_batch_size=64, address=served.target)
    return served.target


def _item_keys(served: ServedModel, n: int, seed: int = 0) -> np.ndarray:
    """Stored item keys mixed with keys no level holds (those get the default vector, -1.5)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(served.truth["item"][0], n - n // 3), rng.integers(10**7, 10**8, n // 3)])


@pytest.mark.parametrize("shape", [(12,), (3, 4), (2, 3, 2), (0,), (0, 5)])
def test_lookup_layer_keeps_the_ids_shape_eager_and_in_a_graph(served: ServedModel, address: str, shape) -> None:
    keys = _item_keys(served, int(np.prod(shape)), seed=len(shape)).reshape(shape)
    layer = hps.LookupLayer("ctr", ITEM, 8, tf.float32)
    expected = served.expected("item", keys.reshape(-1)).reshape(*shape, 8)
    eager = layer(keys)
    spec = tf.TensorSpec([None] * len(shape), tf.int64)
    graph = tf.function(layer, input_signature=[spec])
    assert graph.get_concrete_function().structured_outputs.shape.as_list() == [None] * len(shape) + [8]
    for got in (eager, graph(tf.constant(keys))):
        assert got.shape == (*shape, 8) and got.dtype == tf.float32
        np.testing.assert_array_equal(got.numpy(), expected)


def test_unknown_keys_get_the_table_default_vector(served: ServedModel, address: str) -> None:
    got = hps.LookupLayer("ctr", ITEM, 8, tf.float32)(np.array([10**9, 10**9 + 1])).numpy()
    np.testing.assert_array_equal(got, np.full((2, 8), TABLE_SPECS["item"][2], np.float32))


def test_float16_vectors_and_int32_ids(served: ServedModel, address: str) -> None:
    keys = served.truth["user"][0][:10]
    layer = hps.LookupLayer("ctr", USER, 16, tf.float16)
    got = tf.function(layer)(tf.constant(keys.astype(np.int32)))  # sample keys fit in int32
    assert got.dtype == tf.float16
    np.testing.assert_array_equal(got.numpy(), served.expected("user", keys).astype(np.float16))


def test_layer_argument_errors(served: ServedModel, address: str) -> None:
    with pytest.raises(TypeError, match=r"emb_vec_dtype: must be tf\.float32 or tf\.float16"):
        hps.LookupLayer("ctr", USER, 16, tf.float64)
    with pytest.raises(TypeError, match="ids must be integers"):
        hps.LookupLayer("ctr", USER, 16, tf.float32).call(tf.constant([1.0]))
    with pytest.raises(ValueError, match="combiner: must be one of"):
        hps.SparseLookupLayer("ctr", USER, 16, tf.float32)(tf.ragged.constant([[1]], tf.int64), combiner="max")
    with pytest.raises(ValueError, match="give ps_config_file or address"):
        hps.Init(global_batch_size=8)


def _ragged_ids(served: ServedModel, lengths: list[int], seed: int) -> tf.RaggedTensor:
    keys = _item_keys(served, sum(lengths), seed)
    return tf.RaggedTensor.from_row_lengths(keys, np.array(lengths, np.int64))


def _pooled(vectors, row_splits, combiner, weights, max_norm=None) -> np.ndarray:
    """tf.nn.embedding_lookup_sparse's definition, one sample at a time."""
    if max_norm is not None:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors * (max_norm / np.maximum(norms, max_norm))
    out = np.zeros((len(row_splits) - 1, vectors.shape[1]), np.float64)
    for i in range(len(row_splits) - 1):
        v, w = vectors[row_splits[i] : row_splits[i + 1]], weights[row_splits[i] : row_splits[i + 1]]
        if len(v):
            total = (v * w[:, None]).sum(0)
            out[i] = {"sum": total, "mean": total / w.sum(), "sqrtn": total / np.sqrt((w * w).sum())}[combiner]
    return out


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("form", ["ragged", "sparse"])
def test_sparse_lookup_layer_matches_numpy(served: ServedModel, address: str, combiner, weighted, form) -> None:
    lengths = [3, 0, 1, 4, 2, 0]
    ids = _ragged_ids(served, lengths, seed=7)
    weights = tf.RaggedTensor.from_row_lengths(np.linspace(0.5, 2.0, sum(lengths), dtype=np.float32), lengths)
    keys, row_splits = ids.values.numpy(), ids.row_splits.numpy()
    expected = _pooled(
        served.expected("item", keys), row_splits, combiner, weights.values.numpy() if weighted else np.ones(len(keys))
    )
    if form == "sparse":
        ids, weights = ids.to_sparse(), weights.to_sparse()
    layer = hps.SparseLookupLayer("ctr", ITEM, 8, tf.float32)
    sp_weights = weights if weighted else None
    eager = layer(ids, sp_weights, combiner=combiner)
    graph = tf.function(lambda i, w: layer(i, w, combiner=combiner))(ids, sp_weights)
    for got in (eager, graph):
        assert got.shape == (len(lengths), 8) and got.dtype == tf.float32
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_sparse_lookup_layer_max_norm_clips_before_combining(served: ServedModel, address: str) -> None:
    ids = _ragged_ids(served, [2, 3, 1], seed=3)
    keys, row_splits = ids.values.numpy(), ids.row_splits.numpy()
    got = hps.SparseLookupLayer("ctr", ITEM, 8, tf.float32)(ids, combiner="sum", max_norm=0.5)
    expected = _pooled(served.expected("item", keys), row_splits, "sum", np.ones(len(keys)), max_norm=0.5)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_sparse_lookup_layer_empty_batch_and_static_batch_size(served: ServedModel, address: str) -> None:
    layer = hps.SparseLookupLayer("ctr", ITEM, 8, tf.float32)
    empty = tf.RaggedTensor.from_row_splits(tf.zeros([0], tf.int64), tf.zeros([1], tf.int64))
    assert layer(empty).shape == (0, 8)
    spec = tf.RaggedTensorSpec([4, None], tf.int64, ragged_rank=1)
    graph = tf.function(lambda ids: layer(ids, combiner="sum"), input_signature=[spec])
    assert graph.get_concrete_function().structured_outputs.shape.as_list() == [4, 8]
    ids = _ragged_ids(served, [1, 0, 2, 1], seed=5)
    np.testing.assert_allclose(graph(ids).numpy(), layer(ids, combiner="sum").numpy())


def test_server_errors_surface_with_the_server_message_inside_a_graph(served: ServedModel, address: str) -> None:
    unknown_model = tf.function(hps.LookupLayer("nope", 0, 8, tf.float32))
    with pytest.raises(tf.errors.OpError, match="NOT_FOUND: no model 'nope'"):
        unknown_model(tf.constant([1, 2], tf.int64))
    wrong_size = tf.function(hps.LookupLayer("ctr", ITEM, 4, tf.float32))
    with pytest.raises(tf.errors.OpError, match=r"emb_vec_size: table 1 \('item'\) of model 'ctr' has dim 8, got 4"):
        wrong_size(tf.constant([1], tf.int64))
    with pytest.raises(tf.errors.OpError, match="table_id: model 'ctr' has 2 tables"):
        tf.function(hps.LookupLayer("ctr", 5, 8, tf.float32))(tf.constant([1], tf.int64))
    too_many = tf.function(hps.LookupLayer("ctr", ITEM, 8, tf.float32))
    with pytest.raises(tf.errors.OpError, match=r"RESOURCE_EXHAUSTED: .*exceed the limit of 256"):
        too_many(tf.zeros([257], tf.int64))
    ids = _ragged_ids(served, [2, 1], seed=1)
    short_weights = tf.RaggedTensor.from_row_lengths(tf.ones([2]), [1, 1])
    pooled = tf.function(lambda i, w: hps.SparseLookupLayer("ctr", ITEM, 8, tf.float32)(i, w, combiner="sum"))
    with pytest.raises(tf.errors.OpError, match=r"INVALID_ARGUMENT: queries\[0\]\.weights: 2 weights for 3 keys"):
        pooled(ids, short_weights)
    # The server is still serving afterwards.
    keys = served.truth["item"][0][:3]
    np.testing.assert_array_equal(hps.LookupLayer("ctr", ITEM, 8, tf.float32)(keys), served.expected("item", keys))


def test_table_id_follows_a_reload_that_reorders_the_tables(admin_served: ServedModel, tmp_path: Path) -> None:
    a, b = write_constant_table(tmp_path, "a", 8, 1.0), write_constant_table(tmp_path, "b", 8, 2.0)
    keys = tf.constant(CONSTANT_KEYS)
    with Client(admin_served.target) as client:
        client.load_model({"name": "reordered", "tables": [a, b]})
        before = tf.function(hps.LookupLayer("reordered", 0, 8, tf.float32, address=admin_served.target))
        np.testing.assert_array_equal(before(keys), np.full((4, 8), 1.0))
        client.reload_model("reordered", model_config={"name": "reordered", "tables": [b, a]})
    after = hps.SparseLookupLayer("reordered", 0, 8, tf.float32, address=admin_served.target)
    np.testing.assert_array_equal(after(tf.RaggedTensor.from_row_lengths(keys, [2, 2]), combiner="sum"), 4.0)
    np.testing.assert_array_equal(before(keys), np.full((4, 8), 2.0))  # a graph traced earlier follows too


def test_keras_model_with_the_layers_predicts_saves_and_loads(
    served: ServedModel, address: str, tmp_path: Path
) -> None:
    ids = tf.keras.Input(shape=(3,), dtype="int64")
    user = tf.keras.Input(shape=(), dtype="int64")
    pooled = tf.keras.layers.Flatten()(hps.LookupLayer("ctr", ITEM, 8, tf.float32)(ids))
    features = tf.keras.layers.Concatenate()([pooled, hps.LookupLayer("ctr", USER, 16, tf.float32)(user)])
    model = tf.keras.Model([ids, user], tf.keras.layers.Dense(1, kernel_initializer="ones")(features))
    item_keys = _item_keys(served, 12, seed=2).reshape(4, 3)
    user_keys = served.truth["user"][0][:4]
    got = model.predict([item_keys, user_keys], verbose=0)
    expected = served.expected("item", item_keys.reshape(-1)).reshape(4, -1).sum(1) + served.expected(
        "user", user_keys
    ).sum(1)
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-5, atol=1e-5)
    # The inference graph saved as a .keras file rebuilds its layers, pointing at the same server.
    model.save(tmp_path / "inference.keras")
    loaded = tf.keras.models.load_model(tmp_path / "inference.keras")
    np.testing.assert_array_equal(loaded.predict([item_keys, user_keys], verbose=0), got)
    layer = hps.SparseLookupLayer("ctr", ITEM, 8, tf.float16, address=address)
    clone = hps.SparseLookupLayer.from_config(layer.get_config())
    assert (clone.address, clone.table_id, clone.emb_vec_size, clone.emb_vec_dtype) == (address, ITEM, 8, tf.float16)


@pytest.mark.parametrize("form", ["sparse", "ragged"])
def test_sparse_lookup_layer_in_a_functional_model(served: ServedModel, address: str, form: str) -> None:
    ids = _ragged_ids(served, [2, 1, 3], seed=9)
    inputs = tf.keras.Input(shape=(None,), dtype="int64", **{form: True})
    pooled = hps.SparseLookupLayer("ctr", ITEM, 8, tf.float32)(inputs, combiner="sum")
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(1, kernel_initializer="ones")(pooled))
    assert model.output.shape == (None, 1)
    expected = _pooled(served.expected("item", ids.values.numpy()), ids.row_splits.numpy(), "sum", np.ones(6)).sum(1)
    got = model(ids.to_sparse() if form == "sparse" else ids)
    np.testing.assert_allclose(got.numpy()[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_layers_reach_a_tls_server_with_a_token_and_save_no_token(secured: SecuredModel) -> None:
    files = (secured.ca.cert_file, secured.client.cert_file, secured.client.key_file)
    layer = hps.LookupLayer("ctr", USER, 16, address=secured.target, tls=TLS(*files), token=READER)
    keys = secured.truth["user"][0][:4]
    np.testing.assert_array_equal(layer(tf.constant(keys)).numpy(), secured.expected("user", keys))
    config = layer.get_config()
    assert config["tls"]["root_ca_file"] == str(secured.ca.cert_file) and READER not in str(config)
    clone = hps.LookupLayer.from_config(config)  # no token now: HPS_TOKEN is unset here
    assert clone.tls == TLS(
        *(str(p) for p in (secured.ca.cert_file, secured.client.cert_file, secured.client.key_file))
    )
    with pytest.raises(Exception, match="UNAUTHENTICATED"):
        clone(tf.constant(keys))


def _run_python(code: str) -> str:
    """`code` in a fresh interpreter (nothing of this process registered there): its stdout, or the failure."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_saved_model_exports_are_refused_at_save_time_and_a_keras_file_loads_elsewhere(
    served: ServedModel, address: str, tmp_path: Path
) -> None:
    ids = tf.keras.Input(shape=(3,), dtype="int64")
    pooled = tf.keras.layers.Flatten()(hps.LookupLayer("ctr", ITEM, 8, tf.float32)(ids))
    model = tf.keras.Model(ids, tf.keras.layers.Dense(1, kernel_initializer="ones")(pooled))
    module = tf.Module()
    module.layer = hps.SparseLookupLayer("ctr", ITEM, 8, tf.float32)
    refused = (
        r"hps_client\.tf\.(Sparse)?LookupLayer '\w+': a SavedModel cannot hold .* Save the Keras model as a \.keras"
    )
    for name, export in {
        "saved_model": lambda path: tf.saved_model.save(model, str(path)),
        "export": lambda path: model.export(str(path), verbose=False),
        "module": lambda path: tf.saved_model.save(module, str(path)),
    }.items():
        with pytest.raises(ValueError, match=refused):
            export(tmp_path / name)
        assert not (tmp_path / name / "saved_model.pb").exists()
    tf.train.Checkpoint(model=model).write(str(tmp_path / "weights"))  # checkpoints still work: only weights
    # The way to ship it: a .keras file, loaded in another process, reconnects its layers to the server.
    model.save(tmp_path / "inference.keras")
    keys = _item_keys(served, 12, seed=4).reshape(4, 3)
    printed = _run_python(
        "import keras, numpy as np, hps_client.tf\n"
        f"model = keras.models.load_model({str(tmp_path / 'inference.keras')!r})\n"
        f"print(model.predict(np.array({keys.tolist()}), verbose=0)[:, 0].tolist())"
    )
    expected = served.expected("item", keys.reshape(-1)).reshape(4, -1).sum(1)
    np.testing.assert_allclose(json.loads(printed.strip().splitlines()[-1]), expected, rtol=1e-5, atol=1e-5)
