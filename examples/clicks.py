"""Synthetic click data for the DLRM-like examples: dense features, three one-hot ids and a multi-hot history.

NumPy only, shared by the TensorFlow and PyTorch workflows so both learn the same task; it trains nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DENSE_FEATURES = 4
DIM = 8  # every table's vector size (the DLRM dot interaction needs one size)
HISTORY_LENGTH = 5  # most ids in one sample's history


@dataclass(frozen=True)
class TableSpec:
    name: str
    rows: int
    max_keys_per_sample: int


# In table_id order: the layers address tables by their index in the ps config.
TABLES = (
    TableSpec("user", 1_000, 1),
    TableSpec("item", 500, 1),
    TableSpec("category", 40, 1),
    TableSpec("history", 500, HISTORY_LENGTH),
)
ONE_HOT = TABLES[:3]


@dataclass(frozen=True)
class Clicks:
    """One batch: dense (n, 4) float32, ids (n, 3) int64 for the one-hot tables, history (n, 5) int64 padded
    with -1 after history_lengths (n,) valid ids (at least one each), labels (n,) float32 in {0, 1}."""

    dense: np.ndarray
    ids: np.ndarray
    history: np.ndarray
    history_lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, start: int, stop: int) -> Clicks:
        return Clicks(
            self.dense[start:stop],
            self.ids[start:stop],
            self.history[start:stop],
            self.history_lengths[start:stop],
            self.labels[start:stop],
        )

    @property
    def history_values(self) -> np.ndarray:
        """The valid history ids, sample after sample (ragged values)."""
        return self.history[np.arange(HISTORY_LENGTH) < self.history_lengths[:, None]]

    @property
    def history_offsets(self) -> np.ndarray:
        """Where each sample's ids start in history_values (torch.nn.EmbeddingBag's offsets)."""
        return np.concatenate([[0], np.cumsum(self.history_lengths)[:-1]]).astype(np.int64)


def synthetic_clicks(samples: int, seed: int) -> Clicks:
    """Clicks drawn from one fixed hidden logistic model (the same for every seed), ids Zipf-skewed."""
    hidden = np.random.default_rng(20260101)
    weights = hidden.standard_normal(DENSE_FEATURES)
    biases = [hidden.standard_normal(t.rows) for t in TABLES]
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((samples, DENSE_FEATURES)).astype(np.float32)
    ids = np.stack([(rng.zipf(1.3, samples) - 1) % t.rows for t in ONE_HOT], axis=1).astype(np.int64)
    lengths = rng.integers(1, HISTORY_LENGTH + 1, samples)
    history = rng.integers(0, TABLES[3].rows, (samples, HISTORY_LENGTH))
    history[np.arange(HISTORY_LENGTH) >= lengths[:, None]] = -1
    logit = dense @ weights + sum(biases[i][ids[:, i]] for i in range(len(ONE_HOT)))
    logit += np.where(history >= 0, biases[3][history], 0).sum(1) / lengths
    labels = (rng.random(samples) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return Clicks(dense, ids, history.astype(np.int64), lengths.astype(np.int64), labels)


@dataclass(frozen=True)
class Comparison:
    """The trained model's and the served model's click probabilities on the same held-out clicks."""

    trained: np.ndarray
    served: np.ndarray
    labels: np.ndarray

    @property
    def max_difference(self) -> float:
        return float(np.abs(self.trained - self.served).max())

    @property
    def accuracy(self) -> float:
        """Share of held-out clicks the served model gets right at threshold 0.5 (the task is learnable)."""
        return float(np.mean((self.served > 0.5) == (self.labels > 0.5)))

    def summary(self, model: str) -> str:
        majority = max(self.labels.mean(), 1 - self.labels.mean())
        return (
            f"{model}: max |trained - served| = {self.max_difference:.3g} over {len(self.labels)} held-out clicks, "
            f"served accuracy {self.accuracy:.3f} (majority class {majority:.3f})"
        )
