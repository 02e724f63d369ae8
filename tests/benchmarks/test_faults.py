"""`hps bench faults` runs end to end (its own Redis Cluster, hps serve, 8 client threads) through every
fault, and every reply agrees with the acknowledged writes: the issue's fault targets, met."""

from __future__ import annotations

import json

import pytest

from hps_server.cli import main

FAULTS = ["steady", "snapshot_restart", "freeze_short", "freeze_failover", "reshard"]


def test_every_fault_under_load_serves_only_acknowledged_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "faults", "--json", "--seconds", "0.5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [row["fault"] for row in printed["rows"]] == FAULTS
    for row in printed["rows"]:
        assert row["lookups"] > 0 and row["upserts"] > 0
    totals = printed["totals"]
    assert totals["deletes"] > 0
    assert {name: target["value"] for name, target in printed["targets"].items()} == {
        "wrong_vectors": 0,
        "resurrected_deletes": 0,
        "failed_lookups": 0,
        "failed_writes": 0,
    }
