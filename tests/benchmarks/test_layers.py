"""The layers benchmark runs end to end against `hps serve` and reports every figure it promises.

Speed itself is never asserted here: benchmarks report it as ratios, tests only check they ran.
"""

from __future__ import annotations

import json

import pytest

from hps_bench import layers


def test_json_report_has_every_case_and_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert layers.main(["--json", "--scale", "0.01"]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = printed["rows"]
    assert {(r["case"], r["path"]) for r in rows} == {
        (case.name, path) for case in layers._cases(0.01) for path in ("tf eager", "tf.function", "torch")
    }
    for r in rows:
        assert r["layer_p50_ms"] > 0 and r["client_p50_ms"] > 0
        assert r["overhead_ms"] == pytest.approx(r["layer_p50_ms"] - r["client_p50_ms"])
        assert r["ratio"] == pytest.approx(r["layer_p50_ms"] / r["client_p50_ms"])
    assert printed["max_overhead_ms"] == pytest.approx(max(r["overhead_ms"] for r in rows), abs=1e-3)
    assert printed["tf_function_dispatch_ms"] > 0
