"""A guest's address without asking libvirt (the hook must not): from its MACs,
the static DHCP hosts of each NIC's own network, then that network's lease file.

Nothing here trusts more than it must (issue 11): a guest can put any MAC in its
DHCP requests, so a lease only counts when it comes from the lease file of the
NIC's own network and its address lies inside that network's subnets.  Every file
is read so that a FIFO, a device, a symlink or a huge file is skipped, never
waited on: the hook runs at every guest start.

Nor does it guess (issue 19): two unexpired leases for one MAC, or one address leased
to two MACs, may be another guest asking DHCP with this guest's MAC; no address is
taken then (the forwards wait) and the pair is named, until one expires or a static
DHCP host settles it.

Never waits for a lease either: an address not known yet is simply not found,
and the watcher applies the forwards once a lease appears.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import stat
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .domainxml import Nic
from .ports import IPAddress

Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network
_Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# The live state first: it is what the running dnsmasq serves (`net-update --live`
# lands only there); the persistent definition may hold edits not applied yet, and
# is the fallback when there is no readable live state (libvirtd down, a test root).
NETWORK_DIRS = ("var/lib/libvirt/network", "etc/libvirt/qemu/networks")
# libvirt_leaseshelper writes <LEASE_DIR>/<bridge>.status (leaseshelper.c, and
# networkDnsmasqLeaseFileNameCustom in bridge_driver.c): one JSON list per bridge.
LEASE_DIR = "var/lib/libvirt/dnsmasq"
# A real file holds ~200 bytes a lease; beyond this it is not libvirt's and is skipped.
MAX_BYTES = 4 << 20


def read_small(path: Path, limit: int = MAX_BYTES) -> bytes | None:
    """The bytes of a regular file of at most `limit` bytes, else None; never blocks."""
    try:
        # lstat first: never even open a device node (opening one can have effects)
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        # O_NONBLOCK: a FIFO swapped in since would block open() until a writer came;
        # O_NOFOLLOW: a symlink swapped in since is refused (ELOOP)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    try:
        st = os.fstat(fd)  # what was opened, not what the name pointed at before
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        chunks, total = [], 0
        while chunk := os.read(fd, limit + 1 - total):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # grew while being read
                return None
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _safe_name(name: str | None) -> str | None:
    """A network or bridge name usable as one path component, else None (it comes
    from the domain XML: never let it walk out of the directory)."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        return None
    return name


def _parse_network(data: bytes | None) -> ET.Element | None:
    """The <network> element of a definition or of a live status file (<networkstatus>)."""
    if data is None:
        return None
    try:
        root = ET.fromstring(data)
    except (ET.ParseError, ValueError, LookupError):  # LookupError: an unknown encoding
        return None
    return root if root.tag == "network" else root.find("network")


def _network_xml(network: str | None, root: Path) -> ET.Element | None:
    name = _safe_name(network)
    if name is None:
        return None
    for rel in NETWORK_DIRS:
        net = _parse_network(read_small(root / rel / f"{name}.xml"))
        if net is not None:
            return net
    return None


def _network_of_bridge(bridge: str | None, root: Path) -> ET.Element | None:
    """For a NIC plugged into a libvirt network's bridge directly (<interface type='bridge'>)."""
    if _safe_name(bridge) is None:
        return None
    return next((net for net in _all_networks(root) if _bridge(net) == bridge), None)


def _all_networks(root: Path) -> Iterator[ET.Element]:
    """Every network definition readable under `root`, the live states first."""
    for rel in NETWORK_DIRS:
        try:
            paths = sorted((root / rel).glob("*.xml"))
        except OSError:
            continue
        for path in paths:
            net = _parse_network(read_small(path))
            if net is not None:
                yield net
    return None


def _bridge(net: ET.Element) -> str | None:
    el = net.find("bridge")
    return el.get("name") if el is not None else None


def _classful(addr: IPAddress) -> int | None:
    """libvirt's default prefix for an <ip> with neither prefix nor netmask
    (virSocketAddrGetIPPrefix): the class of an IPv4 address, /64 for IPv6."""
    if addr.version == 6:
        return 64
    first = int(addr) >> 24
    return 8 if first < 128 else 16 if first < 192 else 24 if first < 224 else None


def _interfaces(net: ET.Element) -> tuple[_Interface, ...]:
    """The network's <ip> elements as host address + subnet."""
    found: list[_Interface] = []
    for ip in net.iterfind("ip"):
        try:
            addr = ipaddress.ip_address(ip.get("address") or "")
            prefix, mask = (ip.get("prefix") or "0").strip(), ip.get("netmask")
            if addr.is_unspecified or not prefix.isdigit():
                continue  # libvirt refuses such a definition: so do we
            # libvirt's order: a positive prefix, then a netmask, then the default
            length: int | str | None = int(prefix) or (mask if mask and addr.version == 4 else _classful(addr))
            if length is None:
                continue
            iface = ipaddress.ip_interface(f"{addr}/{length}")
        except ValueError:
            continue
        # a /0 would hold every address and so check nothing
        if iface.network.prefixlen > 0 and iface not in found:
            found.append(iface)
    return tuple(found)


def network_subnets(network: str, root: Path = Path("/")) -> tuple[Subnet, ...]:
    """The subnets of the libvirt network `network`, from its live state or its
    definition under `root`; () when unknown.  Pure: reads files, never libvirt."""
    net = _network_xml(network, root)
    return tuple(dict.fromkeys(i.network for i in _interfaces(net))) if net is not None else ()


def nic_interfaces(nics: tuple[Nic, ...], root: Path = Path("/")) -> tuple[_Interface, ...]:
    """The host's address and subnet on each NIC's own network (by name, else by its bridge):
    where a domain's <metadata> forwards may point (config.guest_from_metadata checks)."""
    found: list[_Interface] = []
    for nic in nics:
        net = _network_xml(nic.network, root) if nic.network else None
        net = net if net is not None else _network_of_bridge(nic.bridge, root)
        if net is not None:
            found += [i for i in _interfaces(net) if i not in found]
    return tuple(found)


def nat_networks(root: Path = Path("/")) -> dict[str, tuple[_Interface, ...]]:
    """{bridge: its host addresses and subnets} of every libvirt network that NATs (`<forward>`
    without a mode is NAT), live state first: where a guest calling its own forward needs
    hairpin mode on its port (hairpin.py)."""
    found: dict[str, tuple[_Interface, ...]] = {}
    for net in _all_networks(root):
        forward, bridge = net.find("forward"), _bridge(net)
        if forward is not None and forward.get("mode", "nat") == "nat" and bridge and bridge not in found:
            found[bridge] = _interfaces(net)
    return found


def network_host_addresses(root: Path = Path("/")) -> frozenset[IPAddress]:
    """The host's own address on every libvirt network under `root` (each bridge's <ip address=>):
    never a public address of a forward from <metadata> (config.check_metadata_scope)."""
    return frozenset(i.ip for net in _all_networks(root) for i in _interfaces(net))


def host_addresses() -> frozenset[IPAddress] | None:
    """Every address on an interface of this host (its network namespace), from `ip -j addr`;
    None when it cannot be read (no iproute2, a failure): nothing can be checked then."""
    from .errors import VirtForwardError
    from .runner import run
    try:
        result = run(["ip", "-j", "addr", "show"], check=False, timeout=5)
        links = json.loads(result.stdout) if result.returncode == 0 else None
    except (VirtForwardError, ValueError, RecursionError):
        return None
    if not isinstance(links, list):
        return None
    found: set[IPAddress] = set()
    for link in links:
        for info in link.get("addr_info", []) if isinstance(link, dict) else []:
            addr = _address(info.get("local")) if isinstance(info, dict) else None
            if addr is not None:
                found.add(addr)
    return frozenset(found)


def inside(addr: IPAddress, ifaces: tuple[_Interface, ...]) -> bool:
    return _inside(addr, ifaces)


def network_interfaces(network: str, root: Path = Path("/")) -> tuple[_Interface, ...]:
    """The host's addresses and subnets on the libvirt network `network`; () when unknown."""
    net = _network_xml(network, root)
    return _interfaces(net) if net is not None else ()


def on_network(nics: tuple[Nic, ...], network: str, root: Path = Path("/")) -> tuple[Nic, ...]:
    """The NICs plugged into libvirt network `network`: by its name, or into its bridge."""
    net = _network_xml(network, root)
    bridge = _bridge(net) if net is not None else None
    return tuple(n for n in nics if n.network == network or (bridge is not None and n.bridge == bridge))


def _inside(addr: IPAddress, ifaces: tuple[_Interface, ...]) -> bool:
    """In one of the subnets, and a guest's: not the host's own address on the
    network, not the subnet's network or broadcast address."""
    for iface in ifaces:
        net = iface.network
        if addr.version == net.version and addr in net and addr != iface.ip:
            if net.num_addresses <= 2 or addr not in (net.network_address, net.broadcast_address):
                return True
    return False


def _address(value: object) -> IPAddress | None:
    # only a plain string: ip_address() would take an int too, and a scoped IPv6
    # address ("fe80::1%eth0") names no host we could forward to
    if not isinstance(value, str) or "%" in value:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def static_hosts(net: ET.Element, ifaces: tuple[_Interface, ...]) -> dict[str, list[IPAddress]]:
    """mac -> addresses of the network's <ip><dhcp><host mac= ip=/>, inside its subnets."""
    found: dict[str, list[IPAddress]] = {}
    for host in net.iterfind("ip/dhcp/host"):
        mac, addr = (host.get("mac") or "").lower(), _address(host.get("ip"))
        if mac and addr is not None and _inside(addr, ifaces) and addr not in found.setdefault(mac, []):
            found[mac].append(addr)
    return found


@dataclass(frozen=True)
class Lease:
    mac: str  # lower case
    address: IPAddress
    expiry: float  # math.inf: an infinite lease (expiry-time 0)

    def describe(self) -> str:
        until = "never expires" if self.expiry == math.inf else \
            time.strftime("expires %Y-%m-%d %H:%M:%S UTC", time.gmtime(self.expiry))
        return f"{self.address} for MAC {self.mac} ({until})"


def unexpired_leases(bridge: str, ifaces: tuple[_Interface, ...], root: Path,
                     now: float | None = None) -> list[Lease]:
    """The bridge's lease file: its unexpired leases inside the subnets, in file order."""
    now = time.time() if now is None else now
    name = _safe_name(bridge)
    data = read_small(root / LEASE_DIR / f"{name}.status") if name else None
    try:
        entries = json.loads(data) if data and data.strip() else []
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        return []
    found: list[Lease] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        mac, addr, expiry = entry.get("mac-address"), _address(entry.get("ip-address")), entry.get("expiry-time")
        # libvirt writes every lease with a numeric expiry-time; 0 is an infinite lease
        if (not isinstance(mac, str) or addr is None or isinstance(expiry, bool)
                or not isinstance(expiry, int | float) or not _inside(addr, ifaces)):
            continue
        rank = math.inf if expiry == 0 else float(expiry)
        if math.isnan(rank) or rank <= now:
            continue
        lease = Lease(mac.lower(), addr, rank)
        if lease not in found:
            found.append(lease)
    return found


def ambiguities(found: list[Lease]) -> dict[tuple[str, int], list[tuple[Lease, Lease]]]:
    """(mac, IP version) -> the pairs of leases that make its address a guess: two leases of
    one MAC with different addresses, or one address leased to two MACs.

    Any guest may ask DHCP with another guest's MAC (or take its address), and which of
    two unexpired leases is the real guest's cannot be told from the file: picking the
    later expiry let the other guest steer its forwards (issue 19).  Neither is taken."""
    out: dict[tuple[str, int], list[tuple[Lease, Lease]]] = {}
    by_mac: dict[tuple[str, int], Lease] = {}
    by_address: dict[IPAddress, Lease] = {}
    for lease in found:
        family = (lease.mac, lease.address.version)
        first = by_mac.setdefault(family, lease)
        if first.address != lease.address:
            out.setdefault(family, []).append((first, lease))
        holder = by_address.setdefault(lease.address, lease)
        if holder.mac != lease.mac:
            for mac in (holder.mac, lease.mac):
                out.setdefault((mac, lease.address.version), []).append((holder, lease))
    return out


def describe_ambiguity(network: str, pair: tuple[Lease, Lease]) -> str:
    first, second = pair
    what = (f"two unexpired leases for MAC {first.mac}" if first.mac == second.mac
            else f"{first.address} is leased to two MACs")
    return f"network {network!r}: {what}: {first.describe()}, {second.describe()}"


@dataclass(frozen=True)
class Found:
    addresses: tuple[IPAddress, ...]  # at most one per family
    # why no address was taken although leases exist: ambiguous leases, each named (a wait)
    ambiguous: tuple[str, ...] = ()


def find(nics: tuple[Nic, ...], root: Path = Path("/"), now: float | None = None) -> Found:
    """At most one address per family: static hosts first (stable), then leases; each NIC
    looked up only in its own network.  A family whose lease is ambiguous (two for the MAC,
    or its address leased to another MAC too) and that no static host gives makes the
    whole answer empty: forwards to a guess could serve another guest."""
    static: list[IPAddress] = []
    leased: list[IPAddress] = []
    unclear: dict[int, list[str]] = {}
    for nic in nics:
        net = _network_xml(nic.network, root) if nic.network else _network_of_bridge(nic.bridge, root)
        if net is None:
            continue  # without the network's subnets nothing can be checked: nothing is taken
        ifaces, mac = _interfaces(net), nic.mac.lower()
        static += static_hosts(net, ifaces).get(mac, [])
        # the network's own bridge names the file (libvirt's def->bridge); the NIC's
        # live <source bridge=> only when the network XML lacks one
        bridge = _bridge(net) or nic.bridge
        if bridge:
            found = unexpired_leases(bridge, ifaces, root, now)
            name = net.findtext("name") or bridge
            for (owner, family), pairs in ambiguities(found).items():
                if owner == mac:
                    texts = unclear.setdefault(family, [])
                    texts += [d for d in dict.fromkeys(describe_ambiguity(name, p) for p in pairs) if d not in texts]
            leased += [lease.address for lease in found
                       if lease.mac == mac and lease.address.version not in unclear]
    chosen: dict[int, IPAddress] = {}
    for addr in static:
        chosen.setdefault(addr.version, addr)
    problems = [text for family, texts in sorted(unclear.items()) if family not in chosen for text in texts]
    if problems:
        return Found((), tuple(problems))
    for addr in leased:
        chosen.setdefault(addr.version, addr)
    return Found(tuple(chosen[v] for v in sorted(chosen)))


def discover(nics: tuple[Nic, ...], root: Path = Path("/"), now: float | None = None) -> tuple[IPAddress, ...]:
    """find()'s addresses: () while a lease is ambiguous."""
    return find(nics, root, now).addresses


def ambiguous_leases(root: Path = Path("/"), now: float | None = None) -> list[str]:
    """Every ambiguous lease of every libvirt network under `root` (doctor): each pair named."""
    out: list[str] = []
    seen: set[str] = set()
    for net in _all_networks(root):  # the live state first: its bridge is what dnsmasq serves
        bridge, name = _bridge(net), net.findtext("name")
        if not bridge or not name or name in seen:
            continue
        seen.add(name)
        for pairs in ambiguities(unexpired_leases(bridge, _interfaces(net), root, now)).values():
            out += [text for text in (describe_ambiguity(name, p) for p in pairs) if text not in out]
    return out
