"""Docker-style port specs, parsed without I/O.

Grammar: ``[public_ip:][host_port[-end]:]guest_port[-end][/tcp|/udp][@target]``,
IPv6 in brackets, plus the post's ``proto:port`` form.  A range maps one to one
with an offset; Docker's "pick any host port" forms are refused because a
hypervisor admin needs to know which host port is open.

``@target`` (ours, not Docker's) sends the forward to one NIC of a guest with
several: an address of the guest, or the name of the libvirt network whose NIC
should get it (its address on that network is found as the guest's `address` in
that network's subnets, else from the NIC's MAC).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterator, Literal

from .errors import PortSpecError

Proto = Literal["tcp", "udp"]
PROTOCOLS: tuple[Proto, ...] = ("tcp", "udp")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# the longest valid one, "[ffff:(x8)]:65535-65535:65535-65535/tcp@[ffff:(x8)]", is 111
MAX_SPEC_LENGTH = 160

# ASCII digits only, whole text only: \d would take "٨٠" for 80 and $ would
# let "80\n" through.
_RANGE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", re.ASCII)
_POST_FORM = re.compile(r"(?P<proto>[A-Za-z]+):(?P<ports>[0-9-]+)", re.ASCII)
# libvirt network names as virt-forward accepts them after '@' (libvirt allows more; none of
# these characters can start an address, so "@default" is never read as one)
_NETWORK = re.compile(r"[A-Za-z_][A-Za-z0-9_.+-]{0,63}", re.ASCII)
Target = IPAddress | str  # an address of the guest, or a libvirt network's name


@dataclass(frozen=True, order=True)
class PortRange:
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start + 1

    def __str__(self) -> str:
        return str(self.start) if self.start == self.end else f"{self.start}-{self.end}"


@dataclass(frozen=True)
class PortSpec:
    public: IPAddress | None
    proto: Proto
    host: PortRange
    guest: PortRange
    target: Target | None = None  # '@...': None sends it to the guest's first address of each family

    def pairs(self) -> Iterator[tuple[int, int]]:
        """(host port, guest port) for every port of the range, offset kept."""
        offset = self.guest.start - self.host.start
        for port in range(self.host.start, self.host.end + 1):
            yield port, port + offset

    def __str__(self) -> str:
        pub = ""
        if self.public is not None:
            pub = f"[{self.public}]:" if self.public.version == 6 else f"{self.public}:"
        at = "" if self.target is None else f"@{self.target}"
        return f"{pub}{self.host}:{self.guest}/{self.proto}{at}"


def _port(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise PortSpecError(f"{what} {text!r} is not a number")
    value = int(text)
    if not 1 <= value <= 65535:
        raise PortSpecError(f"{what} {value} is out of range 1-65535")
    return value


def parse_range(text: str, what: str) -> PortRange:
    if text == "":
        raise PortSpecError(f"{what} is empty (virt-forward never picks a port for you)")
    m = _RANGE.fullmatch(text)
    if not m:
        raise PortSpecError(f"{what} {text!r} is not a port or a range like 8000-8009")
    start = _port(m.group(1), what)
    end = _port(m.group(2), what) if m.group(2) else start
    if end < start:
        raise PortSpecError(f"{what} range {text!r} ends before it starts")
    return PortRange(start, end)


def _proto(text: str) -> Proto:
    low = text.lower()
    for proto in PROTOCOLS:
        if low == proto:
            return proto
    raise PortSpecError(f"unknown protocol {text!r} (use tcp or udp)")


def _public(text: str, bracketed: bool) -> IPAddress:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise PortSpecError(f"public address {text!r} is not an IP address") from None
    if bracketed and addr.version != 6:
        raise PortSpecError(f"only IPv6 addresses go in brackets, not {text!r}")
    if addr.is_unspecified:
        # Docker's 0.0.0.0 means "every address"; as an nft key it matches nothing.
        raise PortSpecError(f"public address {text!r} means every address: leave the address out instead")
    if addr.is_multicast:
        raise PortSpecError(f"public address {text!r} is a multicast address")
    if addr.version == 6 and addr.scope_id:
        raise PortSpecError(f"public address {text!r} has a zone index, which nftables cannot match")
    return addr


def parse_port_spec(spec: str) -> PortSpec:
    """Parse one entry of a guest's ``ports`` list.

    Every error message starts with the spec itself, so a user sees the bad value.
    """
    if not isinstance(spec, str):
        raise PortSpecError(f"{spec!r} is not a string")
    if len(spec) > MAX_SPEC_LENGTH:  # keeps error messages one readable line
        raise PortSpecError(f"{spec[:20]!r}... is {len(spec)} characters long, too long for a port spec")
    try:
        return _parse(spec)
    except PortSpecError as exc:
        raise PortSpecError(f"{spec!r}: {exc}") from None


def _parse(spec: str) -> PortSpec:
    text = spec.strip()
    if not text:
        raise PortSpecError("empty port spec")
    if "," in text:  # the post's PORTS=tcp:80,tcp:443
        raise PortSpecError("one forward per list entry: split it at ',' into separate strings")

    target: Target | None = None
    if "@" in text:
        text, at = text.rsplit("@", 1)
        at, slash, proto_after = at.partition("/")
        if slash:  # "80@net/udp" reads as well as "80/udp@net"
            if "/" in text:
                raise PortSpecError("two protocols")
            text += "/" + proto_after
        target = _target(at.strip())

    post = _POST_FORM.fullmatch(text)
    if post:  # the post's "tcp:80" form; a protocol name cannot be a port number
        ports = parse_range(post.group("ports"), "port")
        return PortSpec(None, _proto(post.group("proto")), ports, ports, target)

    proto: Proto = "tcp"
    if "/" in text:
        text, proto_text = text.rsplit("/", 1)
        proto = _proto(proto_text)

    public: IPAddress | None = None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise PortSpecError("'[' without ']'")
        public = _public(text[1:close], bracketed=True)
        rest = text[close + 1:]
        if not rest.startswith(":"):
            raise PortSpecError("expected ':' after the bracketed address")
        parts = rest[1:].split(":")
        if len(parts) == 1:
            raise PortSpecError("give host and guest port after the address")
    else:
        parts = text.split(":")
        if len(parts) > 3:
            raise PortSpecError("too many ':' (put an IPv6 address in brackets)")
        if len(parts) == 3:
            public = _public(parts[0], bracketed=False)
            parts = parts[1:]

    if len(parts) == 1:
        guest = parse_range(parts[0], "port")
        host = guest
    elif len(parts) == 2:
        host = parse_range(parts[0], "host port")
        guest = parse_range(parts[1], "guest port")
    else:
        raise PortSpecError("too many ':'")

    if len(host) != len(guest):
        raise PortSpecError(
            f"host range {host} has {len(host)} ports but guest range {guest} has {len(guest)}")
    if isinstance(target, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and public is not None \
            and public.version != target.version:
        raise PortSpecError(f"public address {public} and target {target} are of different families")
    return PortSpec(public, proto, host, guest, target)


def _target(text: str) -> Target:
    """What follows '@': an address of the guest (IPv6 with or without brackets) or a network name."""
    if not text:
        raise PortSpecError("nothing after '@' (an address of the guest, or a libvirt network's name)")
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        addr = ipaddress.ip_address(bare)
    except ValueError:
        if _NETWORK.fullmatch(text):
            return text
        raise PortSpecError(f"target {text!r} is neither an IP address nor a libvirt network name") from None
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
        raise PortSpecError(f"target {text!r} cannot be a guest's address")
    if addr.version == 6 and addr.scope_id:
        raise PortSpecError(f"target {text!r} has a zone index, which nftables cannot match")
    return addr
