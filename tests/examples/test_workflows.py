"""The train -> dissect -> deploy -> serve -> predict workflows of examples/, each against a real `hps serve`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples import tf_dlrm, torch_dlrm, two_models
from examples.clicks import Comparison


def _assert_served_like_trained(comparison: Comparison) -> None:
    assert comparison.max_difference <= 1e-5
    # A model that learned nothing would make equal predictions trivially: this one beats the majority class.
    majority = max(comparison.labels.mean(), 1 - comparison.labels.mean())
    assert comparison.accuracy > majority + 0.1


@pytest.mark.parametrize("workflow", [tf_dlrm, torch_dlrm], ids=["tensorflow", "pytorch"])
def test_workflow_predicts_like_the_trained_model(tmp_path: Path, workflow) -> None:
    _assert_served_like_trained(workflow.run(tmp_path))
    ps_config = json.loads((tmp_path / "ps.json").read_text())
    assert [m["model"] for m in ps_config["models"]] == [workflow.MODEL_NAME]
    assert (tmp_path / "tables" / workflow.MODEL_NAME / "history" / "emb_vector").stat().st_size == 500 * 8 * 4


def test_two_models_served_by_one_server(tmp_path: Path) -> None:
    comparisons = two_models.run(tmp_path)
    assert sorted(comparisons) == ["dlrm_tf", "dlrm_torch"]
    for comparison in comparisons.values():
        _assert_served_like_trained(comparison)
    # Same table names, different weights: a mixed-up model would not match its own trained predictions.
    tf_served, torch_served = comparisons["dlrm_tf"].served, comparisons["dlrm_torch"].served
    assert abs(tf_served - torch_served).max() > 1e-3
