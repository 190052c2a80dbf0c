"""safefile: paths written or removed as root (metrics_file, uninstall) never go through a
directory another user controls, nor through a symlink (issue 19, item 7)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from virt_forward import config, safefile
from virt_forward.errors import ConfigError, VirtForwardError


@pytest.fixture
def textdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """node_exporter's textfile directory, 0755, and elsewhere/, where nothing may appear.
    Our own uid is trusted like root (the directories pytest made above are ours), so this
    runs without root too; a directory of another uid needs root (its own test)."""
    monkeypatch.setattr(config, "TRUSTED_UIDS", frozenset({0, os.geteuid()}))
    tmp_path.chmod(0o755)
    for d in ("textfile", "elsewhere"):
        (tmp_path / d).mkdir(mode=0o755)
        (tmp_path / d).chmod(0o755)
    return tmp_path / "textfile"


def test_write_and_unlink(textdir: Path) -> None:
    target = textdir / "virt_forward.prom"
    safefile.write_strict(str(target), b"a 1\n", 0o644)
    assert target.read_bytes() == b"a 1\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    safefile.write_strict(str(target), b"a 2\n", 0o644)  # over the old one
    assert target.read_bytes() == b"a 2\n" and os.listdir(textdir) == ["virt_forward.prom"]  # no temp file left
    # a symlink planted at the name is replaced, never written through
    victim = textdir.parent / "elsewhere" / "victim"
    victim.write_bytes(b"keep")
    target.unlink()
    target.symlink_to(victim)
    safefile.write_strict(str(target), b"a 3\n", 0o644)
    assert not target.is_symlink() and target.read_bytes() == b"a 3\n" and victim.read_bytes() == b"keep"
    assert safefile.exists_strict(str(target)) is True
    assert safefile.unlink_strict(str(target)) is True and not target.exists()
    assert safefile.exists_strict(str(target)) is False
    assert safefile.unlink_strict(str(target)) is False  # nothing to remove
    assert safefile.unlink_strict(str(textdir / "missing" / "x.prom")) is False


def test_a_directory_swapped_for_a_symlink_is_refused(textdir: Path) -> None:
    """The node_exporter user replaces its directory by a symlink to where root's file would do harm."""
    elsewhere = textdir.parent / "elsewhere"
    textdir.rmdir()
    textdir.symlink_to(elsewhere)
    target = str(textdir / "virt_forward.prom")
    with pytest.raises(ConfigError) as info:
        safefile.write_strict(target, b"a 1\n", 0o644)
    assert str(info.value) == (f"{textdir}: refused: a symlink (to {str(elsewhere)!r}) on the way to {target}: a file "
                               f"written as root never follows one (replace it by the directory it names: {textdir})")
    assert os.listdir(elsewhere) == []  # nothing created elsewhere
    (elsewhere / "virt_forward.prom").write_bytes(b"theirs")
    for check in (safefile.unlink_strict, safefile.exists_strict):
        with pytest.raises(ConfigError, match="refused: a symlink"):
            check(target)
    assert (elsewhere / "virt_forward.prom").read_bytes() == b"theirs"  # nothing removed elsewhere


def test_a_symlink_higher_up_is_refused_too(textdir: Path) -> None:
    elsewhere = textdir.parent / "elsewhere"
    (elsewhere / "deep").mkdir(mode=0o755)
    link = textdir / "sub"
    link.symlink_to(elsewhere)
    with pytest.raises(ConfigError, match=f"^{link}: refused: a symlink"):
        safefile.write_strict(str(link / "deep" / "virt_forward.prom"), b"x", 0o644)
    assert os.listdir(elsewhere / "deep") == []


@pytest.mark.parametrize("mode, words", [
    (0o775, "is writable by group or others (owner root, mode 0775): they could rename or replace the file below "
            "it (chmod go-w"),
    (0o757, "is writable by group or others (owner root, mode 0757)"),
    # sticky is fine above the file's directory (/tmp), not for the directory itself
    (0o1777, "is writable by group or others (owner root, mode 1777)"),
])
def test_a_directory_others_may_write_is_refused(textdir: Path, mode: int, words: str) -> None:
    textdir.chmod(mode)
    target = textdir / "virt_forward.prom"
    with pytest.raises(ConfigError) as info:
        safefile.write_strict(str(target), b"x", 0o644)
    assert str(info.value).startswith(f"{textdir}: refused: the directory of {target} {words}"), str(info.value)
    assert os.listdir(textdir) == []
    with pytest.raises(ConfigError, match="is writable by group or others"):
        safefile.unlink_strict(str(target))


def test_a_group_writable_directory_above_is_refused_a_sticky_one_is_not(textdir: Path) -> None:
    above = textdir.parent
    inner = textdir / "inner"
    inner.mkdir(mode=0o755)
    inner.chmod(0o755)
    textdir.chmod(0o775)
    with pytest.raises(ConfigError, match=f"^{textdir}: refused: a directory above {inner}/x.prom is writable"):
        safefile.write_strict(str(inner / "x.prom"), b"x", 0o644)
    assert os.listdir(inner) == []
    textdir.chmod(0o1777)  # like /tmp: others may add entries, not rename or remove ours
    safefile.write_strict(str(inner / "x.prom"), b"x", 0o644)
    assert (inner / "x.prom").read_bytes() == b"x"
    assert above.is_dir()


def test_a_directory_of_another_user_is_refused(textdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a directory of another uid needs root")
    os.chown(textdir, 65534, 65534)
    target = textdir / "virt_forward.prom"
    with pytest.raises(ConfigError) as info:
        safefile.write_strict(str(target), b"x", 0o644)
    assert str(info.value) == (f"{textdir}: refused: the directory of {target} is owned by uid 65534 (mode 0755), "
                               f"not root: its owner could swap the file below it (chown root {textdir})")
    assert os.listdir(textdir) == []
    # and its owner's file there is not removed by root either
    (textdir / "virt_forward.prom").write_bytes(b"theirs")
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        safefile.unlink_strict(str(target))
    assert (textdir / "virt_forward.prom").exists()


def test_what_is_not_a_plain_path_or_file(textdir: Path) -> None:
    with pytest.raises(ConfigError, match="not an absolute path"):
        safefile.write_strict("relative/x.prom", b"x")
    with pytest.raises(ConfigError, match=r"a '\.\.' in the path"):
        safefile.write_strict(f"{textdir}/../textfile/x.prom", b"x")
    with pytest.raises(ConfigError, match="a directory on the way does not exist"):
        safefile.write_strict(str(textdir / "missing" / "x.prom"), b"x")
    (textdir / "file").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"^{textdir}/file: not a directory"):
        safefile.write_strict(str(textdir / "file" / "x.prom"), b"x")
    (textdir / "dir.prom").mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        safefile.unlink_strict(str(textdir / "dir.prom"))
    with pytest.raises(VirtForwardError, match="cannot write"):
        safefile.write_strict(str(textdir / "dir.prom"), b"x")  # rename over a directory
    assert sorted(os.listdir(textdir)) == ["dir.prom", "file"]
