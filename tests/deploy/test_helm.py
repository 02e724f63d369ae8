"""The Helm chart: lint, schema, and rendering with several values files into manifests Kubernetes accepts."""

from __future__ import annotations

import base64
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from hps_server import config as hps_config

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a current one.
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")
VALUES = Path(__file__).parent / "values"
SCENARIOS = ["default", "cpu", "gpu", "external-redis", "autoscaling", "extras"]


def values_of(scenario: str) -> dict[str, Any]:
    return {} if scenario == "default" else yaml.safe_load((VALUES / f"{scenario}.yaml").read_text())


def render(helm: ModuleType, chart: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(chart)) as loaded:
        files = loaded.render(values, name="rec", namespace="ml", is_install=True)
    return [
        doc for path, text in sorted(files.items()) if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc
    ]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def workload(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    found = by_kind(manifests, "Deployment") + by_kind(manifests, "StatefulSet")
    assert len(found) == 1
    return found[0]


def hps_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    containers = workload(manifests)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "hps")


def served_config(manifests: list[dict[str, Any]], tmp_path: Path) -> hps_config.Config:
    """The ConfigMap's hps.yaml, parsed and validated by the server's own config loader."""
    path = tmp_path / "hps.yaml"
    path.write_text(one(manifests, "ConfigMap")["data"]["hps.yaml"])
    return hps_config.load(path)


@pytest.fixture(scope="module")
def chart(repo_root: Path) -> Path:
    return repo_root / "helm" / "hps"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_is_clean(helm: ModuleType, chart: Path, scenario: str) -> None:
    report = helm.lint(str(chart), values_of(scenario), strict=True, namespace="ml")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_manifest_passes_kubernetes_schemas(
    helm: ModuleType, kubernetes_validate: ModuleType, chart: Path, scenario: str, version: str
) -> None:
    manifests = render(helm, chart, values_of(scenario))
    assert manifests
    for manifest in manifests:
        if manifest["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD kind, checked by test_service_monitor_selects_the_metrics_port
        kubernetes_validate.validate(manifest, version, strict=True)


def test_kubernetes_schemas_catch_a_bad_manifest(
    helm: ModuleType, kubernetes_validate: ModuleType, chart: Path
) -> None:
    manifest = workload(render(helm, chart, {}))
    manifest["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, KUBERNETES_VERSIONS[-1], strict=True)
    assert yaml.safe_load((chart / "Chart.yaml").read_text())["kubeVersion"] == f">={KUBERNETES_VERSIONS[0]}-0"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_config_is_a_valid_hps_config(helm: ModuleType, chart: Path, scenario: str, tmp_path: Path) -> None:
    manifests = render(helm, chart, values_of(scenario))
    cfg = served_config(manifests, tmp_path)
    ports = {p["name"]: p["containerPort"] for p in hps_container(manifests)["ports"]}
    assert cfg.server.address.endswith(f":{ports['grpc']}")
    assert cfg.server.metrics_address.endswith(f":{ports['metrics']}")
    assert [m.name for m in cfg.models] == [m["name"] for m in values_of(scenario).get("models", [{"name": "ctr"}])]
    assert str(cfg.persistent_db.path) == "/data/rocksdb"


def test_invalid_values_are_rejected_by_the_schema(helm: ModuleType, chart: Path) -> None:
    for values, field in [
        ({"replicaCount": "three"}, "/replicaCount"),
        ({"models": [{"name": "ctr", "tables": [{"name": "item"}]}]}, "dim"),
        ({"redis": {"enabled": True}}, "/redis/addresses"),
        ({"gpus": 1}, "gpus"),
        ({"updates": {"max_len": 0}}, "/updates/max_len"),
        ({"updates": {"streams": "x"}}, "streams"),
    ]:
        with pytest.raises(helm.HelmValuesError, match=field):
            render(helm, chart, values)


def test_cpu_only(helm: ModuleType, chart: Path, tmp_path: Path) -> None:
    manifests = render(helm, chart, values_of("cpu"))
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    container = hps_container(manifests)
    assert container["image"] == "hps:0.1.0-cpu"
    assert not any("gpu" in name for name in container["resources"].get("limits", {}))
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["data"]
    assert by_kind(manifests, "PersistentVolumeClaim") == []
    assert by_kind(manifests, "Secret") == []
    assert served_config(manifests, tmp_path).volatile_db.type == "hash_map"


def test_gpu_statefulset_with_sync_and_import(helm: ModuleType, chart: Path) -> None:
    manifests = render(helm, chart, values_of("gpu"))
    sts = one(manifests, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert hps_container(manifests)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in by_kind(manifests, "Service")}
    # Tables are synced first, then imported; both see the data volume the server reads.
    init = pod["initContainers"]
    assert [c["name"] for c in init] == ["sync-tables", "import-tables"]
    assert init[1]["args"][0] == "import"
    for container in [*init, hps_container(manifests)]:
        assert any(m["name"] == "data" and m["mountPath"] == "/data" for m in container["volumeMounts"])


def test_probes_are_native_grpc(helm: ModuleType, chart: Path) -> None:
    manifests = render(helm, chart, {})
    container = hps_container(manifests)
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": grpc_port}
    pod = workload(manifests)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Terminating pods serve on while Services drop them, then drain; SIGKILL never cuts the drain short.
    defaults = yaml.safe_load((chart / "values.yaml").read_text())
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] == defaults["preStopSleepSeconds"] > 0
    assert (
        pod["terminationGracePeriodSeconds"]
        > defaults["server"]["shutdown_grace_seconds"] + defaults["preStopSleepSeconds"]
    )
    no_sleep = hps_container(render(helm, chart, {"preStopSleepSeconds": 0}))
    assert "lifecycle" not in no_sleep


def test_external_redis_password_lives_in_a_secret(helm: ModuleType, chart: Path, tmp_path: Path) -> None:
    manifests = render(helm, chart, values_of("external-redis"))
    secret = one(manifests, "Secret")
    assert base64.b64decode(secret["data"]["password"]).decode() == "s3cret-pass"
    assert "s3cret-pass" not in yaml.safe_dump(one(manifests, "ConfigMap"))
    env = {e["name"]: e for e in hps_container(manifests)["env"]}
    ref = env["HPS_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "password"}
    cfg = served_config(manifests, tmp_path)
    assert cfg.volatile_db.type == "redis_cluster"
    assert cfg.volatile_db.address == "redis-0.redis:6379,redis-1.redis:6379,redis-2.redis:6379"
    assert cfg.volatile_db.num_partitions == 16
    assert cfg.volatile_db.overflow_policy == "evict_oldest"
    assert cfg.persistent_db.read_only is True
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    claim = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "data")
    assert claim["persistentVolumeClaim"] == {"claimName": "hps-tables", "readOnly": True}
    # A read-only database is prepared elsewhere: no import step.
    assert "initContainers" not in deployment["spec"]["template"]["spec"]


def test_existing_secret_is_referenced_not_created(helm: ModuleType, chart: Path) -> None:
    values = values_of("external-redis")
    values["redis"] |= {"password": "", "existingSecret": "redis-auth", "existingSecretKey": "redis-password"}
    manifests = render(helm, chart, values)
    assert by_kind(manifests, "Secret") == []
    env = {e["name"]: e for e in hps_container(manifests)["env"]}
    assert env["HPS_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "redis-password"}


def test_autoscaling(helm: ModuleType, chart: Path) -> None:
    manifests = render(helm, chart, values_of("autoscaling"))
    deployment = one(manifests, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    hpa = one(manifests, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    kinds = [m["type"] for m in hpa["spec"]["metrics"]]
    assert kinds == ["Resource", "Pods"]
    pdb = one(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    claim = one(manifests, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]  # the prepared database every pod reads


def test_service_monitor_selects_the_metrics_port(helm: ModuleType, chart: Path) -> None:
    manifests = render(helm, chart, values_of("gpu"))
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    services = [
        s
        for s in by_kind(manifests, "Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert services, "the ServiceMonitor selects no Service"
    ports = {p["name"] for s in services for p in s["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["port"] in ports
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert by_kind(render(helm, chart, {}), "ServiceMonitor") == []


def test_service_exposes_grpc_and_metrics(helm: ModuleType, chart: Path) -> None:
    manifests = render(helm, chart, {})
    service = next(s for s in by_kind(manifests, "Service") if s["spec"].get("clusterIP") != "None")
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("grpc", 8500, "grpc"),
        ("metrics", 9100, "metrics"),
    }
    pod_labels = workload(manifests)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_each_server_process_gets_a_metrics_port(helm: ModuleType, chart: Path, tmp_path: Path) -> None:
    manifests = render(helm, chart, {**values_of("gpu"), "server": {"processes": 3}})
    assert served_config(manifests, tmp_path).server.processes == 3
    wanted = {("metrics", 9100), ("metrics-1", 9101), ("metrics-2", 9102)}
    container = {(p["name"], p["containerPort"]) for p in hps_container(manifests)["ports"]}
    assert wanted <= container
    service = next(s for s in by_kind(manifests, "Service") if s["spec"].get("clusterIP") != "None")
    assert wanted <= {(p["name"], p["port"]) for p in service["spec"]["ports"]}
    monitor = one(manifests, "ServiceMonitor")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {name for name, _ in wanted}
    # The shared hash map's /dev/shm: memory-backed and sized (a runtime's own is 64 MiB).
    mounts = {m["name"]: m["mountPath"] for m in hps_container(manifests)["volumeMounts"]}
    volumes = {v["name"]: v for v in workload(manifests)["spec"]["template"]["spec"]["volumes"]}
    assert mounts["shm"] == "/dev/shm"
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    single = render(helm, chart, values_of("gpu"))
    assert "shm" not in {v["name"] for v in workload(single)["spec"]["template"]["spec"]["volumes"]}


def test_every_server_option_of_hps_is_a_value(helm: ModuleType, chart: Path, tmp_path: Path) -> None:
    options = {
        "batch_window_us": 200, "max_queued_requests": 64, "max_queries_per_request": 512,
        "max_keys_per_request": 100_000, "max_keys_per_write": 5_000, "max_streams": 4,
        "stream_idle_seconds": 30.0, "admin": True,
    }  # fmt: skip
    values = {**values_of("gpu"), "server": options, "persistentDb": {"options": {"sync_writes": True}}}
    values["models"][0]["tables"][0]["version"] = "v2"
    values["models"][0]["hit_rate_threshold"] = 1.1
    config = served_config(render(helm, chart, values), tmp_path)
    assert {name: getattr(config.server, name) for name in options} == options
    assert config.persistent_db.sync_writes
    assert config.models[0].tables[0].version == "v2"


def test_by_default_the_server_ingests_tables_itself(helm: ModuleType, chart: Path, tmp_path: Path) -> None:
    manifests = render(helm, chart, {})
    assert "initContainers" not in workload(manifests)["spec"]["template"]["spec"]
    assert all(t.source is not None for m in served_config(manifests, tmp_path).models for t in m.tables)


def test_devices_beyond_the_pods_gpus_are_refused(helm: ModuleType, chart: Path) -> None:
    values = values_of("gpu")  # two GPUs per pod
    values["models"][0]["deployed_device_list"] = [0, 2]
    with pytest.raises(helm.HelmRenderError, match=r"models\[ctr\].deployed_device_list: device 2.*gpu.count=2"):
        render(helm, chart, values)
    values["gpu"]["count"] = 0  # CPU pods: the reference cache ignores device numbers
    assert by_kind(render(helm, chart, values), "ConfigMap")


# ---------------------------------------------------------------- the "restricted" Pod Security Standard

_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What a namespace enforcing the "restricted" Pod Security level would reject in a pod spec."""
    found = [f"spec.{key}" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds - _RESTRICTED_VOLUMES)}")
    pod_context = pod.get("securityContext", {})
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        name, context = container["name"], container.get("securityContext", {})
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities must drop ALL and add at most NET_BIND_SERVICE")
        if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot must be true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost, got {seccomp}")
        if any("hostPort" in port for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_meet_the_restricted_pod_security_standard(helm: ModuleType, chart: Path, scenario: str) -> None:
    pod = workload(render(helm, chart, values_of(scenario)))["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    if scenario == "gpu":
        assert len(pod["initContainers"]) == 2  # the sync and import steps were checked too


def test_the_restricted_check_catches_what_the_chart_lacked(helm: ModuleType, chart: Path) -> None:
    pod = workload(render(helm, chart, {"podSecurityContext": {"seccompProfile": None}}))["spec"]["template"]["spec"]
    assert restricted_violations(pod) == ["hps: seccompProfile must be RuntimeDefault or Localhost, got None"]


# ---------------------------------------------------------------- pass-through options and names


def test_a_new_redis_password_rolls_the_pods(helm: ModuleType, chart: Path) -> None:
    def annotations(password: str) -> dict[str, str]:
        values = values_of("external-redis")
        values["redis"]["password"] = password
        return dict(workload(render(helm, chart, values))["spec"]["template"]["metadata"]["annotations"])

    first, second = annotations("s3cret-pass"), annotations("rotated-pass")
    assert first["checksum/secret"] != second["checksum/secret"]
    assert first["checksum/config"] == second["checksum/config"]  # the password is not in the ConfigMap
    assert "checksum/secret" not in workload(render(helm, chart, {}))["spec"]["template"]["metadata"]["annotations"]


def test_extra_volumes_env_from_and_a_private_redis_ca(helm: ModuleType, chart: Path, tmp_path: Path) -> None:
    manifests = render(helm, chart, values_of("extras"))
    pod = workload(manifests)["spec"]["template"]["spec"]
    container = hps_container(manifests)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["redis-ca"]["secret"] == {"secretName": "redis-ca"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["redis-ca"] == {"name": "redis-ca", "mountPath": "/etc/redis-ca", "readOnly": True}
    assert {"name": "config", "mountPath": "/etc/hps", "readOnly": True} in container["volumeMounts"]
    assert container["envFrom"] == [{"secretRef": {"name": "hps-extra-env"}}]
    env = {e["name"]: e for e in container["env"]}
    assert env["SSL_CERT_FILE"]["value"] == "/etc/redis-ca/ca.crt"
    assert "HPS_REDIS_PASSWORD" in env
    # The import step runs the same config, so it sees the same mounts.
    values = values_of("extras") | {
        "persistence": {"enabled": True, "perPod": True},
        "tables": {"import": {"enabled": True}},
    }
    init = workload(render(helm, chart, values))["spec"]["template"]["spec"]["initContainers"]
    assert any(m["name"] == "redis-ca" for m in init[0]["volumeMounts"])
    assert "envFrom" not in hps_container(render(helm, chart, {}))


def test_updates_between_replicas_reach_the_config(helm: ModuleType, chart: Path, tmp_path: Path) -> None:
    values = values_of("external-redis") | {"updates": {"stream": "ctr_updates", "max_len": 50000}}
    updates = served_config(render(helm, chart, values), tmp_path).updates
    assert (updates.enabled, updates.stream, updates.max_len) == (True, "ctr_updates", 50000)
    # By default the pods share the stream on the Redis Cluster they use as L2.
    default = served_config(render(helm, chart, values_of("external-redis")), tmp_path)
    assert default.updates == hps_config.UpdatesConfig()
    assert default.updates.stream_address(default.volatile_db) == default.volatile_db.address
    off = render(helm, chart, values_of("external-redis") | {"updates": {"enabled": False}})
    assert served_config(off, tmp_path).updates.enabled is False


def test_name_overrides(helm: ModuleType, chart: Path) -> None:
    manifests = render(helm, chart, values_of("extras"))
    names = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    assert ("Deployment", "hps-ranking") in names and ("ConfigMap", "hps-ranking") in names
    assert ("Secret", "hps-ranking-redis") in names
    renamed = render(helm, chart, {"nameOverride": "ranker"})
    deployment = workload(renamed)
    assert deployment["metadata"]["name"] == "rec-ranker"
    assert deployment["metadata"]["labels"]["app.kubernetes.io/name"] == "ranker"
    service = next(s for s in by_kind(renamed, "Service") if s["spec"].get("clusterIP") != "None")
    assert service["spec"]["selector"]["app.kubernetes.io/name"] == "ranker"


def test_headless_service_and_connection_age_for_client_side_balancing(
    helm: ModuleType, chart: Path, tmp_path: Path
) -> None:
    manifests = render(helm, chart, values_of("extras"))
    headless = next(s for s in by_kind(manifests, "Service") if s["spec"].get("clusterIP") == "None")
    assert headless["metadata"]["name"] == "hps-ranking-headless"
    assert headless["spec"]["publishNotReadyAddresses"] is False  # only ready pods are resolved
    assert headless["spec"]["selector"].items() <= workload(manifests)["spec"]["template"]["metadata"]["labels"].items()
    assert all(s["spec"].get("clusterIP") != "None" for s in by_kind(render(helm, chart, values_of("cpu")), "Service"))
    # Connections age out, so channels opened before a scale-out reach the new pods too.
    assert served_config(manifests, tmp_path).server.max_connection_age_seconds == 300
    tuned = render(helm, chart, {"server": {"max_connection_age_seconds": 0}})
    assert served_config(tuned, tmp_path).server.max_connection_age_seconds == 0


def test_pods_sharing_one_writable_rocksdb_are_refused_and_one_is_recreated(helm: ModuleType, chart: Path) -> None:
    shared = {"persistence": {"enabled": True, "perPod": False}, "replicaCount": 2}
    with pytest.raises(helm.HelmRenderError, match=r"persistence.perPod: false shares one RocksDB between the pods"):
        render(helm, chart, shared)
    one_pod = workload(render(helm, chart, {**shared, "replicaCount": 1}))
    assert one_pod["kind"] == "Deployment" and one_pod["spec"]["strategy"] == {"type": "Recreate"}
    read_only = {
        **shared,
        "persistentDb": {"readOnly": True},
        "persistence": {**shared["persistence"], "accessModes": ["ReadOnlyMany"]},
    }
    replicas = workload(render(helm, chart, read_only))
    assert replicas["spec"]["replicas"] == 2 and replicas["spec"]["strategy"]["type"] == "RollingUpdate"


def test_the_network_policy_lets_pods_reach_an_update_stream_on_a_cluster_of_its_own(
    helm: ModuleType, chart: Path
) -> None:
    values = values_of("external-redis")
    values["networkPolicy"] = {"enabled": True, "egress": {"enabled": True}}
    values["updates"] = {"address": "stream-0:7001, stream-1:7002"}
    policy = one(render(helm, chart, values), "NetworkPolicy")
    ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {7001, 7002} <= ports


def test_the_notes_health_check_speaks_tls_where_the_server_does(helm: ModuleType, chart: Path) -> None:
    for scenario, wanted in (("default", "healthcheck localhost:8500\n"), ("secure", "--tls-ca-file ca.crt")):
        with helm.Chart.load(str(chart)) as loaded:
            files = loaded.render(values_of(scenario), name="rec", namespace="ml", is_install=True)
        notes = next(text for path, text in files.items() if path.endswith("NOTES.txt"))
        assert wanted in notes, notes


def test_values_that_would_be_ignored_are_refused(helm: ModuleType, chart: Path) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"persistence.existingClaim: a StatefulSet \(perPod: true\)"):
        render(helm, chart, {"persistence": {"enabled": True, "perPod": True, "existingClaim": "mine"}})
    redis = {**values_of("external-redis")["redis"], "tls": True, "tlsClientCert": True, "tlsSecretName": ""}
    with pytest.raises(helm.HelmRenderError, match=r"redis.tlsClientCert: the client certificate comes from"):
        render(helm, chart, {**values_of("external-redis"), "redis": redis})


def test_an_update_stream_port_is_opened_without_the_redis_level_too(helm: ModuleType, chart: Path) -> None:
    values = {"networkPolicy": {"enabled": True, "egress": {"enabled": True}}, "updates": {"address": "u1:7000"}}
    policy = one(render(helm, chart, values), "NetworkPolicy")
    assert 7000 in {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}


def test_a_dev_shm_of_ones_own_needs_the_charts_turned_off(helm: ModuleType, chart: Path) -> None:
    own = {
        "server": {"processes": 2},
        "extraVolumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        "extraVolumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    with pytest.raises(helm.HelmRenderError, match=r"extraVolumeMounts: /dev/shm is the chart's own"):
        render(helm, chart, {**values_of("gpu"), **own})
    pod = workload(render(helm, chart, {**values_of("gpu"), **own, "sharedMemory": {"enabled": False}}))
    mounts = [m["mountPath"] for m in pod["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]]
    assert mounts.count("/dev/shm") == 1
