"""Model lifecycle over real servers: LoadModel, UnloadModel, ReloadModel to new table versions, SIGHUP, the
admin gate, `hps import --version`, and reloads under concurrent lookups (no failures, no mixed replies)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hps_bench.servers import free_port, wait_serving
from hps_client import AlreadyExistsError, Client, InvalidArgumentError
from hps_server import config as config_module
from hps_server import storage, tables, transfer
from hps_server.cli import main
from hps_server.config import TableConfig
from hps_server.handover import Handover, ModelChangingError
from hps_server.server import HpsServer
from hps_server.session import LookupSession
from hps_wire._proto import hps_pb2, hps_pb2_grpc
from tests.conftest import ServedModel, sample_raw_config, serve_command, write_sample_tables


@dataclass
class Admin:
    server: HpsServer
    models: hps_pb2_grpc.ModelServiceStub
    lookups: hps_pb2_grpc.LookupServiceStub
    truth: dict[str, tuple[np.ndarray, np.ndarray]]
    directory: Path
    target: str

    def vectors(self, model: str, table: str, keys: np.ndarray) -> np.ndarray:
        query = hps_pb2.TableQuery(table=table, keys=keys.astype("<i8").tobytes())
        reply = self.lookups.Lookup(hps_pb2.LookupRequest(model=model, queries=[query]), timeout=10)
        return np.frombuffer(reply.results[0].vectors, "<f4").reshape(len(keys), -1)


def _import(config: config_module.Config, name: str, keys: np.ndarray, vectors: np.ndarray, folder: Path) -> None:
    """Writes table files and imports them as storage table `name` while no server holds the database."""
    tables.write_table(folder, [(keys, vectors)], vectors.shape[1])
    level = storage.open_persistent(config.persistent_db)
    assert level is not None
    try:
        transfer.import_table(level, name, folder, vectors.shape[1], progress=False)
    finally:
        level.close()


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    """The sample model on a server with server.admin on; `ctr.user@v2` (the user rows + 100) and a `bad`
    version of user with another dim are in RocksDB beside the served rows."""
    truth = write_sample_tables(tmp_path)
    raw = sample_raw_config()
    raw["server"]["admin"] = True
    config = config_module.parse(raw, tmp_path)
    keys, vectors = truth["user"]
    _import(config, "ctr.user@v2", keys, vectors + 100, tmp_path / "user_v2")
    _import(config, "ctr.user@bad", keys, vectors[:, :4], tmp_path / "user_bad")
    server = HpsServer(config)
    port = server.start()
    assert server.wait_ready(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Admin(
            server,
            hps_pb2_grpc.ModelServiceStub(channel),
            hps_pb2_grpc.LookupServiceStub(channel),
            truth,
            tmp_path,
            f"127.0.0.1:{port}",
        )
    finally:
        channel.close()
        server.stop(grace=1)


def _refused(call, request, code: grpc.StatusCode) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as refused:
        call(request, timeout=10)
    assert refused.value.code() == code, refused.value.details()
    return refused.value.details()


def test_admin_calls_are_off_by_default(served: ServedModel) -> None:
    with grpc.insecure_channel(served.target) as channel:
        models = hps_pb2_grpc.ModelServiceStub(channel)
        for call, request in (
            (models.LoadModel, hps_pb2.LoadModelRequest(model_config="name: x")),
            (models.UnloadModel, hps_pb2.UnloadModelRequest(model="ctr")),
            (models.ReloadModel, hps_pb2.ReloadModelRequest(model="ctr", version="v2")),
        ):
            assert "server.admin: true" in _refused(call, request, grpc.StatusCode.PERMISSION_DENIED)
        assert list(models.ListModels(hps_pb2.ListModelsRequest()).models) == ["ctr"]


def test_load_model_takes_a_ps_json_model_entry(admin: Admin) -> None:
    keys, vectors = admin.truth["item"]
    entry = {
        "model": "from_hps",
        "sparse_files": [str(admin.directory / "item")],
        "embedding_vecsize_per_table": [8],
        "embedding_table_names": ["t"],
        "maxnum_catfeature_query_per_table_per_sample": [2],
        "max_batch_size": 8,
        "gpucache": False,
        "dense_file": "kept.model",
    }
    with Client(admin.target) as client:
        described = client.load_model(json.dumps(entry))
        assert (described.name, described.tables[0].name, described.tables[0].rows) == ("from_hps", "t", len(keys))
        np.testing.assert_array_equal(client.lookup("from_hps", "t", keys[:8]), vectors[:8])
        bad = {**entry, "model": "broken", "embedding_vecsize_per_table": [8, 8]}
        with pytest.raises(InvalidArgumentError, match=r"model_config.embedding_vecsize_per_table: has 2 entries"):
            client.load_model(json.dumps(bad))


def test_load_model_serves_it_and_unload_makes_it_not_found(admin: Admin) -> None:
    keys, vectors = admin.truth["item"]
    entry = {
        "name": "fresh",
        "max_batch_size": 8,
        "tables": [{"name": "t", "dim": 8, "source": str(admin.directory / "item")}],
    }
    described = admin.models.LoadModel(hps_pb2.LoadModelRequest(model_config=yaml.safe_dump(entry))).model
    assert (described.model, described.tables[0].rows) == ("fresh", len(keys))
    np.testing.assert_array_equal(admin.vectors("fresh", "t", keys[:8]), vectors[:8])
    assert list(admin.models.ListModels(hps_pb2.ListModelsRequest()).models) == ["ctr", "fresh"]
    with Client(admin.target) as client, pytest.raises(AlreadyExistsError, match="fresh"):
        client.load_model(entry)
    bad = {"name": "broken", "tables": [{"name": "t", "dim": 0}]}
    details = _refused(
        admin.models.LoadModel,
        hps_pb2.LoadModelRequest(model_config=yaml.safe_dump(bad)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "model_config.tables[0].dim" in details

    admin.models.UnloadModel(hps_pb2.UnloadModelRequest(model="fresh"))
    request = hps_pb2.LookupRequest(model="fresh", queries=[hps_pb2.TableQuery(table="t", key_list=[1])])
    assert "fresh" in _refused(admin.lookups.Lookup, request, grpc.StatusCode.NOT_FOUND)
    _refused(admin.models.DescribeModel, hps_pb2.DescribeModelRequest(model="fresh"), grpc.StatusCode.NOT_FOUND)
    _refused(admin.models.UnloadModel, hps_pb2.UnloadModelRequest(model="fresh"), grpc.StatusCode.NOT_FOUND)
    np.testing.assert_array_equal(admin.vectors("ctr", "item", keys[:8]), vectors[:8])


def _retired(server: HpsServer) -> None:
    for thread in list(server.models._retiring):
        thread.join(timeout=30)


def test_reload_to_a_new_version_serves_it_describes_it_and_drops_the_old(admin: Admin) -> None:
    keys, vectors = admin.truth["user"]
    before = admin.models.DescribeModel(hps_pb2.DescribeModelRequest(model="ctr"))
    assert (before.version, dict(before.table_versions)) == ("", {})

    with Client(admin.target) as client:
        reloaded = client.reload_model("ctr", table_versions={"user": "v2"})
    assert dict(reloaded.table_versions) == {"user": "v2"}
    assert reloaded.tables[0].rows == len(keys)
    np.testing.assert_array_equal(admin.vectors("ctr", "user", keys[:16]), vectors[:16] + 100)
    item_keys, item_vectors = admin.truth["item"]
    np.testing.assert_array_equal(admin.vectors("ctr", "item", item_keys[:16]), item_vectors[:16])
    described = admin.models.DescribeModel(hps_pb2.DescribeModelRequest(model="ctr"))
    assert (described.version, dict(described.table_versions)) == ("", {"user": "v2"})
    # The unversioned user rows were served by nobody once the old session's last request was done.
    _retired(admin.server)
    persistent = admin.server.models.persistent
    assert persistent is not None
    assert "ctr.user" not in persistent.tables()
    assert {"ctr.user@v2", "ctr.item"} <= set(persistent.tables())


def test_a_reload_back_before_the_old_version_is_dropped_keeps_it_served(admin: Admin) -> None:
    keys, vectors = admin.truth["user"]
    models = admin.server.models
    unversioned = models.sessions["ctr"].model
    with models.serving("ctr"):  # a request still on the unversioned rows across both reloads
        models.reload("ctr", {"user": "v2"})
        models.reload("ctr", model=unversioned)
    _retired(admin.server)
    # The first reload's drop of ctr.user came once its last request was done: it is served again by then.
    np.testing.assert_array_equal(admin.vectors("ctr", "user", keys[:16]), vectors[:16])
    persistent = admin.server.models.persistent
    assert persistent is not None and persistent.size("ctr.user") == len(keys)
    assert "ctr.user@v2" not in persistent.tables()


def test_a_failed_reload_leaves_the_old_version_served(admin: Admin) -> None:
    keys, vectors = admin.truth["user"]
    missing = _refused(
        admin.models.ReloadModel,
        hps_pb2.ReloadModelRequest(model="ctr", version="v9"),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "no version v9" in missing and "hps import" in missing
    wrong_dim = _refused(
        admin.models.ReloadModel,
        hps_pb2.ReloadModelRequest(model="ctr", table_versions={"user": "bad"}),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "dim" in wrong_dim
    assert "table_versions" in _refused(
        admin.models.ReloadModel,
        hps_pb2.ReloadModelRequest(model="ctr", table_versions={"user": "a/b"}),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "nope" in _refused(
        admin.models.ReloadModel,
        hps_pb2.ReloadModelRequest(model="ctr", table_versions={"nope": "v2"}),
        grpc.StatusCode.NOT_FOUND,
    )
    np.testing.assert_array_equal(admin.vectors("ctr", "user", keys[:16]), vectors[:16])
    assert dict(admin.models.DescribeModel(hps_pb2.DescribeModelRequest(model="ctr")).table_versions) == {}
    persistent = admin.server.models.persistent
    assert persistent is not None and persistent.size("ctr.user") == len(keys)


def test_admin_calls_are_refused_with_several_processes(tmp_path: Path) -> None:
    write_sample_tables(tmp_path)
    raw = sample_raw_config()
    raw["server"]["admin"] = True
    config = config_module.parse(raw, tmp_path)
    # The worker's view of a group: one HpsServer of a config that says several processes.
    server = HpsServer(replace(config, server=replace(config.server, processes=2)))
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            details = _refused(
                hps_pb2_grpc.ModelServiceStub(channel).ReloadModel,
                hps_pb2.ReloadModelRequest(model="ctr"),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        assert "server.processes 2" in details
    finally:
        server.stop(grace=1)


def test_reloads_under_concurrent_lookups_fail_nothing_and_never_mix_versions(tmp_path: Path) -> None:
    """Each version's vectors hold its number: a reply over both tables with two values mixed versions."""
    truth = write_sample_tables(tmp_path)
    raw = sample_raw_config(initial_cache_rate=1.0)
    raw["server"]["admin"] = True
    for table in raw["models"][0]["tables"]:
        table.update(version="v0", source=None)
    raw["models"][0]["gpucache"] = True
    config = config_module.parse(raw, tmp_path)
    model = config.model("ctr")
    for number in range(3):
        for table in model.tables:
            keys = truth[table.name][0]
            full = np.full((len(keys), table.dim), number, np.float32)
            name = model.storage_name(replace(table, version=f"v{number}"))
            _import(config, name, keys, full, tmp_path / f"{table.name}_v{number}")
    server = HpsServer(config)
    port = server.start()
    assert server.wait_ready(30)
    stop = threading.Event()
    failures: list[str] = []
    seen: list[set[float]] = []

    def look() -> None:
        rng = np.random.default_rng()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            lookups = hps_pb2_grpc.LookupServiceStub(channel)
            while not stop.is_set():
                queries = [
                    hps_pb2.TableQuery(table=name, keys=rng.choice(truth[name][0], 64).astype("<i8").tobytes())
                    for name in ("user", "item")
                ]
                try:
                    reply = lookups.Lookup(hps_pb2.LookupRequest(model="ctr", queries=queries), timeout=30)
                except grpc.RpcError as e:
                    failures.append(f"{e.code()}: {e.details()}")
                    continue
                seen.append(set(np.concatenate([np.frombuffer(r.vectors, "<f4") for r in reply.results]).tolist()))

    clients = [threading.Thread(target=look) for _ in range(4)]
    try:
        for thread in clients:
            thread.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            models = hps_pb2_grpc.ModelServiceStub(channel)
            for number in (1, 2):
                time.sleep(0.5)
                assert (
                    models.ReloadModel(hps_pb2.ReloadModelRequest(model="ctr", version=f"v{number}")).model.version
                    == f"v{number}"
                )
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
        server.stop(grace=1)
    assert failures == []
    assert [values for values in seen if len(values) != 1] == []
    served = [values.pop() for values in seen]
    assert {0.0, 1.0, 2.0} <= set(served)
    assert served[-1] == 2.0


def test_import_version_writes_beside_the_served_rows(tmp_path: Path, capsys) -> None:
    truth = write_sample_tables(tmp_path)
    raw = sample_raw_config()
    path = tmp_path / "hps.yaml"
    path.write_text(yaml.safe_dump(raw))
    keys, vectors = truth["user"]
    tables.write_table(tmp_path / "user_v3", [(keys, vectors * 2)], vectors.shape[1])
    assert (
        main(
            [
                "import",
                "--config",
                str(path),
                "--model",
                "ctr",
                "--table",
                "user",
                "--source",
                str(tmp_path / "user_v3"),
                "--version",
                "v3",
            ]
        )
        == 0
    )
    assert "ctr.user@v3: imported 5000 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["import", "--config", str(path), "--version", "bad/one"])
    assert "argument --version: must be 1 to 64 of" in capsys.readouterr().err
    # Served at v3 from the config alone; the unversioned rows are ingested beside it on first start.
    raw["models"][0]["tables"][0]["version"] = "v3"
    config = config_module.parse(raw, tmp_path)
    server = HpsServer(config)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            query = hps_pb2.TableQuery(table="user", keys=keys[:8].astype("<i8").tobytes())
            reply = hps_pb2_grpc.LookupServiceStub(channel).Lookup(hps_pb2.LookupRequest(model="ctr", queries=[query]))
            described = hps_pb2_grpc.ModelServiceStub(channel).DescribeModel(hps_pb2.DescribeModelRequest(model="ctr"))
    finally:
        server.stop(grace=1)
    np.testing.assert_array_equal(np.frombuffer(reply.results[0].vectors, "<f4").reshape(8, -1), vectors[:8] * 2)
    assert dict(described.table_versions) == {"user": "v3"}


def test_sighup_applies_a_changed_config_file(tmp_path: Path) -> None:
    truth = write_sample_tables(tmp_path)
    keys, vectors = truth["user"]
    tables.write_table(tmp_path / "user_v2", [(keys, vectors - 7)], vectors.shape[1])
    port = free_port()
    raw = sample_raw_config()
    raw["server"]["address"] = f"127.0.0.1:{port}"
    path = tmp_path / "hps.yaml"
    path.write_text(yaml.safe_dump(raw))
    log = tmp_path / "serve.log"
    process = subprocess.Popen(serve_command(path), stderr=log.open("w"))
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, process, timeout=60)
        # The user table moves to version v2, ingested by the server from its new source; a model is added.
        raw["models"][0]["tables"][0].update(version="v2", source="user_v2")
        raw["models"].append(
            {"name": "other", "max_batch_size": 8, "tables": [{"name": "t", "dim": 8, "source": "item"}]}
        )
        path.write_text(yaml.safe_dump(raw))
        process.send_signal(signal.SIGHUP)
        with grpc.insecure_channel(target) as channel:
            models = hps_pb2_grpc.ModelServiceStub(channel)
            deadline = time.monotonic() + 30
            while list(models.ListModels(hps_pb2.ListModelsRequest()).models) != ["ctr", "other"]:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            while dict(models.DescribeModel(hps_pb2.DescribeModelRequest(model="ctr")).table_versions) != {
                "user": "v2"
            }:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            query = hps_pb2.TableQuery(table="user", keys=keys[:8].astype("<i8").tobytes())
            reply = hps_pb2_grpc.LookupServiceStub(channel).Lookup(hps_pb2.LookupRequest(model="ctr", queries=[query]))
            np.testing.assert_array_equal(
                np.frombuffer(reply.results[0].vectors, "<f4").reshape(8, -1), vectors[:8] - 7
            )
            # A config that no longer parses changes nothing.
            path.write_text("models: [")
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while "config reload refused" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            assert list(models.ListModels(hps_pb2.ListModelsRequest()).models) == ["ctr", "other"]
            # A change that fails leaves its model as it was; the others are applied.
            raw["models"][0]["tables"][0].update(version="v9", source=None)
            raw["models"].pop()
            path.write_text(yaml.safe_dump(raw))
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while "failed (see above)" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            assert list(models.ListModels(hps_pb2.ListModelsRequest()).models) == ["ctr"]
            described = models.DescribeModel(hps_pb2.DescribeModelRequest(model="ctr"))
            assert dict(described.table_versions) == {"user": "v2"}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "config reload: reloaded ctr; loaded other" in text
    assert "ERROR hps_server.models: config reload: reloading ctr failed, it is served as before: table user" in text
    assert "WARNING hps_server.server: config reload: unloaded other; failed (see above): reload ctr" in text
    assert str(tmp_path) not in text


def test_a_retired_session_waits_for_the_requests_that_hold_it() -> None:
    model = config_module.ModelConfig("m", (TableConfig("t", 4),), gpucache=False)
    old, new = LookupSession(model, []), LookupSession(model, [])
    current = [old]
    handover = Handover()
    retired = threading.Event()
    with handover.using(lambda: current[0]) as held:
        assert held is old
        handover.swap(lambda: current.__setitem__(0, new))
        with handover.using(lambda: current[0]) as later:
            assert later is new
        handover.retire(old, retired.set)
        assert not retired.is_set()
    assert retired.is_set()


def test_writes_are_refused_while_their_model_changes_and_a_change_waits_for_writes_in_flight() -> None:
    model = config_module.ModelConfig("m", (TableConfig("t", 4),), gpucache=False)
    session = LookupSession(model, [])
    handover = Handover()
    changed = threading.Event()

    def change() -> None:
        with handover.changing("m"):
            changed.set()

    with handover.writing("m", lambda: session):
        changer = threading.Thread(target=change)
        changer.start()
        assert not changed.wait(0.2)  # the write in flight holds it off
    changer.join(10)
    assert changed.is_set()
    with (
        handover.changing("m"),
        pytest.raises(ModelChangingError, match="model m is being reloaded"),
        handover.writing("m", lambda: session),
    ):
        pytest.fail("a write went ahead while its model changed")
    with handover.using(lambda: session) as held:  # lookups are never refused
        assert held is session


def test_a_reload_fills_the_new_l1_with_the_keys_hot_before_the_switch(tmp_path: Path) -> None:
    truth = write_sample_tables(tmp_path)
    raw = sample_raw_config()  # initial_cache_rate 0: only the carried hot keys reach the new L1
    raw["server"]["admin"] = True
    raw["models"][0].update(gpucache=True, gpucacheper=0.2)
    config = config_module.parse(raw, tmp_path)
    keys, vectors = truth["user"]
    _import(config, "ctr.user@v2", keys, vectors + 100, tmp_path / "user_v2")
    server = HpsServer(config)
    port = server.start()
    try:
        hot = np.sort(keys[:64])
        with Client(f"127.0.0.1:{port}") as client:
            client.lookup("ctr", "user", hot)  # L1 misses below the hit-rate threshold: cached at once
            before = server.models.session("ctr").tables["user"].l1
            assert before is not None
            np.testing.assert_array_equal(before.caches[0].dump(before.index)[0], hot)
            client.reload_model("ctr", table_versions={"user": "v2"})
        after = server.models.session("ctr").tables["user"].l1
        assert after is not None and after is not before
        held_keys, held_vectors = after.caches[0].dump(after.index)[:2]
        np.testing.assert_array_equal(held_keys, hot)
        np.testing.assert_array_equal(held_vectors, vectors[np.argsort(keys[:64])] + 100)
    finally:
        server.stop(grace=1)


def test_versions_in_redis_are_hashes_of_their_own_and_the_old_ones_go(tmp_path: Path, redis_cluster: str) -> None:
    from hps_server.storage.redis_cluster import hash_name

    truth = write_sample_tables(tmp_path)
    raw = sample_raw_config(type="redis_cluster", address=redis_cluster, timeout_ms=2000, initial_cache_rate=1.0)
    raw["server"]["admin"] = True
    raw["models"][0]["name"] = "versioned"  # the shared cluster: table names of this test's own
    config = config_module.parse(raw, tmp_path)
    keys, vectors = truth["user"]
    _import(config, "versioned.user@v2", keys, vectors + 100, tmp_path / "user_v2")
    host, port = redis_cluster.rsplit(":", 1)
    redis_client = redis.RedisCluster(host=host, port=int(port))
    partitions = config.volatile_db.num_partitions

    def rows_in_redis(table: str) -> int:
        return sum(redis_client.hlen(hash_name(table, p, "v")) for p in range(partitions))

    server = HpsServer(config)
    server.start()
    try:
        assert server.wait_ready(60)
        assert rows_in_redis("versioned.user") == len(keys)
        with Client(f"127.0.0.1:{server.port}") as client:
            client.reload_model("versioned", table_versions={"user": "v2"})
            np.testing.assert_array_equal(client.lookup("versioned", "user", keys[:32]), vectors[:32] + 100)
        _retired(server)
        assert rows_in_redis("versioned.user@v2") == len(keys)
        assert rows_in_redis("versioned.user") == 0
    finally:
        server.stop(grace=1)
        redis_client.close()


def test_reload_with_a_model_config_ingests_a_new_version_from_its_source(admin: Admin) -> None:
    keys, vectors = admin.truth["user"]
    tables.write_table(admin.directory / "user_v5", [(keys, vectors * 3)], vectors.shape[1])
    entry = sample_raw_config()["models"][0]
    entry["tables"][0].update(version="v5", source=str(admin.directory / "user_v5"))
    entry["tables"][1]["source"] = str(admin.directory / "item")
    with Client(admin.target) as client:
        for wrong, field in (({"version": "v2"}, "not both"), ({"model": "other"}, "names model ctr")):
            request = hps_pb2.ReloadModelRequest(model="ctr", model_config=yaml.safe_dump(entry))
            for name, value in wrong.items():
                setattr(request, name, value)
            assert field in _refused(admin.models.ReloadModel, request, grpc.StatusCode.INVALID_ARGUMENT)
        reloaded = client.reload_model("ctr", model_config=entry)
        assert reloaded.table_versions == {"user": "v5"}
        np.testing.assert_array_equal(client.lookup("ctr", "user", keys[:8]), vectors[:8] * 3)


def test_load_model_with_unreadable_table_files_names_no_server_path(admin: Admin) -> None:
    (admin.directory / "empty_folder").mkdir()
    entry = {"name": "broken", "tables": [{"name": "t", "dim": 8, "source": str(admin.directory / "empty_folder")}]}
    details = _refused(
        admin.models.LoadModel,
        hps_pb2.LoadModelRequest(model_config=yaml.safe_dump(entry)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details.startswith("table files could not be read: empty_folder: no table files")
    assert str(admin.directory) not in details
    assert list(admin.models.ListModels(hps_pb2.ListModelsRequest()).models) == ["ctr"]


def test_load_model_of_a_folder_the_os_refuses_to_read_names_no_server_path(admin: Admin) -> None:
    """An error of the operating system itself (here a name longer than a file name may be, in the server's
    folder) is refused like any unreadable table, naming only the folder, not the server's path."""
    entry = {"name": "broken", "tables": [{"name": "t", "dim": 8, "source": str(admin.directory / ("x" * 300))}]}
    details = _refused(
        admin.models.LoadModel,
        hps_pb2.LoadModelRequest(model_config=yaml.safe_dump(entry)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details == f"table files could not be read: {'x' * 300}: cannot be read: File name too long (table broken.t)"
    assert list(admin.models.ListModels(hps_pb2.ListModelsRequest()).models) == ["ctr"]


def test_a_failed_load_model_leaves_nothing_behind_so_the_corrected_one_loads(admin: Admin) -> None:
    keys, vectors = admin.truth["item"]  # dim 8
    source = str(admin.directory / "item")
    for wrong in ({"dim": 5, "source": source}, {"dim": 100_000}):
        entry = {"name": "fixed", "tables": [{"name": "u", "dim": 8, "source": source}, {"name": "t", **wrong}]}
        code = grpc.StatusCode.FAILED_PRECONDITION if "source" in wrong else grpc.StatusCode.INVALID_ARGUMENT
        _refused(admin.models.LoadModel, hps_pb2.LoadModelRequest(model_config=yaml.safe_dump(entry)), code)
    persistent = admin.server.models.persistent
    assert persistent is not None and {"fixed.t", "fixed.u"}.isdisjoint(persistent.tables())
    entry = {"name": "fixed", "tables": [{"name": "t", "dim": 8, "source": source}]}
    admin.models.LoadModel(hps_pb2.LoadModelRequest(model_config=yaml.safe_dump(entry)))
    np.testing.assert_array_equal(admin.vectors("fixed", "t", keys[:8]), vectors[:8])
    # A bound too wide for any host is refused before the levels are asked for it, and later loads work.
    huge = {"name": "huge", "tables": [{"name": "t", "dim": 10**11}]}
    details = _refused(
        admin.models.LoadModel,
        hps_pb2.LoadModelRequest(model_config=yaml.safe_dump(huge)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith("model_config.tables[0].dim: must be <= 65536")
    assert list(admin.models.ListModels(hps_pb2.ListModelsRequest()).models) == ["ctr", "fixed"]


def test_a_model_loaded_with_wider_tables_than_at_start_takes_writes_within_the_limits(tmp_path: Path) -> None:
    write_sample_tables(tmp_path)
    raw = sample_raw_config()
    raw["server"].update(admin=True, max_keys_per_write=1000, max_keys_per_request=1000)
    server = HpsServer(config_module.parse(raw, tmp_path))
    server.start()
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            client.load_model({"name": "wide", "tables": [{"name": "w", "dim": 2048}]})
            keys, vectors = np.arange(1000), np.random.default_rng(0).standard_normal((1000, 2048), np.float32)
            client.upsert("wide", "w", keys, vectors)  # 8 MB: wider than any table the server started with
            np.testing.assert_array_equal(client.lookup("wide", "w", keys), vectors)
    finally:
        server.stop(grace=1)


def test_import_version_into_a_rocksdb_a_server_holds_is_one_clear_error(admin: Admin, capsys) -> None:
    path = admin.directory / "hps.yaml"
    path.write_text(yaml.safe_dump(sample_raw_config()))
    assert main(["import", "--config", str(path), "--model", "ctr", "--table", "user", "--version", "v7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hps import: error: rocksdb: the database at persistent_db.path is held by another opener")
    assert str(admin.directory) not in err


def test_model_changes_that_wait_hold_no_health_check(admin: Admin) -> None:
    """LoadModels that wait (here for the model-change lock the test holds, as for a long ingest) take the
    ModelService's own threads, never those answering health checks."""
    entries = [{"name": f"waiting{i}", "tables": [{"name": "t", "dim": 8}]} for i in range(3)]
    with admin.server.models._changes:
        loads = [
            admin.models.LoadModel.future(hps_pb2.LoadModelRequest(model_config=yaml.safe_dump(e)), timeout=60)
            for e in entries
        ]
        time.sleep(0.5)  # every load has reached the lock, or waits for a ModelService thread
        with grpc.insecure_channel(admin.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert sorted(load.result(60).model.model for load in loads) == ["waiting0", "waiting1", "waiting2"]
