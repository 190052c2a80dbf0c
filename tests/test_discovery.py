"""Guest address discovery by MAC, and forwards carried in the domain XML's metadata."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from netns_util import World, make_world
from virt_forward import discovery, domainxml
from virt_forward.lab import CLIENT4, PUBLIC4

MAC = "52:54:00:aa:bb:01"
DOMAIN = f"""<domain type='kvm'><name>guest1</name>
  <metadata>
    <vf:config xmlns:vf="{domainxml.NAMESPACE}">
      <vf:address>192.168.122.10</vf:address><vf:port>8080:80</vf:port><vf:port>53/udp</vf:port>
    </vf:config>
    <other:thing xmlns:other="http://example.org/x"><other:port>1</other:port></other:thing>
  </metadata>
  <devices><interface type='network'><mac address='{MAC.upper()}'/><source network='default' bridge='virbr0'/>
  </interface></devices></domain>"""
NETWORK = f"""<network><name>default</name><bridge name='virbr0'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'><dhcp><range start='192.168.122.100' end='192.168.122.254'/>
  <host mac='{MAC}' name='guest1' ip='192.168.122.10'/></dhcp></ip></network>"""


def test_domain_xml_nics_and_metadata() -> None:
    dom = domainxml.parse(DOMAIN)
    assert dom is not None and dom.name == "guest1"
    assert dom.nics == (domainxml.Nic(MAC, "default", "virbr0"),)
    assert dom.metadata == {"address": ["192.168.122.10"], "ports": ["8080:80", "53/udp"]}
    assert domainxml.parse("<domain><name>x</name></domain>") == domainxml.DomainXML("x", (), None)
    assert domainxml.parse("not xml") is None and domainxml.parse("") is None


def test_unknown_metadata_element_is_refused_by_name() -> None:
    from virt_forward.config import guest_from_metadata
    from virt_forward.errors import ConfigError
    dom = domainxml.parse(DOMAIN.replace("<vf:port>53/udp</vf:port>", "<vf:ports>53</vf:ports>"))
    assert dom is not None and dom.metadata is not None
    assert dom.metadata["ports"] == ["8080:80"] and dom.metadata["<ports>"] == ["53"]
    with pytest.raises(ConfigError, match=r"^<metadata of domain guest1>: '<ports>': unknown key"):
        guest_from_metadata("guest1", dom.metadata)


def _libvirt_root(tmp: Path, network: str | None = None, leases: list[dict[str, object]] | None = None) -> Path:
    if network is not None:
        (tmp / "etc/libvirt/qemu/networks").mkdir(parents=True, exist_ok=True)
        (tmp / "etc/libvirt/qemu/networks/default.xml").write_text(network)
    if leases is not None:
        (tmp / "var/lib/libvirt/dnsmasq").mkdir(parents=True, exist_ok=True)
        (tmp / "var/lib/libvirt/dnsmasq/virbr0.status").write_text(json.dumps(leases))
    return tmp


def test_static_host_first_then_unexpired_leases(tmp_path: Path) -> None:
    nic = (domainxml.Nic(MAC, "default", "virbr0"),)
    assert discovery.discover(nic, tmp_path) == ()
    now = time.time()
    root = _libvirt_root(tmp_path, leases=[
        {"ip-address": "192.168.122.99", "mac-address": MAC, "expiry-time": now - 10},   # expired
        {"ip-address": "192.168.122.150", "mac-address": MAC, "expiry-time": now + 3600},
        {"ip-address": "fd00:122::99", "mac-address": MAC, "expiry-time": now + 3600},
        {"ip-address": "192.168.122.151", "mac-address": "52:54:00:00:00:09", "expiry-time": now + 3600},
    ])
    assert discovery.discover(nic, root) == (ipaddress.ip_address("192.168.122.150"),
                                             ipaddress.ip_address("fd00:122::99"))
    _libvirt_root(tmp_path, network=NETWORK)
    assert discovery.discover(nic, root)[0] == ipaddress.ip_address("192.168.122.10")  # static wins


# ---------------------------------------------------------------- in namespaces

@pytest.fixture
def world() -> Iterator[World]:
    w, lab = make_world()
    try:
        w.write("config.toml", f'public = "{PUBLIC4}"\n')
        yield w
    finally:
        lab.close()
        shutil.rmtree(w.root, ignore_errors=True)


def _env(w: World, root: Path) -> dict[str, str]:
    return {**w.env(), "VIRT_FORWARD_LIBVIRT_ROOT": str(root)}


@pytest.mark.netns
def test_address_from_the_networks_static_dhcp_host(world: World, tmp_path: Path) -> None:
    w = world
    root = _libvirt_root(tmp_path, network=NETWORK)
    w.guest_file("guest1", 'ports = ["8080:80"]\n')  # no address
    r = w.lab.sh(w.lab.host, str(w.hook_path), "guest1", "start", "begin", "-", stdin=DOMAIN, env=_env(w, root))
    assert r.returncode == 0, r.stderr
    assert w.probe("tcp", PUBLIC4, 8080) == f"guest1:80 from {CLIENT4}"


@pytest.mark.netns
def test_watcher_applies_when_the_lease_appears(world: World, tmp_path: Path) -> None:
    w = world
    root = _libvirt_root(tmp_path)
    w.guest_file("guest1", 'ports = ["8080:80"]\n')
    env = _env(w, root)
    r = w.lab.sh(w.lab.host, str(w.hook_path), "guest1", "start", "begin", "-", stdin=DOMAIN, env=env)
    assert r.returncode == 0 and "address not known yet" in r.stderr and MAC in r.stderr
    assert w.elements() == {}
    watcher = subprocess.Popen(["ip", "netns", "exec", w.lab.host, sys.executable, "-m", "virt_forward", "watch"],
                               env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        time.sleep(1)
        _libvirt_root(tmp_path, leases=[{"ip-address": "192.168.122.10", "mac-address": MAC,
                                         "expiry-time": time.time() + 3600}])
        t0 = time.monotonic()
        while time.monotonic() - t0 < 8:
            if w.probe("tcp", PUBLIC4, 8080, timeout=0.3) == f"guest1:80 from {CLIENT4}":
                break
            time.sleep(0.2)
        took = time.monotonic() - t0
        print(f"forward live {took:.2f} s after the lease appeared")
        assert took < 5
    finally:
        watcher.terminate()
        print(watcher.communicate()[1][-1500:])
    assert w.hook("guest1", "stopped", "end").returncode == 0
    assert w.elements() == {}


@pytest.mark.netns
def test_forwards_from_domain_metadata_only_when_trusted(world: World) -> None:
    w = world
    assert w.hook("guest1", "start", xml=DOMAIN).returncode == 0
    assert w.elements() == {}  # metadata is ignored unless config.toml says metadata = true
    w.write("config.toml", f'public = "{PUBLIC4}"\nmetadata = true\n')
    assert w.hook("guest1", "start", xml=DOMAIN).returncode == 0
    assert w.probe("tcp", PUBLIC4, 8080) == f"guest1:80 from {CLIENT4}"
    # a guest file, when there is one, is the whole config: metadata is not merged into it
    w.guest_file("guest1", 'address = "192.168.122.10"\nports = ["9090:80"]\n')
    assert w.hook("guest1", "reconnect", xml=DOMAIN).returncode == 0
    assert w.probe("tcp", PUBLIC4, 9090) == f"guest1:80 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC4, 8080).startswith("ERR")
    # bad metadata is named as such
    (w.cfg / "guests/guest1.toml").unlink()
    r = w.hook("guest1", "reconnect", xml=DOMAIN.replace("8080:80", "70000"))
    assert r.returncode == 0 and "<metadata of domain guest1>: ports:" in r.stderr
