#!/usr/bin/env python3
"""Set up runsteer in ./.venv and run it: `python3 dev.py demo` or `python3 dev.py test`.

Needs nothing but Python 3.11+. The first run creates the virtual environment and installs
runsteer with its test dependencies; on a machine without an NVIDIA GPU it installs the CPU
build of PyTorch first, so that pip never pulls the multi-gigabyte CUDA build. Later runs
reinstall only when pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".runsteer-installed"
CPU_TORCH = os.environ.get("RUNSTEER_CPU_TORCH", "torch==2.13.0")
"""The CPU build installed first when there is no GPU (override with RUNSTEER_CPU_TORCH)."""
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def say(message: str) -> None:
    print(f"[runsteer] {message}", flush=True)


def pip(*args: str) -> None:
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", *args], check=True)


def has_nvidia_gpu() -> bool:
    """True when `nvidia-smi` lists at least one GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return result.returncode == 0 and "GPU" in result.stdout


def torch_installed() -> bool:
    result = subprocess.run([str(PYTHON), "-c", "import torch"], capture_output=True)
    return result.returncode == 0


def setup() -> None:
    """Create .venv and install runsteer[test] into it, unless it is already up to date."""
    if sys.version_info < (3, 11):
        sys.exit(f"runsteer needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and PYTHON.exists():
        return
    if not PYTHON.exists():
        say(f"creating a virtual environment in {VENV}")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    if not torch_installed():
        if has_nvidia_gpu():
            say("NVIDIA GPU found: PyTorch with CUDA comes with runsteer's own dependencies")
        else:
            say(f"no GPU: installing the CPU build of PyTorch ({CPU_TORCH}) first")
            # Only torch itself comes from the CPU index; its dependencies follow from PyPI below.
            pip(CPU_TORCH, "--no-deps", "--index-url", CPU_TORCH_INDEX, "--retries", "1", "--timeout", "30")
    say("installing runsteer and its test dependencies")
    pip("-e", f"{ROOT}[test]")
    STAMP.write_text(wanted)


TEST_SYSTEM_PACKAGES = {"prometheus": "prometheus", "chromium": "chromium", "initdb": "postgresql"}
"""Programs the tests drive for real (a Prometheus server, a browser, a PostgreSQL cluster), by Debian package."""

POSTGRES_BINDIRS = "/usr/lib/postgresql/*/bin"
"""Where Debian puts initdb and postgres (not on PATH); the tests look there too (tests/postgres.py)."""


def has_program(program: str) -> bool:
    """True when `program` is on PATH (or, for PostgreSQL's initdb, in Debian's versioned directory)."""
    if shutil.which(program) is not None:
        return True
    return program == "initdb" and any(Path("/").glob(POSTGRES_BINDIRS.lstrip("/") + "/initdb"))


def ensure_system_packages() -> None:
    """Install the test suite's system programs with apt-get when they are missing and we may."""
    missing = sorted({package for program, package in TEST_SYSTEM_PACKAGES.items() if not has_program(program)})
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        say(f"missing {', '.join(missing)} and cannot apt-get them here: the tests that need them will fail")
        return
    say(f"installing {', '.join(missing)} with apt-get for the tests that drive them")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=environment)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=environment
    )


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print("usage: python3 dev.py demo [options]   run the demo (server, training run, agent, dashboard)")
        print("       python3 dev.py test [pytest args] run the whole test suite")
        return 2
    setup()
    task, rest = argv[0], argv[1:]
    if task == "demo":
        command = [str(BIN / "runsteer"), "demo", *rest]
    else:
        ensure_system_packages()
        command = [str(PYTHON), "-m", "pytest", *rest]
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as exc:
        say(f"set-up failed: {' '.join(map(str, exc.cmd))} exited with {exc.returncode}")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
