"""Fixtures of the field tier: the builds every system installs (two .deb versions, the
wheels for the venv path, the guest).  The field tier's systems go through an admin's life in order: after a failed step the
rest of that system's steps are skipped, not run on a half-set-up host."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

from lab_provision import build_guest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    system = getattr(item, "funcargs", {}).get("system")
    if rep.failed and system is not None:
        system.failed = True


# --------------------------------------------------------------------------- builds


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two builds of the package from this checkout, an older and a newer version."""
    if os.geteuid() != 0:
        pytest.skip("the field tier needs root")
    out = tmp_path_factory.mktemp("debs")
    version = subprocess.run([sys.executable, "-c", "import virt_forward; print(virt_forward.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    built = []
    for v in (version, f"{version}+field2"):  # valid for Debian and PEP 440; the second is newer for both
        proc = subprocess.run(["bash", str(REPO / "scripts/build-deb.sh"), "--version", v, "--out", str(out)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"build-deb.sh --version {v} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        built.append(Path(proc.stdout.strip().splitlines()[-1]))
    return built[0], built[1]


@pytest.fixture(scope="session")
def guest_files() -> tuple[Path, Path]:
    return build_guest()




@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """What the README's venv install fetches from PyPI, fetched here (the containers have no
    network): this checkout's wheel, tomlkit, and libvirt-python's source with its build tools."""
    if os.geteuid() != 0:
        pytest.skip("the field tier needs root")
    out = tmp_path_factory.mktemp("wheels")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    for argv in ([*pip, "wheel", "--no-deps", "-w", str(out), str(REPO)],
                 [*pip, "download", "--no-deps", "-d", str(out), "tomlkit", "libvirt-python", "setuptools", "wheel"]):
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=out)
        assert proc.returncode == 0, f"{' '.join(argv)}:\n{proc.stderr[-3000:]}"
    return sorted(out.iterdir())
