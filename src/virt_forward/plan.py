"""The pure planner: a guest's config plus the host settings -> the forwards to apply.

No I/O here; backends render a GuestPlan, the state module records it, and a
removal renders the *recorded* plan, so stopping undoes exactly what starting
did even if the file was edited in between.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

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
                    public=None if pub is None else ipaddress.ip_address(pub),
                    guest=ipaddress.ip_address(guest), guest_port=int(gport))
            for fam, proto, pport, pub, guest, gport in data["forwards"])
        allow = data.get("allow")
        return cls(domain=str(data["domain"]), forwards=forwards,
                   allow=None if allow is None else tuple(ipaddress.ip_network(n) for n in allow))


def _err(guest: GuestConfig, entry: PortEntry | None, key: str, message: str) -> ConfigError:
    line = entry.line if entry is not None else guest.line_of(key)
    return ConfigError(message, path=guest.path, line=line, key=key)


def plan_guest(guest: GuestConfig, settings: Settings) -> GuestPlan:
    if not guest.addresses:
        raise _err(guest, None, "address", "no address given and none found from the guest's MAC")
    by_family: dict[int, IPAddress] = {a.version: a for a in guest.addresses}
    forwards: dict[tuple[Family, IPAddress | None, Proto, int], tuple[Forward, PortEntry]] = {}

    for entry in guest.ports:
        spec = entry.spec
        explicit = True
        publics: tuple[IPAddress | None, ...]
        if spec.public is not None:
            publics = (spec.public,)
        elif guest.public is not None:
            publics = guest.public
        elif settings.public:
            publics, explicit = settings.public, False
        else:
            publics = (None,)

        made: list[Forward] = []
        for public in publics:
            families: list[Family] = [4, 6] if public is None else [4 if public.version == 4 else 6]
            for family in families:
                target = by_family.get(family)
                if target is None:
                    if public is not None and explicit:
                        other = "IPv6" if family == 4 else "IPv4"
                        raise _err(guest, entry, "ports",
                                   f"{entry.text!r}: IPv{family} forward from {public} to a guest that is "
                                   f"{other}-only (address = {', '.join(map(str, guest.addresses))})")
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
    """Forwards of different guests that claim the same public address, port and protocol.

    `guests` (domain -> its config) lets each error name the line of the entry.
    """
    owners: dict[tuple[Family, IPAddress | None, Proto, int], str] = {}
    wild: dict[tuple[Family, Proto, int], str] = {}
    errors: list[ConfigError] = []
    listed = list(plans)
    for plan, _path in listed:
        for fwd in plan.forwards:
            if fwd.public is None:
                wild.setdefault((fwd.family, fwd.proto, fwd.public_port), plan.domain)
    for plan, path in listed:
        seen: set[str] = set()
        for fwd in plan.forwards:
            other = owners.setdefault(fwd.key, plan.domain)
            wild_owner = wild.get((fwd.family, fwd.proto, fwd.public_port))
            if other == plan.domain and wild_owner not in (None, plan.domain):
                other = wild_owner
            if other != plan.domain and other not in seen:
                seen.add(other)
                errors.append(ConfigError(
                    f"{fwd.describe().split(' ->')[0]} is also forwarded by guest {other!r}",
                    path=path, key="ports",
                    line=_line_of_forward((guests or {}).get(plan.domain), fwd)))
    return errors
