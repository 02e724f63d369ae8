"""The hps lookup model in a real tritonserver: one RPC per dynamic batch, HPS backend's tensors, Triton errors."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from hps_client.triton import TritonEndpoint, TritonEnvironment, TritonStartError, running, write_lookup_model
from hps_client.triton.tritonserver import free_port
from hps_server.server import HpsServer
from tests.conftest import READER, SecuredModel, ServedModel, sample_config, write_sample_tables

MODEL = "hps_embedding"


@pytest.fixture(scope="module")
def triton(
    served: ServedModel,
    secured: SecuredModel,
    triton_environment: TritonEnvironment,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TritonEndpoint]:
    repository = tmp_path_factory.mktemp("repository")
    token_file = repository.parent / "hps-token"
    token_file.write_text(READER + "\n")
    write_lookup_model(
        repository,
        name="secured",
        hps_address=secured.target,
        hps_model="ctr",
        tables=["user", "item"],
        security={
            "tls_ca_file": str(secured.ca.cert_file),
            "tls_cert_file": str(secured.client.cert_file),
            "tls_key_file": str(secured.client.key_file),
            "token_file": str(token_file),
        },
    )
    write_lookup_model(
        repository,
        name=MODEL,
        hps_address=served.target,
        hps_model="ctr",
        tables=["user", "item"],
        max_batch_size=64,
        queue_delay_us=20_000,
    )
    write_lookup_model(repository, name="user_only", hps_address=served.target, hps_model="ctr", tables=["user"])
    write_lookup_model(
        repository,
        name="fp16",
        hps_address=served.target,
        hps_model="ctr",
        tables=["user", "item"],
        reply_dtype="float16",
    )
    with running(triton_environment, repository) as endpoint:
        yield endpoint


def _inputs(keys: np.ndarray, numkeys: np.ndarray, key_type: str = "INT64") -> list[triton_grpc.InferInput]:
    key_input = triton_grpc.InferInput("KEYS", list(keys.shape), key_type)
    key_input.set_data_from_numpy(keys)
    count_input = triton_grpc.InferInput("NUMKEYS", list(numkeys.shape), "INT32")
    count_input.set_data_from_numpy(numkeys)
    return [key_input, count_input]


def _sample(served: ServedModel, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """KEYS with 2 user keys and 1 item key per sample (some unknown), NUMKEYS, and the expected OUTPUT0."""
    rng = np.random.default_rng(seed)
    users = rng.choice(np.append(served.truth["user"][0], [10**9, -(10**9)]), size=(samples, 2))
    items = rng.choice(served.truth["item"][0], size=(samples, 1))
    expected = np.concatenate(
        [
            served.expected("user", users.ravel()).reshape(samples, -1),
            served.expected("item", items.ravel()).reshape(samples, -1),
        ],
        axis=1,
    )
    return np.concatenate([users, items], axis=1), np.tile(np.array([[2, 1]], np.int32), (samples, 1)), expected


def test_vectors_come_back_in_key_order(served: ServedModel, triton: TritonEndpoint) -> None:
    keys, numkeys, expected = _sample(served, 16, seed=1)
    with triton_grpc.InferenceServerClient(triton.grpc_target) as client:
        output = client.infer(MODEL, _inputs(keys, numkeys)).as_numpy("OUTPUT0")
    assert output.dtype == np.float32
    np.testing.assert_array_equal(output, expected)


def test_the_model_reaches_an_mtls_server_with_a_token_file(secured: SecuredModel, triton: TritonEndpoint) -> None:
    keys, numkeys, expected = _sample(secured, 8, seed=5)  # the same sample tables
    with triton_grpc.InferenceServerClient(triton.grpc_target) as client:
        output = client.infer("secured", _inputs(keys, numkeys)).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(output, expected)


def test_float16_replies_come_back_as_float32_of_the_rounded_vectors(
    served: ServedModel, triton: TritonEndpoint
) -> None:
    keys, numkeys, expected = _sample(served, 8, seed=3)
    with triton_grpc.InferenceServerClient(triton.grpc_target) as client:
        output = client.infer("fp16", _inputs(keys, numkeys)).as_numpy("OUTPUT0")
    assert output.dtype == np.float32
    np.testing.assert_array_equal(output, expected.astype(np.float16).astype(np.float32))


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(
    served: ServedModel, triton: TritonEndpoint
) -> None:
    cases = [_sample(served, samples, seed) for seed, samples in enumerate([1, 3, 5, 2, 7, 4, 6, 8])]
    with triton_grpc.InferenceServerClient(triton.grpc_target) as client:

        def infer(case: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
            return client.infer(MODEL, _inputs(case[0], case[1])).as_numpy("OUTPUT0")

        def counts() -> tuple[int, int]:
            stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
            return int(stats["inference_stats"]["success"].get("count", 0)), int(stats.get("execution_count", 0))

        requests_before, executions_before = counts()
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            outputs = list(pool.map(infer, cases))
        requests_after, executions_after = counts()
    for output, (_, _, expected) in zip(outputs, cases, strict=True):
        np.testing.assert_array_equal(output, expected)
    assert requests_after - requests_before == len(cases)
    # Fewer executions than requests: the dynamic batcher handed several requests to one execute (one RPC).
    assert executions_after - executions_before < len(cases)


@pytest.mark.parametrize(
    ("make_inputs", "message"),
    [
        (
            lambda k, n: _inputs(k.astype(np.float32), n, "FP32"),
            "data-type is 'FP32', but model 'hps_embedding' expects 'INT64'",
        ),
        (lambda k, n: _inputs(k, n[:, :1].copy()), "NUMKEYS: shape must be [4, 2]"),
        (lambda k, n: _inputs(k[:, :2].copy(), n), "add up to 3, but KEYS has 2 keys per sample"),
    ],
)
def test_bad_requests_get_a_triton_error_naming_the_problem(
    served: ServedModel, triton: TritonEndpoint, make_inputs, message: str
) -> None:
    keys, numkeys, expected = _sample(served, 4, seed=2)
    with triton_grpc.InferenceServerClient(triton.grpc_target) as client:
        with pytest.raises(InferenceServerException, match=message.replace("[", r"\[").replace("]", r"\]")):
            client.infer(MODEL, make_inputs(keys, numkeys))
        np.testing.assert_array_equal(client.infer(MODEL, _inputs(keys, numkeys)).as_numpy("OUTPUT0"), expected)


def test_server_errors_surface_with_the_servers_message(served: ServedModel, triton: TritonEndpoint) -> None:
    # The server allows max_batch_size 64 x max_keys_per_sample 4 = 256 user keys per request.
    keys = np.arange(300, dtype=np.int64).reshape(1, 300)
    with triton_grpc.InferenceServerClient(triton.grpc_target) as client:
        with pytest.raises(InferenceServerException) as error:
            client.infer("user_only", _inputs(keys, np.array([[300]], np.int32)))
        assert "hps lookup failed: RESOURCE_EXHAUSTED" in str(error.value)
        assert "300 keys for table user exceed the limit of 256" in str(error.value)
        output = client.infer("user_only", _inputs(keys[:, :2].copy(), np.array([[2]], np.int32))).as_numpy("OUTPUT0")
    assert output.shape == (1, 32)


def test_a_hundred_concurrent_requests_all_get_their_own_vectors(served: ServedModel, triton: TritonEndpoint) -> None:
    # HugeCTR's HPS backend crashed under 100 concurrent requests; here they queue into dynamic batches.
    cases = [_sample(served, 1 + seed % 4, seed) for seed in range(100)]
    with triton_grpc.InferenceServerClient(triton.grpc_target) as client:
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            futures = [pool.submit(client.infer, MODEL, _inputs(keys, numkeys)) for keys, numkeys, _ in cases]
            outputs = [future.result().as_numpy("OUTPUT0") for future in futures]
        assert client.is_server_live() and client.is_model_ready(MODEL)
    for output, (_, _, expected) in zip(outputs, cases, strict=True):
        np.testing.assert_array_equal(output, expected)


def test_an_hps_outage_is_a_triton_error_and_lookups_resume_after_it(
    triton_environment: TritonEnvironment, tmp_path: Path
) -> None:
    truth = write_sample_tables(tmp_path)
    config = sample_config(tmp_path)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, address=f"127.0.0.1:{free_port()}"))
    write_lookup_model(
        tmp_path / "models", name="item_only", hps_address=config.server.address, hps_model="ctr", tables=["item"]
    )
    keys = truth["item"][0][:2].reshape(1, 2)
    inputs = _inputs(keys, np.array([[2]], np.int32))
    server = HpsServer(config)
    server.start()
    try:
        with (
            running(triton_environment, tmp_path / "models") as endpoint,
            triton_grpc.InferenceServerClient(endpoint.grpc_target) as client,
        ):
            np.testing.assert_array_equal(
                client.infer("item_only", inputs).as_numpy("OUTPUT0"), truth["item"][1][:2].reshape(1, -1)
            )
            server.stop(grace=0)
            with pytest.raises(InferenceServerException, match="hps lookup failed: UNAVAILABLE"):
                client.infer("item_only", inputs)
            assert client.is_server_live() and client.is_model_ready("item_only")
            server = HpsServer(config)  # the same address and RocksDB, as a restarted pod would be
            server.start()
            # The lookup model's channel reconnects on gRPC's backoff (1 s at first): poll, bounded.
            deadline = time.monotonic() + 20
            while True:
                try:
                    output = client.infer("item_only", inputs).as_numpy("OUTPUT0")
                    break
                except InferenceServerException:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            np.testing.assert_array_equal(output, truth["item"][1][:2].reshape(1, -1))
    finally:
        server.stop(grace=0)


def test_a_bad_request_fails_alone_in_its_dynamic_batch(served: ServedModel, triton: TritonEndpoint) -> None:
    good = [_sample(served, 2, seed) for seed in range(4)]
    bad_keys, _, _ = _sample(served, 2, seed=9)
    bad = _inputs(bad_keys, np.array([[2, 2], [2, 2]], np.int32))  # same shapes as the good ones: batched with them
    with (
        triton_grpc.InferenceServerClient(triton.grpc_target) as client,
        concurrent.futures.ThreadPoolExecutor(5) as pool,
    ):
        bad_future = pool.submit(client.infer, MODEL, bad)
        good_futures = [pool.submit(client.infer, MODEL, _inputs(k, n)) for k, n, _ in good]
        outputs = [f.result().as_numpy("OUTPUT0") for f in good_futures]
        with pytest.raises(InferenceServerException, match="add up to 4, but KEYS has 3"):
            bad_future.result()
    for output, (_, _, expected) in zip(outputs, good, strict=True):
        np.testing.assert_array_equal(output, expected)


def test_an_unknown_hps_model_fails_the_load_with_the_servers_message(
    served: ServedModel, triton_environment: TritonEnvironment, tmp_path: Path
) -> None:
    write_lookup_model(tmp_path, name="lost", hps_address=served.target, hps_model="no_such_model")
    with pytest.raises(TritonStartError, match="no_such_model"), running(triton_environment, tmp_path, timeout=60):
        pass
