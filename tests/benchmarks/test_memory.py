"""The memory benchmark runs end to end on a small table and reports every figure it promises.

Speed itself is never asserted here: benchmarks report it as ratios, tests only check they ran.
"""

from __future__ import annotations

import json

import pytest

from hps_bench import memory


def test_json_report_has_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    report = memory.run(True, rows=3000, dims=(4, 16), batch_rows=1000)
    printed = json.loads(capsys.readouterr().out)
    assert printed == report
    assert [r["dim"] for r in report["results"]] == [4, 16]
    for r in report["results"]:
        assert r["rows"] == 3000
        assert r["raw_bytes_per_row"] == 8 + 4 * r["dim"]
        assert r["memory_ratio"] == pytest.approx(r["bytes_per_row"] / r["raw_bytes_per_row"])
        assert r["bytes_per_row"] > r["raw_bytes_per_row"]
        assert r["fetch_vs_gather"] == pytest.approx(r["fetch_rows_per_s"] / r["gather_rows_per_s"])
        assert r["insert_vs_gather"] == pytest.approx(r["insert_rows_per_s"] / r["gather_rows_per_s"])


def test_table_names_every_dim(capsys: pytest.CaptureFixture[str]) -> None:
    memory.main(["--rows", "2000", "--dims", "8", "--batch-rows", "500"])
    out = capsys.readouterr().out
    assert "mem ratio" in out and "fetch/gather" in out
    assert any(line.split()[:2] == ["8", "2,000"] for line in out.splitlines())
