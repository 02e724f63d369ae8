"""The `hps` command as people run it: import/export round trip, bad config, and the demo (README's first command)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml

from hps_server import tables
from hps_server.cli import main
from tests.conftest import TABLE_SPECS, write_sample_tables


def _config_file(directory: Path, with_sources: bool) -> Path:
    document = {
        "persistent_db": {"path": "db"},
        "models": [
            {
                "name": "ctr",
                "tables": [
                    {"name": name, "dim": dim, **({"source": name} if with_sources else {})}
                    for name, (_, dim, _) in TABLE_SPECS.items()
                ],
            }
        ],
    }
    path = directory / "hps.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_import_then_export_round_trip(tmp_path: Path, capsys) -> None:
    truth = write_sample_tables(tmp_path)
    config = _config_file(tmp_path, with_sources=True)
    assert main(["import", "--config", str(config)]) == 0
    assert "ctr.user: imported 5000 rows" in capsys.readouterr().out
    out = tmp_path / "exported"
    assert main(["export", "--config", str(config), "--model", "ctr", "--table", "item", "--out", str(out)]) == 0
    exported = tables.read_table(out, TABLE_SPECS["item"][1])
    keys, vectors = (np.concatenate(parts) for parts in zip(*exported.chunks(1000), strict=True))
    order = np.argsort(keys)
    expected_keys, expected_vectors = truth["item"]
    expected_order = np.argsort(expected_keys)
    np.testing.assert_array_equal(keys[order], expected_keys[expected_order])
    np.testing.assert_array_equal(vectors[order], expected_vectors[expected_order])


def test_bad_config_is_one_clear_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "hps.yaml"
    path.write_text("models:\n  - name: m\n    tables: [{name: t, dim: -1}]\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "models[0].tables[0].dim: must be >= 1, got -1" in capsys.readouterr().err


def test_demo_once_serves_the_sample_model_and_prints_its_summary(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hps_server.cli",
            "demo",
            "--once",
            "--port",
            "0",
            "--seconds",
            "2",
            "--dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wrong vectors: 0" in result.stdout
    for level in ("hash_map", "rocksdb", "user_id", "p99"):
        assert level in result.stdout


@pytest.mark.parametrize("policy", ["evict_random", "evict_oldest"])
def test_import_to_redis(tmp_path: Path, capsys, redis_cluster_processes, policy: str) -> None:
    """`hps import --to redis` bulk-loads the tables into the configured Redis Cluster, with HPS's `}t`
    access time for every row under both overflow policies (HPS's eviction and dumps read it)."""
    from hps_server.config import VolatileDbConfig
    from hps_server.storage.redis_cluster import RedisClusterLevel, hash_name

    redis_cluster_processes.flush()
    truth = write_sample_tables(tmp_path)
    config = _config_file(tmp_path, with_sources=True)
    document = yaml.safe_load(config.read_text())
    document["volatile_db"] = {
        "type": "redis_cluster",
        "address": redis_cluster_processes.seed,
        "timeout_ms": 2000,
        "overflow_policy": policy,
    }
    config.write_text(yaml.safe_dump(document))
    assert main(["import", "--config", str(config), "--to", "redis"]) == 0
    assert "ctr.user: imported 5000 rows from" in capsys.readouterr().out
    level = RedisClusterLevel.from_config(VolatileDbConfig(address=redis_cluster_processes.seed, timeout_ms=2000))
    host, port = redis_cluster_processes.seed.split(":")
    client = redis.RedisCluster(host=host, port=int(port))
    try:
        for name, (rows, dim, _) in TABLE_SPECS.items():
            level.create_table(f"ctr.{name}", dim)
            keys, vectors = truth[name]
            assert level.size(f"ctr.{name}") == rows
            got, found = level.fetch(f"ctr.{name}", keys)
            assert found.all()
            np.testing.assert_array_equal(got, vectors)
            for p in range(level.num_partitions):
                values = client.hkeys(hash_name(f"ctr.{name}", p, "v"))
                times = client.hgetall(hash_name(f"ctr.{name}", p, "t"))
                assert values and set(values) == set(times)
                assert min(np.frombuffer(b"".join(times.values()), "<i8")) > 10**15  # microseconds
    finally:
        client.close()
        level.close()


def test_serve_with_a_wrong_redis_password_is_one_clear_error(tmp_path: Path, capsys, redis_cluster_acl) -> None:
    write_sample_tables(tmp_path)
    config = _config_file(tmp_path, with_sources=True)
    document = yaml.safe_load(config.read_text())
    document["server"] = {"address": "127.0.0.1:0"}
    document["volatile_db"] = {
        "type": "redis_cluster",
        "address": redis_cluster_acl.seed,
        "user_name": redis_cluster_acl.user,
        "password": "not-the-password",
        "timeout_ms": 2000,
    }
    config.write_text(yaml.safe_dump(document))
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "volatile_db.user_name/password" in err and redis_cluster_acl.user in err


def test_serve_processes_must_be_a_count_or_auto(tmp_path: Path, capsys) -> None:
    config = _config_file(tmp_path, with_sources=False)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--config", str(config), "--processes", "0"])
    assert exited.value.code == 2
    assert "argument --processes: server.processes: must be an integer >= 1 or auto, got 0" in capsys.readouterr().err
