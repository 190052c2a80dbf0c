"""Fixtures of the field tier: the builds every system installs (two .deb versions, the
wheels for the venv path, the guest).  The field tier's systems go through an admin's life in order: after a failed step the
rest of that system's steps are skipped, not run on a half-set-up host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

from field.admin import UPGRADE_MARK  # noqa: E402
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


# the line of watch.py that the second build changes (adding admin.UPGRADE_MARK)
WATCH_LINE = 'log.info(f"watching ('


def _build(tree: Path, version: str, out: Path) -> Path:
    proc = subprocess.run(["bash", str(tree / "scripts/build-deb.sh"), "--version", version, "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"build-deb.sh --version {version} in {tree} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return Path(proc.stdout.strip().splitlines()[-1])


def second_tree(dest: Path) -> Path:
    """A copy of this checkout (what build-deb.sh would package) whose watch.py logs
    UPGRADE_MARK in its start line: the upgrade goes to code that really differs."""
    tree = dest / "virt-forward"
    tree.mkdir(parents=True)
    # what build-deb.sh itself would copy (its excludes); works without a .git too
    pack = subprocess.Popen(["tar", "-C", str(REPO), "-cf", "-", "--exclude=./.git", "--exclude=./.venv",
                             "--exclude=./build", "--exclude=./dist", "--exclude=__pycache__", "--exclude=*.egg-info",
                             "--exclude=./.mypy_cache", "--exclude=./.pytest_cache", "--exclude=./.hypothesis",
                             "--exclude=./debian/generated", "."], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-C", str(tree), "-xf", "-"], stdin=pack.stdout, check=True)
    assert pack.wait() == 0, f"tar of {REPO} failed"
    watch = tree / "src/virt_forward/watch.py"
    text = watch.read_text()
    assert text.count(WATCH_LINE) == 1, f"{watch}: want exactly one {WATCH_LINE!r} to patch, found {text.count(WATCH_LINE)}"
    watch.write_text(text.replace(WATCH_LINE, f'log.info(f"[{UPGRADE_MARK}] watching ('))
    return tree


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """Two builds of the package: this checkout as it is, and a newer version from a copy of
    it with a changed module (second_tree)."""
    if os.geteuid() != 0:
        pytest.skip("the field tier needs root")
    out = tmp_path_factory.mktemp("debs")
    version = subprocess.run([sys.executable, "-c", "import virt_forward; print(virt_forward.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # not under pytest's 0700 temp dir: build-deb.sh runs lintian as nobody from the tree
    tmp = Path(tempfile.mkdtemp(prefix="vf-field-tree2-"))
    try:
        tmp.chmod(0o755)
        first = _build(REPO, version, out)
        # valid for Debian and PEP 440; newer than the first for both
        second = _build(second_tree(tmp), f"{version}+field2", out)
        yield first, second
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
