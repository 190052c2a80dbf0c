"""Shared fixtures of the pure tests: config dirs that config.py will trust.

config.py refuses files not owned by root or writable by group/other (like
sshd's StrictModes), so every file made here is chowned to root and chmod-ed
explicitly; tmp_path's own modes are not relied upon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

WriteFile = Callable[..., Path]


def _interpreters_outside_the_venv() -> list[str]:
    """The base interpreter of this venv, Debian's python3 and the python3 on PATH."""
    found = [getattr(sys, "_base_executable", ""), os.path.realpath(sys.executable), "/usr/bin/python3",
             shutil.which("python3") or ""]
    ours = os.path.normpath(sys.executable)
    seen: list[str] = []
    for exe in found:
        if exe and exe != ours and os.access(exe, os.X_OK) and exe not in seen:
            seen.append(exe)
    return seen


def pytest_sessionstart(session: pytest.Session) -> None:
    """The suite must test what users run: a package installed into a base interpreter hides
    a hook that cannot find it (it did: CI was green while no guest could start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    for exe in _interpreters_outside_the_venv():
        probe = subprocess.run([exe, "-c", "import virt_forward; print(virt_forward.__file__)"], cwd="/",
                               env=env, capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            pytest.exit(f"virt_forward is importable by {exe} (from {probe.stdout.strip()}), an interpreter the "
                        f"test suite did not install it into; remove it from there (`{exe} -m pip uninstall "
                        "virt-forward`): the tests must run only what .venv and `virt-forward install` provide",
                        returncode=3)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("config files must be owned by root: run the tests as root")


def write_trusted(path: Path, data: str | bytes, mode: int = 0o644, uid: int = 0) -> Path:
    """Write a config file owned by `uid` with exactly `mode` (default: what config.py trusts)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chown(path, uid, 0)
    os.chmod(path, mode)
    return path


@pytest.fixture
def cdir(tmp_path: Path) -> Path:
    """An empty config dir with guests/ (root, 0755)."""
    _need_root()
    root = tmp_path / "etc-virt-forward"
    (root / "guests").mkdir(parents=True)
    for d in (root, root / "guests"):
        os.chown(d, 0, 0)
        os.chmod(d, 0o755)
    return root


@pytest.fixture
def write_guest(cdir: Path) -> WriteFile:
    """write_guest(name, text, mode=0o644, uid=0) -> path of guests/<name>.toml."""
    def write(name: str, data: str | bytes, mode: int = 0o644, uid: int = 0) -> Path:
        return write_trusted(cdir / "guests" / f"{name}.toml", data, mode, uid)
    return write


@pytest.fixture
def write_config(cdir: Path) -> WriteFile:
    """write_config(text, mode=0o644, uid=0) -> path of config.toml."""
    def write(data: str | bytes, mode: int = 0o644, uid: int = 0) -> Path:
        return write_trusted(cdir / "config.toml", data, mode, uid)
    return write
