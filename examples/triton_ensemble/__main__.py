"""The tutorial end to end: `python -m examples.triton_ensemble [--workdir DIR]`.

Trains the workflow's PyTorch DLRM, dissects it, serves its tables with `hps serve`, runs the ensemble in Triton
and compares the ensemble's predictions on held-out clicks with the trained model's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import tritonclient.grpc as triton_grpc

from examples import torch_dlrm
from examples.clicks import Comparison, synthetic_clicks
from examples.triton_ensemble import client
from examples.triton_ensemble.deployment import deployed
from hps_bench.triton_ensemble import repository
from hps_client.triton import setup


def run(workdir: Path) -> Comparison:
    held_out = synthetic_clicks(1024, seed=2)
    with (
        deployed(workdir, setup()) as deployment,
        triton_grpc.InferenceServerClient(deployment.triton.grpc_target) as triton,
    ):
        served = client.predict(triton, held_out)
    return Comparison(torch_dlrm.predict(deployment.trained, held_out), served, held_out.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where tables, configs and the model repository go")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        print(run(workdir).summary(f"Triton ensemble ({repository.ENSEMBLE})"))


if __name__ == "__main__":
    main()
