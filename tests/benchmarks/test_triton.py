"""The Triton benchmark runs end to end on a small workload and reports every figure it promises.

Speed itself is never asserted here: the benchmark reports it as ratios, tests only check it ran.
"""

from __future__ import annotations

import pytest

from hps_bench import triton
from hps_client.triton import TritonEnvironment


def test_json_report_has_every_figure(
    triton_environment: TritonEnvironment, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = triton.run((8, 32), scale=0.05, workload=triton.Workload(tables=3, rows=300, dim=4, max_batch_size=64))
    assert [r["batch"] for r in rows] == [8, 32]
    for r in rows:
        # Same keys, same weights: the ensemble and the in-process path agree.
        assert r["max_abs_diff"] <= 1e-5
        assert r["seq_ratio"] == pytest.approx(r["triton_samples_per_s"] / r["hps_samples_per_s"])
        assert r["conc_ratio"] == pytest.approx(r["triton_conc_samples_per_s"] / r["hps_conc_samples_per_s"])
        assert r["p50_ratio"] == pytest.approx(r["triton_p50_ms"] / r["hps_p50_ms"])
        assert r["p99_ratio"] == pytest.approx(r["triton_p99_ms"] / r["hps_p99_ms"])
        assert r["triton_lookup_p50_ms"] > 0
