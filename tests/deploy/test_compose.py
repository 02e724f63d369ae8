"""The local compose stack: Compose accepts it, and its pieces point at each other correctly."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from hps_server import config as hps_config
from hps_server import demo


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
