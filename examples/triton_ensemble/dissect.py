"""Cuts the trained DLRM in two: its embedding tables in HPS's key/emb_vector format for hps, and its dense part
as NumPy arrays (dense.npz) for the dense model in Triton; then writes the hps server's config. No serving here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch import nn

from examples.triton_ensemble.dlrm import DIM, DLRM, TABLES, interaction_pairs
from hps_server import tables

HPS_MODEL = "dlrm"


def _linear_layers(sequence: nn.Sequential, prefix: str) -> dict[str, np.ndarray]:
    arrays = {}
    for i, layer in enumerate(m for m in sequence if isinstance(m, nn.Linear)):
        arrays[f"{prefix}_w{i}"] = layer.weight.detach().numpy().astype(np.float32)
        arrays[f"{prefix}_b{i}"] = layer.bias.detach().numpy().astype(np.float32)
    return arrays


def dissect(model: DLRM, folder: Path) -> Path:
    """Writes folder/tables/<table>/{key,emb_vector} and folder/dense.npz; returns the dense.npz path."""
    for name, embedding in model.embeddings.items():
        assert isinstance(embedding, nn.Embedding)
        vectors = embedding.weight.detach().numpy().astype(np.float32)
        keys = np.arange(len(vectors), dtype=np.int64)  # the ids the model was trained with
        tables.write_table(folder / "tables" / name, [(keys, vectors)], vectors.shape[1])
    rows, cols = interaction_pairs(len(TABLES) + 1)
    dense = folder / "dense.npz"
    arrays: dict[str, Any] = {**_linear_layers(model.bottom, "bottom"), **_linear_layers(model.top, "top")}
    np.savez(dense, **arrays, pair_rows=rows, pair_cols=cols)
    return dense


def write_hps_config(folder: Path, address: str = "127.0.0.1:0", max_batch_size: int = 8192) -> Path:
    """An hps config serving the dissected tables (in-process hash map over RocksDB, all rows warm)."""
    config = {
        "server": {"address": address},
        "volatile_db": {"type": "hash_map", "initial_cache_rate": 1.0},
        "persistent_db": {"type": "rocksdb", "path": "rocksdb"},
        "models": [
            {
                "name": HPS_MODEL,
                "max_batch_size": max_batch_size,
                "gpucache": False,
                "tables": [{"name": name, "dim": DIM, "source": f"tables/{name}"} for name in TABLES],
            }
        ],
    }
    path = folder / "hps.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
