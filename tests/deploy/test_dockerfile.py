"""The container image recipe: hadolint-clean, non-root, health-checked, and a CPU build without CUDA."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path


def test_hadolint_finds_nothing(hadolint: str, repo_root: Path) -> None:
    result = subprocess.run(
        [hadolint, "--no-color", str(repo_root / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(hadolint: str, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install python3\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_runs_as_non_root_with_data_volume_and_health_check(repo_root: Path) -> None:
    text = (repo_root / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and not users[-1].startswith(("root", "0")), users
    assert 'VOLUME ["/data"]' in text
    assert "hps_server.healthcheck" in re.search(r"^HEALTHCHECK.*?CMD (.*)$", text, re.MULTILINE | re.DOTALL)[1]
    # The GPU default and the CPU build differ only in build args.
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+-runtime-", text, re.MULTILINE)
    assert re.search(r"^ARG HPS_EXTRAS=cuda12$", text, re.MULTILINE)


def test_the_cuda_extras_exist_in_pyproject(repo_root: Path) -> None:
    pyproject = (repo_root / "pyproject.toml").read_text()
    dockerfile = (repo_root / "Dockerfile").read_text()
    for extra in re.findall(r"HPS_EXTRAS=(cuda\d+)", dockerfile):
        assert re.search(rf"^{extra} = \[", pyproject, re.MULTILINE), extra


def test_dockerignore_keeps_the_build_context_small(repo_root: Path) -> None:
    lines = (repo_root / ".dockerignore").read_text().splitlines()
    assert "*" in lines  # everything is left out unless named
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (repo_root / "Dockerfile").read_text(), re.MULTILINE)
    for source in (s for group in copied for s in group.split()):
        assert f"!{source.rstrip('/')}" in lines or f"!{source.rstrip('/')}/" in lines, source


def test_dependencies_are_installed_from_pyproject_before_the_sources_are_copied(repo_root: Path) -> None:
    """A source change must not reinstall the dependencies (CuPy among them): their layer comes first and is
    built from pyproject.toml alone, with the chosen extras."""
    text = (repo_root / "Dockerfile").read_text()
    steps = text.replace("\\\n", "").splitlines()
    install_deps = next(i for i, step in enumerate(steps) if "pip install --no-cache-dir -r" in step)
    copies = [i for i, step in enumerate(steps) if step.startswith("COPY ") and "--from" not in step]
    assert steps[copies[0]] == "COPY pyproject.toml ./" and copies[0] < install_deps < copies[1]
    assert steps[copies[-1] + 1] == "RUN /opt/hps/bin/pip install --no-cache-dir --no-deps ."
    listing = re.search(r"(python3 -c '.*?' +\"\$\{HPS_EXTRAS\}\")", steps[install_deps])[1]
    printed = subprocess.run(
        ["bash", "-c", listing.replace("python3", sys.executable, 1)],
        cwd=repo_root,
        env={"HPS_EXTRAS": "cuda12,bench"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert printed.stdout.splitlines() == [*project["dependencies"], *extras["cuda12"], *extras["bench"]]
