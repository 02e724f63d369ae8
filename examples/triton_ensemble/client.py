"""Asks the ensemble for click probabilities with tritonclient over gRPC: no hps code on this side.

Builds the HPS backend's inputs (KEYS, NUMKEYS) and the dense features from held-out clicks; nothing else.
"""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as triton_grpc

from examples.clicks import HISTORY_LENGTH, ONE_HOT, Clicks
from hps_bench.triton_ensemble.repository import ENSEMBLE

# Per sample: one id for each one-hot table, then the history padded with -1 to HISTORY_LENGTH ids.
NUMKEYS = [1] * len(ONE_HOT) + [HISTORY_LENGTH]


def inputs(clicks: Clicks) -> list[triton_grpc.InferInput]:
    keys = np.ascontiguousarray(np.concatenate([clicks.ids, clicks.history], axis=1), dtype=np.int64)
    numkeys = np.tile(np.array([NUMKEYS], np.int32), (len(keys), 1))
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


def predict(client: triton_grpc.InferenceServerClient, clicks: Clicks, batch_size: int = 512) -> np.ndarray:
    """Click probabilities (n,), asked batch_size samples per request."""
    parts = []
    for start in range(0, len(clicks), batch_size):
        parts.append(client.infer(ENSEMBLE, inputs(clicks.batch(start, start + batch_size))).as_numpy("PREDICTION"))
    return np.concatenate(parts)[:, 0]
