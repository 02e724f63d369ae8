"""`hps bench processes`: what more server processes buy. Case d of `hps bench lookup` (1,024 samples x 26
tables, dim 128, from client processes) against `hps serve --processes N` for each N asked, in one run.

Each N gets its own server and client processes; one raw-bytes gRPC echo (one process) serves them all as
the same-run baseline, its blocks alternating with the server's, so each N's figure is also given as a
ratio to the echo, and the gain over the first N both raw and normalized by the echo (machine noise
cancels). Every 10th reply is checked against the true rows. It asserts no speed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from hps_bench import echo_server, lookup, report, servers
from hps_client.client import LOOKUP_METHOD
from hps_wire._proto import hps_pb2


def _measure(
    count: int, scale: float, rows: int, l1: servers.L1Choice, clients: int, echo_target: str
) -> dict[str, Any]:
    tables = lookup._tables(rows)
    case = lookup._process_case(scale)
    with tempfile.TemporaryDirectory(prefix="hps-bench-") as tmp:
        port = servers.free_port()
        served = {name: (t.keys, t.vectors, t.max_keys_per_sample) for name, t in tables.items()}
        config = servers.write_served_model(
            Path(tmp), port, lookup.MODEL, served, 1024, l1=l1, server_options={"processes": count}
        )
        with (
            servers.hps_server(config, port, servers.server_env(l1)) as target,
            grpc.insecure_channel(target, options=echo_server.OPTIONS) as raw_channel,
        ):
            raw_lookup = raw_channel.unary_unary(
                LOOKUP_METHOD, request_serializer=hps_pb2.LookupRequest.SerializeToString
            )
            sample = lookup._batches(tables, case.shape, np.random.default_rng([lookup.SEED, 999]))[0]
            sizes = lookup._sizes(raw_lookup, sample, "float32")
            with lookup.client_processes(clients, (target, echo_target), servers.Credentials(), rows) as pool:
                for path in ("hps", "echo"):  # warm every client's connections and both paths
                    pool.run(lookup.Block(path, "float32", 2, clients, sizes))
                hps, echo = lookup.Tally(), lookup.Tally()
                for _ in range(lookup.ROUNDS):
                    hps.add(pool.run(lookup.Block("hps", "float32", case.calls, clients, sizes)))
                    echo.add(pool.run(lookup.Block("echo", "float32", case.calls, clients, sizes)))
    return {
        "name": f"processes={count}",
        "processes": count,
        "clients": clients,
        "hps_samples_per_s": case.samples * hps.calls_per_s(),
        "echo_samples_per_s": case.samples * echo.calls_per_s(),
        "hps_over_echo": hps.calls_per_s() / echo.calls_per_s(),
        "hps_p50_ms": hps.ms(50),
        "hps_p99_ms": hps.ms(99),
        "checked_vectors": hps.checked,
        "wrong_vectors": hps.wrong,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hps bench processes", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of calls")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of each large table (the 26 small: 1/25)")
    parser.add_argument("--l1", choices=servers.L1_CHOICES, default="cpu", help="the served L1 (as for bench lookup)")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument(
        "--processes", type=lambda text: [int(n) for n in text.split(",")], default=[1, 2], help="e.g. 1,2,8"
    )
    args = parser.parse_args(argv)
    with servers.echo_server() as echo_target:
        results = [_measure(n, args.scale, args.rows, args.l1, args.clients, echo_target) for n in args.processes]
    first = results[0]
    for result in results:
        result["samples_vs_first"] = result["hps_samples_per_s"] / first["hps_samples_per_s"]
        result["normalized_vs_first"] = result["hps_over_echo"] / first["hps_over_echo"]
    report.emit(
        f"hps serve --processes N, case d (1,024 x 26 tables, dim 128) from {args.clients} client processes, "
        "beside one same-run echo",
        results,
        args.json,
        extra={"wrong_vectors": sum(r["wrong_vectors"] for r in results)},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
