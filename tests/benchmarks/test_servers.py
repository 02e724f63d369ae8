"""The benchmarks' served config: the L1 choice and server options land where `hps serve` reads them.

Only the written files are checked here; test_lookup.py serves them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from hps_bench import servers
from hps_server import config as config_module


def _write(tmp_path: Path, l1: servers.L1Choice, options: dict[str, object] | None = None) -> dict[str, object]:
    table = (np.arange(4, dtype=np.int64), np.ones((4, 8), dtype=np.float32), 1)
    path = servers.write_served_model(tmp_path, 8500, "m", {"t": table}, 16, l1=l1, server_options=options)
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize(
    ("l1", "gpucache", "devices"), [("none", False, None), ("cpu", True, None), ("gpu", True, [0])]
)
def test_l1_choice_sets_the_models_cache(tmp_path: Path, l1: servers.L1Choice, gpucache: bool, devices: object) -> None:
    model = _write(tmp_path, l1)["models"][0]  # type: ignore[index]
    assert model["gpucache"] is gpucache
    assert model.get("deployed_device_list") == devices
    assert config_module.load(tmp_path / "hps.yaml").models[0].gpucache is gpucache


def test_server_options_are_written_as_given_and_keep_the_address(tmp_path: Path) -> None:
    server = _write(tmp_path, "none", {"workers": 8, "batch_window_us": 200})["server"]
    assert server == {"workers": 8, "batch_window_us": 200, "address": "127.0.0.1:8500"}


def test_cpu_l1_hides_gpus_from_the_server_only() -> None:
    assert servers.server_env("cpu") == {"CUDA_VISIBLE_DEVICES": ""}
    assert servers.server_env("gpu") == servers.server_env("none") == {}


def test_throwaway_security_serves_tls_and_a_token(tmp_path: Path) -> None:
    security = servers.throwaway_security(tmp_path, tls=True, token=True)
    server = config_module.parse({"server": security.server_options, "models": []}, tmp_path).server
    assert (
        server.tls.enabled
        and server.auth.enabled
        and security.echo_files
        == (
            server.tls.cert_file,
            server.tls.key_file,
        )
    )
    assert security.credentials.tls is not None and security.credentials.token
    assert servers.throwaway_security(tmp_path / "plain", tls=False, token=False).server_options == {}
