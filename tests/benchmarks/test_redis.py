"""The Redis benchmark runs end to end on a small table and reports every figure it promises.

Speed itself is never asserted here: the benchmark reports it as a ratio, tests only check it ran.
"""

from __future__ import annotations

import json

import pytest

from hps_bench import redis as redis_bench
from hps_bench.redis_cluster_launcher import RedisClusterProcesses


def test_json_report_has_every_figure(
    capsys: pytest.CaptureFixture[str], redis_cluster_processes: RedisClusterProcesses
) -> None:
    redis_cluster_processes.flush()
    result = redis_bench.run(True, rows=2000, batch=500, batches=2, repeats=1, seed=redis_cluster_processes.seed)
    printed = json.loads(capsys.readouterr().out)
    assert printed == result
    level, plain = result["rows"]
    assert result["batch_keys"] == 500 and result["dim"] == 128 and result["batches_timed"] == 2
    assert level["rows_per_s"] > 0 and plain["rows_per_s"] > 0
    assert result["ratio"] == pytest.approx(level["rows_per_s"] / plain["rows_per_s"], rel=1e-3)
    assert result["target_met"] == (result["ratio"] >= 2.0)


def test_table_names_both_readers(
    capsys: pytest.CaptureFixture[str], redis_cluster_processes: RedisClusterProcesses
) -> None:
    redis_cluster_processes.flush()
    redis_bench.main(["--rows", "1000", "--batch", "300", "--seed", redis_cluster_processes.seed])
    out = capsys.readouterr().out
    assert "RedisClusterLevel (HPS layout)" in out and "mget_nonatomic" in out and "ratio" in out
