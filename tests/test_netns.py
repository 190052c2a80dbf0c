"""Real rules in real kernels, real TCP/UDP through them, inside throw-away namespaces.

The host namespace carries libvirt 9.0's own iptables rules (LIBVIRT_FWI ends
with a REJECT towards virbr0), so every forward here has to get past them.
"""

from __future__ import annotations

import json
import shutil
import threading
from typing import Iterator

import pytest

from netns_util import World, lab_world
from vflab.lab import CLIENT4, CLIENT4_OTHER, PUBLIC4, PUBLIC6

pytestmark = pytest.mark.netns

G1_4, G1_6, G2_4 = "192.168.122.10", "fd00:122::a", "192.168.122.11"
REFUSED = "ERR ConnectionRefusedError"


@pytest.fixture(params=["libvirt-iptables", "libvirt-nftables"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    """A host with libvirt's rules from its iptables backend (libvirt 9.0) or its nftables one (>= 10.4)."""
    with lab_world(backend=request.param.split("-")[1]) as w:
        yield w


@pytest.fixture
def bare() -> Iterator[World]:
    """A host without libvirt's iptables rules (pure nftables host)."""
    with lab_world(libvirt_rules=False) as w:
        yield w


def setup_two(w: World) -> None:
    w.write("config.toml", f'public = ["{PUBLIC4}", "{PUBLIC6}"]\n')
    w.guest_file("guest1", f'address = ["{G1_4}", "{G1_6}"]\n'
                           'ports = ["80", "2222:22", "8000-8002:9000-9002/udp", "udp:5353"]\n')
    w.guest_file("guest2", f'address = "{G2_4}"\nports = ["443"]\nallow = ["{CLIENT4_OTHER}/32"]\n')


def start(w: World, *names: str) -> None:
    for name in names:
        for op in ("prepare", "start", "started"):
            r = w.hook(name, op)
            assert r.returncode == 0, r.stderr
            assert r.stdout == ""


def test_forward_tcp_udp_ipv6_through_libvirt_reject(world: World) -> None:
    w = world
    setup_two(w)
    # Before: libvirt's REJECT is what the client meets.
    assert w.probe("tcp", PUBLIC4, 80).startswith(REFUSED)
    start(w, "guest1")
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC4, 2222) == f"guest1:22 from {CLIENT4}"
    for public_port, guest_port in ((8000, 9000), (8001, 9001), (8002, 9002)):
        assert w.probe("udp", PUBLIC4, public_port) == f"guest1:{guest_port} from {CLIENT4}"
    assert w.probe("udp", PUBLIC4, 5353) == f"guest1:5353 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC6, 80) == "guest1:80 from 2001:db8:1::2"
    assert w.probe("udp", PUBLIC6, 8001) == "guest1:9001 from 2001:db8:1::2"
    # The guard is on top of libvirt's jumps, for IPv4 and IPv6.
    assert w.guards_on_top(), w.foreign()


def test_narrow_unforwarded_and_direct_routes_stay_closed(world: World) -> None:
    w = world
    setup_two(w)
    start(w, "guest1")
    assert w.probe("tcp", PUBLIC4, 80).startswith("guest1:80")
    assert w.probe("tcp", PUBLIC4, 3306).startswith(REFUSED)  # not forwarded: nobody listens on the host
    w.lab.sh(w.lab.client, "ip", "route", "add", "192.168.122.0/24", "via", PUBLIC4)
    w.lab.sh(w.lab.client, "ip", "-6", "route", "add", "fd00:122::/64", "via", PUBLIC6)
    # A host that routes straight to the guest reaches none of its ports, forwarded or not.
    for port in (80, 22, 3306, 8080):
        assert w.probe("tcp", G1_4, port).startswith(REFUSED), port
        assert w.probe("tcp", G1_6, port).startswith(REFUSED), port
    assert w.probe("udp", G1_4, 9001, timeout=1).startswith("ERR")
    # ...while the forward itself still works.
    assert w.probe("tcp", PUBLIC4, 80).startswith("guest1:80")


def test_hairpin_from_host_other_guest_and_itself(world: World) -> None:
    w = world
    setup_two(w)
    start(w, "guest1")
    host, g1, g2 = w.lab.host, w.lab.guest("guest1").ns, w.lab.guest("guest2").ns
    assert w.probe("tcp", PUBLIC4, 80, ns=host) == f"guest1:80 from {PUBLIC4}"
    assert w.probe("tcp", PUBLIC6, 80, ns=host) == f"guest1:80 from {PUBLIC6}"
    # From the guest network the reply must come back through the host: masqueraded.
    assert w.probe("tcp", PUBLIC4, 80, ns=g2) == "guest1:80 from 192.168.122.1"
    assert w.probe("tcp", PUBLIC4, 80, ns=g1) == "guest1:80 from 192.168.122.1"
    assert w.probe("udp", PUBLIC4, 8002, ns=g2) == "guest1:9002 from 192.168.122.1"
    # Outside clients are not masqueraded: the guest sees who called.
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"


def test_hairpin_off(world: World) -> None:
    w = world
    setup_two(w)
    w.write("config.toml", f'public = ["{PUBLIC4}"]\nhairpin = false\n')
    start(w, "guest1")
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC4, 80, ns=w.lab.host).startswith(REFUSED)
    ours = w.nft("list", "table", "inet", "virt_forward").stdout
    assert "masquerade" not in ours and "nat_prerouting" in ours


def test_allow_list(world: World) -> None:
    w = world
    setup_two(w)
    start(w, "guest2")
    assert w.probe("tcp", PUBLIC4, 443, src=CLIENT4_OTHER) == f"guest2:443 from {CLIENT4_OTHER}"
    assert w.probe("tcp", PUBLIC4, 443, src=CLIENT4).startswith(REFUSED)


def test_stop_leaves_nothing_and_start_twice_adds_nothing(world: World) -> None:
    w = world
    setup_two(w)
    before = w.foreign()
    start(w, "guest1", "guest2")
    once = w.ruleset()
    start(w, "guest1", "guest2")
    assert w.ruleset() == once
    assert w.guards_on_top()

    assert w.hook("guest1", "stopped", "end").returncode == 0
    assert w.hook("guest1", "release", "end").returncode == 0
    left = w.elements()
    assert all("192.168.122.10" not in str(e) and "fd00:122::a" not in str(e) for e in left.values()), left
    assert w.probe("tcp", PUBLIC4, 80).startswith(REFUSED)
    assert w.probe("tcp", PUBLIC4, 443, src=CLIENT4_OTHER).startswith("guest2:443")

    assert w.hook("guest2", "stopped", "end").returncode == 0
    assert w.elements() == {}  # the table is gone with the last guest
    assert "virt_forward" not in w.ruleset()
    assert w.no_guards()
    assert w.foreign() == before


def test_config_edited_while_running_then_stop_leaves_nothing(world: World) -> None:
    w = world
    setup_two(w)
    start(w, "guest1")
    w.guest_file("guest1", f'address = "{G1_4}"\nports = ["8080"]\n')  # edited: old ports gone
    assert w.hook("guest1", "stopped", "end").returncode == 0
    assert w.elements() == {}
    assert w.probe("tcp", PUBLIC4, 80).startswith(REFUSED)

    start(w, "guest1")
    (w.cfg / "guests" / "guest1.toml").unlink()  # file deleted while running
    assert w.hook("guest1", "stopped", "end").returncode == 0
    assert w.elements() == {}


def test_reconnect_takes_the_edited_config(world: World) -> None:
    w = world
    setup_two(w)
    start(w, "guest1")
    w.guest_file("guest1", f'address = "{G1_4}"\nports = ["8080:80"]\n')
    assert w.hook("guest1", "reconnect").returncode == 0
    assert w.probe("tcp", PUBLIC4, 8080) == f"guest1:80 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC4, 80).startswith(REFUSED)


def test_broken_config_never_fails_reconnect_and_keeps_the_old_forwards(world: World) -> None:
    w = world
    setup_two(w)
    w.write("config.toml", f'public = ["{PUBLIC4}"]\nstrict = true\n')
    start(w, "guest1")
    w.guest_file("guest1", 'address = "192.168.122.10"\nports = ["99999"]\n')
    r = w.hook("guest1", "reconnect")
    assert r.returncode == 0
    assert "guest1.toml:2: ports:" in r.stderr and "99999" in r.stderr
    assert w.probe("tcp", PUBLIC4, 80).startswith("guest1:80")


def test_strict_aborts_start_only_when_asked(world: World) -> None:
    w = world
    w.guest_file("guest1", 'address = "192.168.122.10"\nports = ["80", "0"]\n')
    r = w.hook("guest1", "prepare")
    assert r.returncode == 0 and "out of range" in r.stderr
    assert w.hook("guest1", "start").returncode == 0
    w.write("config.toml", "strict = true\n")
    r = w.hook("guest1", "prepare")
    assert r.returncode != 0 and "guest1.toml:2: ports:" in r.stderr
    assert w.hook("guest1", "start").returncode != 0
    assert w.elements() == {}


def test_migrate_and_restore_print_nothing_and_unknown_ops_are_ignored(world: World) -> None:
    w = world
    setup_two(w)
    for op in ("migrate", "restore"):
        r = w.hook("guest1", op, xml="<domain><name>guest1</name></domain>")
        assert r.returncode == 0 and r.stdout == ""
    assert w.hook("guest1", "attach").returncode == 0
    assert w.elements() == {}


def test_twenty_concurrent_hook_calls_leave_exactly_the_right_set(world: World) -> None:
    w = world
    w.write("config.toml", f'public = "{PUBLIC4}"\n')
    for i in range(20):
        w.guest_file(f"vm{i}", f'address = "192.168.122.{100 + i}"\nports = ["{10000 + i}:80", "{20000 + i}:53/udp"]\n')
    results: list[int] = []

    def call(i: int) -> None:
        results.append(w.hook(f"vm{i}", "start").returncode)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0] * 20
    dnat = w.elements()["dnat4"]
    want = sorted([(PUBLIC4, "tcp", 10000 + i, f"192.168.122.{100 + i}", 80) for i in range(20)]
                  + [(PUBLIC4, "udp", 20000 + i, f"192.168.122.{100 + i}", 53) for i in range(20)])
    got = sorted((*e[0]["concat"], *e[1]["concat"]) for e in dnat)  # type: ignore[index]
    assert got == want
    # and stopping them all concurrently leaves nothing
    threads = [threading.Thread(target=lambda i=i: w.hook(f"vm{i}", "stopped", "end")) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert w.elements() == {}


def test_wildcard_public_forwards_every_local_address_but_loopback(world: World) -> None:
    w = world
    w.guest_file("guest1", f'address = ["{G1_4}", "{G1_6}"]\nports = ["2222:22"]\n')
    start(w, "guest1")
    assert w.probe("tcp", PUBLIC4, 2222) == f"guest1:22 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC6, 2222) == "guest1:22 from 2001:db8:1::2"
    assert w.probe("tcp", "127.0.0.1", 2222, ns=w.lab.host).startswith(REFUSED)
    # an address that is not the host's is routed, not DNAT-ed
    assert w.probe("tcp", G2_4, 2222, ns=w.lab.host).startswith(REFUSED)


def test_pure_nftables_host_gets_no_iptables_tables(bare: World) -> None:
    w = bare
    setup_two(w)
    start(w, "guest1")
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    tables = w.nft("list", "tables").stdout.split("\n")
    assert [t for t in tables if t] == ["table inet virt_forward"]


def test_status_shows_live_and_missing(world: World) -> None:
    w = world
    setup_two(w)
    start(w, "guest1")
    for _ in range(3):
        assert w.probe("tcp", PUBLIC4, 80).startswith("guest1:80")
    assert w.probe("udp", PUBLIC4, 8001).startswith("guest1:9001")
    out = w.cli("status").stdout
    assert "guest1: applied" in out and f"{PUBLIC4}:80/tcp -> {G1_4}:80" in out and "MISSING" not in out
    line80 = next(ln for ln in out.splitlines() if f"{PUBLIC4}:80/tcp" in ln)
    line8001 = next(ln for ln in out.splitlines() if f"{PUBLIC4}:8001/udp" in ln)
    line2222 = next(ln for ln in out.splitlines() if f"{PUBLIC4}:2222/tcp" in ln)
    assert line80.split()[-2:] == ["3", "connection(s)"], line80
    assert line8001.split()[-2:] == ["1", "connection(s)"], line8001
    assert line2222.split()[-2:] == ["0", "connection(s)"], line2222
    assert w.hook("guest1", "started").returncode == 0  # re-applying keeps the counters
    assert "3 connection(s)" in next(ln for ln in w.cli("status").stdout.splitlines() if f"{PUBLIC4}:80/tcp" in ln)
    assert "guest2: not applied" in out
    assert "rules and guards: in place" in out
    w.nft("delete", "element", "inet", "virt_forward", "dnat4", "{", f"{PUBLIC4} . tcp . 80", "}")
    out = w.cli("status").stdout
    assert f"{PUBLIC4}:80/tcp -> {G1_4}:80" in out and "MISSING" in out
    assert "rules and guards: map dnat4 differs from the records" in out
    data = json.loads(w.cli("status", "--json").stdout)
    assert data["problems"] == ["map dnat4 differs from the records"]
    assert [f["live"] for f in data["guests"][0]["forwards"]].count(False) == 1


def test_libvirt_reinserting_its_rules(world: World) -> None:
    """What a libvirtd restart or network restart does to the foreign chains, and how we come back."""
    w = world
    setup_two(w)
    start(w, "guest1")
    if w.backend == "iptables":
        # libvirt 9.0 re-inserts its jumps at the top of FORWARD: our guard falls below the REJECT.
        for chain in ("LIBVIRT_FWO", "LIBVIRT_FWI", "LIBVIRT_FWX"):
            w.lab.sh(w.lab.host, "iptables", "-w", "-I", "FORWARD", "1", "-j", chain)
        assert w.probe("tcp", PUBLIC4, 80).startswith(REFUSED)
    else:
        # libvirt >= 10.4 re-inserts a network's rules at the top of guest_input; our guard
        # sits in the `forward` base chain above the jump, so it keeps working.
        w.lab.sh(w.lab.host, "nft", "-f", "-", stdin=w.lab.libvirt_nft_ruleset(with_base=False))
        assert w.probe("tcp", PUBLIC4, 80).startswith("guest1:80")
    # libvirt then runs the `reconnect` hook for each guest (daemon restart): back on top, once.
    assert w.hook("guest1", "reconnect").returncode == 0
    assert w.guards_on_top(), w.foreign()
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC6, 80) == "guest1:80 from 2001:db8:1::2"


def test_reconcile_after_flush_wipe_and_edits(world: World) -> None:
    w = world
    setup_two(w)
    start(w, "guest1", "guest2")
    before = w.ruleset()
    # someone flushes our table and libvirt's tables alike
    w.nft("delete", "table", "inet", "virt_forward")
    assert w.probe("tcp", PUBLIC4, 80).startswith(REFUSED)
    out = w.cli("reconcile").stdout
    assert "2 running guest(s)" in out and "records" in out
    assert w.ruleset() == before
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"

    # reboot: the state dir is gone; the boot-time reconcile learns the running guests
    shutil.rmtree(w.state)
    w.nft("delete", "table", "inet", "virt_forward")
    w.cli("reconcile", "--running", "guest1", "--running", "guest2")
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC4, 443, src=CLIENT4_OTHER).startswith("guest2:443")
    assert w.guards_on_top()

    # guest2 stopped while nobody listened, guest1's file edited: nothing orphaned
    w.guest_file("guest1", f'address = "{G1_4}"\nports = ["8080:80"]\n')
    w.cli("reconcile", "--running", "guest1")
    assert w.probe("tcp", PUBLIC4, 8080) == f"guest1:80 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC4, 80).startswith(REFUSED)
    assert w.probe("tcp", PUBLIC4, 443, src=CLIENT4_OTHER).startswith(REFUSED)
    assert [e for e in w.elements()["dnat4"]] == [[{"concat": [PUBLIC4, "tcp", 8080]},
                                                   {"concat": [G1_4, 80]}]]
    assert sorted(p.name for p in (w.state / "guests").iterdir()) == ["guest1.json"]
    # an invalid file keeps what was applied (nothing lost, nothing opened)
    w.guest_file("guest1", f'address = "{G1_4}"\nports = ["0"]\n')
    out = w.cli("reconcile", "--running", "guest1").stdout
    assert "keeping what was applied" in out
    assert w.probe("tcp", PUBLIC4, 8080) == f"guest1:80 from {CLIENT4}"
    # nothing running: everything of ours goes, guards included
    w.cli("reconcile", "--running", "none-of-ours")
    assert w.elements() == {} and w.no_guards()


def test_a_second_guest_cannot_take_a_claimed_port(world: World) -> None:
    w = world
    setup_two(w)
    start(w, "guest1")
    w.guest_file("guest2", f'address = "{G2_4}"\nports = ["80"]\npublic = "{PUBLIC4}"\n')  # guest1's port
    r = w.hook("guest2", "start")
    assert r.returncode == 0 and "is forwarded to guest 'guest1', which applied it first" in r.stderr, r.stderr
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    assert w.hook("guest2", "stopped", "end").returncode == 0
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"  # guest1's forward untouched
    assert "not applied" in w.cli("status", "guest2").stdout


def test_table_of_an_older_version_is_rebuilt(world: World) -> None:
    w = world
    setup_two(w)
    start(w, "guest2")
    # the same table as an earlier release made it: dnat maps without per-element counters
    w.nft("delete", "table", "inet", "virt_forward")
    w.nft("add", "table", "inet", "virt_forward")
    w.nft("add", "map", "inet", "virt_forward", "dnat4",
          "{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service ; }")
    r = w.hook("guest1", "start")
    assert r.returncode == 0 and "older version" in r.stderr, r.stderr
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC4, 443, src=CLIENT4_OTHER).startswith("guest2:443")


def test_live_migration_hook_sequence(world: World) -> None:
    """Destination: migrate, prepare, start, started bring the forwards up; source: stopped/release
    (reason `migrated` on libvirt >= 10.5) take them down, as on any stop."""
    w = world
    setup_two(w)
    r = w.hook("guest1", "migrate", "begin", "-")
    assert r.returncode == 0 and r.stdout == "" and w.elements() == {}  # nothing before it runs here
    for op in ("prepare", "start", "started"):
        assert w.hook("guest1", op, "begin", "-").returncode == 0
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    # the source side of the same migration (a second host, here the same one after the fact)
    assert w.hook("guest1", "stopped", "end", "migrated").returncode == 0
    assert w.hook("guest1", "release", "end", "migrated").returncode == 0
    assert w.elements() == {} and w.probe("tcp", PUBLIC4, 80).startswith(REFUSED)


def test_plan_shows_the_batch_and_the_guards_and_changes_nothing(world: World) -> None:
    w = world
    setup_two(w)
    before = w.ruleset()
    out = w.cli("plan", "guest1").stdout
    assert w.ruleset() == before  # read-only
    assert f"add element inet virt_forward dnat4 {{ {PUBLIC4} . tcp . 80 : {G1_4} . 80" in out
    if w.backend == "iptables":
        assert "iptables filter FORWARD guard: iptables-restore --noflush" in out and "-I FORWARD 1 " in out
    else:
        assert "insert rule ip libvirt_network forward ct mark" in out
        assert "insert rule ip6 libvirt_network forward ct mark" in out
    start(w, "guest1")
    out = w.cli("plan", "guest1").stdout
    assert "# nft -f - <<EOF (one transaction; no guard needed in others' tables)" in out
    assert "add element inet virt_forward dnat4" in out and "skel_" not in out  # the fixed part is there already
    if w.backend == "iptables":
        assert "iptables filter FORWARD guard: in place or not needed" in out


DOCKER_FILTER = """*filter
:FORWARD DROP [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A FORWARD -i docker0 -o docker0 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
"""


def test_docker_forward_policy_drop(bare: World) -> None:
    """A host where Docker set FORWARD's policy to DROP (and no libvirt rules)."""
    w = bare
    setup_two(w)
    w.lab.sh(w.lab.host, "iptables-restore", "-w", "--noflush", stdin=DOCKER_FILTER)
    start(w, "guest1")
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    rules = w.forward_chain()
    assert rules[0] == "-P FORWARD DROP" and "virt-forward:guard" in rules[1], rules
    # the obstacle is real: without the guard, Docker's policy drops our DNAT-ed connection
    w.lab.sh(w.lab.host, "iptables", "-w", "-D", "FORWARD", "1")
    assert w.probe("tcp", PUBLIC4, 80, timeout=1).startswith("ERR")
    assert w.hook("guest1", "reconnect").returncode == 0
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    w.lab.sh(w.lab.client, "ip", "route", "add", "192.168.122.0/24", "via", PUBLIC4)
    assert w.probe("tcp", G1_4, 80, timeout=1).startswith("ERR")  # Docker's DROP stays for the rest
    assert w.hook("guest1", "stopped", "end").returncode == 0
    assert not any("virt-forward" in r for r in w.forward_chain())
