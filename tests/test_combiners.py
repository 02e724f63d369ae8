"""Server-side combiners against a plain per-sample NumPy computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hps_server.combiners import clip_norms, combine


def _expected(vectors, row_splits, combiner, weights):
    out = []
    for start, end in itertools.pairwise(row_splits):
        v = vectors[start:end]
        w = np.ones(end - start, np.float32) if weights is None else weights[start:end]
        total = (v * w[:, None]).sum(axis=0)
        if combiner == "mean" and end > start:
            total = total / w.sum()
        if combiner == "sqrtn" and end > start:
            total = total / np.sqrt((w * w).sum())
        out.append(total if end > start else np.zeros(vectors.shape[1], np.float32))
    return np.array(out, np.float32)


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
def test_combine_matches_per_sample_reduction(combiner, weighted) -> None:
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 5, 40)
    lengths[[0, -1]] = 0  # empty first and last samples
    row_splits = np.concatenate([[0], np.cumsum(lengths)])
    vectors = rng.standard_normal((row_splits[-1], 8), dtype=np.float32)
    weights = rng.uniform(0.5, 2, row_splits[-1]).astype(np.float32) if weighted else None
    got = combine(vectors, row_splits, combiner, weights)
    np.testing.assert_allclose(got, _expected(vectors, row_splits, combiner, weights), rtol=1e-5, atol=1e-6)


def test_all_empty_samples_give_zeros() -> None:
    got = combine(np.zeros((0, 3), np.float32), np.zeros(4, np.int64), "mean")
    np.testing.assert_array_equal(got, np.zeros((3, 3), np.float32))


@pytest.mark.parametrize(
    ("row_splits", "message"),
    [
        ([1, 2], "must start at 0"),
        ([0, 3], "end at the key count 2"),
        ([0, 2, 1, 2], "must not decrease"),
        ([], "at least one"),
    ],
)
def test_bad_row_splits(row_splits, message) -> None:
    with pytest.raises(ValueError, match=message):
        combine(np.zeros((2, 3), np.float32), np.array(row_splits, np.int64), "sum")


def test_clip_norms_scales_long_rows_only() -> None:
    vectors = np.array([[3, 4], [0.3, 0.4], [0, 0], [-6, 8]], np.float32)
    got = clip_norms(vectors, 1.0)
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.3, 0.4], [0, 0], [-0.6, 0.8]], rtol=1e-6)
    np.testing.assert_array_equal(got[1], vectors[1])  # within the bound: exact
    assert got.dtype == np.float32
    np.testing.assert_array_equal(vectors[0], [3, 4])  # the input is not modified


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan")])
def test_clip_norms_refuses_a_bound_that_is_not_positive(max_norm) -> None:
    with pytest.raises(ValueError, match="max_norm: must be > 0"):
        clip_norms(np.ones((1, 2), np.float32), max_norm)
