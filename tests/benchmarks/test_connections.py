"""`hps bench connections` runs end to end (two hps serve processes, asyncio client processes, a health
probe) and reports every case with every reply right. Speed itself is never asserted here."""

from __future__ import annotations

import json

import pytest

from hps_server.cli import main


def test_json_report_has_both_queues_and_every_connection_count(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "connections", "--json", "--seconds", "1", "--connections", "2", "6", "--processes", "1"]
    assert main([*argv, "--max-queued", "2", "--workers", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = printed["rows"]
    assert [(r["queue"], r["connections"]) for r in rows] == [
        ("unbounded", 2),
        ("unbounded", 6),
        ("bounded", 2),
        ("bounded", 6),
    ]
    assert [r["max_queued"] for r in rows[2:]] == [2, 2]
    for row in rows:
        assert row["ok_rpc_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["wrong"] == 0 and row["failed"] == 0
        assert row["health_checks"] > 0 and row["health_unanswered"] == 0
    targets = printed["targets"]
    assert targets["wrong"] == 0 and targets["health_unanswered"] == 0
    assert {"unbounded_p99_ratio_6_to_2", "bounded_p99_ratio_6_to_2"} <= set(targets)
