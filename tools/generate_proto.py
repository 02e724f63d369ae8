"""Generates the checked-in Python stubs for proto/hps/v1 into hps_wire/_proto.

Run `python tools/generate_proto.py` after editing a .proto file; tests/test_proto.py
fails while the checked-in stubs differ from what this produces.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUTPUT = ROOT / "hps_wire" / "_proto"
# protoc writes absolute imports ("from hps.v1 import ..."); the stubs live inside
# the wire package, so those imports are rewritten to the package path.
GENERATED_IMPORT = "from hps.v1 import "
PACKAGE_IMPORT = "from hps_wire._proto import "


def generate() -> dict[str, str]:
    """Returns {file name: content} for every generated stub."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as out:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {protos}")
        return {
            path.name: path.read_text().replace(GENERATED_IMPORT, PACKAGE_IMPORT)
            for path in sorted(Path(out).rglob("*.py*"))
        }


def main() -> int:
    for name, content in generate().items():
        (OUTPUT / name).write_text(content)
        print(f"wrote {OUTPUT.relative_to(ROOT) / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
