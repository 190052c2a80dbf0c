"""backend = "iptables" (hosts without nft), against libvirt 9.0's iptables rules, with real traffic."""

from __future__ import annotations

import shutil
import threading
from typing import Iterator

import pytest

from netns_util import World, make_world
from vflab.lab import CLIENT4, CLIENT4_OTHER, PUBLIC4, PUBLIC6

pytestmark = pytest.mark.netns
G1, G2 = "192.168.122.10", "192.168.122.11"
REFUSED = "ERR ConnectionRefusedError"


@pytest.fixture
def world() -> Iterator[World]:
    w, lab = make_world()
    try:
        w.write("config.toml", f'backend = "iptables"\npublic = ["{PUBLIC4}", "{PUBLIC6}"]\n')
        w.guest_file("guest1", f'address = ["{G1}", "fd00:122::a"]\n'
                               'ports = ["80", "2222:22", "8000-8002:9000-9002/udp"]\n')
        w.guest_file("guest2", f'address = "{G2}"\nports = ["443"]\nallow = ["{CLIENT4_OTHER}/32"]\n')
        yield w
    finally:
        lab.close()
        shutil.rmtree(w.root, ignore_errors=True)


def ours(w: World) -> list[str]:
    """Every line of iptables-save (v4 and v6) that is ours: our chains, our jumps, our guard."""
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        text = w.lab.sh(w.lab.host, tool).stdout
        out += [ln for ln in text.splitlines() if "VF-" in ln or "virt-forward" in ln]
    return out


def start(w: World, *names: str) -> None:
    for name in names:
        r = w.hook(name, "start")
        assert r.returncode == 0 and "error" not in r.stderr.lower(), r.stderr


def test_forwards_narrow_hairpin_allow(world: World) -> None:
    w = world
    start(w, "guest1", "guest2")
    assert "virt_forward" not in w.nft("list", "tables").stdout  # nothing in nftables of ours
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC4, 2222) == f"guest1:22 from {CLIENT4}"
    assert w.probe("udp", PUBLIC4, 8001) == f"guest1:9001 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC6, 80) == "guest1:80 from 2001:db8:1::2"
    assert w.probe("tcp", PUBLIC4, 443, src=CLIENT4_OTHER) == f"guest2:443 from {CLIENT4_OTHER}"
    assert w.probe("tcp", PUBLIC4, 443, src=CLIENT4).startswith(REFUSED)
    assert w.probe("tcp", PUBLIC4, 3306).startswith(REFUSED)
    w.lab.sh(w.lab.client, "ip", "route", "add", "192.168.122.0/24", "via", PUBLIC4)
    for port in (80, 22, 3306):
        assert w.probe("tcp", G1, port).startswith(REFUSED), port
    host, g1, g2 = w.lab.host, w.lab.guest("guest1").ns, w.lab.guest("guest2").ns
    assert w.probe("tcp", PUBLIC4, 80, ns=host) == f"guest1:80 from {PUBLIC4}"
    assert w.probe("tcp", PUBLIC4, 80, ns=g2) == "guest1:80 from 192.168.122.1"
    assert w.probe("tcp", PUBLIC4, 80, ns=g1) == "guest1:80 from 192.168.122.1"
    assert "virt-forward:guard" in w.forward_chain()[1]
    assert "guest1: applied" in w.cli("status").stdout and "MISSING" not in w.cli("status").stdout


def test_idempotent_and_exact(world: World) -> None:
    w = world
    start(w, "guest1", "guest2")
    once = ours(w)
    start(w, "guest1", "guest2")
    assert ours(w) == once
    w.guest_file("guest1", f'address = "{G1}"\nports = ["8080:80"]\n')  # edited while running
    assert w.hook("guest1", "stopped", "end").returncode == 0
    assert w.probe("tcp", PUBLIC4, 80).startswith(REFUSED)
    assert w.probe("tcp", PUBLIC4, 443, src=CLIENT4_OTHER).startswith("guest2:443")
    assert not any(G1 in ln for ln in ours(w))
    assert w.hook("guest2", "stopped", "end").returncode == 0
    assert ours(w) == []  # no chain, no jump, no guard of ours is left
    assert w.forward_chain()[1:] == ["-A FORWARD -j LIBVIRT_FWX", "-A FORWARD -j LIBVIRT_FWI",
                                     "-A FORWARD -j LIBVIRT_FWO"]


def test_concurrent_starts_and_reconcile_after_a_flush(world: World) -> None:
    w = world
    for i in range(10):
        w.guest_file(f"vm{i}", f'address = "192.168.122.{100 + i}"\nports = ["{10000 + i}:80"]\n')
    codes: list[int] = []
    threads = [threading.Thread(target=lambda i=i: codes.append(w.hook(f"vm{i}", "start").returncode))
               for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [0] * 10
    jumps = [ln for ln in ours(w) if ln.startswith("-A VF-PREROUTING")]
    assert len(jumps) == 10
    before = ours(w)
    w.lab.sh(w.lab.host, "iptables", "-w", "-t", "nat", "-F", "PREROUTING")  # someone's flush
    assert "jump to our chain missing" in w.cli("status").stdout
    w.cli("reconcile")
    assert sorted(ours(w)) == sorted(before)
    assert "rules and guards: in place" in w.cli("status").stdout


def test_a_second_guest_cannot_take_a_claimed_port(world: World) -> None:
    w = world
    start(w, "guest1")
    w.guest_file("guest2", f'address = "{G2}"\nports = ["80"]\npublic = "{PUBLIC4}"\n')
    r = w.hook("guest2", "start")
    assert r.returncode == 0 and "is forwarded to guest 'guest1', which applied it first" in r.stderr, r.stderr
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    assert not any(G2 in ln for ln in ours(w))


def test_plan_prints_the_exact_iptables_batches_and_changes_nothing(world: World) -> None:
    """`plan` shows what `apply` would run on this backend too: the batches, read from the
    live tables, that iptables-restore takes as they are and that make the forward work."""
    w = world
    start(w, "guest2")
    before = ours(w)
    out = w.cli("plan", "guest1").stdout
    assert ours(w) == before  # read-only
    batches = {}
    for tool in ("iptables", "ip6tables"):
        head = f"# {tool}-restore --noflush <<EOF (one transaction)\n"
        assert head in out, out
        batches[tool] = out.split(head, 1)[1].split("EOF\n", 1)[0]
        assert batches[tool].startswith("*nat\n") and batches[tool].endswith("COMMIT\n")
    assert "-j DNAT --to-destination 192.168.122.10:80" in batches["iptables"]
    assert "-j DNAT --to-destination [fd00:122::a]:80" in batches["ip6tables"]
    for tool, batch in batches.items():
        r = w.lab.sh(w.lab.host, f"{tool}-restore", "--noflush", stdin=batch, check=False)
        assert r.returncode == 0, r.stderr
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC6, 80) == "guest1:80 from 2001:db8:1::2"
    assert w.probe("tcp", PUBLIC4, 443, src=CLIENT4_OTHER) == f"guest2:443 from {CLIENT4_OTHER}"
