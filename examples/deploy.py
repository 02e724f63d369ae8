"""The deploy half of the workflow: write dissected tables, an HPS-shaped ps.json, `hps import`, `hps serve`.

Framework-free and the same for every model; it runs the hps CLI as a user would, in child processes.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from examples.clicks import DIM, TABLES
from hps_bench.servers import free_port, hps_server
from hps_server.tables import write_table


def write_tables(folder: Path, vectors_by_table: Mapping[str, np.ndarray]) -> None:
    """Each trained embedding matrix as an HPS table folder (`key`, `emb_vector`); row i has key i."""
    for name, vectors in vectors_by_table.items():
        keys = np.arange(len(vectors), dtype=np.int64)
        write_table(folder / name, [(keys, np.asarray(vectors, np.float32))], vectors.shape[1])


def write_ps_config(path: Path, models: Mapping[str, Path], port: int) -> None:
    """A HugeCTR-style ps.json serving one model per entry of `models` (name -> its tables folder).

    The keys are HPS's own; `server` is the one hps addition, and it is also how the layers find the server.
    """
    config = {
        "supportlonglong": True,
        "server": {"address": f"127.0.0.1:{port}", "shutdown_grace_seconds": 1},
        "volatile_db": {"type": "parallel_hash_map", "initial_cache_rate": 1.0},
        "persistent_db": {"type": "rocks_db", "path": str(path.parent / "rocksdb")},
        "models": [
            {
                "model": name,
                "sparse_files": [str(tables / t.name) for t in TABLES],
                "embedding_table_names": [t.name for t in TABLES],
                "embedding_vecsize_per_table": [DIM] * len(TABLES),
                "maxnum_catfeature_query_per_table_per_sample": [t.max_keys_per_sample for t in TABLES],
                "default_value_for_each_table": [0.0] * len(TABLES),
                "deployed_device_list": [0],
                "max_batch_size": 1024,
                "gpucache": True,
                "gpucacheper": 0.5,
                "hit_rate_threshold": 0.9,
            }
            for name, tables in models.items()
        ],
    }
    path.write_text(json.dumps(config, indent=2))


def hps_import(ps_config: Path) -> None:
    """`hps import --config ps.json`: every table into the persistent level before the first start."""
    command = [sys.executable, "-m", "hps_server.cli", "--log-level", "WARNING", "import", "--config", str(ps_config)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def serving(ps_config: Path) -> Iterator[str]:
    """`hps serve --config ps.json` in a child process until the block ends; yields its address."""
    port = json.loads(ps_config.read_text())["server"]["address"].rsplit(":", 1)[1]
    with hps_server(ps_config, int(port)) as target:
        yield target


def deploy_config(workdir: Path, models: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
    """Writes every model's tables and one ps.json serving them all, then imports them; returns the ps.json."""
    folders = {}
    for name, vectors_by_table in models.items():
        folders[name] = workdir / "tables" / name
        write_tables(folders[name], vectors_by_table)
    ps_config = workdir / "ps.json"
    write_ps_config(ps_config, folders, free_port())
    hps_import(ps_config)
    return ps_config
