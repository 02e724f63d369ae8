"""Asks the ensemble for click probabilities with tritonclient over gRPC: no hps code on this side.

Builds the HPS backend's inputs (KEYS, NUMKEYS) and the dense features from held-out clicks; nothing else.
"""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as triton_grpc

from examples.triton_ensemble.dlrm import Clicks
from examples.triton_ensemble.repository import ENSEMBLE


def inputs(clicks: Clicks) -> list[triton_grpc.InferInput]:
    keys = np.ascontiguousarray(clicks.keys, dtype=np.int64)
    numkeys = np.ones(keys.shape, dtype=np.int32)  # one key per table per sample
    tensors = []
    for name, array, datatype in (
        ("KEYS", keys, "INT64"),
        ("NUMKEYS", numkeys, "INT32"),
        ("DENSE", clicks.dense, "FP32"),
    ):
        tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def predict(client: triton_grpc.InferenceServerClient, clicks: Clicks, batch_size: int = 1024) -> np.ndarray:
    """Click probabilities (n,), asked batch_size samples per request."""
    parts = []
    for start in range(0, len(clicks.labels), batch_size):
        batch = Clicks(*(a[start : start + batch_size] for a in (clicks.dense, clicks.keys, clicks.labels)))
        parts.append(client.infer(ENSEMBLE, inputs(batch)).as_numpy("PREDICTION")[:, 0])
    return np.concatenate(parts)
