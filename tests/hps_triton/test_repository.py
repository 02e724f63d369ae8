"""The lookup model's repository writer: HPS backend's names and types, parameters, the client beside model.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from hps_client.triton import write_lookup_model


def test_writes_config_model_and_client(tmp_path: Path) -> None:
    folder = write_lookup_model(
        tmp_path, name="emb", hps_address="127.0.0.1:9000", hps_model="ctr", tables=["user", "item"], instances=2
    )
    config = (folder / "config.pbtxt").read_text()
    for line in (
        'name: "emb"',
        'backend: "python"',
        '{ name: "KEYS" data_type: TYPE_INT64 dims: [ -1 ] }',
        '{ name: "NUMKEYS" data_type: TYPE_INT32 dims: [ -1 ] }',
        '{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }',
        "dynamic_batching { max_queue_delay_microseconds: 100 }",
        "instance_group [ { kind: KIND_CPU count: 2 } ]",
        '{ key: "hps_tables" value: { string_value: "user,item" } }',
    ):
        assert line in config
    assert "class TritonPythonModel" in (folder / "1" / "model.py").read_text()
    assert (folder / "1" / "hps_client" / "client.py").exists()
    assert (folder / "1" / "hps_wire" / "response_codec.py").exists()  # the client imports it
    assert not list((folder / "1" / "hps_client").rglob("__pycache__"))
    assert not list((folder / "1" / "hps_wire").rglob("__pycache__"))


def test_security_parameters_are_paths_never_a_token(tmp_path: Path) -> None:
    security = {"tls_ca_file": "/etc/hps/tls/ca.crt", "token_file": "/var/run/hps/token"}
    folder = write_lookup_model(tmp_path, name="emb", hps_address="hps:8500", hps_model="ctr", security=security)
    config = (folder / "config.pbtxt").read_text()
    assert '{ key: "hps_tls_ca_file" value: { string_value: "/etc/hps/tls/ca.crt" } }' in config
    assert '{ key: "hps_token_file" value: { string_value: "/var/run/hps/token" } }' in config
    with pytest.raises(ValueError, match="security: unknown parameter 'token'"):
        write_lookup_model(tmp_path, name="emb", hps_address="hps:8500", hps_model="ctr", security={"token": "x"})


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("hps_model", {"hps_model": 'ctr" }'}),
        ("reply_dtype", {"reply_dtype": "int8"}),
        ("instances", {"instances": 0}),
    ],
)
def test_bad_settings_are_refused_by_name(tmp_path: Path, field: str, kwargs: dict[str, object]) -> None:
    settings: dict[str, object] = {"name": "emb", "hps_address": "127.0.0.1:9000", "hps_model": "ctr", **kwargs}
    with pytest.raises(ValueError, match=field):
        write_lookup_model(tmp_path, **settings)  # type: ignore[arg-type]
    assert not (tmp_path / "emb" / "config.pbtxt").exists()
