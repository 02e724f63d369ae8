"""The checked-in stubs are exactly what tools/generate_proto.py produces from proto/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("generate_proto", ROOT / "tools" / "generate_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generated = module.generate()
    assert set(generated) == {"hps_pb2.py", "hps_pb2.pyi", "hps_pb2_grpc.py"}
    for name, content in generated.items():
        checked_in = (ROOT / "hps_client" / "_proto" / name).read_text()
        assert checked_in == content, f"hps_client/_proto/{name} is stale: run python tools/generate_proto.py"
