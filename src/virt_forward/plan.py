"""The pure planner: a guest's config plus the host settings -> the forwards to apply.

No I/O here; backends render a GuestPlan, the state module records it, and a
removal renders the *recorded* plan, so stopping undoes exactly what starting
did even if the file was edited in between.

Limits are checked on counts taken from the parsed specs (ports of a range x
public addresses x families), before any range is expanded: a 163-byte file
once asked for a million forwards, and expanding them was the damage.
"""

from __future__ import annotations

import functools
import ipaddress
from ipaddress import IPv4Address, IPv6Address
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

from .config import GuestConfig, IPNetwork, PortEntry, Settings
from .errors import ConfigError
from .ports import IPAddress, Proto

Family = Literal[4, 6]


@dataclass(frozen=True, order=True)
class Forward:
    family: Family
    proto: Proto
    public_port: int
    public: IPAddress | None  # None: every local address of the family (Docker's default)
    guest: IPAddress
    guest_port: int

    @property
    def key(self) -> tuple[Family, IPAddress | None, Proto, int]:
        """What the kernel looks a packet up by: two forwards may not share it."""
        return (self.family, self.public, self.proto, self.public_port)

    def describe(self) -> str:
        pub = "*" if self.public is None else (f"[{self.public}]" if self.family == 6 else str(self.public))
        guest = f"[{self.guest}]" if self.family == 6 else str(self.guest)
        return f"{pub}:{self.public_port}/{self.proto} -> {guest}:{self.guest_port}"


@dataclass(frozen=True)
class GuestPlan:
    domain: str
    forwards: tuple[Forward, ...]
    allow: tuple[IPNetwork, ...] | None = None

    @property
    def tag(self) -> str:
        """A short, stable, charset-safe id for per-guest objects (domain names may hold anything)."""
        import hashlib  # only guests with an allow list need it: keep it off the hook's import path
        return "g" + hashlib.sha256(self.domain.encode()).hexdigest()[:12]

    def allow_of(self, family: Family) -> tuple[IPNetwork, ...]:
        return tuple(n for n in (self.allow or ()) if n.version == family)

    def families(self) -> set[Family]:
        return {f.family for f in self.forwards}

    # The state record: JSON-friendly and round-trips exactly.
    def to_record(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "allow": None if self.allow is None else [str(n) for n in self.allow],
            "forwards": [
                [f.family, f.proto, f.public_port, None if f.public is None else str(f.public),
                 str(f.guest), f.guest_port]
                for f in self.forwards
            ],
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> GuestPlan:
        forwards = tuple(
            Forward(family=fam, proto=proto, public_port=int(pport),
                    public=None if pub is None else record_address(pub),
                    guest=record_address(guest), guest_port=int(gport))
            for fam, proto, pport, pub, guest, gport in data["forwards"])
        allow = data.get("allow")
        return cls(domain=str(data["domain"]), forwards=forwards,
                   allow=None if allow is None else tuple(ipaddress.ip_network(n) for n in allow))


@functools.lru_cache(maxsize=1 << 16)
def record_address(text: str) -> IPAddress:
    """ipaddress.ip_address, remembered: every forward of a record names the same guest (and
    public) address, and reconcile reads 1,000 records; the objects are immutable."""
    return ipaddress.ip_address(text)


# An address's text, remembered: ipaddress renders it anew at each str() (~1.4 us), and a
# rebuild of 10,000 forwards names the same few hundred guest and public addresses 30,000 times.
address_text = functools.lru_cache(maxsize=1 << 12)(str)


def _err(guest: GuestConfig, entry: PortEntry | None, key: str, message: str) -> ConfigError:
    line = entry.line if entry is not None else guest.line_of(key)
    return ConfigError(message, path=guest.path, line=line, key=key)


def _publics(entry: PortEntry, guest: GuestConfig, settings: Settings) -> tuple[tuple[IPAddress | None, ...], bool]:
    """The public addresses of an entry (None: every local address) and whether the user named them."""
    if entry.spec.public is not None:
        return (entry.spec.public,), True
    if guest.public is not None:
        return guest.public, True
    if settings.public:
        return settings.public, False
    return (None,), True


def _entry_count(entry: PortEntry, guest: GuestConfig, settings: Settings) -> tuple[int, int]:
    """(forwards the entry makes, of them per port), counted without making them.

    A guest whose address is not known yet (found from its MAC later) is counted as dual-stack,
    so the count never falls short of what plan_guest will make once the address is known.
    """
    families = {a.version for a in guest.addresses} or {4, 6}
    publics, _ = _publics(entry, guest, settings)
    per_port = sum(len(families & ({4, 6} if p is None else {p.version})) for p in publics)
    return per_port * len(entry.spec.host), per_port


def guest_forward_count(guest: GuestConfig, settings: Settings) -> int:
    """How many forwards plan_guest makes of `guest` (for a valid guest: exactly), without making them."""
    return sum(_entry_count(e, guest, settings)[0] for e in guest.ports)


def _check_guest_limits(guest: GuestConfig, settings: Settings) -> None:
    """max_forwards_per_guest and, for <metadata>, metadata_ports: from the specs alone."""
    if guest.from_metadata:
        allowed = settings.metadata_ports
        for entry in guest.ports:
            host = entry.spec.host
            if host.start < allowed.start or host.end > allowed.end:
                raise _err(guest, entry, "ports",
                           f"{entry.text!r}: public port {host} is outside metadata_ports = \"{allowed}\" "
                           f"({settings.source_of('metadata_ports')}): forwards from a domain's <metadata> "
                           "may only open those")
    limit, total = settings.max_forwards_per_guest, 0
    counts = [(_entry_count(e, guest, settings), e) for e in guest.ports]
    whole = sum(n for (n, _), _ in counts)
    for (count, per_port), entry in counts:
        total += count
        if total > limit:  # the entry that crosses the limit is the one to name
            publics, _ = _publics(entry, guest, settings)
            on = ("every local address" + (" of both families" if per_port == 2 else "")
                  if publics == (None,) else f"{len(publics)} public address(es)")
            raise _err(guest, entry, "ports",
                       f"{entry.text!r} is {len(entry.spec.host)} port(s) on {on}: {count} forward(s), "
                       f"{whole} for the guest in all, more than max_forwards_per_guest = {limit} "
                       f"({settings.source_of('max_forwards_per_guest')})")


def _first_of_each_family(addresses: Iterable[IPAddress]) -> dict[int, IPAddress]:
    out: dict[int, IPAddress] = {}
    for addr in addresses:
        out.setdefault(addr.version, addr)
    return out


def _targets(entry: PortEntry, guest: GuestConfig, default: dict[int, IPAddress]) -> tuple[dict[int, IPAddress], str]:
    """Where the entry's forwards go, by family, and how to name that in an error."""
    target = entry.spec.target
    if target is None:
        return default, f"address = {', '.join(map(str, guest.addresses))}"
    if not isinstance(target, str):
        return {target.version: target}, f"target {target}"
    found = dict(guest.network_addresses).get(target)
    if not found:
        raise _err(guest, entry, "ports",
                   f"{entry.text!r}: no address of the guest on network {target!r} is known (list it in "
                   "`address`, or give the NIC on that network a static DHCP host or a lease)")
    return _first_of_each_family(found), f"its address(es) on network {target!r}: {', '.join(map(str, found))}"


def plan_guest(guest: GuestConfig, settings: Settings) -> GuestPlan:
    if not guest.addresses and any(e.spec.target is None for e in guest.ports):
        raise _err(guest, None, "address", "no address given and none found from the guest's MAC")
    _check_guest_limits(guest, settings)  # before a single range is expanded
    # several addresses of a family are one per NIC: a forward without '@' goes to the first
    by_family = _first_of_each_family(guest.addresses)
    forwards: dict[tuple[Family, IPAddress | None, Proto, int], tuple[Forward, PortEntry]] = {}

    for entry in guest.ports:
        spec = entry.spec
        publics, explicit = _publics(entry, guest, settings)
        targets, named = _targets(entry, guest, by_family)

        made: list[Forward] = []
        for public in publics:
            families: list[Family] = [4, 6] if public is None else [4 if public.version == 4 else 6]
            for family in families:
                target = targets.get(family)
                if target is None:
                    # '@address' names one family: the other public addresses are not for it
                    if public is not None and explicit and not isinstance(spec.target, (IPv4Address, IPv6Address)):
                        other = "IPv6" if family == 4 else "IPv4"
                        raise _err(guest, entry, "ports",
                                   f"{entry.text!r}: IPv{family} forward from {public} to a guest that is "
                                   f"{other}-only ({named})")
                    continue
                for host_port, guest_port in spec.pairs():
                    made.append(Forward(family, spec.proto, host_port, public, target, guest_port))
        if not made:
            raise _err(guest, entry, "ports",
                       f"{entry.text!r} forwards nothing: no public address of the guest's address family")
        for fwd in made:
            clash = forwards.get(fwd.key)
            if clash is not None:
                raise _err(guest, entry, "ports",
                           f"{entry.text!r} claims {fwd.describe().split(' ->')[0]} "
                           f"already claimed by {clash[1].text!r}")
            forwards[fwd.key] = (fwd, entry)

    _refuse_wildcard_overlap([(f, e.text) for f, e in forwards.values()],
                             lambda text, msg: _err(guest, _entry_by_text(guest, text), "ports", msg))

    if guest.allow is not None:
        for family in sorted({f.family for f, _ in forwards.values()}):
            if not any(n.version == family for n in guest.allow):
                raise _err(guest, None, "allow",
                           f"has no IPv{family} network, so the guest's IPv{family} forwards would accept "
                           f"no one (add one, or give IPv{6 if family == 4 else 4}-only public addresses)")
    return GuestPlan(domain=guest.name, forwards=tuple(sorted(f for f, _ in forwards.values())),
                     allow=guest.allow)


def _entry_by_text(guest: GuestConfig, text: str) -> PortEntry | None:
    return next((e for e in guest.ports if e.text == text), None)


def _refuse_wildcard_overlap(items: list[tuple[Forward, str]], error: Any) -> None:
    """A forward on every address and one on a single address of the same port are ambiguous."""
    wild = {(f.family, f.proto, f.public_port): text for f, text in items if f.public is None}
    for fwd, text in items:
        if fwd.public is not None:
            other = wild.get((fwd.family, fwd.proto, fwd.public_port))
            if other is not None:
                raise error(text, f"{text!r} claims {fwd.public_port}/{fwd.proto} on {fwd.public}, "
                                  f"which {other!r} already claims on every address")


def _line_of_forward(guest: GuestConfig | None, fwd: Forward) -> int | None:
    """The line of the `ports` entry that made `fwd` (for error messages)."""
    if guest is None:
        return None
    for entry in guest.ports:
        spec = entry.spec
        if (spec.proto == fwd.proto and spec.host.start <= fwd.public_port <= spec.host.end
                and spec.public in (None, fwd.public)):
            return entry.line
    return guest.line_of("ports")


def find_conflicts(plans: Iterable[tuple[GuestPlan, str]],
                   guests: Mapping[str, GuestConfig] | None = None) -> list[ConfigError]:
    """Forwards of different guests that claim the same public address, port and protocol, by
    the one ownership rule (claims.py) in the order given: as reconcile would decide it with
    nothing applied yet, the first guest keeps the port and each later one is named.

    `guests` (domain -> its config) lets each error name the line of the entry.
    """
    from . import claims
    ledger = claims.Ledger()
    errors: list[ConfigError] = []
    for plan, path in plans:
        seen: set[str] = set()
        for fwd, claim in zip(plan.forwards, claims_of(plan)):
            other = ledger.clash(plan.domain, [claim])
            if other is not None and other not in seen:
                seen.add(other)
                errors.append(ConfigError(
                    f"{fwd.describe().split(' ->')[0]} is also forwarded by guest {other!r}",
                    path=path, key="ports",
                    line=_line_of_forward((guests or {}).get(plan.domain), fwd)))
        ledger.take(plan.domain, claims_of(plan))
    return errors


def claims_of(plan: GuestPlan | None) -> list[tuple[str, str]]:
    """What each forward claims (claims.py): (family-protocol-port key, public address or *)."""
    from . import claims
    return [] if plan is None else [(claims.key(f.family, f.proto, f.public_port),
                                     claims.ANY if f.public is None else address_text(f.public))
                                    for f in plan.forwards]


# ---------------------------------------------------------------- the host-wide cap

HostItem = GuestConfig | GuestPlan | tuple[str, int]  # (what, forwards) when only a count is known


def _size(item: HostItem, settings: Settings) -> tuple[int, str]:
    if isinstance(item, GuestPlan):
        return len(item.forwards), repr(item.domain)
    if isinstance(item, GuestConfig):
        return guest_forward_count(item, settings), repr(item.name)
    return item[1], item[0]


def host_forward_count(guests: Iterable[HostItem], settings: Settings) -> int:
    """Forwards of all these together: a plan's own, a config's counted from its specs (not
    expanded), or a (what, count) pair, e.g. ("the other guests", n) from the state."""
    return sum(_size(g, settings)[0] for g in guests)


def host_limit_error(guests: Iterable[HostItem], settings: Settings, *,
                     config_path: str | None = None) -> ConfigError | None:
    """A ConfigError when the guests together exceed config.toml's max_forwards, else None.

    The error points at max_forwards in config.toml (or names it as the default) and at
    the largest guests, since one of them is the likely mistake.  `config_path`: the
    config.toml to name when there is none (settings.path is None).
    """
    sizes = [_size(g, settings) for g in guests]
    total = sum(n for n, _ in sizes)
    if total <= settings.max_forwards:
        return None
    sizes.sort(key=lambda s: (-s[0], s[1]))
    largest = ", ".join(f"{name} {n}" for n, name in sizes[:3]) + (
        f" and {len(sizes) - 3} more" if len(sizes) > 3 else "")
    where = ("" if settings.line_of("max_forwards") is not None
             else " (the default; config.toml may raise it)")
    return ConfigError(f"the guests ask for {total} forwards in all ({largest}), more than "
                       f"max_forwards = {settings.max_forwards}{where}",
                       path=settings.path or config_path, line=settings.line_of("max_forwards"),
                       key="max_forwards")


def within_host_limit(plans: Sequence[GuestPlan], settings: Settings) -> tuple[list[GuestPlan], list[ConfigError]]:
    """The plans, in the order given, as long as their sum stays within max_forwards; an error for
    each one left out (for reconcile: put the guests that hold their ports now first)."""
    kept: list[GuestPlan] = []
    errors: list[ConfigError] = []
    total = 0
    for plan in plans:
        if total + len(plan.forwards) > settings.max_forwards:
            errors.append(ConfigError(
                f"guest {plan.domain!r}: not applied: its {len(plan.forwards)} forward(s) would bring the host to "
                f"{total + len(plan.forwards)}, more than max_forwards = {settings.max_forwards}",
                path=settings.path, line=settings.line_of("max_forwards"), key="max_forwards"))
            continue
        kept.append(plan)
        total += len(plan.forwards)
    return kept, errors
