"""The tutorial end to end: `python -m examples.triton_ensemble [--workdir DIR]`.

Trains the DLRM, dissects it, serves its tables with hps, runs the ensemble in Triton and compares predictions.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton_grpc

from examples.triton_ensemble import client, dissect, dlrm, repository
from hps_client.triton import running, setup
from hps_server import config as config_module
from hps_server.server import HpsServer


def run(workdir: Path) -> float:
    """Max abs difference between the ensemble's predictions and the trained model's on held-out clicks."""
    model = dlrm.train(dlrm.synthetic_clicks(20_000, seed=0))
    held_out = dlrm.synthetic_clicks(2_000, seed=1)
    expected = dlrm.predict(model, held_out)
    dense_weights = dissect.dissect(model, workdir)
    server = HpsServer(config_module.load(dissect.write_hps_config(workdir)))
    port = server.start()
    try:
        repository.write_repository(
            workdir / "models",
            f"127.0.0.1:{port}",
            dense_weights,
            hps_model=dissect.HPS_MODEL,
            tables=list(dlrm.TABLES),
            dense_features=dlrm.DENSE_FEATURES,
        )
        with running(setup(), workdir / "models") as triton:
            print(f"Triton: gRPC {triton.grpc_target}; hps: 127.0.0.1:{port}")
            with triton_grpc.InferenceServerClient(triton.grpc_target) as triton_client:
                predictions = client.predict(triton_client, held_out)
    finally:
        server.stop(grace=1)
    accuracy = float(((predictions > 0.5) == held_out.labels).mean())
    difference = float(np.abs(predictions - expected).max())
    print(f"{len(predictions)} held-out clicks: accuracy {accuracy:.3f}, max |ensemble - trained| = {difference:.2e}")
    return difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, help="where tables, configs and the model repository go")
    args = parser.parse_args()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args.workdir)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            run(Path(workdir))


if __name__ == "__main__":
    main()
