"""Writes the ensemble's Triton model repository: hps_embedding (the hps lookup model), dense (the NumPy dense
part) and dlrm, the ensemble that wires them as HugeCTR's HPS tutorial did. It only writes files.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from hps_client.triton import write_lookup_model

LOOKUP = "hps_embedding"
DENSE = "dense"
ENSEMBLE = "dlrm"

_DENSE_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [
  {{ name: "DENSE" data_type: TYPE_FP32 dims: [ {dense_features} ] }},
  {{ name: "EMBEDDINGS" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "KEYS" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [ {{ name: "PREDICTION" data_type: TYPE_FP32 dims: [ 1 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
"""

_ENSEMBLE_CONFIG = """\
name: "{name}"
platform: "ensemble"
max_batch_size: {max_batch_size}
input [
  {{ name: "KEYS" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "NUMKEYS" data_type: TYPE_INT32 dims: [ -1 ] }},
  {{ name: "DENSE" data_type: TYPE_FP32 dims: [ {dense_features} ] }}
]
output [ {{ name: "PREDICTION" data_type: TYPE_FP32 dims: [ 1 ] }} ]
ensemble_scheduling {{
  step [
    {{
      model_name: "{lookup}"
      model_version: -1
      input_map {{ key: "KEYS" value: "KEYS" }}
      input_map {{ key: "NUMKEYS" value: "NUMKEYS" }}
      output_map {{ key: "OUTPUT0" value: "embeddings" }}
    }},
    {{
      model_name: "{dense}"
      model_version: -1
      input_map {{ key: "DENSE" value: "DENSE" }}
      input_map {{ key: "EMBEDDINGS" value: "embeddings" }}
      input_map {{ key: "KEYS" value: "KEYS" }}
      output_map {{ key: "PREDICTION" value: "PREDICTION" }}
    }}
  ]
}}
"""


def write_repository(
    repository: Path,
    hps_address: str,
    dense_weights: Path,
    *,
    hps_model: str,
    tables: Sequence[str],
    dense_features: int,
    max_batch_size: int = 1024,
    queue_delay_us: int = 100,
    instances: int = 1,
    reply_dtype: str = "float32",
) -> Path:
    """The three models under `repository`: `tables` in KEYS order, `dense_features` per sample, weights as
    dissect.py writes them. max_batch_size must not exceed the hps model's. (No PyTorch needed here.)"""
    write_lookup_model(
        repository,
        name=LOOKUP,
        hps_address=hps_address,
        hps_model=hps_model,
        tables=list(tables),
        max_batch_size=max_batch_size,
        queue_delay_us=queue_delay_us,
        instances=instances,
        reply_dtype=reply_dtype,
    )
    settings = {
        "max_batch_size": max_batch_size,
        "dense_features": dense_features,
        "queue_delay_us": queue_delay_us,
        "instances": instances,
    }
    dense = repository / DENSE
    (dense / "1").mkdir(parents=True, exist_ok=True)
    (dense / "config.pbtxt").write_text(_DENSE_CONFIG.format(name=DENSE, **settings))
    shutil.copyfile(Path(__file__).with_name("dense_model.py"), dense / "1" / "model.py")
    shutil.copyfile(Path(__file__).with_name("dense_forward.py"), dense / "1" / "dense_forward.py")
    shutil.copyfile(dense_weights, dense / "1" / "dense.npz")
    ensemble = repository / ENSEMBLE
    (ensemble / "1").mkdir(parents=True, exist_ok=True)
    (ensemble / "config.pbtxt").write_text(
        _ENSEMBLE_CONFIG.format(
            name=ENSEMBLE, max_batch_size=max_batch_size, dense_features=dense_features, lookup=LOOKUP, dense=DENSE
        )
    )
    return repository
