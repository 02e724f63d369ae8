"""The container image recipe: hadolint-clean, non-root, health-checked, and a CPU build without CUDA."""

from __future__ import annotations

import re
import subprocess
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
