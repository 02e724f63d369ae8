"""The tutorial's model: a small DLRM (bottom MLP, three embedding tables, dot interaction, top MLP) in PyTorch,
trained on synthetic clicks. It trains and predicts; cutting it into hps tables and a dense part is dissect.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

DENSE_FEATURES = 13  # as Criteo's, which DLRM was made for
DIM = 8  # every table's vector size: the dot interaction needs one size
TABLES = {"user": 1_000, "item": 500, "category": 40}  # name -> rows, in KEYS/NUMKEYS order
BOTTOM = (DENSE_FEATURES, 16, DIM)
TOP_HIDDEN = 16


@dataclass(frozen=True)
class Clicks:
    """dense float32 (n, 13); keys int64 (n, 3), one id per table in TABLES order; labels float32 (n,)."""

    dense: np.ndarray
    keys: np.ndarray
    labels: np.ndarray


def synthetic_clicks(samples: int, seed: int) -> Clicks:
    """Clicks that depend on the dense features and on hidden per-id preferences, so embeddings have to learn."""
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((samples, DENSE_FEATURES), dtype=np.float32)
    keys = np.stack([rng.zipf(1.3, samples) % rows for rows in TABLES.values()], axis=1).astype(np.int64)
    preference = np.random.default_rng(1234)  # the same hidden preferences for every seed
    taste = [preference.standard_normal(rows) for rows in TABLES.values()]
    logit = dense[:, 0] - 0.5 * dense[:, 1] + sum(t[keys[:, i]] for i, t in enumerate(taste))
    labels = (rng.random(samples) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return Clicks(dense, keys, labels)


def interaction_pairs(features: int) -> tuple[np.ndarray, np.ndarray]:
    """The (i, j), i < j, feature pairs whose dot products DLRM feeds to its top MLP, in a fixed order."""
    rows, cols = np.triu_indices(features, k=1)
    return rows, cols


class DLRM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.ModuleDict({name: nn.Embedding(rows, DIM) for name, rows in TABLES.items()})
        self.bottom = nn.Sequential(
            nn.Linear(BOTTOM[0], BOTTOM[1]), nn.ReLU(), nn.Linear(BOTTOM[1], BOTTOM[2]), nn.ReLU()
        )
        rows, cols = interaction_pairs(len(TABLES) + 1)
        self.top = nn.Sequential(nn.Linear(DIM + len(rows), TOP_HIDDEN), nn.ReLU(), nn.Linear(TOP_HIDDEN, 1))
        self.pair_rows, self.pair_cols = torch.from_numpy(rows), torch.from_numpy(cols)

    def forward(self, dense: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Click probability (n,) from dense (n, 13) and keys (n, tables)."""
        vectors = torch.stack([table(keys[:, i]) for i, table in enumerate(self.embeddings.values())], dim=1)
        return self.dense_part(dense, vectors)

    def dense_part(self, dense: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Everything after the lookups: what the dense model in Triton computes from (n, tables, DIM) vectors."""
        bottom = self.bottom(dense)
        features = torch.cat([bottom[:, None, :], vectors], dim=1)
        dots = torch.bmm(features, features.transpose(1, 2))[:, self.pair_rows, self.pair_cols]
        return torch.sigmoid(self.top(torch.cat([bottom, dots], dim=1))).squeeze(1)


def train(data: Clicks, epochs: int = 3, batch_size: int = 256, seed: int = 0) -> DLRM:
    torch.manual_seed(seed)
    model = DLRM()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss = nn.BCELoss()
    dense, keys, labels = (torch.from_numpy(a) for a in (data.dense, data.keys, data.labels))
    for _ in range(epochs):
        for start in range(0, len(labels), batch_size):
            batch = slice(start, start + batch_size)
            optimizer.zero_grad()
            loss(model(dense[batch], keys[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval()


def predict(model: DLRM, data: Clicks) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(data.dense), torch.from_numpy(data.keys)).numpy()
