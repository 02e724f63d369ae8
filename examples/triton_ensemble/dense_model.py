"""The tutorial's dense part for Triton's Python backend: dense_forward.py run over each dynamic batch.

Copied into the model repository as dense/1/model.py and run only inside Triton; it looks nothing up (the hps
lookup model before it in the ensemble does). Inputs: DENSE fp32 [13], EMBEDDINGS fp32 [tables * dim], the
lookup model's OUTPUT0. Output: PREDICTION fp32 [1], the click probability.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from dense_forward import DenseForward  # copied beside this file; Triton puts the folder on sys.path


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.forward = DenseForward(Path(args["model_repository"]) / args["model_version"] / "dense.npz")
        self.tables, self.dim = self.forward.tables, self.forward.dim

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
            for i, prediction in zip(valid, np.split(self.forward(dense, vectors), sizes), strict=True):
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("PREDICTION", prediction)])
        return responses
