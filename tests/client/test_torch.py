"""The PyTorch layer against a real server: shapes, defaults, no_grad, device and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hps_client import TLS, InvalidArgumentError, NotFoundError, UnauthenticatedError
from hps_client.security import CA_FILE_ENV, CERT_FILE_ENV, KEY_FILE_ENV, TOKEN_ENV
from hps_client.torch import LookupLayer, SparseLookupLayer
from tests.conftest import READER, TABLE_SPECS, SecuredModel, ServedModel


@pytest.mark.parametrize("shape", [(10,), (2, 5), (2, 1, 3), (0,), (0, 4)])
def test_lookup_keeps_the_keys_shape(served: ServedModel, shape) -> None:
    rng = np.random.default_rng(len(shape))
    n = int(np.prod(shape))
    keys = np.concatenate([rng.choice(served.truth["item"][0], n - n // 3), rng.integers(10**7, 10**8, n // 3)])
    layer = LookupLayer(model_name="ctr", table_id=1, emb_vec_size=8, address=served.target)
    got = layer(torch.from_numpy(keys.reshape(shape)))
    assert got.shape == (*shape, 8) and got.dtype == torch.float32 and got.device.type == "cpu"
    np.testing.assert_array_equal(got.numpy().reshape(-1, 8), served.expected("item", keys))


def test_under_no_grad_in_a_module_with_int32_keys(served: ServedModel) -> None:
    keys = served.truth["user"][0][:6]
    model = torch.nn.Sequential(
        LookupLayer(model_name="ctr", table_id=0, emb_vec_size=16, address=served.target), torch.nn.Flatten()
    )
    with torch.no_grad():
        got = model(torch.tensor(keys.astype(np.int32)).reshape(2, 3))
    assert got.shape == (2, 48) and not got.requires_grad
    np.testing.assert_array_equal(got.numpy().reshape(6, 16), served.expected("user", keys))


def test_unknown_keys_get_the_default_and_ps_config_gives_the_address(served: ServedModel, tmp_path: Path) -> None:
    port = served.target.rsplit(":", 1)[1]
    ps_config = tmp_path / "ps.json"
    ps_config.write_text(json.dumps({"server": {"address": f"0.0.0.0:{port}"}, "models": []}))
    layer = LookupLayer(str(ps_config), "ctr", 1, 8)
    assert layer.address == f"127.0.0.1:{port}"
    got = layer(torch.tensor([10**9, -(10**9)]))
    np.testing.assert_array_equal(got.numpy(), np.full((2, 8), TABLE_SPECS["item"][2], np.float32))


def test_errors_carry_the_server_message(served: ServedModel) -> None:
    with pytest.raises(NotFoundError, match="no model 'nope'"):
        LookupLayer(model_name="nope", table_id=0, emb_vec_size=8, address=served.target)(torch.tensor([1]))
    with pytest.raises(ValueError, match=r"emb_vec_size: table 0 \('user'\) of model 'ctr' has dim 16, got 8"):
        LookupLayer(model_name="ctr", table_id=0, emb_vec_size=8, address=served.target)(torch.tensor([1]))
    with pytest.raises(TypeError, match="keys: must be integers"):
        LookupLayer(model_name="ctr", table_id=0, emb_vec_size=16, address=served.target)(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="give ps_config_file or address"):
        LookupLayer(model_name="ctr", table_id=0, emb_vec_size=16)


def _bags(vectors: np.ndarray, starts: list[int], combiner: str, weights: np.ndarray, max_norm=None) -> np.ndarray:
    """torch.nn.EmbeddingBag's definition, one bag at a time."""
    if max_norm is not None:
        vectors = vectors * (max_norm / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), max_norm))
    ends = [*starts[1:], len(vectors)]
    out = np.zeros((len(starts), vectors.shape[1]))
    for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
        if end > start:
            v, w = vectors[start:end], weights[start:end]
            total = (v * w[:, None]).sum(0)
            out[i] = {"sum": total, "mean": total / w.sum(), "sqrtn": total / np.sqrt((w * w).sum())}[combiner]
    return out


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_sparse_lookup_with_offsets_matches_embedding_bag(served: ServedModel, combiner: str) -> None:
    keys = np.concatenate([served.truth["item"][0][:9], [10**9]])  # the last key is unknown: default vector
    offsets = [0, 3, 3, 7]  # the second bag is empty
    weights = np.linspace(0.5, 2, len(keys)).astype(np.float32)
    vectors = served.expected("item", keys)
    layer = SparseLookupLayer(model_name="ctr", table_id=1, emb_vec_size=8, combiner=combiner, address=served.target)
    with torch.no_grad():
        plain = layer(torch.from_numpy(keys), torch.tensor(offsets))
        weighted = layer(torch.from_numpy(keys), torch.tensor(offsets), torch.from_numpy(weights))
    assert plain.shape == (4, 8) and plain.dtype == torch.float32
    np.testing.assert_allclose(plain.numpy(), _bags(vectors, offsets, combiner, np.ones(10)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weighted.numpy(), _bags(vectors, offsets, combiner, weights), rtol=1e-5, atol=1e-6)


def test_sparse_lookup_2d_bags_max_norm_and_empty_batch(served: ServedModel) -> None:
    keys = served.truth["user"][0][:12]
    layer = SparseLookupLayer(
        model_name="ctr", table_id=0, emb_vec_size=16, combiner="sum", max_norm=1.0, address=served.target
    )
    got = layer(torch.from_numpy(keys.reshape(4, 3)))
    expected = _bags(served.expected("user", keys), [0, 3, 6, 9], "sum", np.ones(12), max_norm=1.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert layer(torch.zeros((0, 3), dtype=torch.int64)).shape == (0, 16)
    with pytest.raises(ValueError, match="give 1-D keys with offsets or 2-D keys without"):
        layer(torch.from_numpy(keys))
    with pytest.raises(InvalidArgumentError, match="row_splits: must start at 0"):
        layer(torch.from_numpy(keys), torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="combiner: must be sum, mean or sqrtn"):
        SparseLookupLayer(model_name="ctr", table_id=0, emb_vec_size=16, combiner="max", address=served.target)


def test_tls_and_token_by_argument_or_from_the_environment(
    secured: SecuredModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = secured.truth["user"][0][:5]
    files = {CA_FILE_ENV: secured.ca.cert_file, CERT_FILE_ENV: secured.client.cert_file}
    files[KEY_FILE_ENV] = secured.client.key_file
    tls = TLS(*files.values())
    layer = SparseLookupLayer(
        model_name="ctr", table_id=0, emb_vec_size=16, address=secured.target, tls=tls, token=READER
    )
    pooled = layer(torch.from_numpy(keys.reshape(1, 5))).numpy()[0]
    np.testing.assert_allclose(pooled, secured.expected("user", keys).mean(0), rtol=1e-5, atol=1e-6)
    for name, path in files.items():
        monkeypatch.setenv(name, str(path))
    plain = LookupLayer(model_name="ctr", table_id=0, emb_vec_size=16, address=secured.target)
    with pytest.raises(UnauthenticatedError):  # TLS from the environment, no token yet
        plain(torch.from_numpy(keys))
    monkeypatch.setenv(TOKEN_ENV, READER)
    np.testing.assert_array_equal(plain(torch.from_numpy(keys)).numpy(), secured.expected("user", keys))
