"""The local compose stack and its secure variant: Compose accepts them, and their pieces point at each other."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2_grpc

from hps_server import config as hps_config
from hps_server import demo, healthcheck


def resolve(docker_compose: str, repo_root: Path, *options: str) -> dict[str, Any]:
    """The stack as Compose itself resolves it (anchors, paths, defaults, profiles)."""
    result = subprocess.run(
        [docker_compose, "-f", str(repo_root / "deploy" / "compose.yaml"), *options, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@pytest.fixture(scope="module")
def stack(docker_compose: str, repo_root: Path) -> dict[str, Any]:
    return resolve(docker_compose, repo_root)


def test_compose_rejects_a_broken_file(docker_compose: str, tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  a:\n    image: x\n    depends_on: [missing]\n")
    result = subprocess.run([docker_compose, "-f", str(broken), "config", "-q"], capture_output=True, text=True)
    assert result.returncode != 0 and "missing" in result.stderr


def test_stack_has_every_service(stack: dict[str, Any]) -> None:
    assert set(stack["services"]) == {
        "hps",
        "sample-tables",
        "redis-1",
        "redis-2",
        "redis-3",
        "redis-cluster-create",
        "prometheus",
        "grafana",
    }


def test_redis_cluster_of_three_masters(stack: dict[str, Any]) -> None:
    services = stack["services"]
    for node in ("redis-1", "redis-2", "redis-3"):
        assert "--cluster-enabled yes" in " ".join(services[node]["command"])
    create = " ".join(services["redis-cluster-create"]["command"])
    assert "--cluster-replicas 0" in create
    waits_for = services["redis-cluster-create"]["depends_on"]
    assert {n: waits_for[n]["condition"] for n in waits_for} == dict.fromkeys(
        ("redis-1", "redis-2", "redis-3"), "service_healthy"
    )
    assert services["hps"]["depends_on"]["redis-cluster-create"]["condition"] == "service_completed_successfully"


def test_hps_config_points_at_the_stack(stack: dict[str, Any], repo_root: Path) -> None:
    cfg = hps_config.load(repo_root / "deploy" / "hps.yaml")
    hps = stack["services"]["hps"]
    mounts = {v["target"]: v for v in hps["volumes"]}
    assert Path(mounts["/etc/hps/hps.yaml"]["source"]) == repo_root / "deploy" / "hps.yaml"
    assert hps["command"][-1] == "/etc/hps/hps.yaml"
    assert cfg.volatile_db.type == "redis_cluster"
    seeds = {a.split(":")[0] for a in cfg.volatile_db.address.split(",")}
    assert seeds <= set(stack["services"])
    assert str(cfg.persistent_db.path).startswith(mounts["/data"]["target"])
    metrics_port = cfg.server.metrics_address.rsplit(":", 1)[1]
    scrape = yaml.safe_load((repo_root / "deploy" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [f"hps:{metrics_port}"]
    assert hps["build"]["args"]["BASE_IMAGE"].startswith("ubuntu:")  # the CPU image


def test_grafana_is_provisioned_with_the_dashboard(stack: dict[str, Any], repo_root: Path) -> None:
    grafana = stack["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "hps.yaml").read_text())["providers"][0]
    dashboards = [target for target in mounts if target.startswith(provider["options"]["path"] + "/")]
    assert dashboards
    for target in dashboards:
        assert json.loads(mounts[target].read_text())["uid"] == "hps-overview"


def test_served_model_is_the_one_sample_tables_writes(stack: dict[str, Any], repo_root: Path) -> None:
    cfg = hps_config.load(repo_root / "deploy" / "hps.yaml")
    (model,) = cfg.models
    assert model.name == demo.MODEL
    assert [(t.name, t.dim) for t in model.tables] == [(t.name, t.dim) for t in demo.SAMPLE_TABLES]
    writer = stack["services"]["sample-tables"]
    code = writer["command"][0]
    directory = re.search(r"make_sample_model\(Path\('([^']+)'\)\)", code)
    assert directory is not None, code
    for table in model.tables:
        assert table.source == Path(directory[1]) / "tables" / table.name
    # The writer and the server share the volume the tables live on.
    volume_of = {
        name: {v["target"]: v["source"] for v in stack["services"][name]["volumes"]}
        for name in ("hps", "sample-tables")
    }
    assert volume_of["hps"]["/data"] == volume_of["sample-tables"]["/data"]
    assert stack["services"]["hps"]["depends_on"]["sample-tables"]["condition"] == "service_completed_successfully"


def test_python_one_shots_name_real_functions(docker_compose: str, repo_root: Path) -> None:
    stack = resolve(docker_compose, repo_root, "--profile", "load")
    snippets = [s["command"][0] for s in stack["services"].values() if s.get("entrypoint") == ["python", "-c"]]
    assert len(snippets) == 2  # sample-tables and the optional workload
    for code in snippets:
        compile(code, "<compose>", "exec")
        for module, names in re.findall(r"from (hps_server[.\w]*) import ([\w, ]+)", code):
            imported = importlib.import_module(module)
            for name in names.split(","):
                assert callable(getattr(imported, name.strip())), f"{module}.{name}"


# ---------------------------------------------------------------- compose.secure.yaml


@pytest.fixture(scope="module")
def dev_secrets(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files make-dev-certs.sh writes, in a folder of the test's own."""
    folder = tmp_path_factory.mktemp("dev-secrets") / "secrets"
    script = repo_root / "deploy" / "make-dev-certs.sh"
    subprocess.run(["sh", str(script), str(folder)], check=True, capture_output=True, timeout=120)
    return folder


@pytest.fixture(scope="module")
def secure_stack(docker_compose: str, repo_root: Path, dev_secrets: Path) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HPS_DEV_SECRETS", str(dev_secrets))
        return resolve(docker_compose, repo_root, "-f", str(repo_root / "deploy" / "compose.secure.yaml"))


def _secure_config(repo_root: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((repo_root / "deploy" / "hps.secure.yaml").read_text()))


def test_secure_stack_mounts_each_file_its_config_names(secure_stack: dict[str, Any], repo_root: Path) -> None:
    hps = secure_stack["services"]["hps"]
    assert {v["target"]: Path(v["source"]).name for v in hps["volumes"]}["/etc/hps/hps.yaml"] == "hps.secure.yaml"
    raw = _secure_config(repo_root)
    server, volatile = raw["server"], raw["volatile_db"]
    files = [*server["tls"].values(), server["auth"]["tokens_file"]]
    files += [volatile[key] for key in ("tls_ca_file", "tls_cert_file", "tls_key_file")]
    source_of = {s["target"]: secure_stack["secrets"][s["source"]]["file"] for s in hps["secrets"]}
    for file in files:
        assert Path(source_of[file]).is_file(), f"{file}: no secret mounted there"
    assert Path(source_of[server["tls"]["key_file"]]).name == "server.key"
    assert Path(source_of[volatile["tls_key_file"]]).name == "redis-client.key"
    assert (server["read_only"], server["reflection"], volatile["tls_check_hostname"]) == (True, False, True)
    # The same model as the plaintext stack, and a Redis part the server's loader accepts.
    plain = yaml.safe_load((repo_root / "deploy" / "hps.yaml").read_text())
    assert raw["models"] == plain["models"] and raw["persistent_db"] == plain["persistent_db"]
    raw["server"] = {k: v for k, v in server.items() if k not in {"tls", "auth", "read_only", "reflection"}}
    cfg = hps_config.parse(raw, repo_root / "deploy")
    assert cfg.volatile_db.tls and cfg.volatile_db.tls_cert_file == Path("/etc/hps-redis-tls/tls.crt")


def test_secure_redis_requires_client_certificates_and_announces_its_certificates_names(
    secure_stack: dict[str, Any], dev_secrets: Path
) -> None:
    services = secure_stack["services"]
    names = set()
    for node in ("redis-1", "redis-2", "redis-3"):
        command = services[node]["command"][-1]
        for option in (
            "--port 0",
            "--tls-auth-clients yes",
            "--tls-cluster yes",
            "--cluster-preferred-endpoint-type hostname",
        ):
            assert option in command, (node, option)
        assert "--tls" in services[node]["healthcheck"]["test"]
        names.add(services[node]["environment"]["NODE"])
    assert "$TLS --cluster create" in services["redis-cluster-create"]["command"][0].replace("$$", "$")
    # The nodes announce their service names, and their certificate carries exactly those.
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(dev_secrets / "redis.crt")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert set(re.findall(r"DNS:([\w-]+)", text)) == names == {"redis-1", "redis-2", "redis-3"}


def test_secure_healthcheck_passes_against_an_mtls_server_with_the_dev_certificates(
    secure_stack: dict[str, Any], dev_secrets: Path
) -> None:
    hps = secure_stack["services"]["hps"]
    source_of = {s["target"]: secure_stack["secrets"][s["source"]]["file"] for s in hps["secrets"]}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials(
        [((dev_secrets / "server.key").read_bytes(), (dev_secrets / "server.crt").read_bytes())],
        root_certificates=(dev_secrets / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        test = hps["healthcheck"]["test"]
        assert test[1:4] == ["python", "-m", "hps_server.healthcheck"] and test[4] == "127.0.0.1:8500"
        args = [source_of.get(arg, arg) for arg in test[5:]]  # the container's paths -> the files behind them
        assert healthcheck.main([f"127.0.0.1:{port}", "--timeout", "5", *args]) == 0
    finally:
        server.stop(grace=0)
