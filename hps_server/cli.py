"""The `hps` command: serve, import, export, demo and bench.

It parses arguments and prints for people; the work itself lives in the modules it calls.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from hps_server import __version__
from hps_server import config as config_module

log = logging.getLogger("hps")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

BENCHMARKS = {
    "lookup": "benchmarks.lookup",
    "memory": "benchmarks.memory",
    "cache": "benchmarks.cache",
    "redis": "benchmarks.redis",
    "layers": "benchmarks.layers",
    "triton": "benchmarks.triton",
    "replicas": "benchmarks.replicas",
    "feed": "benchmarks.feed",
    "prefetch": "benchmarks.prefetch",
}


def _serve(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    if args.processes is not None:
        config = replace(config, server=replace(config.server, processes=args.processes))
    if config.server.processes > 1:
        from hps_server.supervisor import serve_workers

        return serve_workers(config, LOG_FORMAT)
    from hps_server.server import serve

    return serve(config)


def _processes(text: str) -> int:
    try:
        return config_module.processes(int(text) if text.isdigit() else text, "server.processes")
    except config_module.ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _import(args: argparse.Namespace) -> int:
    from hps_server import storage, transfer

    config = config_module.load(args.config)
    if args.to == "redis":
        if config.volatile_db.type != "redis_cluster":
            raise config_module.ConfigError(
                f"volatile_db.type: is {config.volatile_db.type}; --to redis needs redis_cluster"
            )
        level = storage.open_volatile(config.volatile_db)
    else:
        if config.persistent_db.type != "rocksdb":
            raise config_module.ConfigError(
                f"persistent_db.type: is {config.persistent_db.type}; --to rocksdb needs rocksdb"
            )
        level = storage.open_persistent(config.persistent_db)
    assert level is not None
    try:
        for model in config.models:
            if args.model not in (None, model.name):
                continue
            for table in model.tables:
                if args.table not in (None, table.name):
                    continue
                source = Path(args.source) if args.source else table.source
                if source is None:
                    print(f"{model.name}.{table.name}: no source configured, skipped (pass --source)")
                    continue
                name = model.storage_name(table)
                rows = transfer.import_table(level, name, source, table.dim)
                print(f"{name}: imported {rows} rows from {source} into {level.kind}")
    finally:
        level.close()
    return 0


def _export(args: argparse.Namespace) -> int:
    from hps_server import storage, transfer

    config = config_module.load(args.config)
    model = config.model(args.model)
    table = model.table(args.table)
    level = storage.open_persistent(config.persistent_db)
    if level is None:
        raise config_module.ConfigError("persistent_db: disabled; nothing to export from")
    try:
        rows = transfer.export_table(level, model.storage_name(table), Path(args.out), format=args.format)
    finally:
        level.close()
    print(f"{model.name}.{table.name}: exported {rows} rows to {args.out} ({args.format} format)")
    return 0


def _push(args: argparse.Namespace) -> int:
    # The trainer's side of the feed lives with the client; the CLI only reads the table folder for it.
    from hps_client.feed import UpdatePublisher
    from hps_server import tables

    config = config_module.load(args.config)
    address = config.updates.stream_address(config.volatile_db)
    if not address:
        raise config_module.ConfigError(
            "updates: no stream to push to (set updates.address, or volatile_db.type redis_cluster, and enabled)"
        )
    model = config.model(args.model) if args.model else config.models[0]
    table = model.table(args.table)
    files = tables.read_table(args.source, table.dim)
    volatile = config.volatile_db
    publisher = UpdatePublisher(
        address,
        stream=config.updates.stream,
        max_len=config.updates.max_len,
        rows_per_message=args.rows_per_message,
        username=volatile.user_name or None,
        password=volatile.password or None,
        tls=volatile.tls,
    )
    messages = 0
    with publisher:
        for keys, vectors in files.chunks(args.rows_per_message):
            messages += publisher.upsert(model.name, table.name, keys, vectors)
    print(f"{model.name}.{table.name}: pushed {files.rows} rows from {args.source} in {messages} messages")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from hps_server.demo import run_demo

    return run_demo(Path(args.dir), port=args.port, seconds=args.seconds, once=args.once)


def _bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHMARKS[args.what])
    return int(module.main(args.bench_args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hps", description="Hierarchical Parameter Server for embedding lookups.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--version", action="version", version=f"hps {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the models of a config file")
    serve.add_argument("--config", required=True, help="YAML config, or an HPS ps.json")
    serve.add_argument(
        "--processes",
        type=_processes,
        metavar="N|auto",
        help="server processes on the one port (default: server.processes of the config; auto: one per core)",
    )
    serve.set_defaults(run=_serve)

    imp = commands.add_parser("import", help="bulk-load table files into a level")
    imp.add_argument("--config", required=True)
    imp.add_argument("--model", help="only this model (default: all)")
    imp.add_argument("--table", help="only this table (default: all)")
    imp.add_argument("--source", help="table folder (HPS key/emb_vector or .npy pair); default: the config's")
    imp.add_argument(
        "--to",
        choices=["rocksdb", "redis"],
        default="rocksdb",
        help="level to load: the configured persistent_db (rocksdb) or volatile_db (redis_cluster)",
    )
    imp.set_defaults(run=_import)

    exp = commands.add_parser("export", help="write a table from the persistent level to files")
    exp.add_argument("--config", required=True)
    exp.add_argument("--model", required=True)
    exp.add_argument("--table", required=True)
    exp.add_argument("--out", required=True, help="folder to write")
    exp.add_argument("--format", choices=["hps", "npy"], default="hps")
    exp.set_defaults(run=_export)

    push = commands.add_parser("push", help="append a table folder to the update stream (the servers apply it)")
    push.add_argument("--config", required=True, help="the servers' config (its updates stream and tables)")
    push.add_argument("--model", help="model of the table (default: the config's first)")
    push.add_argument("--table", required=True)
    push.add_argument("--source", required=True, help="table folder (HPS key/emb_vector or .npy pair)")
    push.add_argument("--rows-per-message", type=int, default=4096, help="rows per stream message (default 4096)")
    push.set_defaults(run=_push)

    demo = commands.add_parser("demo", help="make a sample model, serve it, run a skewed workload, keep serving")
    demo.add_argument("--dir", default="hps-demo", help="where the sample tables and database live")
    demo.add_argument("--port", type=int, default=8500, help="port to serve on (0: any free port)")
    demo.add_argument("--seconds", type=float, default=5.0, help="length of the client workload")
    demo.add_argument("--once", action="store_true", help="exit after the workload instead of serving on")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="run a benchmark (results as ratios to a same-run baseline)")
    bench.add_argument("what", choices=sorted(BENCHMARKS))
    bench.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="options for the benchmark (every one takes --json and --help)"
    )
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        return int(args.run(args))
    except (config_module.ConfigError, KeyError, OSError, ValueError) as e:
        print(f"hps {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
