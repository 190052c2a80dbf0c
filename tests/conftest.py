"""Shared fixtures of the pure tests: config dirs that config.py will trust.

config.py refuses files not owned by root or writable by group/other (like
sshd's StrictModes), so every file made here is chowned to root (or, without root,
to the test's own uid, which the cdir fixture makes config.py trust) and chmod-ed
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

from virt_forward import config

import tiers

WriteFile = Callable[..., Path]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden files (tests/data/golden/*) from what the code renders now, then "
                          "read the diff: it is the change in what the kernel gets.  Refused when CI is set.")


def pytest_configure(config: pytest.Config) -> None:
    # the tiers' marks, required runs and the per-tier summary: a plugin of the whole session, not
    # hooks of this conftest (those would not see a session-scoped fixture fail, for one)
    tiers.configure(config)
    if not config.pluginmanager.is_registered(tiers):
        config.pluginmanager.register(tiers, "virt-forward-tiers")
    if os.environ.get("UPDATE_GOLDEN"):
        raise pytest.UsageError("UPDATE_GOLDEN is no longer read (tests wrote, then compared, their own output): "
                                "unset it; pytest --update-golden rewrites the golden files")
    if config.getoption("--update-golden") and os.environ.get("CI"):
        raise pytest.UsageError(f"--update-golden with CI={os.environ['CI']!r}: CI compares against the golden "
                                "files and never writes them; regenerate them by hand and commit the diff")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True under --update-golden: a golden test writes its file and skips (it proves nothing then)."""
    return bool(request.config.getoption("--update-golden"))


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


def _as_root() -> bool:
    return os.geteuid() == 0


def trusted_owner() -> tuple[int, int]:
    """The owner config.py trusts in these tests: root, or without root the test's own uid
    (the cdir fixture adds it to config.TRUSTED_UIDS), so that pure tests run as nobody."""
    return (0, 0) if _as_root() else (os.geteuid(), os.getegid())


def write_trusted(path: Path, data: str | bytes, mode: int = 0o644, uid: int = 0) -> Path:
    """Write a config file owned by `uid` with exactly `mode` (default: what config.py trusts).

    uid 0 means the trusted owner (trusted_owner()); another uid needs root (the `root` tier)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    owner, group = trusted_owner() if uid == 0 else (uid, 0)
    os.chown(path, owner, group)
    os.chmod(path, mode)
    return path


@pytest.fixture(autouse=True)
def _trust_own_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    """config.py trusts the test's own uid besides root: without root, tmp_path and its parents
    (/tmp/pytest-of-<user>) are that uid's.  As root this changes nothing.  A subprocess (the
    hook, the CLI) still trusts root only: such tests need root."""
    monkeypatch.setattr(config, "TRUSTED_UIDS", frozenset({0, trusted_owner()[0]}))


@pytest.fixture
def cdir(tmp_path: Path) -> Path:
    """An empty config dir with guests/ (0755, the trusted owner's: root, or the test's own uid)."""
    root = tmp_path / "etc-virt-forward"
    (root / "guests").mkdir(parents=True)
    for d in (root, root / "guests"):
        os.chown(d, *trusted_owner())
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
