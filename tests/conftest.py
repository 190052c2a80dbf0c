"""Shared fixtures of the pure tests: config dirs that config.py will trust.

config.py refuses files not owned by root or writable by group/other (like
sshd's StrictModes), so every file made here is chowned to root and chmod-ed
explicitly; tmp_path's own modes are not relied upon.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

WriteFile = Callable[..., Path]


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
