"""The Helm chart's security values: server TLS/mTLS, tokens and Redis TLS from Secrets, probes, NetworkPolicy.

Renders tests/deploy/values/secure.yaml (the production settings of docs/security.md) and variations of it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from hps_server import config as hps_config
from tests.deploy.test_helm import (
    KUBERNETES_VERSIONS,
    by_kind,
    chart,
    hps_container,
    one,
    render,
    values_of,
    workload,
)

__all__ = ["chart"]  # the fixture, shared with test_helm.py


def test_lint_is_clean(helm: ModuleType, chart: Path) -> None:
    report = helm.lint(str(chart), values_of("secure"), strict=True, namespace="ml")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_passes_kubernetes_schemas(
    helm: ModuleType, kubernetes_validate: ModuleType, chart: Path, version: str
) -> None:
    manifests = render(helm, chart, values_of("secure"))
    assert {"NetworkPolicy", "Deployment", "ConfigMap"} <= {m["kind"] for m in manifests}
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)


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
    values["redis"] |= {"tlsSecretName": "", "tlsClientCert": False, "tlsCheckHostname": False}
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
