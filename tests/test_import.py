"""`import`: the post's scripts and hooks.json -> guest files, data-driven from tests/data/import.

Each case directory holds:
  in/            the files to import (copied to tmp_path/in, so names and paths are real)
  args           optional: the path to import, relative to in/ (default: in/ itself), then
                 --dry-run / --force
  existing/      optional: guest files present before the import
  config.toml    optional
  out.txt        the exact lines import_path returns, or
  error.txt      the exact ConfigError message (then nothing may be written)
  expected/      the exact guest files afterwards ({in} stands for tmp_path/in)
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from conftest import write_trusted
from virt_forward.config import guest_names, load_guest, load_settings
from virt_forward.errors import ConfigError
from virt_forward.importer import import_path
from virt_forward.plan import plan_guest

DATA = Path(__file__).parent / "data" / "import"
CASES = sorted(p.name for p in DATA.iterdir() if p.is_dir())


def _fill(text: str, src: Path, cdir: Path) -> str:
    return text.replace("{in}", str(src)).replace("{cdir}", str(cdir))


def _snapshot(cdir: Path) -> dict[str, str]:
    gdir = cdir / "guests"
    return {p.name: p.read_text() for p in sorted(gdir.iterdir())} if gdir.is_dir() else {}


@pytest.mark.parametrize("case", CASES)
def test_import_case(case: str, cdir: Path, tmp_path: Path) -> None:
    here = DATA / case
    src = tmp_path / "in"
    if (here / "in").is_dir():
        shutil.copytree(here / "in", src)
    else:
        src.mkdir()
    for f in sorted((here / "existing").glob("*.toml")) if (here / "existing").is_dir() else []:
        write_trusted(cdir / "guests" / f.name, f.read_text())
    if (here / "config.toml").exists():
        write_trusted(cdir / "config.toml", (here / "config.toml").read_text())
    args = (here / "args").read_text().split() if (here / "args").exists() else []
    target = src / args[0] if args and not args[0].startswith("--") else src
    before = _snapshot(cdir)

    if (here / "error.txt").exists():
        with pytest.raises(ConfigError) as info:
            import_path(target, cdir, dry_run="--dry-run" in args, force="--force" in args)
        assert str(info.value) == _fill((here / "error.txt").read_text().rstrip("\n"), src, cdir)
        assert _snapshot(cdir) == before
        return

    lines = import_path(target, cdir, dry_run="--dry-run" in args, force="--force" in args)
    assert "\n".join(lines) == _fill((here / "out.txt").read_text().rstrip("\n"), src, cdir)

    expected_dir = here / "expected"
    expected = {p.name: _fill(p.read_text(), src, cdir)
                for p in sorted(expected_dir.iterdir())} if expected_dir.is_dir() else {}
    assert _snapshot(cdir) == expected
    settings = load_settings(cdir)
    for name in guest_names(cdir):  # what the hook will read: trusted, valid, plannable
        path = cdir / "guests" / f"{name}.toml"
        if f"{name}.toml" not in before or before[f"{name}.toml"] != path.read_text():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.stat().st_uid == 0
        guest = load_guest(cdir, name)
        assert guest is not None
        plan_guest(guest, settings)
    assert not [p for p in (cdir / "guests").iterdir() if p.name.startswith(".")], "temp file left behind"


def test_makes_missing_config_dirs_0755(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    os.umask(0o077)
    try:
        shutil.copy(DATA / "post-example" / "in" / "networks" / "web", tmp_path / "web")
        cdir = tmp_path / "etc"
        lines = import_path(tmp_path / "web", cdir)
    finally:
        os.umask(0o022)
    assert lines == [f"wrote {cdir}/guests/web.toml: 2 forward(s) from {tmp_path}/web"]
    for d in (cdir, cdir / "guests"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert stat.S_IMODE((cdir / "guests" / "web.toml").stat().st_mode) == 0o644
    assert load_guest(cdir, "web") is not None


def test_dry_run_makes_no_dirs(tmp_path: Path) -> None:
    shutil.copy(DATA / "post-example" / "in" / "networks" / "web", tmp_path / "web")
    cdir = tmp_path / "etc"
    assert import_path(tmp_path / "web", cdir, dry_run=True) == [
        f"would write {cdir}/guests/web.toml: 2 forward(s) from {tmp_path}/web"]
    assert not cdir.exists()


def test_bad_config_toml_aborts(cdir: Path, tmp_path: Path) -> None:
    write_trusted(cdir / "config.toml", "public = 5\n")
    shutil.copy(DATA / "post-example" / "in" / "networks" / "web", tmp_path / "web")
    with pytest.raises(ConfigError, match=r"config\.toml:1: public: must be a string"):
        import_path(tmp_path / "web", cdir)
    assert _snapshot(cdir) == {}
