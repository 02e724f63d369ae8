"""Two models behind one server: the TensorFlow and the PyTorch DLRM, one ps.json, one `hps serve`.

Run `python -m examples.two_models [WORKDIR]`; each inference model queries its own model's tables through its
framework's layers, and the script prints each one's largest difference from its trained model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from examples import deploy, tf_dlrm, torch_dlrm
from examples.clicks import Comparison, synthetic_clicks


def run(workdir: Path) -> dict[str, Comparison]:
    """Trains both, serves both from one server; model name -> its held-out predictions, trained and served."""
    data, held_out = synthetic_clicks(4096, seed=1), synthetic_clicks(1024, seed=2)
    tf_model, torch_model = tf_dlrm.train(data), torch_dlrm.train(data)
    tables = {
        tf_dlrm.MODEL_NAME: tf_dlrm.dissect(tf_model, workdir),
        torch_dlrm.MODEL_NAME: torch_dlrm.dissect(torch_model, workdir),
    }
    ps_config = deploy.deploy_config(workdir, tables)
    with deploy.serving(ps_config):
        served_tf = tf_dlrm.predict(tf_dlrm.InferenceDLRM(ps_config, workdir), held_out)
        served_torch = torch_dlrm.predict(torch_dlrm.InferenceDLRM(ps_config, workdir).eval(), held_out)
    return {
        tf_dlrm.MODEL_NAME: Comparison(tf_dlrm.predict(tf_model, held_out), served_tf, held_out.labels),
        torch_dlrm.MODEL_NAME: Comparison(torch_dlrm.predict(torch_model, held_out), served_torch, held_out.labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", help="where tables, ps.json and the database go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        comparisons = run(workdir)
    for model, comparison in comparisons.items():
        print(comparison.summary(model))


if __name__ == "__main__":
    main()
