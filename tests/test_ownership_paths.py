"""A held port never moves, on every path that can apply forwards (issue 19, item 1).

The holder owns 8080 and 2222; the other guest owns 7000, and then its file is edited to
also claim 8080 (by hand, and with `add`, which refuses it).  Whatever runs next -- the
CLI's reconcile, the network hook (every network restart), the watcher's repair, the
hook's reconnect, the cap -- the holder keeps 8080 and 2222 and the other guest keeps
7000; real traffic decides.  Both orders of names (the holder sorted first and last),
both of our backends.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

from netns_util import Watcher, World, lab_world, wait_until
from vflab.lab import PUBLIC4

pytestmark = pytest.mark.netns

G1, G2 = "192.168.122.10", "192.168.122.11"  # the lab's guest1 and guest2 answer with those names


@pytest.fixture(params=["nftables", "iptables"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    with lab_world(backend="iptables") as w:
        w.write("config.toml", f'backend = "{request.param}"\n')
        yield w


@pytest.fixture(params=["holder sorted last", "holder sorted first"])
def names(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(holder, other): zeta/alpha, or alpha/zeta."""
    return ("zeta", "alpha") if request.param == "holder sorted last" else ("alpha", "zeta")


def _start_both(w: World, holder: str, other: str) -> None:
    w.guest_file(holder, f'address = "{G1}"\npublic = "{PUBLIC4}"\nports = ["8080:80", "2222:22"]\n')
    w.guest_file(other, f'address = "{G2}"\npublic = "{PUBLIC4}"\nports = ["7000:443"]\n')
    for name in (holder, other):
        r = w.hook(name, "start")
        assert r.returncode == 0 and "forward(s) live" in r.stderr, r.stderr


def _edit_other(w: World, other: str) -> None:
    w.guest_file(other, f'address = "{G2}"\npublic = "{PUBLIC4}"\nports = ["7000:443", "8080:3306"]\n')


def _who(w: World, port: int) -> str:
    reply = w.probe("tcp", PUBLIC4, port)
    return "nobody" if reply.startswith("ERR") else reply.split(":")[0]


def _assert_held(w: World, holder: str, other: str) -> None:
    assert (_who(w, 8080), _who(w, 2222), _who(w, 7000)) == ("guest1", "guest1", "guest2")
    assert (w.state / "guests" / f"{holder}.json").exists() and (w.state / "guests" / f"{other}.json").exists()


def test_reconcile_and_the_network_hook_keep_the_holder(world: World, names: tuple[str, str]) -> None:
    w, (holder, other) = world, names
    _start_both(w, holder, other)
    _edit_other(w, other)
    r = w.cli("reconcile", "--running", holder, "--running", other, check=False)
    assert f"8080/tcp is forwarded to guest '{holder}', which holds it; keeping what it held" in r.stdout + r.stderr
    _assert_held(w, holder, other)
    # libvirt restarting the network runs the network hook, which reconciles from the records
    r = w.lab.sh(w.lab.host, str(w.network_hook_path), "default", "started", "begin", "-", stdin="<network/>",
                 env=w.env(), check=False)
    assert r.returncode == 0, r.stderr
    _assert_held(w, holder, other)


def test_the_hook_reconnect_keeps_what_each_guest_held(world: World, names: tuple[str, str]) -> None:
    w, (holder, other) = world, names
    _start_both(w, holder, other)
    _edit_other(w, other)
    r = w.hook(other, "reconnect")
    assert r.returncode == 0 and f"is forwarded to guest '{holder}', which applied it first" in r.stderr, r.stderr
    _assert_held(w, holder, other)


def test_add_refuses_a_held_port_and_leaves_the_file_as_it_was(world: World, names: tuple[str, str]) -> None:
    w, (holder, other) = world, names
    _start_both(w, holder, other)
    path = w.cfg / "guests" / f"{other}.toml"
    before = path.read_bytes()
    r = w.cli("add", other, "8080:3306", check=False)
    assert r.returncode != 0 and f"forwarded to guest '{holder}'" in r.stderr and "file left unchanged" in r.stderr, \
        (r.stdout, r.stderr)
    assert path.read_bytes() == before
    # a port nobody holds is still added and applied
    r = w.cli("add", other, "3306:3306")
    assert "added" in r.stdout
    _assert_held(w, holder, other)
    w.cli("reconcile", "--running", holder, "--running", other)
    _assert_held(w, holder, other)


def test_the_watcher_repairs_without_moving_a_port(world: World, names: tuple[str, str]) -> None:
    w, (holder, other) = world, names
    _start_both(w, holder, other)
    _edit_other(w, other)
    watcher = Watcher(w, interval="2")
    try:
        watcher.wait_monitoring()
        mark = len(watcher.lines)
        # a reset of every rule (both backends' rules live in nf_tables): the watcher's check fails
        w.nft("flush", "ruleset")
        watcher.wait_for_line("reconciled", after=mark, timeout=60)
        wait_until(lambda: _who(w, 2222), lambda got: got == "guest1", timeout=30, what="2222 answering again")
        _assert_held(w, holder, other)
    finally:
        watcher.stop()


def test_a_guest_that_grows_past_the_cap_keeps_what_it_held(world: World, names: tuple[str, str]) -> None:
    w, (holder, other) = world, names
    w.write("config.toml", "max_forwards = 3\n" + (w.cfg / "config.toml").read_text())
    _start_both(w, holder, other)
    # the other guest grows by a port nobody holds, past the cap of 3
    w.guest_file(other, f'address = "{G2}"\npublic = "{PUBLIC4}"\nports = ["7000:443", "3306"]\n')
    r = w.cli("reconcile", "--running", holder, "--running", other, check=False)
    assert "max_forwards = 3" in r.stdout + r.stderr and "keeping what it held" in r.stdout + r.stderr
    _assert_held(w, holder, other)
    assert _who(w, 3306) == "nobody"
    # the cap is lowered below what is held: nobody loses a forward
    w.write("config.toml", "max_forwards = 1\n" + (w.cfg / "config.toml").read_text().split("\n", 1)[1])
    w.guest_file(other, f'address = "{G2}"\npublic = "{PUBLIC4}"\nports = ["7000:443"]\n')
    w.cli("reconcile", "--running", holder, "--running", other, check=False)
    _assert_held(w, holder, other)
    # and a guest over the lowered cap may always give a port up, by `rm` or by an edit
    r = w.cli("rm", holder, "2222:22", check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert (_who(w, 8080), _who(w, 2222), _who(w, 7000)) == ("guest1", "nobody", "guest2")


META_NETWORK = """<network><name>default</name><bridge name='virbr0'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'/></network>"""


def _meta_domain(name: str, ports: list[str]) -> str:
    from virt_forward import domainxml
    return (f"<domain type='kvm'><name>{name}</name><metadata><vf:config xmlns:vf='{domainxml.NAMESPACE}'>"
            f"<vf:address>{G2}</vf:address>" + "".join(f"<vf:port>{p}</vf:port>" for p in ports)
            + "</vf:config></metadata><devices><interface type='network'><mac address='52:54:00:aa:bb:02'/>"
            "<source network='default' bridge='virbr0'/></interface></devices></domain>")


def test_a_metadata_guest_cannot_take_a_file_guests_port(world: World, tmp_path: Path) -> None:
    """Whoever may edit a domain writes its <metadata>, not root: a metadata guest ("alpha",
    sorted first) that later claims a file guest's held port keeps only what it held, through
    the hook's reconnect and through reconcile."""
    w = world
    root = tmp_path / "libvirt"
    (root / "etc/libvirt/qemu/networks").mkdir(parents=True)
    (root / "etc/libvirt/qemu/networks/default.xml").write_text(META_NETWORK)
    env = {**w.env(), "VIRT_FORWARD_LIBVIRT_ROOT": str(root)}
    w.write("config.toml", (w.cfg / "config.toml").read_text() + f'metadata = true\npublic = "{PUBLIC4}"\n')

    def hook(domain: str, op: str, xml: str) -> str:
        r = w.lab.sh(w.lab.host, str(w.hook_path), domain, op, "begin", "-", stdin=xml, env=env, check=False)
        assert r.returncode == 0, r.stderr
        return r.stderr

    assert "forward(s) live" in hook("alpha", "start", _meta_domain("alpha", ["7000:443"]))
    w.guest_file("zeta", f'address = "{G1}"\nports = ["8080:80", "2222:22"]\n')
    assert "forward(s) live" in hook("zeta", "start", _meta_domain("zeta", []))
    edited = _meta_domain("alpha", ["7000:443", "8080:3306"])
    err = hook("alpha", "reconnect", edited)
    assert "8080/tcp is forwarded to guest 'zeta'" in err, err
    assert (_who(w, 8080), _who(w, 2222), _who(w, 7000)) == ("guest1", "guest1", "guest2")
    r = w.lab.sh(w.lab.host, sys.executable, "-m", "virt_forward", "reconcile", "--running", "alpha",
                 "--running", "zeta", env={**os.environ, **env}, check=False)
    assert "which holds it; keeping what it held" in r.stdout + r.stderr, (r.stdout, r.stderr)
    assert (_who(w, 8080), _who(w, 2222), _who(w, 7000)) == ("guest1", "guest1", "guest2")
