"""The tutorial's deployment: train and dissect the workflow's PyTorch DLRM, serve its tables with `hps serve`
and the three models with Triton, for as long as the caller needs them. It predicts nothing itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from examples import deploy, torch_dlrm
from examples.clicks import DENSE_FEATURES, TABLES, synthetic_clicks
from examples.triton_ensemble import dissect
from hps_bench.triton_ensemble import repository
from hps_client.triton import TritonEndpoint, TritonEnvironment, running

HPS_MODEL = "dlrm"


@dataclass(frozen=True)
class Deployment:
    trained: torch_dlrm.TrainedDLRM
    hps_target: str
    triton: TritonEndpoint


@contextlib.contextmanager
def deployed(workdir: Path, environment: TritonEnvironment, train_clicks: int = 4096) -> Iterator[Deployment]:
    """Trains and dissects the DLRM, serves its tables with hps and the three models with Triton."""
    model = torch_dlrm.train(synthetic_clicks(train_clicks, seed=1))
    ps_config = deploy.deploy_config(workdir, {HPS_MODEL: torch_dlrm.dissect(model, workdir)})
    weights = dissect.dense_weights(model.dense_part, workdir / "dense.npz")
    with deploy.serving(ps_config) as hps_target:
        repository.write_repository(
            workdir / "models",
            hps_target,
            weights,
            hps_model=HPS_MODEL,
            tables=[t.name for t in TABLES],
            dense_features=DENSE_FEATURES,
        )
        with running(environment, workdir / "models") as triton:
            yield Deployment(model, hps_target, triton)
