"""Config parsing: our YAML, HugeCTR's ps.json, and one clear error per invalid field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hps_server import config as config_module
from hps_server.config import ConfigError
from hps_server.cores import cpu_quota, usable_cores

# The shape of the ps.json in HugeCTR's HPS documentation (two tables of a wide-and-deep model).
HPS_PS_JSON = {
    "supportlonglong": True,
    "volatile_db": {
        "type": "redis_cluster",
        "address": "127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002",
        "user_name": "default",
        "password": "",
        "num_partitions": 8,
        "max_get_batch_size": 100000,
        "max_set_batch_size": 50000,
        "overflow_margin": 10000000,
        "overflow_policy": "evict_oldest",
        "overflow_resolution_target": 0.8,
        "initial_cache_rate": 1.0,
        "cache_missed_embeddings": True,
        "update_filters": [".+"],
    },
    "persistent_db": {
        "type": "rocks_db",
        "path": "/var/lib/hps/rocksdb",
        "num_threads": 16,
        "read_only": False,
        "max_get_batch_size": 10000,
        "max_set_batch_size": 10000,
    },
    "models": [
        {
            "model": "wdl",
            "sparse_files": ["wdl0_sparse_2000.model", "wdl1_sparse_2000.model"],
            "dense_file": "wdl_dense_2000.model",
            "network_file": "wdl.json",
            "num_of_worker_buffer_in_pool": 4,
            "num_of_refresher_buffer_in_pool": 1,
            "deployed_device_list": [0, 1],
            "max_batch_size": 64,
            "default_value_for_each_table": [0.0, 0.5],
            "maxnum_catfeature_query_per_table_per_sample": [2, 26],
            "embedding_vecsize_per_table": [1, 15],
            "embedding_table_names": ["table1", "table2"],
            "hit_rate_threshold": 0.9,
            "gpucacheper": 0.1,
            "gpucache": True,
            "cache_refresh_percentage_per_iteration": 0.2,
            "use_static_table": False,
        }
    ],
}


def test_hps_ps_json_maps_onto_our_options(tmp_path: Path) -> None:
    path = tmp_path / "ps.json"
    path.write_text(json.dumps(HPS_PS_JSON))
    config = config_module.load(path)
    volatile = config.volatile_db
    assert (volatile.type, volatile.num_partitions, volatile.max_batch_size) == ("redis_cluster", 8, 50000)
    assert (volatile.overflow_policy, volatile.overflow_margin) == ("evict_oldest", 10_000_000)
    assert config.persistent_db.type == "rocksdb"
    assert config.persistent_db.path == Path("/var/lib/hps/rocksdb")
    (model,) = config.models
    assert model.name == "wdl"
    assert [(t.name, t.dim, t.default_value, t.max_keys_per_sample) for t in model.tables] == [
        ("table1", 1, 0.0, 2),
        ("table2", 15, 0.5, 26),
    ]
    assert model.tables[0].source == tmp_path / "wdl0_sparse_2000.model"
    assert (model.gpucacheper, model.deployed_device_list, model.max_batch_size) == (0.1, (0, 1), 64)
    assert model.hps_extras["dense_file"] == "wdl_dense_2000.model"
    assert model.max_keys(model.tables[1]) == 64 * 26


def test_yaml_config_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "hps.yaml"
    path.write_text(
        "server: {address: '127.0.0.1:9000'}\n"
        "models:\n  - name: m\n    tables:\n      - {name: t, dim: 8, source: data/t}\n"
    )
    config = config_module.load(path)
    assert config.server.address == "127.0.0.1:9000"
    assert config.volatile_db.type == "hash_map"
    assert config.persistent_db.path == tmp_path / "hps-data" / "rocksdb"
    assert config.models[0].tables[0].source == tmp_path / "data" / "t"
    assert config.models[0].gpucache is True
    assert config.server.processes == 1


def test_processes_auto_is_one_per_usable_core() -> None:
    raw = {"server": {"processes": "auto"}, "models": [_model()]}
    assert config_module.parse(raw, Path(".")).server.processes == usable_cores()
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


def _cgroups(directory: Path, text: str) -> Path:
    path = directory / "cgroup"
    path.write_text(text)
    return path


def test_a_cgroup_v2_cpu_limit_on_the_process_or_a_parent_bounds_usable_cores(tmp_path: Path) -> None:
    own = _cgroups(tmp_path, "0::/kubepods/pod1/hps\n")
    leaf = tmp_path / "kubepods" / "pod1" / "hps"
    leaf.mkdir(parents=True)
    (leaf / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path, {"": "/kubepods/pod1/hps"}) is None
    assert usable_cores(tmp_path, own) == len(os.sched_getaffinity(0))
    (leaf.parent / "cpu.max").write_text("150000 100000\n")  # the pod's limit: 1.5 CPUs
    assert cpu_quota(tmp_path, {"": "/kubepods/pod1/hps"}) == 1.5
    assert usable_cores(tmp_path, own) == min(2, len(os.sched_getaffinity(0)))


def test_a_cgroup_v1_cfs_quota_bounds_usable_cores_and_minus_one_means_none(tmp_path: Path) -> None:
    own = _cgroups(tmp_path, "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n")
    folder = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores(tmp_path, own) == len(os.sched_getaffinity(0))
    (folder / "cpu.cfs_quota_us").write_text("50000\n")  # half a CPU: one process still
    assert usable_cores(tmp_path, own) == 1


def test_every_server_option_is_read_from_the_file() -> None:
    options = {
        "max_queries_per_request": 8,
        "max_keys_per_request": 1000,
        "max_keys_per_write": 100,
        "max_streams": 2,
        "stream_idle_seconds": 5.0,
        "max_connection_age_seconds": 300.0,
    }
    server = config_module.parse({"server": options, "models": [_model()]}, Path(".")).server
    assert {name: getattr(server, name) for name in options} == options
    assert config_module.ServerConfig().max_connection_age_seconds == 0  # off unless asked for


def _model(**fields: object) -> dict:
    return {"name": "m", "tables": [{"name": "t", "dim": 4}], **fields}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "models: required"),
        ({"models": [{"name": "m", "tables": []}]}, "models[0].tables: a model needs at least one table"),
        (
            {"models": [_model(tables=[{"name": f"t{i}", "dim": 4} for i in range(1025)])]},
            "models[0].tables: at most 1024 tables a model, got 1025",
        ),
        ({"models": [_model(tables=[{"name": "t", "dim": 0}])]}, "models[0].tables[0].dim: must be >= 1, got 0"),
        ({"models": [_model(tables=[{"name": "t", "dim": "8"}])]}, "models[0].tables[0].dim: must be an integer"),
        ({"models": [_model(tables=[{"dim": 4}])]}, "models[0].tables[0].name: required"),
        (
            {"models": [_model(tables=[{"name": "a/b", "dim": 4}])]},
            "models[0].tables[0].name: must be 1 to 120 of A-Z a-z 0-9 _ -",
        ),
        (
            {"models": [_model(tables=[{"name": "t", "dim": 4}, {"name": "t", "dim": 2}])]},
            "models[0].tables[1].name: duplicate table 't'",
        ),
        ({"models": [_model(), _model()]}, "models[1]: duplicate model name 'm'"),
        ({"models": [_model(gpucacheper=1.5)]}, "models[0].gpucacheper: must be <= 1"),
        ({"models": [_model(gpucache="yes")]}, "models[0].gpucache: must be true or false"),
        ({"models": [_model(deployed_device_list=[])]}, "models[0].deployed_device_list: must name at least one"),
        ({"models": [_model(colour=1)]}, "models[0].colour: unknown option"),
        (
            {"models": [_model()], "persistent_db": {"type": "rocksdb", "path": " "}},
            "persistent_db.path: must be a path, got an empty string",
        ),
        (
            {"models": [_model()], "server": {"address": "127.0.0.1:70000"}},
            "server.address: must be HOST:PORT with a port from 0 to 65535, got '127.0.0.1:70000'",
        ),
        (
            {"models": [_model()], "server": {"metrics_address": ":99999"}},
            "server.metrics_address: must be HOST:PORT with a port from 0 to 65535",
        ),
        (
            {"models": [_model()], "volatile_db": {"overflow_policy": "lru"}},
            "volatile_db.overflow_policy: must be one of evict_oldest, evict_random, got 'lru'",
        ),
        ({"models": [_model()], "volatile_db": {"type": "memcached"}}, "volatile_db.type: must be one of"),
        (
            {"models": [_model()], "volatile_db": {"overflow_resolution_target": 0}},
            "volatile_db.overflow_resolution_target: must be > 0",
        ),
        ({"models": [_model()], "server": {"workers": 0}}, "server.workers: must be >= 1"),
        ({"models": [_model()], "server": {"processes": 0}}, "server.processes: must be an integer >= 1 or auto"),
        ({"models": [_model()], "server": {"processes": "2"}}, "server.processes: must be an integer >= 1 or auto"),
        ({"models": [_model()], "server": []}, "server: must be a mapping"),
        (
            {"models": [_model()], "server": {"max_connection_age_seconds": -1}},
            "server.max_connection_age_seconds: must be >= 0",
        ),
        ({"models": [_model()], "persistent_db": {"path": 3}}, "persistent_db.path: must be a string"),
        ({"models": [_model()], "extra": 1}, "extra: unknown option"),
    ],
)
def test_invalid_yaml_config_names_the_field(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_module.parse(raw, Path("."))
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"embedding_vecsize_per_table": [1]}, "embedding_vecsize_per_table: has 1 entries but sparse_files has 2"),
        ({"default_value_for_each_table": [0.0]}, "default_value_for_each_table: has 1 entries"),
        ({"embedding_vecsize_per_table": [1, -2]}, "models[0].embedding_vecsize_per_table[1]: must be >= 1"),
        ({"model": None}, "models[0].model: required"),
        ({"gpucacheper": "a lot"}, "models[0].gpucacheper: must be a finite number"),
        ({"default_value_for_each_table": [0.0, 1e39]}, "default_value_for_each_table[1]: must fit a float32"),
        ({"embedding_table_names": ["a", "a"]}, "models[0].embedding_table_names[1]: duplicate table 'a'"),
        (
            {"sparse_files": ["hdfs://namenode:9000/wdl/0.model", "b"]},
            "models[0].sparse_files[0]: hdfs:// is not read, only local files",
        ),
        (
            {
                "sparse_files": [],
                "embedding_vecsize_per_table": [],
                "embedding_table_names": [],
                "default_value_for_each_table": [],
                "maxnum_catfeature_query_per_table_per_sample": [],
            },
            "models[0].sparse_files: a model needs at least one table",
        ),
        (
            {"max_batch_size": 2**20, "maxnum_catfeature_query_per_table_per_sample": [2, 2**12]},
            "models[0].maxnum_catfeature_query_per_table_per_sample[1]: max_batch_size x max_keys_per_sample",
        ),
    ],
)
def test_invalid_ps_json_names_the_field(tmp_path: Path, change: dict, message: str) -> None:
    document = json.loads(json.dumps(HPS_PS_JSON))
    document["models"][0].update(change)
    path = tmp_path / "ps.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as raised:
        config_module.load(path)
    assert message in str(raised.value)


def test_unsupported_int32_keys_and_unreadable_files(tmp_path: Path) -> None:
    path = tmp_path / "ps.json"
    path.write_text(json.dumps({**HPS_PS_JSON, "supportlonglong": False}))
    with pytest.raises(ConfigError, match="supportlonglong"):
        config_module.load(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        config_module.load(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        config_module.load(tmp_path / "missing.yaml")


def test_the_update_stream_follows_the_redis_cluster_unless_told_otherwise(tmp_path: Path) -> None:
    models = [{"name": "m", "tables": [{"name": "t", "dim": 2}]}]
    plain = config_module.parse({"models": models}, tmp_path)
    assert plain.updates.enabled and plain.updates.stream_address(plain.volatile_db) == ""  # hash_map: no stream
    redis = config_module.parse(
        {"volatile_db": {"type": "redis_cluster", "address": "h:1"}, "models": models}, tmp_path
    )
    assert redis.updates.stream_address(redis.volatile_db) == "h:1"
    raw = {"volatile_db": {"type": "redis_cluster", "address": "h:1"}, "models": models}
    own = config_module.parse({**raw, "updates": {"address": "u:2", "stream": "s", "max_len": 5}}, tmp_path)
    assert own.updates.stream_address(own.volatile_db) == "u:2" and own.updates.max_len == 5
    off = config_module.parse({**raw, "updates": {"enabled": False}}, tmp_path)
    assert off.updates.stream_address(off.volatile_db) == ""
    for bad, message in (
        ({"stream": ""}, "updates.stream: must not be empty"),
        ({"max_len": 0}, "updates.max_len: must be >= 1"),
        ({"polling": 1}, "updates.polling: unknown option"),
        ({"address": "redis-0"}, "updates.address: expected host:port"),
    ):
        with pytest.raises(ConfigError, match=message):
            config_module.parse({**raw, "updates": bad}, tmp_path)


def test_ps_json_values_hps_documents_are_taken(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    document = json.loads(json.dumps(HPS_PS_JSON))
    document["volatile_db"]["overflow_policy"] = "evict_least_used"
    document["models"][0].update(hit_rate_threshold=1.1, default_value_for_each_table=[-3.4e38, 3.4028235e38])
    document["update_source"] = {"type": "kafka_message_queue", "brokers": "127.0.0.1:9092"}
    path = tmp_path / "ps.json"
    path.write_text(json.dumps(document))
    with caplog.at_level("WARNING", logger="hps_server.config"):
        config = config_module.load(path)
    assert config.volatile_db.overflow_policy == "evict_oldest"
    assert config.models[0].hit_rate_threshold == 1.1  # above 1: L1 inserts are never deferred
    assert [t.default_value for t in config.models[0].tables] == [-3.4e38, 3.4028235e38]  # NumPy's float32 max
    warned = caplog.text
    assert "evict_least_used is served as evict_oldest" in warned
    assert "update_source: ignored; hps does not read Kafka" in warned


def test_a_yaml_default_value_past_float32_is_refused() -> None:
    raw = {"models": [_model()]}
    raw["models"][0]["tables"][0]["default_value"] = -1e39
    with pytest.raises(ConfigError, match=r"models\[0\].tables\[0\].default_value: must fit a float32"):
        config_module.parse(raw, Path("."))


def test_a_ps_json_overflow_policy_that_is_no_string_is_one_clear_error(tmp_path: Path) -> None:
    document = json.loads(json.dumps(HPS_PS_JSON))
    document["volatile_db"]["overflow_policy"] = ["evict_oldest"]
    path = tmp_path / "ps.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=r"volatile_db.overflow_policy: must be one of"):
        config_module.load(path)
