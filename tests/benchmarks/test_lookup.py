"""`hps bench lookup` runs end to end (hps serve and the echo baseline as child processes) and reports its ratios.

Speed itself is never asserted here: benchmarks report it as ratios, tests only check they ran.
"""

from __future__ import annotations

import json

import pytest

from hps_server.cli import main


def test_json_report_has_both_targets_and_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "lookup", "--json", "--scale", "0.01", "--rows", "2000"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["case"][:2] for r in printed["rows"]] == ["a:", "b:", "26"]
    for row in printed["rows"]:
        assert row["hps_MB_per_s"] > 0 and row["echo_MB_per_s"] > 0
        assert row["bytes_ratio"] == pytest.approx(row["hps_MB_per_s"] / row["echo_MB_per_s"], rel=1e-6)
        assert row["p50_ratio"] == pytest.approx(row["hps_p50_ms"] / row["echo_p50_ms"], rel=1e-6)
    assert printed["a_bytes_ratio"] == pytest.approx(printed["rows"][0]["bytes_ratio"], abs=1e-3)
    assert printed["b_p50_ratio"] == pytest.approx(printed["rows"][1]["p50_ratio"], abs=1e-3)
