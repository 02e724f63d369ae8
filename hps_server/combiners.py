"""Server-side reduction of ragged lookups: one vector per sample (sum, mean, sqrtn), like SparseLookupLayer.

Pure array code, vectorized with np.add.reduceat; it knows nothing of levels or the wire.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

CombinerName = Literal["sum", "mean", "sqrtn"]


def check_row_splits(row_splits: np.ndarray, keys: int) -> None:
    """Raises ValueError unless row_splits starts at 0, never decreases and ends at `keys`."""
    if row_splits.ndim != 1 or len(row_splits) < 1:
        raise ValueError("row_splits: needs at least one offset (0)")
    if row_splits[0] != 0 or row_splits[-1] != keys:
        raise ValueError(
            f"row_splits: must start at 0 and end at the key count {keys}, "
            f"got {int(row_splits[0])}..{int(row_splits[-1])}"
        )
    if len(row_splits) > 1 and np.any(np.diff(row_splits) < 0):
        raise ValueError("row_splits: offsets must not decrease")


def clip_norms(vectors: np.ndarray, max_norm: float) -> np.ndarray:
    """A copy of vectors with each row scaled down to at most `max_norm` L2 norm (tf.clip_by_norm per row)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm: must be > 0, got {max_norm}")
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float32))
    # Rows already within the bound keep their exact values (scale 1), as TensorFlow's clip does.
    scale = max_norm / np.maximum(norms, np.float32(max_norm))
    return (vectors * scale[:, None]).astype(np.float32, copy=False)


def combine(
    vectors: np.ndarray, row_splits: np.ndarray, combiner: CombinerName, weights: np.ndarray | None = None
) -> np.ndarray:
    """Reduces vectors[row_splits[i]:row_splits[i+1]] per sample; empty samples give zero vectors."""
    check_row_splits(row_splits, len(vectors))
    if weights is not None and weights.shape != (len(vectors),):
        raise ValueError(f"weights: expected one per key ({len(vectors)}), got shape {weights.shape}")
    samples = len(row_splits) - 1
    out = np.zeros((samples, vectors.shape[1]), dtype=np.float32)
    lengths = np.diff(row_splits)
    nonempty = lengths > 0
    if not np.any(nonempty):
        return out
    weighted = vectors if weights is None else vectors * weights[:, None]
    # reduceat needs strictly valid start offsets: reduce only the non-empty samples.
    out[nonempty] = np.add.reduceat(weighted, row_splits[:-1][nonempty], axis=0)
    if combiner == "sum":
        return out
    if weights is None:
        scale = lengths.astype(np.float32) if combiner == "mean" else np.sqrt(lengths, dtype=np.float32)
    elif combiner == "mean":
        scale = _segment_sum(weights, row_splits, nonempty)
    else:
        scale = np.sqrt(_segment_sum(weights * weights, row_splits, nonempty))
    with np.errstate(divide="ignore", invalid="ignore"):
        out /= np.where(scale == 0, 1, scale)[:, None].astype(np.float32)
    return out


def _segment_sum(values: np.ndarray, row_splits: np.ndarray, nonempty: np.ndarray) -> np.ndarray:
    sums = np.zeros(len(row_splits) - 1, dtype=np.float32)
    sums[nonempty] = np.add.reduceat(values, row_splits[:-1][nonempty])
    return sums
