"""The `hps` command as people run it: import/export round trip, bad config, and the demo (README's first command)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml

from hps_bench.servers import free_port, wait_serving
from hps_client import Client
from hps_server import config as config_module
from hps_server import demo, logs, tables
from hps_server.cli import BENCHMARKS, build_parser, main
from hps_server.server import HpsServer
from tests.conftest import TABLE_SPECS, ServedModel, write_sample_config, write_sample_tables


def _config_file(directory: Path, with_sources: bool) -> Path:
    document = {
        "persistent_db": {"path": "db"},
        "models": [
            {
                "name": "ctr",
                "tables": [
                    {"name": name, "dim": dim, **({"source": name} if with_sources else {})}
                    for name, (_, dim, _) in TABLE_SPECS.items()
                ],
            }
        ],
    }
    path = directory / "hps.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_import_then_export_round_trip(tmp_path: Path, capsys) -> None:
    truth = write_sample_tables(tmp_path)
    config = _config_file(tmp_path, with_sources=True)
    assert main(["import", "--config", str(config)]) == 0
    assert "ctr.user: imported 5000 rows" in capsys.readouterr().out
    out = tmp_path / "exported"
    assert main(["export", "--config", str(config), "--model", "ctr", "--table", "item", "--out", str(out)]) == 0
    exported = tables.read_table(out, TABLE_SPECS["item"][1])
    keys, vectors = (np.concatenate(parts) for parts in zip(*exported.chunks(1000), strict=True))
    order = np.argsort(keys)
    expected_keys, expected_vectors = truth["item"]
    expected_order = np.argsort(expected_keys)
    np.testing.assert_array_equal(keys[order], expected_keys[expected_order])
    np.testing.assert_array_equal(vectors[order], expected_vectors[expected_order])


def test_an_import_of_table_files_that_do_not_read_names_the_folder_not_its_path(tmp_path: Path, capsys) -> None:
    write_sample_tables(tmp_path)
    config = _config_file(tmp_path, with_sources=True)
    (tmp_path / "plain_file").write_text("not a table folder")
    for source, problem in (("missing_folder", "table folder does not exist"), ("plain_file", "not a folder")):
        command = ["import", "--config", str(config), "--model", "ctr", "--table", "user"]
        assert main([*command, "--source", str(tmp_path / source)]) == 2
        err = capsys.readouterr().err
        assert f"hps import: error: {source}: {problem}" in err
        assert str(tmp_path) not in err


def test_bad_config_is_one_clear_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "hps.yaml"
    path.write_text("models:\n  - name: m\n    tables: [{name: t, dim: -1}]\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "models[0].tables[0].dim: must be >= 1, got -1" in capsys.readouterr().err


def _demo(directory: Path, seconds: float) -> subprocess.CompletedProcess[str]:
    command = ["demo", "--once", "--port", "0", "--seconds", str(seconds), "--dir", str(directory)]
    return subprocess.run(
        [sys.executable, "-m", "hps_server.cli", *command], capture_output=True, text=True, timeout=600
    )


def test_demo_once_serves_the_sample_model_and_prints_its_summary(tmp_path: Path) -> None:
    result = _demo(tmp_path / "demo", seconds=2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "this first start ingests the sample tables" in result.stdout
    assert "wrong vectors: 0" in result.stdout
    for level in ("hash_map", "rocksdb", "user_id", "p99"):
        assert level in result.stdout
    # A second start finds the tables in RocksDB and says nothing of ingesting; a workload that got no reply
    # says why instead of failing in its summary.
    again = _demo(tmp_path / "demo", seconds=0)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "ingests" not in again.stdout
    assert "workload: no replies in" in again.stdout and "--seconds ran out before a request" in again.stdout
    assert "Traceback" not in again.stderr


def test_demo_workload_refused_by_the_server_says_why(served: ServedModel, capsys) -> None:
    """The served model is not the demo's: every request is refused, and the summary names the error."""
    result = demo.run_workload(served.target, seconds=0.5)
    assert len(result.latencies_ms) == 0
    assert result.error is not None and result.error.startswith("NotFoundError")
    demo.print_summary(served.server, result)
    out = capsys.readouterr().out
    assert f"workload: no replies in {result.seconds:.1f} s (every request failed, the first with NotFoundError" in out
    assert demo.MODEL in out


def test_log_level_is_checked_with_a_message(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--log-level", "loud", "demo"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --log-level: invalid choice: 'LOUD' (choose from 'DEBUG', 'INFO', 'WARNING', 'ERROR'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "--model", "zz", "--table", "user", "--out", "x"], "no model 'zz' in the config; its models: ctr"),
        (
            ["export", "--model", "ctr", "--table", "zz", "--out", "x"],
            "model ctr has no table 'zz'; its tables: user, item",
        ),
        (["import", "--model", "zz"], "no model 'zz' in the config; its models: ctr"),
        (["import", "--model", "ctr", "--table", "zz"], "model ctr has no table 'zz'; its tables: user, item"),
        (["import", "--table", "zz"], "no model has a table 'zz'; the tables: user, item"),
    ],
)
def test_unknown_model_or_table_names_what_exists(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    config = _config_file(tmp_path, with_sources=False)
    assert main([argv[0], "--config", str(config), *argv[1:]]) == 2
    assert capsys.readouterr().err.strip() == f"hps {argv[0]}: error: {message}"


def test_bench_help_lists_the_benchmarks(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for name, (_, summary) in BENCHMARKS.items():
        assert f"  {name:<8} {summary}" in out


def test_every_option_has_a_description() -> None:
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in [("hps", parser), *subcommands.choices.items()]:
        assert command.description, name
        for action in command._actions:
            assert action.help, f"{name} {action.dest}"


def test_serve_address_must_be_host_and_port(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(_config_file(tmp_path, with_sources=False)), "--address", "8500"])
    assert "argument --address: must be HOST:PORT with a port from 0 to 65535, got '8500'" in capsys.readouterr().err


def test_serve_address_overrides_the_config_and_json_logs_are_json_lines(tmp_path: Path) -> None:
    """`--address` wins over server.address; with `--log-format json` every stderr line is one JSON object, and
    the config's password is in none of them; nor is a file path in the warning NumPy gives as a float16
    reply overflows to inf."""
    password = "pa55-not-for-logs"
    config, _ = write_sample_config(tmp_path, "127.0.0.1:1")  # a port the server could not bind
    document = yaml.safe_load(config.read_text())
    document["volatile_db"]["password"] = password
    config.write_text(yaml.safe_dump(document))
    port = free_port()
    command = [sys.executable, "-m", "hps_server.cli", "--log-format", "json", "serve", "--config", str(config)]
    process = subprocess.Popen([*command, "--address", f"127.0.0.1:{port}"], stderr=subprocess.PIPE)
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        with Client(f"127.0.0.1:{port}") as client:
            client.upsert("ctr", "user", [77], np.full((1, 16), 1e6, np.float32))
            assert np.isinf(client.lookup("ctr", "user", [77], dtype="float16")).all()
    finally:
        process.send_signal(signal.SIGTERM)
        err = process.communicate(timeout=60)[1].decode()
    assert process.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines()]
    assert records and all(set(r) == {"time", "level", "logger", "message"} for r in records)
    assert any(r["level"] == "INFO" and f"serving ctr on port {port}" in r["message"] for r in records), err
    assert any(r["message"] == "RuntimeWarning: overflow encountered in cast" for r in records), err
    assert password not in err and ".py" not in err


def test_a_workers_log_lines_carry_its_index() -> None:
    record = logging.LogRecord("hps_server.server", logging.INFO, __file__, 1, "serving %s", ("ctr",), None)
    assert json.loads(logs.JsonFormatter(worker=3).format(record))["worker"] == 3
    assert "worker" not in json.loads(logs.JsonFormatter().format(record))


@pytest.mark.parametrize("policy", ["evict_random", "evict_oldest"])
def test_import_to_redis(tmp_path: Path, capsys, redis_cluster_processes, policy: str) -> None:
    """`hps import --to redis` bulk-loads the tables into the configured Redis Cluster, with HPS's `}t`
    access time for every row under both overflow policies (HPS's eviction and dumps read it)."""
    from hps_server.config import VolatileDbConfig
    from hps_server.storage.redis_cluster import RedisClusterLevel, hash_name

    redis_cluster_processes.flush()
    truth = write_sample_tables(tmp_path)
    config = _config_file(tmp_path, with_sources=True)
    document = yaml.safe_load(config.read_text())
    document["volatile_db"] = {
        "type": "redis_cluster",
        "address": redis_cluster_processes.seed,
        "timeout_ms": 2000,
        "overflow_policy": policy,
    }
    config.write_text(yaml.safe_dump(document))
    assert main(["import", "--config", str(config), "--to", "redis"]) == 0
    assert "ctr.user: imported 5000 rows from" in capsys.readouterr().out
    level = RedisClusterLevel.from_config(VolatileDbConfig(address=redis_cluster_processes.seed, timeout_ms=2000))
    host, port = redis_cluster_processes.seed.split(":")
    client = redis.RedisCluster(host=host, port=int(port))
    try:
        for name, (rows, dim, _) in TABLE_SPECS.items():
            level.create_table(f"ctr.{name}", dim)
            keys, vectors = truth[name]
            assert level.size(f"ctr.{name}") == rows
            got, found = level.fetch(f"ctr.{name}", keys)
            assert found.all()
            np.testing.assert_array_equal(got, vectors)
            for p in range(level.num_partitions):
                values = client.hkeys(hash_name(f"ctr.{name}", p, "v"))
                times = client.hgetall(hash_name(f"ctr.{name}", p, "t"))
                assert values and set(values) == set(times)
                assert min(np.frombuffer(b"".join(times.values()), "<i8")) > 10**15  # microseconds
    finally:
        client.close()
        level.close()


def test_serve_with_a_wrong_redis_password_is_one_clear_error(tmp_path: Path, capsys, redis_cluster_acl) -> None:
    write_sample_tables(tmp_path)
    config = _config_file(tmp_path, with_sources=True)
    document = yaml.safe_load(config.read_text())
    document["server"] = {"address": "127.0.0.1:0"}
    document["volatile_db"] = {
        "type": "redis_cluster",
        "address": redis_cluster_acl.seed,
        "user_name": redis_cluster_acl.user,
        "password": "not-the-password",
        "timeout_ms": 2000,
    }
    config.write_text(yaml.safe_dump(document))
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "volatile_db.user_name/password" in err and redis_cluster_acl.user in err


def test_serve_processes_must_be_a_count_or_auto(tmp_path: Path, capsys) -> None:
    config = _config_file(tmp_path, with_sources=False)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--config", str(config), "--processes", "0"])
    assert exited.value.code == 2
    assert "argument --processes: server.processes: must be an integer >= 1 or auto, got 0" in capsys.readouterr().err


def test_readme_grpcurl_lookup_asks_for_a_key_the_demo_holds_and_one_it_does_not() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    request = json.loads(re.search(r"grpcurl -plaintext -d '(.*?)' ", readme, re.DOTALL)[1])
    assert request["model"] == demo.MODEL
    (query,) = request["queries"]
    (table,) = (t for t in demo.SAMPLE_TABLES if t.name == query["table"])
    held = np.isin(np.array([int(k) for k in query["key_list"]]), demo.sample_keys(table))
    assert held.tolist() == [True, False]
    assert f'"dim": {table.dim}' in readme and '"found": "AQA="' in readme


def test_an_import_of_one_folder_into_several_tables_is_refused_and_changes_nothing(tmp_path: Path, capsys) -> None:
    truth = write_sample_tables(tmp_path)
    config = _config_file(tmp_path, with_sources=True)
    assert main(["import", "--config", str(config)]) == 0
    capsys.readouterr()
    for scope in ([], ["--model", "ctr"]):  # the sample model has two tables
        assert main(["import", "--config", str(config), *scope, "--source", str(tmp_path / "item")]) == 2
        assert "--source: is one table's folder; name the table with --model and --table" in capsys.readouterr().err
    out = tmp_path / "exported"
    assert main(["export", "--config", str(config), "--model", "ctr", "--table", "user", "--out", str(out)]) == 0
    keys = np.concatenate([k for k, _ in tables.read_table(out, TABLE_SPECS["user"][1]).chunks(10_000)])
    np.testing.assert_array_equal(np.sort(keys), np.sort(truth["user"][0]))  # the user table kept its rows


def test_beside_a_running_server_export_reads_and_import_says_a_server_holds_the_database(
    tmp_path: Path, capsys
) -> None:
    truth = write_sample_tables(tmp_path)
    config_path = _config_file(tmp_path, with_sources=True)
    server = HpsServer(config_module.load(config_path))  # ingests the sources and holds RocksDB read-write
    server.start()
    try:
        assert server.wait_ready(30)
        out = tmp_path / "exported"
        assert (
            main(["export", "--config", str(config_path), "--model", "ctr", "--table", "user", "--out", str(out)]) == 0
        )
        keys = np.concatenate([k for k, _ in tables.read_table(out, TABLE_SPECS["user"][1]).chunks(10_000)])
        np.testing.assert_array_equal(np.sort(keys), np.sort(truth["user"][0]))
        capsys.readouterr()
        assert main(["import", "--config", str(config_path), "--model", "ctr", "--table", "user"]) == 2
        err = capsys.readouterr().err
        assert "is held by another opener (a running hps serve?)" in err
        assert str(tmp_path) not in err
    finally:
        server.stop(grace=1)


def test_a_bad_table_file_of_an_import_names_the_table_and_the_file(tmp_path: Path, capsys) -> None:
    write_sample_tables(tmp_path)
    config = _config_file(tmp_path, with_sources=True)
    keys, vectors = np.array([1, 2, 2], np.int64), np.zeros((3, TABLE_SPECS["item"][1]), np.float32)
    (tmp_path / "item").rename(tmp_path / "item_old")
    tables.write_table(tmp_path / "item", [(keys, vectors)], TABLE_SPECS["item"][1])
    assert main(["import", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert (
        "hps import: error: item/key: 1 duplicate key rows (1 distinct keys repeat), e.g. key 2 (table ctr.item)" in err
    )
    assert str(tmp_path) not in err


def test_a_benchmark_whose_extras_are_missing_still_says_what_it_measures(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    def missing(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}", name="tritonclient")

    monkeypatch.setattr("hps_server.cli.importlib.import_module", missing)
    assert main(["bench", "triton", "--help"]) == 0
    out, err = capsys.readouterr()
    assert out == f"hps bench triton: {BENCHMARKS['triton'][1]}\n"
    assert "needs the module tritonclient" in err
    assert main(["bench", "triton"]) == 2
