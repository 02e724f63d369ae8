"""Fixtures for the Triton tests: the Triton environment (`python -m hps_client.triton setup`), prepared once.

Outside CI a machine that cannot prepare it skips these tests saying why; under CI=true they fail instead.
"""

from __future__ import annotations

import os

import pytest

from hps_client.triton import TritonEnvironment, TritonSetupError, setup

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def triton_environment() -> TritonEnvironment:
    try:
        return setup()
    except TritonSetupError as e:
        if IN_CI:
            raise
        pytest.skip(f"needs a Triton environment (python -m hps_client.triton setup): {e}")
