"""The tutorial's dense part for Triton's Python backend: dense_forward.py run over each dynamic batch.

Copied into the model repository as dense/1/model.py and run only inside Triton; it looks nothing up (the hps
lookup model before it in the ensemble does). Inputs: DENSE fp32, EMBEDDINGS fp32 (the lookup model's OUTPUT0)
and the KEYS they were looked up with (pads of -1 in the last table's bag). Output: PREDICTION fp32 [1].
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

    def _checked(self, request: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dense = pb_utils.get_input_tensor_by_name(request, "DENSE").as_numpy()
        embeddings = pb_utils.get_input_tensor_by_name(request, "EMBEDDINGS").as_numpy()
        keys = pb_utils.get_input_tensor_by_name(request, "KEYS").as_numpy()
        tables, dim = self.forward.tables, self.forward.dim
        if keys.shape[1] < tables:
            raise ValueError(
                f"KEYS: {keys.shape[1]} keys per sample, the dense model needs at least {tables} (one per table)"
            )
        if embeddings.shape[1] != keys.shape[1] * dim:
            raise ValueError(
                f"EMBEDDINGS: {embeddings.shape[1]} values per sample for {keys.shape[1]} keys; "
                f"the dense model needs dim {dim} vectors"
            )
        return dense, embeddings.reshape(len(embeddings), keys.shape[1], dim), keys

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
        # One forward pass per key layout over all requests of the dynamic batch that share it.
        for width in {keys.shape[1] for _, _, keys in inputs}:
            group = [(i, x) for i, x in zip(valid, inputs, strict=True) if x[2].shape[1] == width]
            sizes = np.cumsum([len(x[0]) for _, x in group])[:-1]
            predictions = self.forward(*(np.concatenate([x[part] for _, x in group]) for part in range(3)))
            for (i, _), prediction in zip(group, np.split(predictions, sizes), strict=True):
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("PREDICTION", prediction)])
        return responses
