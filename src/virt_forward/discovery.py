"""A guest's address without asking libvirt (the hook must not): from its MACs,
the networks' static DHCP hosts, then dnsmasq's lease status files.

Never waits: an address not known yet is simply not found, and the watcher
applies the forwards once a lease appears.
"""

from __future__ import annotations

import ipaddress
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from .domainxml import Nic
from .ports import IPAddress

NETWORK_DIRS = ("etc/libvirt/qemu/networks", "var/lib/libvirt/network")
LEASE_DIR = "var/lib/libvirt/dnsmasq"


def static_hosts(root: Path) -> dict[str, list[IPAddress]]:
    """mac -> addresses from <ip><dhcp><host mac= ip=/> of every network definition."""
    found: dict[str, list[IPAddress]] = {}
    for rel in NETWORK_DIRS:
        for path in sorted((root / rel).glob("*.xml")):
            try:
                tree = ET.parse(path).getroot()
            except (ET.ParseError, OSError):
                continue
            for host in tree.iter("host"):
                mac, ip = (host.get("mac") or "").lower(), host.get("ip")
                if mac and ip:
                    try:
                        addr = ipaddress.ip_address(ip)
                    except ValueError:
                        continue
                    if addr not in found.setdefault(mac, []):
                        found[mac].append(addr)
    return found


def leases(root: Path, now: float | None = None) -> dict[str, list[IPAddress]]:
    """mac -> addresses from dnsmasq's *.status files (libvirt's leasehelper), unexpired only."""
    now = time.time() if now is None else now
    found: dict[str, list[IPAddress]] = {}
    for path in sorted((root / LEASE_DIR).glob("*.status")):
        try:
            entries = json.loads(path.read_text() or "[]")
        except (OSError, ValueError):
            continue
        for entry in entries if isinstance(entries, list) else []:
            try:
                mac = str(entry["mac-address"]).lower()
                addr = ipaddress.ip_address(entry["ip-address"])
                expiry = float(entry.get("expiry-time", now + 1))
            except (KeyError, TypeError, ValueError):
                continue
            if expiry > now and addr not in found.setdefault(mac, []):
                found[mac].append(addr)
    return found


def discover(nics: tuple[Nic, ...], root: Path = Path("/")) -> tuple[IPAddress, ...]:
    """At most one address per family: static hosts first (stable), then leases."""
    chosen: dict[int, IPAddress] = {}
    for table in (static_hosts(root), leases(root)):
        for nic in nics:
            for addr in table.get(nic.mac, []):
                chosen.setdefault(addr.version, addr)
    return tuple(chosen[v] for v in sorted(chosen))
