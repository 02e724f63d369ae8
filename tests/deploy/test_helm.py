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
SCENARIOS = ["default", "cpu", "gpu", "external-redis", "autoscaling"]
# TLS, tokens, Redis TLS and a NetworkPolicy on (tests/deploy/values/secure.yaml). Its server.tls/auth keys
# are the server's once its TLS and token support is in; until then test_secure_* check them by hand.
RENDERED = [*SCENARIOS, "secure"]


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


@pytest.mark.parametrize("scenario", RENDERED)
def test_lint_is_clean(helm: ModuleType, chart: Path, scenario: str) -> None:
    report = helm.lint(str(chart), values_of(scenario), strict=True, namespace="ml")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", RENDERED)
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
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


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


# ---------------------------------------------------------------- TLS, tokens, NetworkPolicy


def raw_config(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(yaml.safe_load(one(manifests, "ConfigMap")["data"]["hps.yaml"]))


def secret_behind(pod: dict[str, Any], container: dict[str, Any], file: str) -> tuple[str, str]:
    """(Secret name, key) that `file` is, through the container's volumeMounts (whole folders, no subPath)."""
    folder, _, name = file.rpartition("/")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == folder)
    assert mount["readOnly"] is True and "subPath" not in mount  # renewed Secrets reach the running pod
    secret = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
    items = {item["path"]: item["key"] for item in secret.get("items", [])}
    assert not items or name in items, f"{file}: not among the Secret's items {items}"
    return secret["secretName"], items.get(name, name)


def test_secure_config_points_at_the_mounted_secrets(helm: ModuleType, chart: Path) -> None:
    values = values_of("secure")
    values["tables"] = {"import": {"enabled": True}}  # the import step reads the same config
    manifests = render(helm, chart, values)
    server, volatile = raw_config(manifests)["server"], raw_config(manifests)["volatile_db"]
    pod = workload(manifests)["spec"]["template"]["spec"]
    expected = {
        server["tls"]["cert_file"]: ("hps-server-tls", "tls.crt"),
        server["tls"]["key_file"]: ("hps-server-tls", "tls.key"),
        server["tls"]["client_ca_file"]: ("hps-client-ca", "ca.crt"),
        server["auth"]["tokens_file"]: ("hps-tokens", "tokens.yaml"),
        volatile["tls_ca_file"]: ("hps-redis-client", "ca.crt"),
        volatile["tls_cert_file"]: ("hps-redis-client", "tls.crt"),
        volatile["tls_key_file"]: ("hps-redis-client", "tls.key"),
    }
    for container in [hps_container(manifests), *pod["initContainers"]]:
        assert {file: secret_behind(pod, container, file) for file in expected} == expected
    assert (server["read_only"], server["reflection"]) == (True, False)
    # Secrets stay Secrets: the ConfigMap names files, the password comes from the environment.
    assert "redis-auth" not in yaml.safe_dump(one(manifests, "ConfigMap"))
    assert by_kind(manifests, "Secret") == []


def test_secure_redis_tls_config_is_valid_for_the_server(helm: ModuleType, chart: Path, tmp_path: Path) -> None:
    raw = raw_config(render(helm, chart, values_of("secure")))
    raw["server"] = {k: v for k, v in raw["server"].items() if k not in {"tls", "auth", "read_only", "reflection"}}
    volatile = hps_config.parse(raw, tmp_path).volatile_db
    assert volatile.tls and volatile.tls_check_hostname
    assert (volatile.tls_ca_file, volatile.tls_cert_file, volatile.tls_key_file) == (
        Path("/etc/hps-redis-tls/ca.crt"),
        Path("/etc/hps-redis-tls/tls.crt"),
        Path("/etc/hps-redis-tls/tls.key"),
    )
    # Without a Secret: TLS against the image's trust store, no client certificate, the hostname check as set.
    values = values_of("secure")
    values["redis"] |= {"tlsSecretName": "", "tlsCheckHostname": False}
    plain = raw_config(render(helm, chart, values))["volatile_db"]
    assert plain["tls"] is True and plain["tls_check_hostname"] is False
    assert not {"tls_ca_file", "tls_cert_file", "tls_key_file"} & set(plain)


def test_tls_probes_dial_loopback_with_the_mounted_certificates(helm: ModuleType, chart: Path) -> None:
    manifests = render(helm, chart, values_of("secure"))
    container = hps_container(manifests)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in container[probe]  # Kubernetes' gRPC probes speak no TLS
        command = container[probe]["exec"]["command"]
        assert command[:4] == ["python", "-m", "hps_server.healthcheck", "127.0.0.1:8500"]
        flags = dict(zip(command[4::2], command[5::2], strict=True))
        assert flags == {
            "--tls-ca-file": "/etc/hps-tls/ca.crt",
            "--tls-server-name": "rec-hps.ml.svc",
            "--tls-cert-file": "/etc/hps-tls/tls.crt",  # mTLS: the server's own certificate
            "--tls-key-file": "/etc/hps-tls/tls.key",
        }
    values = values_of("secure")
    values["tls"] = {"enabled": True, "secretName": "hps-server-tls", "serverName": "hps.example.com"}
    manifests = render(helm, chart, values)
    command = hps_container(manifests)["readinessProbe"]["exec"]["command"]
    assert command[-2:] == ["--tls-server-name", "hps.example.com"] and "--tls-cert-file" not in command
    server_tls = raw_config(manifests)["server"]["tls"]
    assert server_tls == {"cert_file": "/etc/hps-tls/tls.crt", "key_file": "/etc/hps-tls/tls.key"}
    values["tls"]["clientCA"] = {"enabled": True}  # the CA from the server's own Secret
    assert raw_config(render(helm, chart, values))["server"]["tls"]["client_ca_file"] == "/etc/hps-tls/ca.crt"


def test_network_policy_admits_callers_scraper_and_reaches_dns_and_redis(helm: ModuleType, chart: Path) -> None:
    manifests = render(helm, chart, values_of("secure"))
    policy = one(manifests, "NetworkPolicy")["spec"]
    assert (
        policy["podSelector"]["matchLabels"].items()
        <= workload(manifests)["spec"]["template"]["metadata"]["labels"].items()
    )
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    ingress = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(ingress) == {"grpc", "metrics"} == {p["name"] for p in hps_container(manifests)["ports"]}
    assert ingress["grpc"] == values_of("secure")["networkPolicy"]["grpcFrom"]
    assert ingress["metrics"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    dns, redis = policy["egress"]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert redis["ports"] == [{"port": 6380, "protocol": "TCP"}]  # the ports of redis.addresses, once each
    assert redis["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "redis-cluster"}}}]

    values = values_of("secure")
    values["networkPolicy"]["egress"] |= {
        "redisPorts": [7000, 7001],
        "extra": [{"to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}]}],
    }
    egress = one(render(helm, chart, values), "NetworkPolicy")["spec"]["egress"]
    assert [p["port"] for p in egress[1]["ports"]] == [7000, 7001]
    assert egress[2] == {"to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}]}
    values["networkPolicy"]["egress"]["enabled"] = False
    assert "egress" not in one(render(helm, chart, values), "NetworkPolicy")["spec"]
    # Without Redis: DNS only; without the value: no policy at all.
    local = one(render(helm, chart, {"networkPolicy": {"enabled": True}}), "NetworkPolicy")["spec"]
    assert len(local["egress"]) == 1 and local["ingress"][0]["from"] == [{"podSelector": {}}]
    assert by_kind(render(helm, chart, {}), "NetworkPolicy") == []


def test_tls_and_auth_need_their_secret(helm: ModuleType, chart: Path) -> None:
    for values, field in [
        ({"tls": {"enabled": True}}, "/tls/secretName"),
        ({"auth": {"enabled": True}}, "/auth/tokensSecretName"),
        ({"networkPolicy": {"egress": {"redisPorts": [0]}}}, "/networkPolicy/egress/redisPorts"),
    ]:
        with pytest.raises(helm.HelmValuesError, match=field):
            render(helm, chart, values)
