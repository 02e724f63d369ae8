"""The HPS Triton ensemble tutorial against a real tritonserver and hps server: trained model's predictions, and
bad requests answered with Triton errors naming the problem while the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from examples.triton_ensemble import client, dissect, dlrm, repository
from hps_client.triton import TritonEnvironment, running
from hps_server import config as config_module
from hps_server.server import HpsServer


@dataclass
class Deployed:
    triton: triton_grpc.InferenceServerClient
    held_out: dlrm.Clicks
    expected: np.ndarray


@pytest.fixture(scope="module")
def deployed(triton_environment: TritonEnvironment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    workdir = tmp_path_factory.mktemp("triton_ensemble")
    model = dlrm.train(dlrm.synthetic_clicks(8_000, seed=0), epochs=2)
    held_out = dlrm.synthetic_clicks(1_500, seed=1)
    expected = dlrm.predict(model, held_out)
    dense_weights = dissect.dissect(model, workdir)
    server = HpsServer(config_module.load(dissect.write_hps_config(workdir)))
    port = server.start()
    try:
        repository.write_repository(
            workdir / "models",
            f"127.0.0.1:{port}",
            dense_weights,
            hps_model=dissect.HPS_MODEL,
            tables=list(dlrm.TABLES),
            dense_features=dlrm.DENSE_FEATURES,
        )
        with (
            running(triton_environment, workdir / "models") as endpoint,
            triton_grpc.InferenceServerClient(endpoint.grpc_target) as triton,
        ):
            yield Deployed(triton, held_out, expected)
    finally:
        server.stop(grace=1)


def test_ensemble_predicts_what_the_trained_model_does(deployed: Deployed) -> None:
    predictions = client.predict(deployed.triton, deployed.held_out, batch_size=512)
    assert predictions.shape == deployed.expected.shape
    assert np.abs(predictions - deployed.expected).max() <= 1e-5
    # The model learned something, so equal predictions are a real check and not two constant outputs.
    assert predictions.std() > 0.05


def _tensor(name: str, array: np.ndarray, datatype: str) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _bad_inputs(case: str, clicks: dlrm.Clicks) -> list[triton_grpc.InferInput]:
    """The held-out inputs with one thing wrong."""
    keys, dense, samples = clicks.keys, clicks.dense, len(clicks.keys)

    def numkeys(*counts: int) -> triton_grpc.InferInput:
        return _tensor("NUMKEYS", np.tile(np.array([counts], np.int32), (samples, 1)), "INT32")

    good_keys, good_dense = _tensor("KEYS", keys, "INT64"), _tensor("DENSE", dense, "FP32")
    return {
        "float keys": [_tensor("KEYS", keys.astype(np.float32), "FP32"), numkeys(1, 1, 1), good_dense],
        "counts off": [good_keys, numkeys(1, 1, 2), good_dense],
        "two categories": [
            _tensor("KEYS", np.concatenate([keys, keys[:, 2:]], 1), "INT64"),
            numkeys(1, 1, 2),
            good_dense,
        ],
        "short dense": [good_keys, numkeys(1, 1, 1), _tensor("DENSE", dense[:, :12].copy(), "FP32")],
    }[case]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("float keys", "input 'KEYS' data-type is 'FP32', but model 'dlrm' expects 'INT64'"),
        ("counts off", "NUMKEYS: counts [1, 1, 2] add up to 4, but KEYS has 3 keys per sample"),
        ("two categories", "EMBEDDINGS: 32 values per sample, the dense model needs 24"),
        ("short dense", "unexpected shape for input 'DENSE' for model 'dlrm'"),
    ],
)
def test_bad_requests_get_triton_errors_and_the_server_keeps_serving(
    deployed: Deployed, case: str, message: str
) -> None:
    clicks = dlrm.Clicks(*(a[:8] for a in (deployed.held_out.dense, deployed.held_out.keys, deployed.held_out.labels)))
    with pytest.raises(InferenceServerException) as error:
        deployed.triton.infer(repository.ENSEMBLE, _bad_inputs(case, clicks))
    assert message in str(error.value)
    np.testing.assert_allclose(client.predict(deployed.triton, clicks), deployed.expected[:8], atol=1e-5, rtol=0)
