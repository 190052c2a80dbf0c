"""add / rm / import through the CLI, on a lab host: edits take effect at once for a running guest."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from netns_util import World, lab_world
from vflab.lab import CLIENT4, PUBLIC4

pytestmark = pytest.mark.netns
# the post's per-guest script, as published (the same file the import corpus starts from)
POSTS_SCRIPT = Path(__file__).resolve().parent / "data" / "import" / "post-example" / "in" / "networks" / "web"


@pytest.fixture
def world() -> Iterator[World]:
    with lab_world() as w:
        yield w


def test_add_and_rm_apply_to_a_running_guest_and_keep_comments(world: World) -> None:
    w = world
    w.write("config.toml", f'public = "{PUBLIC4}"\n')
    path = w.guest_file("guest1", '# the web guest\naddress = "192.168.122.10"  # on default\nports = ["80"]\n')
    assert w.hook("guest1", "start").returncode == 0
    out = w.cli("add", "guest1", "2222:22", "8080:80").stdout
    assert "2222:22" in out and "guest1: 3 forward(s) live" in out
    assert w.probe("tcp", PUBLIC4, 2222) == f"guest1:22 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC4, 8080) == f"guest1:80 from {CLIENT4}"
    w.cli("rm", "guest1", "80")
    assert w.probe("tcp", PUBLIC4, 80).startswith("ERR")
    assert w.probe("tcp", PUBLIC4, 8080) == f"guest1:80 from {CLIENT4}"
    text = path.read_text()
    assert text.startswith("# the web guest\n") and "# on default" in text
    r = w.cli("add", "guest1", "99999", check=False)
    assert r.returncode == 3 and "guest1.toml" in r.stderr and "99999" in r.stderr
    assert path.read_text() == text  # a refused edit changes nothing


def test_import_the_posts_script_then_forward(world: World, tmp_path: Path) -> None:
    w = world
    script = tmp_path / "guest1"
    text = POSTS_SCRIPT.read_text()
    assert "192.168.0.2" in text and "10.1.1.2" in text  # the addresses replaced below
    script.write_text(text.replace("192.168.0.2", PUBLIC4).replace("10.1.1.2", "192.168.122.10"))
    out = w.cli("import", str(script)).stdout
    assert "wrote" in out and "guest1.toml" in out
    assert w.hook("guest1", "start").returncode == 0
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC4, 443).startswith("guest1:443")
