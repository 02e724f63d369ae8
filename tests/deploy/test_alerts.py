"""The alert rules: promtool accepts them, they fire on the failures they name (promtool test rules), and the
Helm chart's PrometheusRule carries the same rules as the compose stack's file."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.deploy.test_helm import one, render


@pytest.fixture(scope="module")
def rules_file(repo_root: Path) -> Path:
    return repo_root / "deploy" / "prometheus-rules.yml"


def promtool_run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_rules_and_rejects_a_broken_one(promtool: str, rules_file: Path, tmp_path: Path) -> None:
    checked = promtool_run(promtool, "check", "rules", str(rules_file))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    broken = tmp_path / "broken.yml"
    broken.write_text(rules_file.read_text().replace("> 0.01", "> > 0.01"))
    assert promtool_run(promtool, "check", "rules", str(broken)).returncode != 0


def test_the_compose_prometheus_loads_the_rules(repo_root: Path) -> None:
    scrape = yaml.safe_load((repo_root / "deploy" / "prometheus.yml").read_text())
    compose = yaml.safe_load((repo_root / "deploy" / "compose.yaml").read_text())
    mounts = dict(m.rsplit(":", 1)[0].split(":") for m in compose["services"]["prometheus"]["volumes"])
    assert mounts["./prometheus-rules.yml"] in scrape["rule_files"]
    job = {config["job_name"] for config in scrape["scrape_configs"]}
    assert job == {"hps"}  # the job every rule selects


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    selector = ",".join(f'{key}="{value}"' for key, value in {"job": "hps", "instance": "a:9100", **labels}.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


SEVERITY = {
    "HpsServerDown": "critical",
    "HpsErrorRatioHigh": "critical",
    "HpsLookupLatencyHigh": "warning",
    "HpsLevelUnavailable": "warning",
    "HpsLevelWritesFailing": "critical",
    "HpsL1HitRatioDropping": "warning",
}


def _alert(name: str, at: str, fired: list[dict[str, str]]) -> dict[str, Any]:
    expected = [{"exp_labels": {**labels, "severity": SEVERITY[name]}} for labels in fired]
    return {"eval_time": at, "alertname": name, "exp_alerts": expected}


def test_each_alert_fires_on_its_failure_and_not_before(promtool: str, rules_file: Path, tmp_path: Path) -> None:
    at = {"job": "hps"}
    cases = [
        # The server stops answering scrapes at minute 5.
        (
            [_series("up", "1x4 0x10")],
            [_alert("HpsServerDown", "6m", []), _alert("HpsServerDown", "9m", [{**at, "instance": "a:9100"}])],
        ),
        # 100 requests a minute, 5 of them UNAVAILABLE; 30 INVALID_ARGUMENT ones are the client's fault.
        (
            [
                _series("hps_requests_total", "0+95x30", model="m", method="Lookup", code="OK"),
                _series("hps_requests_total", "0+5x30", model="m", method="Lookup", code="UNAVAILABLE"),
                _series("hps_requests_total", "0+30x30", model="m", method="Lookup", code="INVALID_ARGUMENT"),
            ],
            [_alert("HpsErrorRatioHigh", "4m", []), _alert("HpsErrorRatioHigh", "15m", [at])],
        ),
        # Every Lookup takes between 0.1 s and 0.25 s.
        (
            [
                _series("hps_request_duration_seconds_bucket", "0x30", model="m", method="Lookup", le="0.05"),
                _series("hps_request_duration_seconds_bucket", "0+60x30", model="m", method="Lookup", le="0.25"),
                _series("hps_request_duration_seconds_bucket", "0+60x30", model="m", method="Lookup", le="+Inf"),
            ],
            [_alert("HpsLookupLatencyHigh", "8m", []), _alert("HpsLookupLatencyHigh", "20m", [at])],
        ),
        # Redis fails fetches from minute 10; RocksDB's counters stay at 0 (present from the start).
        (
            [
                _series("hps_level_failures_total", "0x10 0+10x10", level="redis_cluster", operation="fetch"),
                _series("hps_level_failures_total", "0x20", level="rocksdb", operation="fetch"),
                _series("hps_level_writes_failing", "0x20", level="rocksdb"),
            ],
            [
                _alert("HpsLevelUnavailable", "9m", []),
                _alert("HpsLevelUnavailable", "15m", [{**at, "level": "redis_cluster"}]),
                _alert("HpsLevelWritesFailing", "15m", []),
            ],
        ),
        # L1 answers 90 of every 100 keys for 90 minutes, then 40.
        (
            [
                _series("hps_cache_hits_total", "0+90x90 8100+40x60", model="m", table="t", device="0"),
                _series("hps_cache_misses_total", "0+10x90 900+60x60", model="m", table="t", device="0"),
            ],
            [
                _alert("HpsL1HitRatioDropping", "85m", []),
                _alert("HpsL1HitRatioDropping", "125m", [{**at, "model": "m", "table": "t"}]),
            ],
        ),
    ]
    tests = [{"interval": "1m", "input_series": series, "alert_rule_test": alerts} for series, alerts in cases]
    # promtool compares annotations too; their text is not what these cases check, so a copy goes without.
    rules = yaml.safe_load(rules_file.read_text())
    for rule in rules["groups"][0]["rules"]:
        del rule["annotations"]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}))
    result = promtool_run(promtool, "test", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_chart_ships_the_same_rules(helm: ModuleType, chart: Path, rules_file: Path) -> None:
    values = {"fullnameOverride": "hps", "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}}}
    rule = one(render(helm, chart, values), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"]["groups"] == yaml.safe_load(rules_file.read_text())["groups"]
    # Thresholds come from values; the job is the release's Service.
    tuned = {"prometheusRule": {"enabled": True, "errorRatio": 0.05, "lookupP99Seconds": 0.2}}
    rules = {
        r["alert"]: r["expr"] for r in one(render(helm, chart, tuned), "PrometheusRule")["spec"]["groups"][0]["rules"]
    }
    assert rules["HpsErrorRatioHigh"].endswith("> 0.05") and rules["HpsLookupLatencyHigh"].endswith("> 0.2")
    assert 'up{job="rec-hps"}' in rules["HpsServerDown"]
    assert [m for m in render(helm, chart, {}) if m["kind"] == "PrometheusRule"] == []


def test_promtool_accepts_the_charts_rules(helm: ModuleType, chart: Path, promtool: str, tmp_path: Path) -> None:
    rule = one(render(helm, chart, {"prometheusRule": {"enabled": True}}), "PrometheusRule")
    path = tmp_path / "chart-rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    checked = promtool_run(promtool, "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture(scope="module")
def chart(repo_root: Path) -> Path:
    return repo_root / "helm" / "hps"
