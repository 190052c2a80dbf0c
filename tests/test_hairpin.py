"""Hairpin mode on a guest's bridge port (hairpin.py): the guest reaches its own forwards.

Pure tests of the domain-XML scan and the NAT-network lookup; namespace tests where a
guest (a namespace behind a bridge port, br_netfilter on as on these kernels) calls its
own public address:port through the hook `install` writes, on both libvirt firewall
backends, full path and fast path.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from netns_util import World, lab_world
from vflab.lab import BRIDGE4, PUBLIC4, domain_xml
from virt_forward import discovery, fastpath, hairpin

G1 = "192.168.122.10"
LIVE_NIC = """<interface type='network'>
      <mac address='52:54:00:6b:3c:58'/>
      <source network='default' portid='0b7e1b0e-5d4c-4a5e-8f1e-3c1d2e0a9b77' bridge='virbr0'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>"""


def test_ports_of_a_live_domain_xml() -> None:
    xml = (f"<domain type='kvm' id='4'><name>web</name><devices>{LIVE_NIC}"
           "<interface type=\"bridge\"><mac address=\"52:54:00:00:00:02\"/><source bridge=\"br-lan\"/>"
           "<target dev=\"vnet4\"/></interface>"
           "<interface type='user'><mac address='52:54:00:00:00:03'/></interface>"  # no bridge, no tap
           "<interface type='network'><source bridge='virbr0'/><target dev='a/../../x'/></interface>"  # not a name
           "<interface type='network'><source bridge='virbr0'/><target dev='v&amp;x'/></interface>"
           "<interface type='network'><source bridge='virbr0'/><target dev='0123456789abcdef'/></interface>"
           "</devices></domain>")
    assert hairpin.ports(xml) == [("virbr0", "vnet3"), ("br-lan", "vnet4")]
    assert hairpin.taps(xml, ("virbr0",)) == ["vnet3"]
    assert hairpin.taps(xml, ()) == [] and hairpin.ports("") == [] and hairpin.ports("<interface") == []


@pytest.mark.parametrize("dev, ok", [("vnet0", True), ("x" * 15, True), ("x" * 16, False), ("", False), (".", False),
                                     ("..", False), ("a b", False), ("a:b", False), ("a/b", False)])
def test_interface_names_as_the_kernel_allows_them(dev: str, ok: bool) -> None:
    assert hairpin.valid_name(dev) is ok


def _network(root: Path, rel: str, name: str, bridge: str, forward: str) -> None:
    path = root / rel / f"{name}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<network><name>{name}</name>{forward}<bridge name='{bridge}'/>"
                    f"<ip address='{BRIDGE4}' netmask='255.255.255.0'/>"
                    "<ip family='ipv6' address='fd00:122::1' prefix='64'/></network>")


def test_nat_networks_only(tmp_path: Path) -> None:
    _network(tmp_path, "etc/libvirt/qemu/networks", "default", "virbr0", "<forward mode='nat'/>")
    _network(tmp_path, "etc/libvirt/qemu/networks", "plain", "virbr1", "<forward/>")  # NAT is libvirt's default
    _network(tmp_path, "etc/libvirt/qemu/networks", "routed", "virbr2", "<forward mode='route'/>")
    _network(tmp_path, "etc/libvirt/qemu/networks", "isolated", "virbr3", "")
    nat = discovery.nat_networks(tmp_path)
    assert sorted(nat) == ["virbr0", "virbr1"]
    import ipaddress
    assert discovery.inside(ipaddress.ip_address(G1), nat["virbr0"])
    assert not discovery.inside(ipaddress.ip_address(BRIDGE4), nat["virbr0"])  # the host's own address


# ---------------------------------------------------------------- in namespaces

@pytest.fixture(params=["iptables", "nftables"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[World, dict[str, str]]]:
    with lab_world(backend=request.param, hairpin_ports=False) as w:
        _network(tmp_path, "etc/libvirt/qemu/networks", "default", "virbr0", "<forward mode='nat'/>")
        w.write("config.toml", f'public = ["{PUBLIC4}"]\n')
        w.guest_file("guest1", f'address = "{G1}"\nports = ["8080:80", "8053:53/udp"]\n')
        yield w, {**w.env(), "VIRT_FORWARD_LIBVIRT_ROOT": str(tmp_path), "VIRT_FORWARD_TRACE": "1"}


def _hook(w: World, env: dict[str, str], op: str) -> str:
    """The path the installed hook took (fast/full)."""
    sub = "end" if op in ("stopped", "release") else "begin"
    r = w.lab.sh(w.lab.host, str(w.hook_path), "guest1", op, sub, "-", stdin=domain_xml("guest1"), env=env,
                 check=False)
    assert r.returncode == 0 and r.stdout == "", r
    return "fast" if "trace: fast path" in r.stderr else "full"


def _mode(w: World) -> str:
    return w.lab.sh(w.lab.host, "cat", "/sys/class/net/vnet0/brport/hairpin_mode").stdout.strip()


def _self(w: World, proto: str = "tcp", port: int = 8080) -> str:
    return w.probe(proto, PUBLIC4, port, ns=w.lab.guest("guest1").ns)


@pytest.mark.netns
def test_a_guest_reaches_its_own_forward(world: tuple[World, dict[str, str]]) -> None:
    w, env = world
    w.cli("apply", "guest1")  # no domain XML from the CLI: the port is left as it is
    assert _mode(w) == "0"
    assert _self(w).startswith("ERR")  # what issue 13 measured: the bridge will not send it back
    assert w.probe("tcp", PUBLIC4, 8080).startswith("guest1:80 from ")  # from outside it works

    time.sleep(fastpath.RACY_SECONDS + 0.1)  # settled files: the next calls leave a fast file
    assert _hook(w, env, "start") == "full"
    assert _mode(w) == "1"  # the lab's tap is plugged in at `start` already; libvirt's at `started`
    assert _hook(w, env, "started") == "fast"
    assert (w.state / "hairpin" / "guest1").read_text() == f"vnet0 {_ifindex(w)}\n"
    # masqueraded to the bridge's address, so the reply goes back through us
    assert _self(w) == f"guest1:80 from {BRIDGE4}"
    assert _self(w, "udp", 8053) == f"guest1:53 from {BRIDGE4}"
    assert w.probe("tcp", PUBLIC4, 8080, ns=w.lab.guest("guest2").ns).startswith("guest1:80 from ")

    assert _hook(w, env, "stopped") == "fast"  # off again: we switched it on (the lab's tap outlives the stop)
    assert _mode(w) == "0" and not (w.state / "hairpin" / "guest1").exists()
    for op in ("start", "started"):
        assert _hook(w, env, op) == "fast"
    assert _mode(w) == "1" and _self(w) == f"guest1:80 from {BRIDGE4}"

    w.guest_file("guest1", f'address = "{G1}"\nports = ["8080:80"]\n')  # `rm` of a forward, guest running
    assert _hook(w, env, "reconnect") == "full" and _mode(w) == "1"
    w.write("config.toml", f'public = ["{PUBLIC4}"]\nhairpin = false\n')
    _hook(w, env, "reconnect")
    assert _mode(w) == "0" and not (w.state / "hairpin" / "guest1").exists()


@pytest.mark.netns
def test_a_port_in_hairpin_mode_before_us_stays_so(world: tuple[World, dict[str, str]]) -> None:
    w, env = world
    w.lab.sh(w.lab.host, "ip", "link", "set", "vnet0", "type", "bridge_slave", "hairpin", "on")
    _hook(w, env, "start")
    _hook(w, env, "started")
    assert not (w.state / "hairpin" / "guest1").exists()  # not ours to switch off
    _hook(w, env, "stopped")
    assert _mode(w) == "1"


@pytest.mark.netns
def test_reconcile_sets_it_from_the_kept_or_asked_domain_xml(world: tuple[World, dict[str, str]]) -> None:
    w, env = world
    _hook(w, env, "start")
    _hook(w, env, "started")
    w.lab.sh(w.lab.host, "ip", "link", "set", "vnet0", "type", "bridge_slave", "hairpin", "off")  # someone
    # without libvirt and without a kept domain XML the ports are not known: left alone
    r = w.lab.sh(w.lab.host, str(w.network_hook_path), "default", "started", "begin", "-", env=env, check=False)
    assert r.returncode == 0
    assert _mode(w) == "0"
    # a domain XML kept in the state dir (what the hook keeps for a guest found by MAC) is used
    from virt_forward.state import StateStore
    StateStore(w.state).write_xml("guest1", domain_xml("guest1"))
    r = w.lab.sh(w.lab.host, str(w.network_hook_path), "default", "started", "begin", "-", env=env, check=False)
    assert r.returncode == 0 and _mode(w) == "1", r.stderr


def _ifindex(w: World) -> str:
    return w.lab.sh(w.lab.host, "cat", "/sys/class/net/vnet0/ifindex").stdout.strip()


@pytest.mark.netns
def test_the_watcher_puts_hairpin_mode_back(world: tuple[World, dict[str, str]]) -> None:
    """A network restart makes the bridge ports anew (libvirt re-attaches the taps): hairpin mode
    is gone.  The watcher's check sees it and sets it again from libvirt's live XML, without
    touching the firewall (a firewall change would wake it again)."""
    w, env = world
    _hook(w, env, "start")
    _hook(w, env, "started")
    handle = w.nft("-a", "list", "table", "inet", "virt_forward").stdout.splitlines()[0]
    w.lab.sh(w.lab.host, "ip", "link", "set", "vnet0", "type", "bridge_slave", "hairpin", "off")
    assert "guest1: hairpin mode off on its port vnet0" in w.cli("status").stdout
    code = ("import sys; from virt_forward import engine, watch\n"
            "ctx = engine.default_context(None, None)\n"
            f"print(watch.check_and_repair(ctx, running=['guest1'], xmls={{'guest1': sys.stdin.read()}}))\n")
    r = w.lab.sh(w.lab.host, sys.executable, "-c", code, stdin=domain_xml("guest1"), env={**os.environ, **env})
    assert "hairpin mode off on its port vnet0" in r.stdout, r
    assert _mode(w) == "1" and _self(w) == f"guest1:80 from {BRIDGE4}"
    assert w.nft("-a", "list", "table", "inet", "virt_forward").stdout.splitlines()[0] == handle
    assert "rules and guards: in place" in w.cli("status").stdout
