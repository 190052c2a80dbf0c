"""Several networks per guest: '@address' and '@network' send a forward to one NIC.

In namespaces: guest1 has a second NIC on a second NAT bridge (virbr1, 10.0.1.0/24), where
a service listens on that NIC's address only, so an answer proves the DNAT went to the
right NIC.  '@second' finds the NIC's address from libvirt's lease file for its MAC, as
on a real host; the hook is the one `install` writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from netns_util import World, lab_world
from vflab.lab import PUBLIC4

G1, NIC2 = "192.168.122.10", "10.0.1.10"
MAC1, MAC2 = "52:54:00:00:00:01", "52:54:00:00:01:0a"
XML = ("<domain type='kvm' id='1'><name>guest1</name><uuid>6f1c5ce0-6b8a-4a3e-9b36-000000000001</uuid><devices>"
       f"<interface type='network'><mac address='{MAC1}'/><source network='default' bridge='virbr0'/>"
       "<target dev='vnet0'/></interface>"
       f"<interface type='network'><mac address='{MAC2}'/><source network='second' bridge='virbr1'/>"
       "<target dev='vnet9'/></interface></devices></domain>")
# answers on the second NIC's address only: a DNAT to the first NIC gets no answer
NIC2_SERVER = (f"import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
               f"s.bind(('{NIC2}', 81)); s.listen(8); print('ready', flush=True)\n"
               "while True:\n    c, peer = s.accept(); c.sendall(f'nic2:81 from {peer[0]}\\n'.encode()); c.close()\n")


def _network(root: Path, name: str, bridge: str, address: str) -> None:
    path = root / "etc/libvirt/qemu/networks" / f"{name}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<network><name>{name}</name><forward mode='nat'/><bridge name='{bridge}'/>"
                    f"<ip address='{address}' netmask='255.255.255.0'/></network>")


def _lease(root: Path, bridge: str, mac: str, addr: str) -> None:
    path = root / "var/lib/libvirt/dnsmasq" / f"{bridge}.status"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"ip-address": addr, "mac-address": mac, "hostname": "guest1",
                                 "expiry-time": int(time.time()) + 3600}]))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[World, dict[str, str], Path]]:
    with lab_world(backend="nftables", hairpin_ports=False) as w:
        lab, host, ns = w.lab, w.lab.host, w.lab.guest("guest1").ns
        lab.sh(None, "ip", "-n", host, "link", "add", "virbr1", "type", "bridge")
        lab.sh(None, "ip", "-n", host, "addr", "add", "10.0.1.1/24", "dev", "virbr1")
        lab.sh(None, "ip", "-n", host, "link", "set", "virbr1", "up")
        lab.sh(None, "ip", "-n", host, "link", "add", "vnet9", "type", "veth", "peer", "name", "eth1", "netns", ns)
        lab.sh(None, "ip", "-n", host, "link", "set", "vnet9", "master", "virbr1", "up")
        lab.sh(None, "ip", "-n", ns, "addr", "add", f"{NIC2}/24", "dev", "eth1")
        lab.sh(None, "ip", "-n", ns, "link", "set", "eth1", "up")
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", NIC2_SERVER],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        lab.servers.append(server)  # killed with the lab
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        _network(tmp_path, "default", "virbr0", "192.168.122.1")
        _network(tmp_path, "second", "virbr1", "10.0.1.1")
        w.write("config.toml", f'public = ["{PUBLIC4}"]\n')
        yield w, {**w.env(), "VIRT_FORWARD_LIBVIRT_ROOT": str(tmp_path)}, tmp_path


def _hook(w: World, env: dict[str, str], op: str) -> str:
    sub = "end" if op in ("stopped", "release") else "begin"
    r = w.lab.sh(w.lab.host, str(w.hook_path), "guest1", op, sub, "-", stdin=XML, env=env, check=False)
    assert r.returncode == 0 and r.stdout == "", r
    return r.stderr


@pytest.mark.netns
def test_forward_to_the_nic_named_by_its_address(world: tuple[World, dict[str, str], Path]) -> None:
    w, env, _ = world
    w.guest_file("guest1", f'address = ["{G1}", "{NIC2}"]\nports = ["8080:80", "8081:81@{NIC2}"]\n')
    _hook(w, env, "start")
    assert w.probe("tcp", PUBLIC4, 8080) == "guest1:80 from 198.51.100.2"  # the first address: NIC 1
    assert w.probe("tcp", PUBLIC4, 8081) == "nic2:81 from 198.51.100.2"
    _hook(w, env, "stopped")
    assert w.probe("tcp", PUBLIC4, 8081).startswith("ERR")


@pytest.mark.netns
def test_forward_to_the_nic_on_a_network_found_by_its_mac(world: tuple[World, dict[str, str], Path]) -> None:
    w, env, root = world
    w.guest_file("guest1", f'address = "{G1}"\nports = ["8080:80", "8081:81@second"]\n')
    # no lease yet for the second NIC: nothing is applied, the guest waits (the watcher retries)
    err = _hook(w, env, "start")
    assert "address on network 'second' not known yet" in err and f"MAC {MAC2}" in err, err
    assert w.probe("tcp", PUBLIC4, 8080).startswith("ERR")
    _lease(root, "virbr1", MAC2, NIC2)
    _lease(root, "virbr0", MAC2, "192.168.122.99")  # the other network's leases are not the NIC's
    _hook(w, env, "started")
    assert w.probe("tcp", PUBLIC4, 8080) == "guest1:80 from 198.51.100.2"
    assert w.probe("tcp", PUBLIC4, 8081) == "nic2:81 from 198.51.100.2"
    status = w.cli("status").stdout
    assert f"{PUBLIC4}:8081/tcp -> {NIC2}:81" in status, status
    # hairpin mode on both ports: each NIC's network holds a forward's target
    assert (w.state / "hairpin" / "guest1").read_text().split()[0::2] == ["vnet0", "vnet9"]
    _hook(w, env, "stopped")
    assert w.probe("tcp", PUBLIC4, 8081).startswith("ERR") and not (w.state / "hairpin" / "guest1").exists()


def test_a_network_target_in_domain_metadata(cdir: Path, tmp_path: Path) -> None:
    """'@network' in <metadata> is resolved like one in a guest file (the guest is known only
    after the XML is read), and an '@address' there must lie in the domain's own networks."""
    from conftest import write_trusted
    from virt_forward import engine
    from virt_forward.errors import ConfigError
    root = tmp_path / "libvirt"
    _network(root, "default", "virbr0", "192.168.122.1")
    _network(root, "second", "virbr1", "10.0.1.1")
    _lease(root, "virbr1", MAC2, NIC2)
    write_trusted(cdir / "config.toml", "metadata = true\npublic = \"127.0.0.1\"\n")
    ctx = engine.Context(cdir, tmp_path / "state", root)
    meta = ("<metadata><vf:config xmlns:vf='https://virt-forward.org/xmlns/guest/1'>"
            f"<vf:address>{G1}</vf:address><vf:port>8080:80</vf:port><vf:port>8081:81@second</vf:port>"
            "</vf:config></metadata>")
    xml = XML.replace("<devices>", meta + "<devices>")
    want = engine.desired(ctx, "guest1", xml)
    assert want.plan is not None and want.uses_xml and want.inputs is None  # no fast file for it
    assert sorted((f.public_port, str(f.guest)) for f in want.plan.forwards) == [(8080, G1), (8081, NIC2)]
    with pytest.raises(ConfigError, match="not a guest address of the domain's own networks"):
        engine.desired(ctx, "guest1", xml.replace("8081:81@second", "8081:81@10.9.9.9"))


def test_check_accepts_targets_found_at_start(cdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`check` has no domain XML: a guest whose targets come from it ('@network', or no
    `address`) is valid, not an error; a bad spec in it still is."""
    from conftest import write_trusted
    from virt_forward import commands, engine
    write_trusted(cdir / "guests" / "db.toml", 'address = "10.0.0.2"\nports = ["80", "81@backend"]\n')
    write_trusted(cdir / "guests" / "bymac.toml", 'ports = ["80"]\n')
    ctx = engine.Context(cdir, cdir / "state")
    assert commands.check(ctx) == 0
    out = capsys.readouterr().out
    assert "error:" not in out and "0 error(s)" in out and out.count("note: ") == 2 and "db.toml" in out and "bymac.toml" in out, out
    write_trusted(cdir / "guests" / "db.toml", 'address = "10.0.0.2"\nports = ["80", "81@a b"]\n')
    assert commands.check(ctx) != 0
    assert "db.toml:2: ports: '81@a b': target 'a b' is neither" in capsys.readouterr().out
