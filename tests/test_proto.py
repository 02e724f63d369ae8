"""The checked-in stubs are exactly what tools/generate_proto.py produces from proto/; buf lints the proto clean;
Go and Java stubs generate from it (protoc with protoc-gen-go and its built-in Java generator)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "hps" / "v1" / "hps.proto"


def _tool(name: str, install: str) -> str:
    """The path of a command-line tool .ci/run installs; missing, it fails under CI=true and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is missing: {install} (as .ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


# In a child process: protoc crashes the interpreter once TensorFlow (which links its own libprotobuf) is loaded,
# and the layer tests load it into this one.
_GENERATE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("generate_proto", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(module.generate()))
"""


def test_generated_stubs_are_up_to_date() -> None:
    script = ROOT / "tools" / "generate_proto.py"
    result = subprocess.run([sys.executable, "-c", _GENERATE, str(script)], capture_output=True, text=True, check=True)
    generated = json.loads(result.stdout)
    assert set(generated) == {"hps_pb2.py", "hps_pb2.pyi", "hps_pb2_grpc.py"}
    for name, content in generated.items():
        checked_in = (ROOT / "hps_wire" / "_proto" / name).read_text()
        assert checked_in == content, f"hps_wire/_proto/{name} is stale: run python tools/generate_proto.py"


def _buf_lint(directory: Path) -> subprocess.CompletedProcess[str]:
    buf = _tool("buf", "npm install -g @bufbuild/buf")
    return subprocess.run([buf, "lint"], cwd=directory, capture_output=True, text=True, timeout=120)


def test_buf_lint_is_clean_and_catches_a_violation(tmp_path: Path) -> None:
    result = _buf_lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    # The same config on a copy whose enum lacks its _UNSPECIFIED zero value: buf must object.
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    copy = tmp_path / "proto" / "hps" / "v1" / "hps.proto"
    copy.parent.mkdir(parents=True)
    copy.write_text(PROTO.read_text().replace("VECTOR_DTYPE_UNSPECIFIED = 0", "VECTOR_DTYPE_ANY = 0"))
    result = _buf_lint(tmp_path)
    assert result.returncode != 0 and 'should be suffixed with "_UNSPECIFIED"' in result.stdout


def _protoc(proto_root: Path, out: Path) -> subprocess.CompletedProcess[str]:
    protoc = _tool("protoc", "apt-get install protobuf-compiler")
    _tool("protoc-gen-go", "apt-get install protoc-gen-go")
    (out / "go").mkdir(parents=True)
    (out / "java").mkdir()
    command = [protoc, f"-I{proto_root}", f"--go_out={out / 'go'}", f"--java_out={out / 'java'}", "hps/v1/hps.proto"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_go_and_java_stubs_generate(tmp_path: Path) -> None:
    result = _protoc(ROOT / "proto", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    (go,) = (tmp_path / "out" / "go").rglob("*.pb.go")
    assert go.relative_to(tmp_path / "out" / "go").parent == Path("hps/gen/go/hps/v1")
    assert "\npackage hpsv1\n" in go.read_text()
    java = tmp_path / "out" / "java" / "hps" / "v1"
    assert {"HpsProto.java", "LookupRequest.java", "LookupResponse.java"} <= {f.name for f in java.iterdir()}
    assert "package hps.v1;" in (java / "LookupRequest.java").read_text()
    # Without go_package protoc-gen-go refuses the file: the option is what makes Go stubs possible.
    bare = tmp_path / "bare" / "hps" / "v1" / "hps.proto"
    bare.parent.mkdir(parents=True)
    bare.write_text("".join(line for line in PROTO.read_text().splitlines(True) if "go_package" not in line))
    refused = _protoc(tmp_path / "bare", tmp_path / "bare-out")
    assert refused.returncode != 0 and "go_package" in refused.stderr
