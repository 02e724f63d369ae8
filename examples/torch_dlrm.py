"""The HPS workflow in PyTorch: train a DLRM-like model, dissect it, serve its tables, predict through hps.

Run `python -m examples.torch_dlrm [WORKDIR]`; it prints the largest difference between the trained model's
predictions and the served inference model's on held-out clicks, and the served accuracy.
Example code: hps itself never imports it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from examples import deploy
from examples.clicks import DENSE_FEATURES, DIM, ONE_HOT, TABLES, Clicks, Comparison, synthetic_clicks
from hps_client.torch import LookupLayer, SparseLookupLayer

MODEL_NAME = "dlrm_torch"


class DenseNetwork(nn.Module):
    """The dense part: bottom MLP over the dense features, pairwise dot interaction with the embeddings, top MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(DENSE_FEATURES, 16), nn.ReLU(), nn.Linear(16, DIM), nn.ReLU())
        features = len(TABLES) + 1
        self.pairs = torch.triu_indices(features, features, offset=1)
        self.top = nn.Sequential(nn.Linear(DIM + self.pairs.shape[1], 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())

    def forward(self, dense: torch.Tensor, vectors: list[torch.Tensor]) -> torch.Tensor:
        bottom = self.bottom(dense)
        features = torch.stack([bottom, *vectors], dim=1)
        dots = torch.bmm(features, features.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([bottom, dots], dim=1))[:, 0]


class TrainedDLRM(nn.Module):
    """The training model: nn.Embedding tables, an EmbeddingBag (mean) for the history, and the dense part."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(t.rows, DIM) for t in ONE_HOT)
        self.history = nn.EmbeddingBag(TABLES[-1].rows, DIM, mode="mean")
        self.dense_part = DenseNetwork()

    def forward(self, dense: torch.Tensor, ids: torch.Tensor, history: torch.Tensor, offsets: torch.Tensor):
        vectors = [table(ids[:, i]) for i, table in enumerate(self.tables)]
        return self.dense_part(dense, [*vectors, self.history(history, offsets)])


def _inputs(clicks: Clicks) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(a) for a in (clicks.dense, clicks.ids, clicks.history_values, clicks.history_offsets))


def train(data: Clicks, epochs: int = 4, batch_size: int = 256, seed: int = 0) -> TrainedDLRM:
    torch.manual_seed(seed)
    model = TrainedDLRM()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        for start in range(0, len(data), batch_size):
            batch = data.batch(start, start + batch_size)
            optimizer.zero_grad()
            loss = nn.functional.binary_cross_entropy(model(*_inputs(batch)), torch.from_numpy(batch.labels))
            loss.backward()
            optimizer.step()
    return model.eval()


def dissect(model: TrainedDLRM, workdir: Path) -> dict[str, np.ndarray]:
    """Saves the dense part's weights and returns the embedding tables (name -> rows x DIM)."""
    torch.save(model.dense_part.state_dict(), workdir / "dense_torch.pt")
    weights = [next(table.parameters()) for table in model.tables] + [model.history.weight]  # weight: their one
    return {t.name: w.detach().numpy().copy() for t, w in zip(TABLES, weights, strict=True)}


class InferenceDLRM(nn.Module):
    """The deployed model: hps layers for every table, the saved dense part on top; one RPC per table."""

    def __init__(self, ps_config: Path, workdir: Path, model_name: str = MODEL_NAME) -> None:
        super().__init__()
        self.tables = nn.ModuleList(LookupLayer(ps_config, model_name, i, DIM) for i in range(len(ONE_HOT)))
        self.history = SparseLookupLayer(ps_config, model_name, len(ONE_HOT), DIM, combiner="mean")
        self.dense_part = DenseNetwork()
        self.dense_part.load_state_dict(torch.load(workdir / "dense_torch.pt"))

    def forward(self, dense: torch.Tensor, ids: torch.Tensor, history: torch.Tensor, offsets: torch.Tensor):
        vectors = [table(ids[:, i]) for i, table in enumerate(self.tables)]
        return self.dense_part(dense, [*vectors, self.history(history, offsets)])


@torch.no_grad()
def predict(model: nn.Module, data: Clicks, batch_size: int = 512) -> np.ndarray:
    batches = (data.batch(start, start + batch_size) for start in range(0, len(data), batch_size))
    return np.concatenate([model(*_inputs(b)).numpy() for b in batches])


def run(workdir: Path) -> Comparison:
    """The whole workflow: train, dissect, write ps.json, import, serve, predict held-out clicks both ways."""
    model = train(synthetic_clicks(4096, seed=1))
    held_out = synthetic_clicks(1024, seed=2)
    ps_config = deploy.deploy_config(workdir, {MODEL_NAME: dissect(model, workdir)})
    with deploy.serving(ps_config):
        served = predict(InferenceDLRM(ps_config, workdir).eval(), held_out)
    return Comparison(predict(model, held_out), served, held_out.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", help="where tables, ps.json and the database go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        print(run(workdir).summary(MODEL_NAME))


if __name__ == "__main__":
    main()
