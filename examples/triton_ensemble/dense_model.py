"""The tutorial's dense part for Triton's Python backend: DLRM's MLPs and dot interaction in NumPy, from dense.npz.

Copied into the model repository as dense/1/model.py and run only inside Triton; it looks nothing up (the hps
lookup model before it in the ensemble does). Inputs: DENSE fp32 [13], EMBEDDINGS fp32 [tables * dim], the
lookup model's OUTPUT0. Output: PREDICTION fp32 [1], the click probability.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def _layers(weights: Any, prefix: str) -> list[tuple[np.ndarray, np.ndarray]]:
    count = len([name for name in weights.files if name.startswith(f"{prefix}_w")])
    return [(weights[f"{prefix}_w{i}"].T.copy(), weights[f"{prefix}_b{i}"]) for i in range(count)]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        with np.load(Path(args["model_repository"]) / args["model_version"] / "dense.npz") as weights:
            self.bottom = _layers(weights, "bottom")
            self.top = _layers(weights, "top")
            self.rows, self.cols = weights["pair_rows"], weights["pair_cols"]
        self.dim = self.bottom[-1][0].shape[1]
        self.tables = int(self.cols.max())  # features: the bottom output, then one vector per table

    def _forward(self, dense: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        x = dense
        for weight, bias in self.bottom:
            x = np.maximum(x @ weight + bias, 0)
        features = np.concatenate([x[:, None, :], vectors], axis=1)
        dots = np.matmul(features, features.transpose(0, 2, 1))[:, self.rows, self.cols]
        h = np.concatenate([x, dots], axis=1)
        for i, (weight, bias) in enumerate(self.top):
            h = h @ weight + bias
            if i < len(self.top) - 1:
                h = np.maximum(h, 0)
        return (1 / (1 + np.exp(-h))).astype(np.float32)

    def _checked(self, request: Any) -> tuple[np.ndarray, np.ndarray]:
        dense = pb_utils.get_input_tensor_by_name(request, "DENSE").as_numpy()
        embeddings = pb_utils.get_input_tensor_by_name(request, "EMBEDDINGS").as_numpy()
        width = self.tables * self.dim
        if embeddings.shape[1] != width:
            raise ValueError(
                f"EMBEDDINGS: {embeddings.shape[1]} values per sample, the dense model needs {width} "
                f"({self.tables} tables x dim {self.dim}: NUMKEYS must be 1 per table)"
            )
        return dense, embeddings.reshape(len(embeddings), self.tables, self.dim)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        valid, inputs = [], []
        for i, request in enumerate(requests):
            try:
                inputs.append(self._checked(request))
                valid.append(i)
            except ValueError as e:
                error = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                responses[i] = pb_utils.InferenceResponse(error=error)
        if valid:
            # One forward pass over all requests of the dynamic batch.
            sizes = np.cumsum([len(dense) for dense, _ in inputs])[:-1]
            dense = np.concatenate([d for d, _ in inputs])
            vectors = np.concatenate([v for _, v in inputs])
            for i, prediction in zip(valid, np.split(self._forward(dense, vectors), sizes), strict=True):
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("PREDICTION", prediction)])
        return responses
