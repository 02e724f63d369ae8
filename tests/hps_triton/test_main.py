"""`python -m hps_client.triton`: the model command writes a loadable model; errors are one line, exit code 1."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from hps_client.triton import TritonEnvironment, TritonSetupError, setup, write_lookup_model
from hps_client.triton.__main__ import main
from tests.conftest import ServedModel


def test_model_command_writes_the_lookup_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["model", "--repository", str(tmp_path), "--hps-address", "127.0.0.1:8500", "--hps-model", "ctr"]
    assert main([*argv, "--tables", "user,item", "--reply-dtype", "float16", "--instances", "3"]) == 0
    config = (tmp_path / "hps_embedding" / "config.pbtxt").read_text()
    assert '{ key: "hps_tables" value: { string_value: "user,item" } }' in config
    assert '{ key: "hps_reply_dtype" value: { string_value: "float16" } }' in config
    assert "count: 3" in config
    assert "wrote" in capsys.readouterr().out


def test_bad_values_exit_with_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["model", "--repository", str(tmp_path), "--hps-address", "127.0.0.1:8500", "--hps-model", "ctr"]
    assert main([*argv, "--max-batch-size", "0"]) == 1
    assert capsys.readouterr().err.strip() == "error: max_batch_size: must be >= 1, got 0"


def test_setup_names_a_missing_python(tmp_path: Path) -> None:
    with pytest.raises(TritonSetupError, match=r"python: .*nope not found"):
        setup(tmp_path, python=str(tmp_path / "nope"))
    assert not (tmp_path / "venv").exists()


def test_serve_command_serves_until_terminated(
    served: ServedModel, triton_environment: TritonEnvironment, tmp_path: Path
) -> None:
    write_lookup_model(tmp_path, name="emb", hps_address=served.target, hps_model="ctr", tables=["item"])
    command = [sys.executable, "-m", "hps_client.triton", "serve", "--dir", str(triton_environment.directory)]
    process = subprocess.Popen([*command, "--repository", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        match = re.search(r"gRPC (\S+),", process.stdout.readline())
        assert match, "serve did not print its gRPC address"
        keys = served.truth["item"][0][:3].reshape(1, 3)
        tensors = [triton_grpc.InferInput("KEYS", [1, 3], "INT64"), triton_grpc.InferInput("NUMKEYS", [1, 1], "INT32")]
        tensors[0].set_data_from_numpy(keys)
        tensors[1].set_data_from_numpy(np.array([[3]], np.int32))
        with triton_grpc.InferenceServerClient(match.group(1)) as client:
            output = client.infer("emb", tensors).as_numpy("OUTPUT0")
        np.testing.assert_array_equal(output, served.expected("item", keys[0]).reshape(1, -1))
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
