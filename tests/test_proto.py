"""The checked-in stubs are exactly what tools/generate_proto.py produces from proto/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

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
