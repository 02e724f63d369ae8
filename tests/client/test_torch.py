"""The PyTorch layers against a real server: shapes, defaults, no_grad, device, errors, TorchScript and export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hps_client import TLS, Client, InvalidArgumentError, NotFoundError, UnauthenticatedError
from hps_client.torch import LookupLayer, SparseLookupLayer
from hps_wire.security import CA_FILE_ENV, CERT_FILE_ENV, KEY_FILE_ENV, TOKEN_ENV
from tests.conftest import CONSTANT_KEYS, READER, TABLE_SPECS, SecuredModel, ServedModel, write_constant_table


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


def test_table_id_follows_a_reload_that_reorders_the_tables(admin_served: ServedModel, tmp_path: Path) -> None:
    a, b = write_constant_table(tmp_path, "a", 8, 1.0), write_constant_table(tmp_path, "b", 8, 2.0)
    keys = torch.from_numpy(CONSTANT_KEYS)
    with Client(admin_served.target) as client:
        client.load_model({"name": "reordered", "tables": [a, b]})
        before = LookupLayer(model_name="reordered", table_id=0, emb_vec_size=8, address=admin_served.target)
        assert torch.equal(before(keys), torch.full((4, 8), 1.0))
        client.reload_model("reordered", model_config={"name": "reordered", "tables": [b, a]})
    after = SparseLookupLayer(
        model_name="reordered", table_id=0, emb_vec_size=8, combiner="sum", address=admin_served.target
    )
    assert torch.equal(after(keys.reshape(2, 2)), torch.full((2, 8), 4.0))  # two of b's vectors per bag
    assert torch.equal(before(keys), torch.full((4, 8), 2.0))  # built earlier, it follows too
    # Table 0 resized: refused, never a tensor of another shape than the one the op declares to torch.compile.
    narrow_b = {**write_constant_table(tmp_path, "b", 4, 3.0), "version": "v4"}
    with Client(admin_served.target) as client:
        client.reload_model("reordered", model_config={"name": "reordered", "tables": [narrow_b, a]})
    with pytest.raises(ValueError, match=r"emb_vec_size: table 0 \('b'\) of model 'reordered' has dim 4, got 8"):
        before(keys)


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


class _TwoTables(torch.nn.Module):
    """A model's lookup front: item vectors per key, and user keys pooled per bag (EmbeddingBag's offsets)."""

    def __init__(self, target: str, tls: TLS | None = None, token: str | None = None) -> None:
        super().__init__()
        self.item = LookupLayer(model_name="ctr", table_id=1, emb_vec_size=8, address=target, tls=tls, token=token)
        self.user = SparseLookupLayer(
            model_name="ctr", table_id=0, emb_vec_size=16, combiner="sum", address=target, tls=tls, token=token
        )

    def forward(
        self, items: torch.Tensor, users: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.item(items), self.user(users, offsets)


def _two_table_inputs(served: ServedModel, seed: int, items_shape: tuple[int, ...], bags: int):
    """Stored and unknown item keys, stored user keys in `bags` bags (the first one empty), and the outputs."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(items_shape))
    items = np.concatenate([rng.choice(served.truth["item"][0], n - 1), [10**9]]).reshape(items_shape)
    users = rng.choice(served.truth["user"][0], 2 * bags)
    offsets = [0, 0, *range(2, 2 * bags, 2)][:bags]
    expected_items = served.expected("item", items.reshape(-1)).reshape(*items_shape, 8)
    expected_users = _bags(served.expected("user", users), offsets, "sum", np.ones(len(users)))
    return (torch.from_numpy(items), torch.from_numpy(users), torch.tensor(offsets)), (expected_items, expected_users)


def _assert_outputs(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[np.ndarray, np.ndarray]) -> None:
    assert got[0].shape == expected[0].shape and got[1].shape == expected[1].shape
    np.testing.assert_array_equal(got[0].numpy(), expected[0])
    np.testing.assert_allclose(got[1].numpy(), expected[1], rtol=1e-5, atol=1e-5)


def _export(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """torch.export with every dimension dynamic (items 2-D, users and offsets 1-D)."""
    dim = torch.export.Dim.AUTO
    return torch.export.export(model, example, dynamic_shapes=({0: dim, 1: dim}, {0: dim}, {0: dim}))


def test_trace_script_compile_and_export_record_the_lookup_not_its_result(served: ServedModel) -> None:
    model = _TwoTables(served.target)
    example, _ = _two_table_inputs(served, seed=1, items_shape=(2, 3), bags=3)
    traced = torch.jit.trace(model, example)
    assert "hps::lookup(" in str(traced.item.graph) and "hps::lookup_combined(" in str(traced.user.graph)
    scripted = torch.jit.script(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    exported = _export(model, example).module()
    for seed, shape, bags in ((2, (4, 5), 5), (3, (7,), 2)):  # new keys, new shapes, new bag counts
        inputs, expected = _two_table_inputs(served, seed, shape, bags)
        exports = [exported] if len(shape) == 2 else []  # an exported program keeps its inputs' ranks
        for module in [traced, scripted, compiled, *exports]:
            _assert_outputs(module(*inputs), expected)
    # Inside TorchScript a server error is a RuntimeError carrying the server's message.
    with pytest.raises(RuntimeError, match="no model 'nope'"):
        torch.jit.script(LookupLayer(model_name="nope", table_id=0, emb_vec_size=8, address=served.target))(
            torch.tensor([1])
        )


def test_saved_modules_keep_calling_the_server_in_another_process_with_no_token_inside(
    secured: SecuredModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    tls = TLS(secured.ca.cert_file, secured.client.cert_file, secured.client.key_file)
    model = _TwoTables(secured.target, tls=tls, token=READER)
    example, _ = _two_table_inputs(secured, seed=4, items_shape=(2, 2), bags=2)
    inputs, expected = _two_table_inputs(secured, seed=5, items_shape=(3, 4), bags=4)
    traced, scripted, exported = torch.jit.trace(model, example), torch.jit.script(model), _export(model, example)
    for module in (traced, scripted, exported.module()):
        _assert_outputs(module(*inputs), expected)  # in this process: the layers' own token
    traced.save(tmp_path / "traced.pt")
    scripted.save(tmp_path / "scripted.pt")
    torch.export.save(exported, tmp_path / "exported.pt2")
    paths = [str(tmp_path / name) for name in ("traced.pt", "scripted.pt", "exported.pt2")]
    for path in paths:
        with zipfile.ZipFile(path) as archive:
            assert not any(READER.encode() in archive.read(member) for member in archive.namelist())
    torch.save(inputs, tmp_path / "inputs.pt")
    # Another process: the ops come with `import hps_client.torch`, the TLS files with the saved module, the
    # token from HPS_TOKEN.
    script = (
        "import sys, torch, hps_client.torch\n"
        "inputs = torch.load(sys.argv[1])\n"
        "for path in sys.argv[2:]:\n"
        "    model = torch.export.load(path).module() if path.endswith('.pt2') else torch.jit.load(path)\n"
        "    torch.save(model(*inputs), path + '.out')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "inputs.pt"), *paths],
        env={**os.environ, TOKEN_ENV: READER},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for path in paths:
        _assert_outputs(torch.load(path + ".out"), expected)
