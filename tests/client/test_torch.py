"""The PyTorch layer against a real server: shapes, defaults, no_grad, device and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hps_client import NotFoundError
from hps_client.torch import LookupLayer
from tests.conftest import TABLE_SPECS, ServedModel


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
