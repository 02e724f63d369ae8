"""The Grafana dashboard: a valid dashboard model whose every query names metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from hps_server.cache import CacheStats
from hps_server.metrics import CacheOccupancy, LevelOccupancy, PassShape, ServerMetrics


@pytest.fixture(scope="module")
def document(repo_root: Path) -> dict[str, Any]:
    return json.loads((repo_root / "deploy" / "grafana" / "hps-dashboard.json").read_text())


def panels(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in document["panels"] if p["type"] != "row"]


def exported_series_names() -> set[str]:
    """Every series name one server exports once each collector has a sample."""
    m = ServerMetrics(models=["m"])
    tally = m.tally("m", ["t"], ["rocksdb", "default"])
    one = np.ones(1, np.int64)
    tally.add(PassShape.of(np.zeros(1, np.int64), np.zeros(1, np.int64), one), [(0, one, one)], np.zeros(1, np.int64))
    m.record_level_seconds("m", "rocksdb", 0.001)
    m.record_level_failure("redis_cluster", "fetch")
    m.record_model_event("m", "loaded")
    m.requests.labels("m", "Lookup", "OK").inc()
    m.request_seconds.labels("m", "Lookup").observe(0.001)
    m.in_flight.labels("Lookup").set(0)
    m.watch_caches(lambda: [CacheOccupancy("m", "t", "0", CacheStats(1, 1, 1, 2), 16)])
    m.watch_level_occupancy(lambda: [LevelOccupancy("m", "t", "rocksdb", 1, 24)])
    return {sample.name for family in m.registry.collect() for sample in family.samples}


def test_loads_as_a_grafana_dashboard_model(grafana_models: ModuleType, document: dict[str, Any]) -> None:
    dashboard = grafana_models.Dashboard.from_json(document)
    assert dashboard.uid == "hps-overview"
    assert len(dashboard.panels) == len(document["panels"])
    queries = [t for p in dashboard.panels if getattr(p, "targets", None) for t in p.targets]
    assert queries and all(type(q).__module__.endswith(".prometheus") for q in queries)
    assert [v.name for v in dashboard.templating.list_val] == ["datasource", "model"]


def test_panels_are_laid_out_without_overlap(document: dict[str, Any]) -> None:
    ids = [p["id"] for p in document["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in document["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area


def test_every_query_uses_metrics_the_server_exports(document: dict[str, Any]) -> None:
    exported = exported_series_names()
    used = {
        name
        for panel in panels(document)
        for target in panel["targets"]
        for name in re.findall(r"\bhps_[a-z_]+\b", target["expr"])
    }
    assert used, "no query names an hps metric"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    # What the issue asks the dashboard to show.
    for needed in ("hps_requests_total", "hps_request_duration_seconds_bucket", "hps_level_hits_total"):
        assert needed in used


def test_every_panel_reads_the_chosen_data_source(document: dict[str, Any]) -> None:
    for panel in panels(document):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])
