"""The Triton lookup model's key layout: validation messages, regrouping per table, and the way back."""

from __future__ import annotations

import numpy as np
import pytest

from hps_client.triton.batching import KeyLayoutError, LookupBatch, key_counts


def _request(samples: int, counts: list[int], start: int) -> tuple[np.ndarray, np.ndarray]:
    keys = np.arange(start, start + samples * sum(counts), dtype=np.int64).reshape(samples, sum(counts))
    return keys, np.tile(np.array([counts], np.int32), (samples, 1))


def test_requests_regroup_per_table_and_split_back() -> None:
    first, second = _request(3, [2, 1], 0), _request(2, [1, 3], 100)
    batch = LookupBatch(["a", "b"], [(k, key_counts(k, n, 2)) for k, n in (first, second)])
    grouped = batch.keys_by_table()
    assert grouped["a"].tolist() == [0, 1, 3, 4, 6, 7, 100, 104]
    assert grouped["b"].tolist() == [2, 5, 8, 101, 102, 103, 105, 106, 107]
    dims = {"a": 2, "b": 3}
    # Each key's vector encodes the key, so the output says which key landed where.
    vectors = {t: np.repeat(grouped[t][:, None].astype(np.float16), dims[t], axis=1) for t in grouped}
    out_first, out_second = batch.outputs(vectors)
    assert out_first.dtype == np.float32 and out_first.shape == (3, 2 * 2 + 1 * 3)
    assert out_first[1].tolist() == [3, 3, 4, 4, 5, 5, 5]
    assert out_second.shape == (2, 1 * 2 + 3 * 3)
    assert out_second[1].tolist() == [104, 104, *[105] * 3, *[106] * 3, *[107] * 3]


def test_a_table_without_keys_gives_empty_columns() -> None:
    keys, numkeys = _request(2, [0, 2], 0)
    batch = LookupBatch(["a", "b"], [(keys, key_counts(keys, numkeys, 2))])
    grouped = batch.keys_by_table()
    assert grouped["a"].size == 0
    (out,) = batch.outputs({"a": np.zeros((0, 4), np.float32), "b": np.ones((4, 2), np.float32)})
    assert out.shape == (2, 4)


@pytest.mark.parametrize(
    ("keys", "numkeys", "message"),
    [
        (np.zeros((2, 3), np.float32), np.array([[3], [3]], np.int32), "KEYS: must be INT64"),
        (np.zeros(3, np.int64), np.array([[3]], np.int32), "must be [samples, n] tensors"),
        (np.zeros((2, 3), np.int64), np.array([[3]], np.int32), "NUMKEYS: shape must be [2, 1]"),
        (np.zeros((2, 3), np.int64), np.array([[3], [2]], np.int32), "every row of a request must be equal"),
        (np.zeros((1, 3), np.int64), np.array([[4]], np.int32), "add up to 4, but KEYS has 3"),
        (np.zeros((1, 0), np.int64), np.array([[-1]], np.int32), "counts must be >= 0"),
    ],
)
def test_bad_layouts_name_the_input(keys: np.ndarray, numkeys: np.ndarray, message: str) -> None:
    with pytest.raises(KeyLayoutError, match=message.replace("[", r"\[").replace("]", r"\]")):
        key_counts(keys, numkeys, 1)
