"""DLRM's dense part in NumPy from dense.npz: bottom MLP, dot interaction, top MLP, sigmoid.

Shared by the dense model in Triton (copied beside its model.py) and by the benchmark's in-process baseline;
NumPy only, it knows nothing of Triton or hps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _layers(weights: np.lib.npyio.NpzFile, prefix: str) -> list[tuple[np.ndarray, np.ndarray]]:
    count = len([name for name in weights.files if name.startswith(f"{prefix}_w")])
    return [(weights[f"{prefix}_w{i}"].T.copy(), weights[f"{prefix}_b{i}"]) for i in range(count)]


class DenseForward:
    """Weights as dissect.py saves them: {bottom,top}_{w,b}<i> (PyTorch Linear layout) and the interaction pairs.

    Inputs are one vector per key, keys in table order: one key for each table but the last, then the last
    table's keys. When the last table has several, its vectors are averaged over the keys >= 0 (a padded bag,
    as torch.nn.EmbeddingBag(mode="mean") does over the valid ids).
    """

    def __init__(self, path: str | Path) -> None:
        with np.load(path) as weights:
            self.bottom = _layers(weights, "bottom")
            self.top = _layers(weights, "top")
            self.rows, self.cols = weights["pair_rows"], weights["pair_cols"]
        self.dim = int(self.bottom[-1][0].shape[1])
        self.tables = int(self.cols.max())  # features: the bottom output, then one vector per table

    def __call__(self, dense: np.ndarray, vectors: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Click probabilities (n, 1) float32 from dense (n, features), vectors (n, k, dim) and keys (n, k)."""
        x = dense
        for weight, bias in self.bottom:
            x = np.maximum(x @ weight + bias, 0)
        one_hot = self.tables - 1
        if vectors.shape[1] > self.tables:
            valid = keys[:, one_hot:] >= 0
            bag = (vectors[:, one_hot:] * valid[:, :, None]).sum(axis=1) / valid.sum(axis=1, keepdims=True)
            vectors = np.concatenate([vectors[:, :one_hot], bag[:, None, :]], axis=1)
        features = np.concatenate([x[:, None, :], vectors], axis=1)
        dots = np.matmul(features, features.transpose(0, 2, 1))[:, self.rows, self.cols]
        h = np.concatenate([x, dots], axis=1)
        for i, (weight, bias) in enumerate(self.top):
            h = h @ weight + bias
            if i < len(self.top) - 1:
                h = np.maximum(h, 0)
        return (1 / (1 + np.exp(-h))).astype(np.float32)
