"""The HPS workflow in TensorFlow: train a DLRM-like model, dissect it, serve its tables, predict through hps.

Run `python -m examples.tf_dlrm [WORKDIR]`; it prints the largest difference between the trained model's
predictions and the served inference model's on held-out clicks, and the served accuracy.
Example code: hps itself never imports it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from examples import deploy
from examples.clicks import DENSE_FEATURES, DIM, ONE_HOT, TABLES, Clicks, Comparison, synthetic_clicks
from hps_client import tf as hps

MODEL_NAME = "dlrm_tf"


def dense_network() -> keras.Model:
    """The dense part: bottom MLP over the dense features, pairwise dot interaction with the embeddings, top MLP.

    Inputs: the dense features and one DIM vector per table, in TABLES order; output: click probability.
    """
    dense = keras.Input((DENSE_FEATURES,), name="dense_features")
    vectors = [keras.Input((DIM,), name=f"{t.name}_vector") for t in TABLES]
    bottom = keras.layers.Dense(16, activation="relu")(dense)
    bottom = keras.layers.Dense(DIM, activation="relu")(bottom)
    features = [bottom, *vectors]
    dots = [
        keras.layers.Dot(axes=1)([features[i], features[j]])
        for i in range(len(features))
        for j in range(i + 1, len(features))
    ]
    top = keras.layers.Concatenate()([bottom, *dots])
    top = keras.layers.Dense(16, activation="relu")(top)
    out = keras.layers.Dense(1, activation="sigmoid")(top)
    return keras.Model([dense, *vectors], out, name="dense_part")


def _history(clicks: Clicks) -> tf.RaggedTensor:
    return tf.RaggedTensor.from_tensor(clicks.history, lengths=clicks.history_lengths)


class TrainedDLRM(keras.Model):
    """The training model: Keras embedding tables (one-hot lookups and a mean-pooled history) + dense part."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = [keras.layers.Embedding(t.rows, DIM, name=t.name) for t in TABLES]
        for table in self.tables:  # the history table is read as a matrix, not called: build them now
            table.build()
        self.dense_part = dense_network()

    def call(self, dense: tf.Tensor, ids: tf.Tensor, history: tf.RaggedTensor) -> tf.Tensor:
        vectors = [table(ids[:, i]) for i, table in enumerate(self.tables[: len(ONE_HOT)])]
        history_table = tf.convert_to_tensor(self.tables[-1].embeddings)
        vectors.append(tf.nn.embedding_lookup_sparse(history_table, history, None, combiner="mean"))
        return self.dense_part([dense, *vectors])


def train(data: Clicks, epochs: int = 4, batch_size: int = 256, seed: int = 0) -> TrainedDLRM:
    keras.utils.set_random_seed(seed)
    model = TrainedDLRM()
    optimizer = keras.optimizers.Adam(0.01)
    loss = keras.losses.BinaryCrossentropy()

    @tf.function
    def step(dense: tf.Tensor, ids: tf.Tensor, history: tf.RaggedTensor, labels: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            value = loss(labels[:, None], model(dense, ids, history))
        gradients = tape.gradient(value, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return value

    for _ in range(epochs):
        for start in range(0, len(data), batch_size):
            batch = data.batch(start, start + batch_size)
            step(batch.dense, batch.ids, _history(batch), batch.labels)
    return model


def dissect(model: TrainedDLRM, workdir: Path) -> dict[str, np.ndarray]:
    """Saves the dense part as a Keras file and returns the embedding tables (name -> rows x DIM)."""
    model.dense_part.save(workdir / "dense_tf.keras")
    return {t.name: table.embeddings.numpy() for t, table in zip(TABLES, model.tables, strict=True)}


class InferenceDLRM:
    """The deployed model: hps layers for every table, the saved dense part on top; one RPC per table."""

    def __init__(self, ps_config: Path, workdir: Path, model_name: str = MODEL_NAME) -> None:
        hps.Init(global_batch_size=1024, ps_config_file=ps_config)
        self.lookups = [hps.LookupLayer(model_name, i, DIM, tf.float32) for i in range(len(ONE_HOT))]
        self.history = hps.SparseLookupLayer(model_name, len(ONE_HOT), DIM, tf.float32)
        self.dense_part = keras.models.load_model(workdir / "dense_tf.keras")

    @tf.function
    def __call__(self, dense: tf.Tensor, ids: tf.Tensor, history: tf.RaggedTensor) -> tf.Tensor:
        vectors = [lookup(ids[:, i]) for i, lookup in enumerate(self.lookups)]
        vectors.append(self.history(history, None, combiner="mean"))
        return self.dense_part([dense, *vectors])


def predict(model: TrainedDLRM | InferenceDLRM, data: Clicks, batch_size: int = 512) -> np.ndarray:
    batches = (data.batch(start, start + batch_size) for start in range(0, len(data), batch_size))
    return np.concatenate([model(b.dense, b.ids, _history(b)).numpy()[:, 0] for b in batches])


def run(workdir: Path) -> Comparison:
    """The whole workflow: train, dissect, write ps.json, import, serve, predict held-out clicks both ways."""
    model = train(synthetic_clicks(4096, seed=1))
    held_out = synthetic_clicks(1024, seed=2)
    ps_config = deploy.deploy_config(workdir, {MODEL_NAME: dissect(model, workdir)})
    with deploy.serving(ps_config):
        served = predict(InferenceDLRM(ps_config, workdir), held_out)
    return Comparison(predict(model, held_out), served, held_out.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", help="where tables, ps.json and the database go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        print(run(workdir).summary(MODEL_NAME))


if __name__ == "__main__":
    main()
