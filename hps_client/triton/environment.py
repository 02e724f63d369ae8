"""Prepares a Triton Inference Server that runs Python-backend models here: `python -m hps_client.triton setup`.

The nvidia-pytriton wheel ships tritonserver, its Python backend, and backend stubs per Python version. The 3.11
stub links Debian's libpython3.11, so the models' environment must be a venv made from Debian's own python3 (under
another 3.11 build the stub mixes two standard libraries and replies come back empty), with the stub copied into
the backend folder and NumPy 1.x in the venv (the stub reads NumPy 1 array layouts; NumPy 2 gives empty replies).
This module installs and copies files; it starts no server (see tritonserver.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PYTHON = "/usr/bin/python3"
PYTRITON = "nvidia-pytriton==0.7.0"
# What models in Triton import: the hps client's own needs, NumPy held below 2 for the stub (see above).
MODEL_PACKAGES = ("numpy>=1.26,<2", "grpcio>=1.85.1", "protobuf>=7.35.1", "pyyaml>=6.0")
_STAMP = "hps-triton.json"


class TritonSetupError(RuntimeError):
    """The Triton environment could not be prepared; the message says which step failed and what to do."""


def default_directory() -> Path:
    """$HPS_TRITON_HOME, else ~/.cache/hps/triton."""
    return Path(os.environ.get("HPS_TRITON_HOME") or Path.home() / ".cache" / "hps" / "triton")


@dataclass(frozen=True)
class TritonEnvironment:
    """A prepared folder: venv/ with tritonserver and the packages Python-backend models import."""

    directory: Path
    python_version: str

    @property
    def venv(self) -> Path:
        return self.directory / "venv"

    @property
    def server_root(self) -> Path:
        return self.venv / "lib" / f"python{self.python_version}" / "site-packages" / "pytriton" / "tritonserver"

    @property
    def tritonserver(self) -> Path:
        return self.server_root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.server_root / "backends"

    def process_environment(self) -> dict[str, str]:
        """Environment for tritonserver: the venv's bin first, which is how the stub finds the venv."""
        env = dict(os.environ)
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.pop("PYTHONHOME", None)
        return env


def _run(step: str, command: list[str], hint: str = "") -> str:
    log.info("%s: %s", step, " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise TritonSetupError(f"{step} failed ({done.returncode}): {done.stderr.strip()[-2000:]}{hint}")
    return done.stdout


def setup(directory: str | Path | None = None, python: str = DEFAULT_PYTHON) -> TritonEnvironment:
    """Prepares (or reuses, when already prepared the same way) the Triton environment in `directory`."""
    directory = Path(directory) if directory is not None else default_directory()
    wanted = {"python": python, "pytriton": PYTRITON, "packages": list(MODEL_PACKAGES)}
    stamp = directory / _STAMP
    if stamp.exists():
        recorded = json.loads(stamp.read_text())
        environment = TritonEnvironment(directory, recorded.get("python_version", ""))
        if {k: recorded.get(k) for k in wanted} == wanted and environment.tritonserver.exists():
            return environment
    if not Path(python).exists():
        raise TritonSetupError(f"python: {python} not found; the Python backend needs Debian's python3 (3.11)")
    directory.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    venv = directory / "venv"
    _run("venv", [python, "-m", "venv", "--clear", str(venv)], "\n(on Debian: apt-get install python3-venv)")
    venv_python = str(venv / "bin" / "python")
    version = _run("version", [venv_python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]).strip()
    pip = [venv_python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # Only its server files are used; its own Python dependencies would pull in a client we don't need.
    _run("pip install " + PYTRITON, [*pip, "--no-deps", PYTRITON])
    _run("pip install model packages", [*pip, *MODEL_PACKAGES])
    environment = TritonEnvironment(directory, version)
    stub = environment.server_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonSetupError(f"{PYTRITON} ships no Python-backend stub for Python {version} ({python})")
    shutil.copy2(stub, environment.backends / "python" / "triton_python_backend_stub")
    stamp.write_text(json.dumps({**wanted, "python_version": version}, indent=2))
    return environment
