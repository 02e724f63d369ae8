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

from hps_server import __version__, logs
from hps_server import config as config_module
from hps_server.stop_signals import StartInterrupted, ignore_stop_signals
from hps_server.storage.base import StorageError
from hps_server.tables import TableFileError

log = logging.getLogger("hps")

# name -> (module, what it measures); `hps bench --help` lists them without importing any.
BENCHMARKS = {
    "lookup": ("hps_bench.lookup", "Client.lookup_tables through hps serve, against a raw gRPC echo of the same bytes"),
    "memory": ("hps_bench.memory", "the in-process hash map's bytes per row and speed, against a NumPy gather"),
    "group-memory": ("hps_bench.group_memory", "GPU and host memory of hps serve --processes N, for several N"),
    "processes": (
        "hps_bench.processes",
        "case d of lookup against hps serve --processes N for several N, beside an echo",
    ),
    "connections": (
        "hps_bench.connections",
        "p50/p99 and refusals with 100 vs 500 concurrent connections",
    ),
    "faults": (
        "hps_bench.faults",
        "Redis killed, restored, frozen and resharded under load: wrong and failed calls",
    ),
    "reload": (
        "hps_bench.reload",
        "p99 while a model is reloaded to new versions under load; failed and mixed replies",
    ),
    "replicas": ("hps_bench.replicas", "time until a second replica answers an upserted vector; stale answers"),
    "feed": ("hps_bench.feed", "update-stream rows applied per second against a plain XREAD of the same stream"),
    "prefetch": ("hps_bench.prefetch", "a lookup's p99 beside another client's prefetches; cold lookups prefetched"),
    "cache": ("hps_bench.cache", "the GPU L1 cache's query/replace speed and Zipf hit rate (needs CuPy and a GPU)"),
    "redis": ("hps_bench.redis", "the Redis Cluster level's fetch rows/s, against plain redis-py on the same cluster"),
    "layers": ("hps_bench.layers", "the TensorFlow and PyTorch layers' overhead over the Client call they make"),
    "triton": ("hps_bench.triton", "a DLRM workload through Triton's ensemble, against the client path in-process"),
}
# Top-level packages of hps itself: a missing module outside them is an optional dependency not installed.
OWN_PACKAGES = {"hps_server", "hps_client", "hps_wire", "hps_bench"}


def _serve(args: argparse.Namespace) -> int:
    config = config_module.load(args.config)
    if args.address is not None:
        config = replace(config, server=replace(config.server, address=args.address))
    if args.processes is not None:
        config = replace(config, server=replace(config.server, processes=args.processes))
    try:
        if config.server.processes > 1:
            from hps_server.supervisor import serve_workers

            return serve_workers(config, args.log_format)
        from hps_server.server import serve

        return serve(config, config_path=Path(args.config))
    finally:
        ignore_stop_signals()


def _processes(text: str) -> int:
    try:
        return config_module.processes(int(text) if text.isdigit() else text, "server.processes")
    except config_module.ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port from 0 to 65535, got {text!r}")
    return text


def _version(text: str) -> str:
    try:
        return config_module.version(text, "--version")
    except config_module.ConfigError as e:  # argparse names the option itself
        raise argparse.ArgumentTypeError(str(e).removeprefix("--version: ")) from None


def _import(args: argparse.Namespace) -> int:
    from hps_server import storage, transfer

    config = config_module.load(args.config)
    _check_names(config, args.model, args.table)
    if args.source is not None:
        selected = [m for m in config.models if args.model in (None, m.name)]
        if len(selected) != 1 or (args.table is None and len(selected[0].tables) != 1):
            # One folder holds one table's rows: imported into several tables it would replace them all.
            raise config_module.ConfigError("--source: is one table's folder; name the table with --model and --table")
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
                if args.version is not None:
                    table = replace(table, version=args.version)
                name = model.storage_name(table)
                rows = transfer.import_table(level, name, source, table.dim)
                print(f"{name}: imported {rows} rows from {source} into {level.kind}")
    finally:
        level.close()
    return 0


def _check_names(config: config_module.Config, model: str | None, table: str | None) -> None:
    """UnknownNameError listing what exists when --model or --table names nothing in the config."""
    models = config.models if model is None else (config.model(model),)
    if table is None or any(table in {t.name for t in m.tables} for m in models):
        return
    if model is not None:
        models[0].table(table)
    tables = ", ".join(dict.fromkeys(t.name for m in models for t in m.tables)) or "none"
    raise config_module.UnknownNameError(f"no model has a table {table!r}; the tables: {tables}")


def _export(args: argparse.Namespace) -> int:
    from hps_server import storage, transfer

    config = config_module.load(args.config)
    model = config.model(args.model)
    table = model.table(args.table)
    # Read-only: an export reads, so it works beside a server holding the database.
    level = storage.open_persistent(replace(config.persistent_db, read_only=True))
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
    try:
        module = importlib.import_module(BENCHMARKS[args.what][0])
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] in OWN_PACKAGES:
            raise
        print(
            f"hps bench {args.what}: needs the module {e.name}, which is not installed "
            "(the bench, tf and torch extras hold what the benchmarks use)",
            file=sys.stderr,
        )
        if {"-h", "--help"} & set(args.bench_args):  # what it measures is still said
            print(f"hps bench {args.what}: {BENCHMARKS[args.what][1]}")
            return 0
        return 2
    return int(module.main(args.bench_args) or 0)


def _command(
    commands: argparse._SubParsersAction, name: str, summary: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with the same summary `hps --help` lists (the epilog as written)."""
    description = summary[0].upper() + summary[1:] + "."
    return commands.add_parser(
        name, help=summary, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hps", description="Hierarchical Parameter Server for embedding lookups.")
    parser.add_argument(
        "--log-level", type=str.upper, choices=logs.LOG_LEVELS, default="INFO", help="log level (default INFO)"
    )
    parser.add_argument(
        "--log-format",
        choices=logs.LOG_FORMATS,
        default="text",
        help="text lines, or json: one JSON object per line (time, level, logger, message) (default text)",
    )
    parser.add_argument("--version", action="version", version=f"hps {__version__}", help="print the version and exit")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of these (`hps COMMAND --help` for its options):"
    )

    serve = _command(commands, "serve", "serve the models of a config file")
    serve.add_argument("--config", required=True, help="YAML config, or an HPS ps.json")
    serve.add_argument(
        "--address",
        type=_address,
        metavar="HOST:PORT",
        help="where gRPC listens (default: server.address of the config, else 127.0.0.1:8500)",
    )
    serve.add_argument(
        "--processes",
        type=_processes,
        metavar="N|auto",
        help="server processes on the one port (default: server.processes of the config; auto: one per usable core)",
    )
    serve.set_defaults(run=_serve)

    imp = _command(commands, "import", "bulk-load table files into a level")
    imp.add_argument("--config", required=True, help="YAML config, or an HPS ps.json, naming the models and levels")
    imp.add_argument("--model", help="only this model (default: all)")
    imp.add_argument("--table", help="only this table (default: all)")
    imp.add_argument("--source", help="table folder (HPS key/emb_vector or .npy pair); default: the config's")
    imp.add_argument(
        "--to",
        choices=["rocksdb", "redis"],
        default="rocksdb",
        help="level to load: the configured persistent_db (rocksdb) or volatile_db (redis_cluster)",
    )
    imp.add_argument(
        "--version",
        type=_version,
        help="write this version of the tables, next to the one served (ReloadModel or the config's `version` "
        "switches to it); default: the config's version of each table",
    )
    imp.set_defaults(run=_import)

    exp = _command(commands, "export", "write a table from the persistent level to files")
    exp.add_argument("--config", required=True, help="YAML config, or an HPS ps.json, naming the persistent level")
    exp.add_argument("--model", required=True, help="the table's model")
    exp.add_argument("--table", required=True, help="the table to write")
    exp.add_argument("--out", required=True, help="folder to write")
    exp.add_argument(
        "--format",
        choices=["hps", "npy"],
        default="hps",
        help="hps: key + emb_vector files; npy: keys.npy + vectors.npy",
    )
    exp.set_defaults(run=_export)

    push = _command(commands, "push", "append a table folder to the update stream (the servers apply it)")
    push.add_argument("--config", required=True, help="the servers' config (its updates stream and tables)")
    push.add_argument("--model", help="model of the table (default: the config's first)")
    push.add_argument("--table", required=True, help="the table the rows belong to")
    push.add_argument("--source", required=True, help="table folder (HPS key/emb_vector or .npy pair)")
    push.add_argument("--rows-per-message", type=int, default=4096, help="rows per stream message (default 4096)")
    push.set_defaults(run=_push)

    demo = _command(commands, "demo", "make a sample model, serve it, run a skewed workload, keep serving")
    demo.add_argument("--dir", default="hps-demo", help="where the sample tables and database live")
    demo.add_argument("--port", type=int, default=8500, help="port to serve on (0: any free port)")
    demo.add_argument("--seconds", type=float, default=5.0, help="length of the client workload")
    demo.add_argument("--once", action="store_true", help="exit after the workload instead of serving on")
    demo.set_defaults(run=_demo)

    listing = "\n".join(f"  {name:<8} {summary}" for name, (_, summary) in BENCHMARKS.items())
    bench = _command(
        commands,
        "bench",
        "run a benchmark (results as ratios to a same-run baseline)",
        epilog=f"benchmarks:\n{listing}\n\n`hps bench NAME --help` shows a benchmark's own options.",
    )
    bench.add_argument("what", choices=list(BENCHMARKS), metavar="NAME", help="the benchmark: " + ", ".join(BENCHMARKS))
    bench.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="options for the benchmark (every one takes --json and --help)"
    )
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        return int(args.run(args))
    except StartInterrupted as e:  # asked to stop before serving: not an error
        log.info("%s", e)
        return 0
    except (config_module.ConfigError, KeyError, OSError, ValueError, StorageError) as e:
        # A table file's error names the file, not its path: what `hps serve` prints is a server's log.
        message = e.without_path() if isinstance(e, TableFileError) else str(e)
        if args.log_format == "json":  # stderr stays all JSON lines
            log.error("hps %s: error: %s", args.command, message)
        else:
            print(f"hps {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
