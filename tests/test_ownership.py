"""A public port belongs to the guest that applied it first: no path hands it to another guest.

Every overlap shape (the same address, one address against every address either way,
overlapping ranges), both orders, both families, both of our backends, through the hook
(full and fast path) and across reconcile -- with real traffic showing who answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from netns_util import World, lab_world
from vflab.lab import CLIENT4, PUBLIC4, PUBLIC6
from virt_forward import claims

pytestmark = pytest.mark.netns

G1_4, G1_6, G2_4, G2_6 = "192.168.122.10", "fd00:122::a", "192.168.122.11", "fd00:122::b"

# (first guest's ports, second guest's ports, a public port both want, family)
SHAPES = {
    "same address": (f'public = "{PUBLIC4}"\nports = ["8080:80"]', f'public = "{PUBLIC4}"\nports = ["8080:80"]', 8080, 4),
    "every address, then one": ('ports = ["8080:80"]', f'ports = ["{PUBLIC4}:8080:80"]', 8080, 4),
    "one address, then every": (f'ports = ["{PUBLIC4}:8080:80"]', 'ports = ["8080:80"]', 8080, 4),
    "overlapping ranges": (f'public = "{PUBLIC4}"\nports = ["8000-8002:9000-9002/udp"]',
                           f'public = "{PUBLIC4}"\nports = ["8002-8004:9002-9004/udp"]', 8002, 4),
    "IPv6, every address then one": ('ports = ["8080:80"]', f'ports = ["[{PUBLIC6}]:8080:80"]', 8080, 6),
}


@pytest.fixture(params=["nftables", "iptables"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    """Our backend as config.toml chooses it, on a host with libvirt 9.0's rules."""
    with lab_world(backend="iptables") as w:
        w.write("config.toml", f'backend = "{request.param}"\n')
        yield w


def files(w: World, first: str, second: str) -> None:
    w.guest_file("guest1", f'address = ["{G1_4}", "{G1_6}"]\n{first}\n')
    w.guest_file("guest2", f'address = ["{G2_4}", "{G2_6}"]\n{second}\n')


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("order", ["guest1 first", "guest2 first"])
def test_the_first_holder_keeps_the_port(world: World, shape: str, order: str) -> None:
    w = world
    first_ports, second_ports, port, family = SHAPES[shape]
    files(w, first_ports, second_ports)
    a, b = ("guest1", "guest2") if order == "guest1 first" else ("guest2", "guest1")
    if order == "guest2 first":  # the same shapes with the roles swapped
        files(w, second_ports, first_ports)
    r = w.hook(a, "start")
    assert r.returncode == 0 and "forward(s) live" in r.stderr, r.stderr
    r = w.hook(b, "start")
    assert r.returncode == 0 and f"is forwarded to guest '{a}', which applied it first" in r.stderr, r.stderr
    proto = "udp" if "/udp" in first_ports else "tcp"
    assert _answer(w, port, family, proto) == a
    # a reconcile (watcher, network hook, boot) must not move it, whatever the names' order
    w.cli("reconcile", "--running", "guest1", "--running", "guest2")
    assert _answer(w, port, family, proto) == a
    assert (w.state / "guests" / f"{a}.json").exists() and not (w.state / "guests" / f"{b}.json").exists()
    # the holder stops: now the other one may have it
    assert w.hook(a, "stopped", "end").returncode == 0
    r = w.hook(b, "start")
    assert r.returncode == 0 and "forward(s) live" in r.stderr, r.stderr
    assert _answer(w, port, family, proto) == b


def _answer(w: World, port: int, family: int, proto: str) -> str:
    """The guest that answers on the public port ("guest1:80 from ..." -> "guest1")."""
    reply = w.probe(proto, PUBLIC4 if family == 4 else PUBLIC6, port)
    assert not reply.startswith("ERR"), reply
    return reply.split(":")[0]


def test_a_port_cannot_be_taken_while_its_holder_is_stopped_and_restarted_on_the_fast_path(world: World) -> None:
    """The fast path replays a start without the planner: it must honour the claims too."""
    import time

    from virt_forward import fastpath
    w = world
    files(w, 'ports = ["8080:80"]', 'ports = ["9999:80"]')
    time.sleep(fastpath.RACY_SECONDS + 0.1)
    for name in ("guest1", "guest2"):
        assert w.hook(name, "start").returncode == 0
    assert w.hook("guest1", "stopped", "end").returncode == 0  # guest1's fast file stays
    # while guest1 is down, guest2 takes 8080 on one address
    w.guest_file("guest2", f'address = ["{G2_4}", "{G2_6}"]\nports = ["{PUBLIC4}:8080:80"]\n')
    r = w.hook("guest2", "start")
    assert "forward(s) live" in r.stderr, r.stderr
    # guest1 comes back: its every-address 8080 overlaps guest2's: refused, by the fast path too
    r = w.hook("guest1", "start")
    assert "is forwarded to guest 'guest2', which applied it first" in r.stderr, r.stderr
    assert _answer(w, 8080, 4, "tcp") == "guest2"


def test_claims_follow_the_records(world: World) -> None:
    w = world
    files(w, f'public = "{PUBLIC4}"\nports = ["80", "53/udp"]', 'ports = ["443"]')
    for name in ("guest1", "guest2"):
        assert w.hook(name, "start").returncode == 0
    held = index(w)
    # one file per (family, protocol, block of 256 ports): "<port> <public> <holder>" lines
    want = {"4-tcp-0": f"80 {PUBLIC4} guest1\n", "4-udp-0": f"53 {PUBLIC4} guest1\n", "4-tcp-1": "443 * guest2\n",
            "6-tcp-1": "443 * guest2\n"}
    assert held == want, held
    assert claims.total(str(w.state)) == 4
    # reconcile rebuilds the same index from the records
    for p in (w.state / "claims").iterdir():
        p.unlink()
    w.cli("reconcile", "--running", "guest1", "--running", "guest2")
    assert index(w) == want and claims.total(str(w.state)) == 4
    assert w.hook("guest1", "stopped", "end").returncode == 0
    assert set(index(w)) == {"4-tcp-1", "6-tcp-1"} and claims.total(str(w.state)) == 2


def index(w: World) -> dict[str, str]:
    return {p.name: p.read_text() for p in (w.state / "claims").iterdir() if not p.name.startswith(".")}


def test_the_host_wide_cap_holds_on_every_path(world: World) -> None:
    w = world
    w.write("config.toml", "max_forwards = 3\n" + (w.cfg / "config.toml").read_text())
    files(w, f'public = "{PUBLIC4}"\nports = ["80", "443"]', f'public = "{PUBLIC4}"\nports = ["8080:80", "22"]')
    assert "forward(s) live" in w.hook("guest1", "start").stderr
    r = w.hook("guest2", "start")
    assert r.returncode == 0 and "not applied" in r.stderr and "max_forwards = 3" in r.stderr, r.stderr
    assert w.probe("tcp", PUBLIC4, 8080).startswith("ERR")
    w.cli("reconcile", "--running", "guest1", "--running", "guest2")  # the holder keeps its forwards
    assert _answer(w, 80, 4, "tcp") == "guest1" and w.probe("tcp", PUBLIC4, 8080).startswith("ERR")
    assert w.hook("guest1", "stopped", "end").returncode == 0
    assert "forward(s) live" in w.hook("guest2", "start").stderr


def test_the_rule_itself(tmp_path: Path) -> None:
    state = str(tmp_path)
    (tmp_path / "claims").mkdir()
    claims.update(state, "a", add=[("4-tcp-80", claims.ANY), ("4-tcp-81", "198.51.100.1")], drop=[])
    assert claims.conflicts(state, "a", [("4-tcp-80", "198.51.100.9")]) == []  # its own
    assert claims.conflicts(state, "b", [("4-tcp-80", "198.51.100.9")]) == [(("4-tcp-80", "198.51.100.9"), "a")]
    assert claims.conflicts(state, "b", [("4-tcp-81", claims.ANY)]) == [(("4-tcp-81", claims.ANY), "a")]
    assert claims.conflicts(state, "b", [("4-tcp-81", "198.51.100.2"), ("6-tcp-80", claims.ANY)]) == []
    claims.update(state, "a", add=[], drop=[("4-tcp-80", claims.ANY)])
    assert (tmp_path / "claims" / "4-tcp-0").read_text() == "81 198.51.100.1 a\n" and claims.total(state) == 1
    claims.update(state, "a", add=[], drop=[("4-tcp-81", "198.51.100.1")])
    assert not (tmp_path / "claims" / "4-tcp-0").exists() and claims.total(state) == 0
    ledger = claims.Ledger()
    ledger.take("a", [("4-udp-53", claims.ANY)])
    assert ledger.clash("b", [("4-udp-53", "192.0.2.1")]) == "a" and ledger.clash("a", [("4-udp-53", "x")]) is None
