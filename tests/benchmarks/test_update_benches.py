"""`hps bench feed`, `replicas` and `prefetch` run end to end on small inputs and report every figure they
promise (the feed's own check that every row was applied holds). Speed and timing are never asserted here.
"""

from __future__ import annotations

import json

import pytest

from hps_bench import feed, prefetch, replicas


def test_feed_applies_every_published_row_and_reports_its_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    result = feed.run(True, messages=4, rows_per_message=256, repeats=1)
    assert json.loads(capsys.readouterr().out) == result
    applied, alone, xread = result["rows"]
    assert result["dim"] == 64 and result["messages"] == 4
    assert result["ratio"] == pytest.approx(applied["rows_per_s"] / xread["rows_per_s"], abs=1e-3)
    assert result["feed_vs_levels_alone"] == pytest.approx(applied["rows_per_s"] / alone["rows_per_s"], abs=1e-3)
    assert result["target_met"] == (result["ratio"] >= 0.8)


def test_replicas_reports_propagation_and_stale_answers(capsys: pytest.CaptureFixture[str]) -> None:
    result = replicas.run(True, upserts=20)
    assert json.loads(capsys.readouterr().out) == result
    (figures,) = result["rows"]
    assert figures["upserts"] == 20 and 0 <= figures["over_bound"] + figures["never_seen"] <= 20
    assert figures["stale_after_bound"] >= 0 and figures["lookup_p50_ms"] > 0
    assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
    assert result["target_met"] == (
        figures["p99_ms"] <= 50 and figures["stale_after_bound"] == 0 and figures["never_seen"] == 0
    )


@pytest.mark.parametrize("processes", [1, 2])
def test_prefetch_reports_both_cases(capsys: pytest.CaptureFixture[str], processes: int) -> None:
    result = prefetch.run(True, rows=5000, lookups=20, rounds=1, processes=processes)
    assert json.loads(capsys.readouterr().out) == result
    assert len(result["rows"]) == 4 and all(row["p99_ms"] > 0 for row in result["rows"])
    assert result["server_processes"] == processes
    assert result["target_met"] == (result["p99_ratio_with_prefetch"] <= 1.2)
