"""The HPS Triton ensemble tutorial against a real tritonserver and `hps serve`: the trained model's predictions,
and bad requests answered with Triton errors naming the problem while the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from examples import torch_dlrm
from examples.clicks import Clicks, synthetic_clicks
from examples.triton_ensemble import client
from examples.triton_ensemble.deployment import deployed
from hps_bench.triton_ensemble import repository
from hps_client.triton import TritonEnvironment


@dataclass
class Deployed:
    triton: triton_grpc.InferenceServerClient
    held_out: Clicks
    expected: np.ndarray


@pytest.fixture(scope="module")
def deployment(triton_environment: TritonEnvironment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    workdir: Path = tmp_path_factory.mktemp("triton_ensemble")
    held_out = synthetic_clicks(1024, seed=2)
    with (
        deployed(workdir, triton_environment) as deployment,
        triton_grpc.InferenceServerClient(deployment.triton.grpc_target) as triton,
    ):
        yield Deployed(triton, held_out, torch_dlrm.predict(deployment.trained, held_out))


def test_ensemble_predicts_what_the_trained_model_does(deployment: Deployed) -> None:
    predictions = client.predict(deployment.triton, deployment.held_out, batch_size=256)
    assert predictions.shape == deployment.expected.shape
    assert np.abs(predictions - deployment.expected).max() <= 1e-5
    # The model learned something, so equal predictions are a real check and not two constant outputs.
    assert predictions.std() > 0.05


def _tensor(name: str, array: np.ndarray, datatype: str) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(np.ascontiguousarray(array))
    return tensor


def _bad_inputs(case: str, clicks: Clicks) -> list[triton_grpc.InferInput]:
    """The held-out inputs with one thing wrong."""
    keys = np.concatenate([clicks.ids, clicks.history], axis=1)

    def numkeys(*counts: int) -> triton_grpc.InferInput:
        return _tensor("NUMKEYS", np.tile(np.array([counts], np.int32), (len(keys), 1)), "INT32")

    good_keys, good_numkeys, good_dense = client.inputs(clicks)
    return {
        "float keys": [_tensor("KEYS", keys.astype(np.float32), "FP32"), good_numkeys, good_dense],
        "counts off": [good_keys, numkeys(1, 1, 1, 6), good_dense],
        "too few keys": [_tensor("KEYS", keys[:, :2], "INT64"), numkeys(1, 1, 0, 0), good_dense],
        "short dense": [good_keys, good_numkeys, _tensor("DENSE", clicks.dense[:, :3], "FP32")],
    }[case]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("float keys", "input 'KEYS' data-type is 'FP32', but model 'dlrm' expects 'INT64'"),
        ("counts off", "NUMKEYS: counts [1, 1, 1, 6] add up to 9, but KEYS has 8 keys per sample"),
        ("too few keys", "KEYS: 2 keys per sample, the dense model needs at least 4 (one per table)"),
        ("short dense", "unexpected shape for input 'DENSE' for model 'dlrm'"),
    ],
)
def test_bad_requests_get_triton_errors_and_the_server_keeps_serving(
    deployment: Deployed, case: str, message: str
) -> None:
    clicks = deployment.held_out.batch(0, 8)
    with pytest.raises(InferenceServerException) as error:
        deployment.triton.infer(repository.ENSEMBLE, _bad_inputs(case, clicks))
    assert message in str(error.value)
    np.testing.assert_allclose(client.predict(deployment.triton, clicks), deployment.expected[:8], atol=1e-5, rtol=0)
