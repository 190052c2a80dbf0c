"""The public side of forwards from a domain's <metadata> (issue 19, item 8): whoever may edit a
domain is not root, so its <public> must be an address of this host, not a libvirt bridge's own,
and within metadata_public (default: config.toml's public; refused when both are empty), and
its forwards are bounded by metadata_max_forwards."""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from netns_util import World, make_world
from vflab.lab import BRIDGE4, CLIENT4, PUBLIC4, PUBLIC6
from virt_forward import domainxml
from virt_forward.config import (METADATA_MAX_FORWARDS, Settings, check_metadata_scope, guest_from_metadata)
from virt_forward.errors import ConfigError
from virt_forward.ports import IPAddress

ip = ipaddress.ip_address
net = ipaddress.ip_network
NET = ipaddress.ip_interface("192.168.122.1/24")
HOST = frozenset({ip("198.51.100.1"), ip("192.168.122.1"), ip("2001:db8:1::1"), ip("203.0.113.5")})
BRIDGES = frozenset({ip("192.168.122.1")})
WHERE = "<metadata of domain web>"


def _check(meta: dict[str, list[str]], settings: Settings, host: frozenset[IPAddress] | None = HOST) -> None:
    guest = guest_from_metadata("web", {"address": ["192.168.122.10"], **meta}, subnets=(NET,))
    check_metadata_scope(guest, settings, host=lambda: host, networks=BRIDGES)


PUBLIC = Settings(metadata=True, public=(ip("198.51.100.1"),))
WIDE = Settings(metadata=True, metadata_public=(net("0.0.0.0/0"), net("::/0")))


@pytest.mark.parametrize("meta, settings", [
    ({"ports": ["8080"]}, PUBLIC),  # the default: config.toml's public
    ({"public": ["198.51.100.1"], "ports": ["8080"]}, PUBLIC),
    ({"ports": ["198.51.100.1:8080:80"]}, PUBLIC),
    ({"public": ["2001:db8:1::1", "203.0.113.5"], "ports": ["8080"]}, WIDE),
    ({"public": ["203.0.113.5"], "ports": ["8080"]},
     Settings(metadata=True, metadata_public=(net("203.0.113.0/24"),))),
])
def test_allowed(meta: dict[str, list[str]], settings: Settings) -> None:
    _check(meta, settings)


@pytest.mark.parametrize("meta, settings, message", [
    # neither metadata_public nor public: the forwards would open every local address
    ({"public": ["198.51.100.1"], "ports": ["8080"]}, Settings(metadata=True),
     f"{WHERE}: refused: config.toml sets neither metadata_public nor public, so forwards from <metadata> would "
     "open every local address (set metadata_public to the addresses they may use)"),
    # the bridge's own address, even where metadata_public would allow it
    ({"public": ["192.168.122.1"], "ports": ["8080"]}, WIDE,
     f"{WHERE}: public: <public>: 192.168.122.1 is the host's own address on a libvirt network (its bridge): a "
     "forward there would take the guests' own traffic to their gateway"),
    ({"ports": ["192.168.122.1:8080:80"]}, WIDE,
     f"{WHERE}: ports: '192.168.122.1:8080:80': 192.168.122.1 is the host's own address on a libvirt network"),
    # an address the host does not have
    ({"public": ["203.0.113.77"], "ports": ["8080"]}, WIDE,
     f"{WHERE}: public: <public>: 203.0.113.77 is not an address of this host"),
    # outside metadata_public, by default config.toml's public
    ({"public": ["203.0.113.5"], "ports": ["8080"]}, PUBLIC,
     f"{WHERE}: public: <public>: 203.0.113.5 is outside config.toml's public (metadata_public is not set): "
     "198.51.100.1/32"),
    ({"ports": ["[2001:db8:1::1]:8080:80"]}, PUBLIC,
     f"{WHERE}: ports: '[2001:db8:1::1]:8080:80': 2001:db8:1::1 is outside config.toml's public"),
    ({"public": ["198.51.100.1"], "ports": ["8080"]},
     Settings(metadata=True, public=(ip("198.51.100.1"),), metadata_public=(net("203.0.113.0/24"),)),
     f"{WHERE}: public: <public>: 198.51.100.1 is outside metadata_public (the default; config.toml may change "
     "it): 203.0.113.0/24"),
    # no <public>: public would apply, but it is empty or outside metadata_public
    ({"ports": ["8080"]}, WIDE,
     f"{WHERE}: ports: refused: a forward without a public address would take config.toml's public (none: every "
     "local address), which is not within metadata_public (the default; config.toml may change it): name a "
     "<public> within it"),
    ({"ports": ["8080"]}, Settings(metadata=True, public=(ip("198.51.100.1"),),
                                   metadata_public=(net("203.0.113.0/24"),)),
     f"{WHERE}: ports: refused: a forward without a public address would take config.toml's public "
     "(198.51.100.1), which is not within metadata_public"),
    # the host's addresses could not be read: nothing can be checked
    ({"public": ["203.0.113.5"], "ports": ["8080"]}, WIDE,
     f"{WHERE}: public: <public>: 203.0.113.5 cannot be checked: the host's addresses could not be read"),
])
def test_refused(meta: dict[str, list[str]], settings: Settings, message: str) -> None:
    host = None if "cannot be checked" in message else HOST
    with pytest.raises(ConfigError) as info:
        _check(meta, settings, host)
    assert str(info.value).startswith(message), str(info.value)


def test_the_host_is_asked_only_when_a_public_is_named() -> None:
    asked: list[int] = []

    def host() -> frozenset[IPAddress]:
        asked.append(1)
        return HOST
    guest = guest_from_metadata("web", {"address": ["192.168.122.10"], "ports": ["8080", "8081"]}, subnets=(NET,))
    check_metadata_scope(guest, PUBLIC, host=host, networks=BRIDGES)
    assert asked == []
    guest = guest_from_metadata("web", {"address": ["192.168.122.10"], "ports": ["198.51.100.1:8080:80"],
                                        "public": ["198.51.100.1"]}, subnets=(NET,))
    check_metadata_scope(guest, PUBLIC, host=host, networks=BRIDGES)
    assert asked == [1]  # read once


def test_metadata_max_forwards() -> None:
    assert METADATA_MAX_FORWARDS == 16
    _check({"ports": ["8000-8015"]}, PUBLIC)
    with pytest.raises(ConfigError) as info:
        _check({"ports": ["80", "8000-8015"]}, PUBLIC)
    assert str(info.value) == (f"{WHERE}: ports: '8000-8015' is 16 port(s): up to 16 forward(s), 17 for the guest in "
                               "all, more than metadata_max_forwards = 16 (the default; config.toml may change it)")
    two = Settings(metadata=True, public=(ip("198.51.100.1"), ip("2001:db8:1::1")))
    with pytest.raises(ConfigError, match="'8000-8008' is 9 port[(]s[)]: up to 18 forward[(]s[)]"):
        _check({"ports": ["8000-8008"]}, two)  # each port on each public address
    _check({"ports": ["8000-8008"]}, Settings(metadata=True, public=two.public, metadata_max_forwards=18))


# ---------------------------------------------------------------- in a namespace: the host's real addresses

NETWORK = """<network><name>default</name><bridge name='virbr0'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'/></network>"""


def _domain(config: str) -> str:
    return (f"<domain type='kvm'><name>guest1</name><metadata><vf:config xmlns:vf='{domainxml.NAMESPACE}'>"
            f"<vf:address>192.168.122.10</vf:address>{config}</vf:config></metadata>"
            "<devices><interface type='network'><mac address='52:54:00:aa:bb:01'/>"
            "<source network='default' bridge='virbr0'/></interface></devices></domain>")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w, lab = make_world()
    try:
        yield w
    finally:
        lab.close()
        shutil.rmtree(w.root, ignore_errors=True)


@pytest.mark.netns
def test_metadata_public_on_a_real_host(world: World, tmp_path: Path) -> None:
    """The hook in the lab host's namespace, whose addresses `ip` reads: a forward on the bridge's
    own address, on an address the host lacks, outside metadata_public, or without any public
    address configured is refused and opens nothing; one on the host's public address answers."""
    w = world
    root = tmp_path / "libvirt"
    (root / "etc/libvirt/qemu/networks").mkdir(parents=True)
    (root / "etc/libvirt/qemu/networks/default.xml").write_text(NETWORK)
    env = {**w.env(), "VIRT_FORWARD_LIBVIRT_ROOT": str(root)}

    def start(config: str) -> str:
        r = w.lab.sh(w.lab.host, str(w.hook_path), "guest1", "start", "begin", "-", stdin=_domain(config),
                     env=env, check=False)
        assert r.returncode == 0, r.stderr
        return r.stderr

    assert BRIDGE4 == "192.168.122.1" and f"inet {BRIDGE4}/" in w.lab.sh(w.lab.host, "ip", "addr").stdout
    port = "<vf:port>8080:80</vf:port>"
    # was: every local address, 1,024 ports of them at most
    w.write("config.toml", "metadata = true\n")
    assert "config.toml sets neither metadata_public nor public" in start(port)
    assert w.elements() == {} or not any(w.elements().values())
    w.write("config.toml", 'metadata = true\nmetadata_public = ["0.0.0.0/0", "::/0"]\n')
    for public, words in ((BRIDGE4, "is the host's own address on a libvirt network"),
                          ("203.0.113.77", "is not an address of this host")):
        err = start(f"<vf:public>{public}</vf:public>{port}")
        assert f"<metadata of domain guest1>: public: <public>: {public} {words}" in err, err
        assert not any(w.elements().values()), w.elements()
        assert w.probe("tcp", PUBLIC4, 8080).startswith("ERR")
    # within metadata_public by default (public), on an address of the host: live, and answers
    w.write("config.toml", f'metadata = true\npublic = "{PUBLIC4}"\n')
    err = start(f"<vf:public>{PUBLIC6}</vf:public>{port}")
    assert f"{PUBLIC6} is outside config.toml's public (metadata_public is not set)" in err, err
    assert not any(w.elements().values())
    start(port)
    assert w.probe("tcp", PUBLIC4, 8080) == f"guest1:80 from {CLIENT4}"
    # 17 ports are more than metadata_max_forwards (16): refused, and what was applied stays
    err = start("<vf:port>9000-9016</vf:port>")
    assert "more than metadata_max_forwards = 16" in err, err
    assert w.probe("tcp", PUBLIC4, 8080) == f"guest1:80 from {CLIENT4}"
