"""`hps bench cache --devices`: the device counts it measures, its argument check, and its refusal to report
anything on a host without a GPU."""

from __future__ import annotations

import pytest

from hps_bench import cache
from hps_bench.cache_devices import device_counts
from hps_server.cache.placement import gpus_available


def test_device_counts_double_up_to_the_devices_asked_for() -> None:
    assert device_counts(1, "all") == [1]
    assert device_counts(8, "all") == [1, 2, 4, 8]
    assert device_counts(6, "all") == [1, 2, 4, 6]
    assert device_counts(8, "3") == [1, 2, 3]
    assert device_counts(2, "9") == [1, 2]  # never more than the machine has


def test_devices_must_be_all_or_a_positive_count(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("two", "0", "-1"):
        with pytest.raises(SystemExit):
            cache.main(["--devices", bad])
        assert "--devices: must be 'all' or a number of GPUs" in capsys.readouterr().err


@pytest.mark.skipif(gpus_available((0,)), reason="checks the GPU-less refusal")
def test_without_a_gpu_it_says_so_and_reports_no_figure(capsys: pytest.CaptureFixture[str]) -> None:
    assert cache.main(["--devices", "all", "--json"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "needs an NVIDIA GPU with CuPy, and none is usable here" in out.err
