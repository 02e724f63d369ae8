"""The Triton half of dissecting the workflow's PyTorch DLRM: its dense part as NumPy arrays (dense.npz) for the
dense model in Triton. The tables go to hps as in the workflow (examples.torch_dlrm.dissect, examples.deploy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from examples.torch_dlrm import DenseNetwork


def _linear_layers(sequence: nn.Sequential, prefix: str) -> dict[str, np.ndarray]:
    arrays = {}
    for i, layer in enumerate(m for m in sequence if isinstance(m, nn.Linear)):
        arrays[f"{prefix}_w{i}"] = layer.weight.detach().numpy().astype(np.float32)
        arrays[f"{prefix}_b{i}"] = layer.bias.detach().numpy().astype(np.float32)
    return arrays


def dense_weights(dense_part: DenseNetwork, path: Path) -> Path:
    """Writes the bottom and top MLPs' Linear layers and the interaction pairs, as dense_forward.py reads them."""
    arrays: dict[str, Any] = {**_linear_layers(dense_part.bottom, "bottom"), **_linear_layers(dense_part.top, "top")}
    pairs = dense_part.pairs.numpy()
    np.savez(path, **arrays, pair_rows=pairs[0], pair_cols=pairs[1])
    return path
