"""Memory of `hps serve --processes N` for several N: the GPU memory its processes hold (L1 is held once per
device, by the group's writer) and the host memory of the shared hash map and of the whole group.

Baselines measured in the same run: a bare CUDA context (CuPy's first allocation in a fresh process), so
the L1 figure is the group's GPU memory less one context per process. Prints for people (a table, or one
JSON object); it must not be imported by the server.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hps_bench import report, servers

TABLES = 8
DIM = 128


def _group_pids(root: int) -> list[int]:
    """`root` and its descendants (the supervisor's workers; the resource tracker too)."""
    pids, index = [root], 0
    while index < len(pids):
        for task in Path(f"/proc/{pids[index]}/task").glob("*"):
            children = (task / "children").read_text().split()
            pids.extend(int(child) for child in children)
        index += 1
    return pids


def _pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def _gpu_bytes_by_pid() -> dict[int, int]:
    """Device memory each process holds (nvidia-smi), {} where there is none."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    used = {}
    for line in out.strip().splitlines():
        pid, mib = (field.strip() for field in line.split(","))
        used[int(pid)] = int(mib) << 20
    return used


def bare_context_bytes() -> int:
    """Device memory of a process that only made a CUDA context (0 without a GPU)."""
    probe = subprocess.Popen(
        [sys.executable, "-c", "import cupy, sys; cupy.zeros(1); print('up', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert probe.stdout is not None
        if probe.stdout.readline().strip() != "up":
            return 0
        return _gpu_bytes_by_pid().get(probe.pid, 0)
    finally:
        probe.communicate("")


def measure(processes: int, rows: int, l1: servers.L1Choice, context: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    tables = {
        f"t{i}": (np.arange(rows, dtype=np.int64), rng.random((rows, DIM), dtype=np.float32), 1) for i in range(TABLES)
    }
    with tempfile.TemporaryDirectory(prefix="hps-bench-") as folder:
        port = servers.free_port()
        config = servers.write_served_model(
            Path(folder), port, "mem", tables, 64, l1=l1, server_options={"processes": processes}
        )
        with servers.served_process(config, port, servers.server_env(l1)) as process:
            pids = _group_pids(process.pid)
            gpu = _gpu_bytes_by_pid()
            held = [gpu.get(pid, 0) for pid in pids]
            shm = sum(path.stat().st_size for path in Path("/dev/shm").glob(f"hps{process.pid}_*"))
            return {
                "name": f"processes={processes}",
                "processes": processes,
                "rows": rows * TABLES,
                "row_bytes": rows * TABLES * DIM * 4,
                "gpu_bytes_total": sum(held),
                "gpu_processes": sum(1 for h in held if h),
                "l1_device_bytes_estimate": sum(held) - context * sum(1 for h in held if h),
                "hash_map_shared_bytes": shm,
                "host_pss_bytes": sum(_pss_bytes(pid) for pid in pids),
            }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hps bench group-memory", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--rows", type=int, default=250_000, help=f"rows of each of the {TABLES} tables (dim {DIM})")
    parser.add_argument("--l1", choices=servers.L1_CHOICES, default="gpu", help="the served L1 (as for bench lookup)")
    parser.add_argument(
        "--processes", type=lambda text: [int(n) for n in text.split(",")], default=[1, 2, 8], help="e.g. 1,2,8"
    )
    args = parser.parse_args(argv)
    context = bare_context_bytes() if servers.uses_gpu(args.l1) else 0
    results = [measure(n, args.rows, args.l1, context) for n in args.processes]
    first = results[0]
    for result in results:
        result["l1_vs_first"] = result["l1_device_bytes_estimate"] / max(1, first["l1_device_bytes_estimate"])
        result["host_pss_vs_first"] = result["host_pss_bytes"] / max(1, first["host_pss_bytes"])
    report.emit(
        f"Memory of hps serve --processes N (L1 {args.l1}); bare CUDA context {context >> 20} MiB, same run",
        results,
        args.json,
        extra={"bare_context_bytes": context},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
