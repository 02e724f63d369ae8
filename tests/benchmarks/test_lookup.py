"""`hps bench lookup` runs end to end (hps serve, the echo baseline and spawned client processes) and reports
every case, ratio and target, with every checked vector right.

Speed itself is never asserted here: benchmarks report it as ratios, tests only check they ran.
"""

from __future__ import annotations

import json

import pytest

from hps_bench import lookup
from hps_server.cache.placement import gpus_available
from hps_server.cli import main

CASES = ["a:", "b:", "c:"]
# Case d: (clients, dtype) in the order measured.
PROCESS_ROWS = [(clients, dtype) for clients in ("1 process", "2 processes") for dtype in ("float32", "float16")]


@pytest.mark.parametrize("security", [[], ["--tls", "--token"]], ids=["plaintext", "tls-and-token"])
def test_json_report_has_every_case_ratio_and_target(capsys: pytest.CaptureFixture[str], security: list[str]) -> None:
    argv = ["bench", "lookup", "--json", "--scale", "0.01", "--rows", "2000", "--clients", "1,2", "--l1", "cpu"]
    assert main([*argv, "--server-option", "workers=4", *security]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tls"] is printed["token"] is bool(security)
    rows = printed["rows"]
    assert [r["case"][:2] for r in rows] == [*CASES, *["d:"] * len(PROCESS_ROWS)]
    assert [(r["clients"], r["dtype"]) for r in rows[3:]] == PROCESS_ROWS
    for row in rows:
        assert row["hps_MB_per_s"] > 0 and row["echo_MB_per_s"] > 0
        assert row["throughput_ratio"] == pytest.approx(row["hps_MB_per_s"] / row["echo_MB_per_s"], rel=1e-6)
        assert row["p50_ratio"] == pytest.approx(row["hps_p50_ms"] / row["echo_p50_ms"], rel=1e-6)
        assert row["p99_ratio"] == pytest.approx(row["hps_p99_ms"] / row["echo_p99_ms"], rel=1e-6)
        assert row["checked_vectors"] > 0 and row["wrong_vectors"] == 0
    for row in rows[3:]:  # case d also runs the echo that copies each reply
        assert row["fresh_echo_over_echo"] > 0 and row["hps_over_fresh_echo"] > 0
        fresh_over_hps = row["fresh_echo_over_echo"] / row["throughput_ratio"]
        assert 1 / row["hps_over_fresh_echo"] == pytest.approx(fresh_over_hps, rel=1e-6)
    fp32, fp16 = rows[3], rows[4]
    assert fp16["reply_MB"] < fp32["reply_MB"]  # the echo stands in for each dtype's own reply size
    assert printed["l1"] == "cpu"
    assert printed["server_options"] == {"workers": 4}  # read as YAML reads it; no processes unless asked
    assert printed["totals"] == {"checked_vectors": sum(r["checked_vectors"] for r in rows), "wrong_vectors": 0}
    targets = printed["targets"]
    assert set(targets) >= {
        "a_bytes_ratio",
        "b_p50_ratio",
        "c_p50_ratio",
        "c_p99_ratio",
        "d_float32_samples_ratio_at_1",
        "d_float16_samples_ratio_at_2",
        "d_float32_samples_2_vs_1_clients",
        "d_float16_samples_never_fall_as_clients_added",
        "d_float32_worst_p99_ratio",
        "d_float16_over_float32_samples",
        "wrong_vectors",
    }
    assert targets["a_bytes_ratio"]["value"] == pytest.approx(rows[0]["throughput_ratio"], abs=1e-3)
    assert all(isinstance(t["met"], bool) and t["target"] for t in targets.values())
    assert targets["wrong_vectors"] == {"value": 0, "target": "== 0", "met": True}


def test_a_worker_group_is_held_to_0_8_of_the_echo_at_the_most_clients() -> None:
    single = [{"throughput_ratio": 1.0, "p50_ratio": 1.0, "p99_ratio": 1.0, "wrong_vectors": 0}] * 3
    rows = [
        {"dtype": dtype, "clients": f"{n} processes", "throughput_ratio": 0.7, "p99_ratio": 1.0}
        | {"hps_samples_per_s": 1.0 * n, "wrong_vectors": 0}
        for n in (1, 16)
        for dtype in ("float32", "float16")
    ]
    alone, group = lookup._targets(single, rows), lookup._targets(single, rows, group=True)
    assert alone["d_float32_samples_ratio_at_16"] == {"value": 0.7, "target": ">= 0.6", "met": True}
    assert group["d_float32_samples_ratio_at_16"] == {"value": 0.7, "target": ">= 0.8", "met": False}
    assert alone["d_float16_samples_ratio_at_1"] == group["d_float16_samples_ratio_at_1"]


@pytest.mark.skipif(gpus_available([0]), reason="CuPy sees a GPU here: --l1 gpu is valid")
def test_gpu_l1_is_refused_where_cupy_sees_no_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "lookup", "--l1", "gpu"])
    assert exited.value.code == 2
    assert "--l1 gpu" in capsys.readouterr().err
