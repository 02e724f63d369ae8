"""The package as users install it: the sdist built from the checkout's files, the wheel built from that sdist,
installed into a fresh venv outside the checkout, and the `hps` command run from there.

The venv sees the system's site-packages (the dependencies are installed there) but not the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from hps_server.cli import BENCHMARKS

ROOT = Path(__file__).resolve().parent.parent
OWN_PACKAGES = ["hps_server", "hps_client", "hps_wire", "hps_bench"]


def _run(command: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel): the sdist of a copy of the checkout's files (tracked and not ignored), the wheel of that."""
    work = tmp_path_factory.mktemp("build")
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT).split("\0")
    source = work / "source"
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    dist = work / "dist"
    build_sdist = f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"
    sdist = dist / _run([sys.executable, "-c", build_sdist], source).strip().splitlines()[-1]
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    _run([*pip_wheel, "-w", dist, sdist], work)
    (wheel,) = dist.glob("*.whl")
    return sdist, wheel


def test_the_sdist_carries_the_proto_and_the_license(built: tuple[Path, Path]) -> None:
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"proto/hps/v1/hps.proto", "LICENSE", "pyproject.toml", "README.md"} <= names


def test_the_wheel_holds_only_hps_packages(built: tuple[Path, Path]) -> None:
    _, wheel = built
    assert wheel.name.startswith("hps_server-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == set(OWN_PACKAGES)
    assert "hps_bench/triton_ensemble/dense_model.py" in names  # copied into Triton model folders
    assert "hps_server/cache/kernels/" in "".join(names)
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert "Name: hps-server\n" in metadata and "License-Expression: Apache-2.0\n" in metadata


def test_the_installed_wheel_runs_hps_and_every_benchmark_outside_the_checkout(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    _, wheel = built
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # --ignore-installed: an editable install of the checkout in the system's site-packages must not count.
    install = ["install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel]
    _run([sys.executable, "-m", "pip", "--python", python, *install], tmp_path, env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    imported = _run(
        [python, "-c", f"import {', '.join(OWN_PACKAGES)}; print({', '.join(OWN_PACKAGES)}, sep=chr(10))"],
        elsewhere,
        env,
    )
    for package, line in zip(OWN_PACKAGES, imported.splitlines(), strict=True):
        assert str(venv) in line, f"{package} imported from {line}, not from the wheel"
    hps = venv / "bin" / "hps"
    assert _run([hps, "--version"], elsewhere, env).strip() == "hps 0.1.0"
    for name in BENCHMARKS:
        assert _run([hps, "bench", name, "--help"], elsewhere, env).startswith(f"usage: hps bench {name} ")
    # One benchmark run end to end from the wheel: it prints its JSON report.
    memory = [hps, "bench", "memory", "--rows", "2000", "--dims", "8", "--batch-rows", "500", "--json"]
    (result,) = json.loads(_run(memory, elsewhere, env))["results"]
    assert result["rows"] == 2000 and result["dim"] == 8
