"""Writes the hps lookup model into a Triton model repository: config.pbtxt, 1/model.py, 1/hps_client/, 1/hps_wire/.

Inputs and outputs are named and typed as HugeCTR's HPS backend's (KEYS int64, NUMKEYS int32, OUTPUT0 fp32),
so an existing ensemble keeps its wiring. It only writes files; nothing here talks to a server.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import hps_wire

_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [
  {{ name: "KEYS" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "NUMKEYS" data_type: TYPE_INT32 dims: [ -1 ] }}
]
output [
  {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
parameters [
  {{ key: "hps_address" value: {{ string_value: "{hps_address}" }} }},
  {{ key: "hps_model" value: {{ string_value: "{hps_model}" }} }},
  {{ key: "hps_tables" value: {{ string_value: "{hps_tables}" }} }},
  {{ key: "hps_reply_dtype" value: {{ string_value: "{reply_dtype}" }} }},
  {{ key: "hps_timeout_seconds" value: {{ string_value: "{timeout_seconds}" }} }}{security}
]
"""
_PARAMETER = """,
  {{ key: "{key}" value: {{ string_value: "{value}" }} }}"""
# The model file itself imports Triton's stub module, so it is located, never imported, here.
MODEL_FILE = Path(__file__).with_name("model.py")
CLIENT_PACKAGE = MODEL_FILE.parents[1]
# The client imports the wire package, so it goes along: from an installed wheel nothing else provides it there.
COPIED_PACKAGES = (CLIENT_PACKAGE, Path(hps_wire.__file__).parent)
_SAFE = re.compile(r"[A-Za-z0-9_.:\-\[\]]*")
_SAFE_PATH = re.compile(r"[A-Za-z0-9_.:\-/]*")
# Parameters of a server with TLS or auth on: file paths (the token itself never goes into config.pbtxt).
SECURITY_PARAMETERS = ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name", "token_file")


def _checked(field: str, value: str, pattern: re.Pattern[str] = _SAFE) -> str:
    if not pattern.fullmatch(value):
        allowed = "_.:-/" if pattern is _SAFE_PATH else "_.:-[]"
        raise ValueError(f"{field}: only letters, digits and {allowed} are allowed, got {value!r}")
    return value


def write_lookup_model(
    repository: str | Path,
    *,
    name: str,
    hps_address: str,
    hps_model: str,
    tables: Sequence[str] = (),
    max_batch_size: int = 1024,
    queue_delay_us: int = 100,
    instances: int = 1,
    reply_dtype: str = "float32",
    timeout_seconds: float = 30.0,
    security: Mapping[str, str] | None = None,
) -> Path:
    """Writes repository/name/{config.pbtxt, 1/model.py, 1/hps_client, 1/hps_wire}; returns the model's folder.

    The client and wire packages are copied beside model.py (Triton puts the version folder on the model's sys.path), so
    the repository carries the client it was written with and needs only numpy, grpcio and protobuf in Triton.

    `tables` orders NUMKEYS (empty: all of the hps model's tables, in its order). `max_batch_size` must not
    exceed the hps model's max_batch_size, or large dynamic batches are refused by the server. `security` sets
    SECURITY_PARAMETERS (without their `hps_` prefix: tls_ca_file, ..., token_file) for a server with TLS or auth.
    """
    if reply_dtype not in ("float32", "float16"):
        raise ValueError(f"reply_dtype: must be float32 or float16, got {reply_dtype!r}")
    for field, number in (("max_batch_size", max_batch_size), ("instances", instances)):
        if number < 1:
            raise ValueError(f"{field}: must be >= 1, got {number}")
    if queue_delay_us < 0:
        raise ValueError(f"queue_delay_us: must be >= 0, got {queue_delay_us}")
    unknown = sorted(set(security or {}) - set(SECURITY_PARAMETERS))
    if unknown:
        raise ValueError(f"security: unknown parameter {unknown[0]!r} (known: {', '.join(SECURITY_PARAMETERS)})")
    parameters = "".join(
        _PARAMETER.format(key=f"hps_{key}", value=_checked(key, value, _SAFE_PATH))
        for key, value in (security or {}).items()
        if value
    )
    folder = Path(repository) / _checked("name", name)
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(
        _CONFIG.format(
            name=name,
            max_batch_size=max_batch_size,
            queue_delay_us=queue_delay_us,
            instances=instances,
            hps_address=_checked("hps_address", hps_address),
            hps_model=_checked("hps_model", hps_model),
            hps_tables=",".join(_checked("tables", t) for t in tables),
            reply_dtype=reply_dtype,
            timeout_seconds=timeout_seconds,
            security=parameters,
        )
    )
    shutil.copyfile(MODEL_FILE, folder / "1" / "model.py")
    for package in COPIED_PACKAGES:
        shutil.rmtree(folder / "1" / package.name, ignore_errors=True)
        shutil.copytree(package, folder / "1" / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    return folder
