"""Render plans to one nft batch (text for `nft -f -`), as pure functions.

Why text and not JSON: nft 1.0.6 (Debian 12) parses a JSON map whose data is a
concatenation (address . port) as a plain *set*, silently.  The text syntax
works on every nft we support, and one `nft -f` is one kernel transaction.

Packet path: one table, `inet virt_forward`.  NEW connections to a local
address are looked up in hash maps keyed by (public address, protocol, port);
a hit is DNAT-ed and its conntrack entry marked FORWARDED.  Only that mark
(set by nothing but our DNAT) is what guards in other tables accept, so a host
that routes straight to a guest reaches none of its ports through us.

Every command is idempotent or paired (`add` before `delete`), so a batch never
fails because the kernel lost something we recorded (e.g. after a reset).
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .consts import FAMILY, MARK_FORWARDED, MARK_HAIRPIN, SKELETON_MARK_PREFIX, TABLE, T
from .plan import Family, Forward, GuestPlan, address_text

__all__ = ["FAMILY", "MARK_FORWARDED", "MARK_HAIRPIN", "SKELETON_MARK_PREFIX", "TABLE", "T", "NAMES", "skeleton", "skeleton_mark", "change",
           "full", "batch", "add_guest", "remove_guest", "delete_table", "parse_live", "parse_counters",
           "ElementCount", "parse_element_counts", "carry_counters"]


@dataclass(frozen=True)
class _FamilyNames:
    ip: str  # nft payload protocol: ip / ip6
    addr_type: str
    dnat: str
    dnat_any: str
    acl: str
    acl_any: str
    traffic: str  # counted sets: the packets and bytes of each forward's connections
    traffic_any: str


NAMES: dict[Family, _FamilyNames] = {
    4: _FamilyNames("ip", "ipv4_addr", "dnat4", "dnat4_any", "acl4", "acl4_any", "traffic4", "traffic4_any"),
    6: _FamilyNames("ip6", "ipv6_addr", "dnat6", "dnat6_any", "acl6", "acl6_any", "traffic6", "traffic6_any"),
}

CHAINS = ("nat_prerouting", "nat_output", "nat_postrouting", "mark_forward", "lookup")


def skeleton(hairpin: bool, stale_marks: Iterable[str] = ()) -> list[str]:
    """Table, maps and base chains; constant size, safe to repeat in every batch.

    It ends with its mark, an empty chain named after it (skeleton_mark): a table
    holding the mark needs no skeleton in the next batch.  `stale_marks`: marks of
    other skeletons found in the table, deleted with this one's arrival."""
    cmds = _skeleton(hairpin)
    cmds += [f"delete chain {T} {m}" for m in stale_marks if m != skeleton_mark(hairpin)]
    return cmds + [f"add chain {T} {skeleton_mark(hairpin)}"]


@functools.lru_cache(maxsize=2)
def skeleton_mark(hairpin: bool) -> str:
    """The name of the empty chain that says which skeleton a table holds (a checksum of it)."""
    import zlib
    return f"{SKELETON_MARK_PREFIX}{zlib.crc32(batch(_skeleton(hairpin)).encode()):08x}"


def _skeleton(hairpin: bool) -> list[str]:
    return list(_skeleton_cmds(hairpin))  # a copy: callers extend it


@functools.lru_cache(maxsize=2)
def _skeleton_cmds(hairpin: bool) -> tuple[str, ...]:
    cmds = [f"add table {T}"]
    for n in NAMES.values():
        key = f"{n.addr_type} . inet_proto . inet_service"
        data = f"{n.addr_type} . inet_service"
        cmds += [
            # per-element counters: NEW connections DNAT-ed by each forward (status shows them)
            f"add map {T} {n.dnat} {{ type {key} : {data} ; counter ; }}",
            f"add map {T} {n.dnat_any} {{ type inet_proto . inet_service : {data} ; counter ; }}",
            f"add map {T} {n.acl} {{ type {key} : verdict ; }}",
            f"add map {T} {n.acl_any} {{ type inet_proto . inet_service : verdict ; }}",
            f"add set {T} {n.traffic} {{ type {key} ; counter ; }}",
            f"add set {T} {n.traffic_any} {{ type inet_proto . inet_service ; counter ; }}",
        ]
    cmds += [
        f"add chain {T} nat_prerouting {{ type nat hook prerouting priority dstnat ; policy accept ; }}",
        f"add chain {T} nat_output {{ type nat hook output priority -100 ; policy accept ; }}",
        f"add chain {T} nat_postrouting {{ type nat hook postrouting priority srcnat ; policy accept ; }}",
        # before the filter priority, so the hairpin bit is set whatever others decide
        f"add chain {T} mark_forward {{ type filter hook forward priority filter - 5 ; policy accept ; }}",
        f"add chain {T} lookup",
    ]
    cmds += [f"flush chain {T} {c}" for c in CHAINS]
    cmds.append(f"add rule {T} nat_prerouting fib daddr type local jump lookup")
    if hairpin:
        # Loopback cannot be DNAT-ed to another host without route_localnet.
        cmds += [
            f"add rule {T} nat_output ip daddr 127.0.0.0/8 return",
            f"add rule {T} nat_output ip6 daddr ::1 return",
            f"add rule {T} nat_output fib daddr type local jump lookup",
            # The destination is reachable through the interface the packet came
            # in on: a guest (or its neighbour) calling a public port.
            f"add rule {T} mark_forward ct state new ct mark & {MARK_FORWARDED:#010x} == {MARK_FORWARDED:#010x}"
            f" fib daddr . iif oif exists ct mark set ct mark | {MARK_HAIRPIN:#010x}",
            f"add rule {T} nat_postrouting ct mark & {MARK_HAIRPIN:#010x} == {MARK_HAIRPIN:#010x} masquerade",
        ]
    # Every packet of a forwarded connection, both directions, counted in the forward's element
    # (keyed by the connection's original destination, the dnat maps' key).  nft 1.0.6 types
    # `ct original proto-dst` in a concatenation only after a protocol match: one rule per protocol.
    marked = f"ct mark & {MARK_FORWARDED:#010x} == {MARK_FORWARDED:#010x}"
    for fam, n in NAMES.items():
        for proto in ("tcp", "udp"):
            cmds += [f"add rule {T} mark_forward meta l4proto {proto} {marked} ct original {n.ip} daddr"
                     f" . meta l4proto . ct original proto-dst @{n.traffic}",
                     f"add rule {T} mark_forward meta nfproto {'ipv4' if fam == 4 else 'ipv6'} meta l4proto {proto}"
                     f" {marked} meta l4proto . ct original proto-dst @{n.traffic_any}"]
    # Mark first, DNAT, and clear the mark when no map had the packet: one lookup
    # per packet (exact per-forward counters), and only our DNAT leaves the mark.
    for fam, n in NAMES.items():
        proto = f"meta nfproto {'ipv4' if fam == 4 else 'ipv6'}"
        cmds += [f"add rule {T} lookup {n.ip} daddr . meta l4proto . th dport vmap @{n.acl}",
                 f"add rule {T} lookup {proto} meta l4proto . th dport vmap @{n.acl_any}"]
    cmds.append(f"add rule {T} lookup ct mark set ct mark | {MARK_FORWARDED:#010x}")
    for fam, n in NAMES.items():
        proto = f"meta nfproto {'ipv4' if fam == 4 else 'ipv6'}"
        cmds += [f"add rule {T} lookup dnat {n.ip} to {n.ip} daddr . meta l4proto . th dport map @{n.dnat}",
                 f"add rule {T} lookup {proto} dnat {n.ip} to meta l4proto . th dport map @{n.dnat_any}"]
    cmds.append(f"add rule {T} lookup ct mark set ct mark & {~MARK_FORWARDED & 0xffffffff:#010x}")
    return tuple(cmds)


Element = tuple[str, tuple[str, ...], tuple[str, ...]]  # (map, key parts, value parts)


def dnat_element(fwd: Forward) -> Element:
    n = NAMES[fwd.family]
    value = (address_text(fwd.guest), str(fwd.guest_port))
    if fwd.public is None:
        return n.dnat_any, (fwd.proto, str(fwd.public_port)), value
    return n.dnat, (address_text(fwd.public), fwd.proto, str(fwd.public_port)), value


def _map_and_key(fwd: Forward) -> tuple[str, str, str, str]:
    """(dnat map, acl map, key, value) of one forward, as nft text."""
    name, key, value = dnat_element(fwd)
    acl = NAMES[fwd.family].acl_any if fwd.public is None else NAMES[fwd.family].acl
    return name, acl, " . ".join(key), " . ".join(value)


def acl_chain(plan: GuestPlan) -> str:
    return f"acl_{plan.tag}"


def _grouped(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, elem in pairs:
        out.setdefault(name, []).append(elem)
    return out


def _elements(verb: str, groups: dict[str, list[str]]) -> list[str]:
    return [f"{verb} element {T} {name} {{ {', '.join(elems)} }}" for name, elems in sorted(groups.items())]


def _dnat_elements(plan: GuestPlan) -> dict[str, list[str]]:
    return _grouped((m, f"{k} : {v}") for m, _, k, v in map(_map_and_key, plan.forwards))


def traffic_set(fwd: Forward) -> str:
    n = NAMES[fwd.family]
    return n.traffic_any if fwd.public is None else n.traffic


def _traffic_elements(forwards: Iterable[Forward]) -> dict[str, list[str]]:
    return _grouped((traffic_set(f), " . ".join(dnat_element(f)[1])) for f in forwards)


def _acl_cmds(plan: GuestPlan) -> list[str]:
    """The guest's allow-list chain and sets, and the acl map elements pointing at it."""
    if plan.allow is None:
        return []
    chain = acl_chain(plan)
    cmds = [f"add chain {T} {chain}", f"flush chain {T} {chain}"]
    for fam in sorted(plan.families()):
        n = NAMES[fam]
        # overlapping intervals are an error in nft: merge them here, purely
        nets = list(ipaddress.collapse_addresses(plan.allow_of(fam)))  # type: ignore[type-var]
        aset = f"{chain}_{fam}"
        cmds += [
            f"add set {T} {aset} {{ type {n.addr_type} ; flags interval ; }}",
            f"flush set {T} {aset}",
            f"add element {T} {aset} {{ {', '.join(map(str, nets))} }}",
            f"add rule {T} {chain} {n.ip} saddr @{aset} return",
        ]
    # not allowed: leave the nat chain without DNAT; the packet is the host's, as if unforwarded
    cmds.append(f"add rule {T} {chain} accept")
    return cmds + _elements("add", _grouped((a, f"{k} : jump {chain}")
                                            for _, a, k, _v in map(_map_and_key, plan.forwards)))


def add_guest(plan: GuestPlan) -> list[str]:
    return _acl_cmds(plan) + _elements("add", _dnat_elements(plan)) + _elements("add", _traffic_elements(plan.forwards))


def remove_guest(plan: GuestPlan, keep: GuestPlan | None = None) -> list[str]:
    """Undo `add_guest(plan)`; each delete is preceded by an add so a missing object is no error.

    `keep`: the guest's next plan; its identical DNAT elements stay (with their counters).
    """
    cmds: list[str] = []
    kept = set() if keep is None else {_map_and_key(f) for f in keep.forwards}
    gone = [f for f in plan.forwards if _map_and_key(f) not in kept]
    pairs = [_map_and_key(f) for f in gone]
    dnat = _grouped((m, f"{k} : {v}") for m, _, k, v in pairs)
    cmds += _elements("add", dnat)
    cmds += _elements("delete", _grouped((m, k) for m, _, k, _v in pairs))
    traffic = _traffic_elements(gone)
    cmds += _elements("add", traffic) + _elements("delete", traffic)
    if plan.allow is not None:
        chain = acl_chain(plan)
        acl = list(map(_map_and_key, plan.forwards))
        cmds.append(f"add chain {T} {chain}")
        cmds += _elements("add", _grouped((a, f"{k} : jump {chain}") for _, a, k, _v in acl))
        cmds += _elements("delete", _grouped((a, k) for _, a, k, _v in acl))
        cmds += [f"flush chain {T} {chain}", f"delete chain {T} {chain}"]
        for fam in sorted(plan.families()):
            aset = f"{chain}_{fam}"
            cmds += [f"add set {T} {aset} {{ type {NAMES[fam].addr_type} ; flags interval ; }}",
                     f"delete set {T} {aset}"]
    return cmds


def delete_table() -> list[str]:
    return [f"add table {T}", f"delete table {T}"]


def full(plans: Iterable[GuestPlan], *, hairpin: bool) -> str:
    """One transaction replacing our whole table with exactly these guests' forwards."""
    listed = list(plans)
    if not listed:
        return batch(delete_table())
    cmds = delete_table() + skeleton(hairpin)
    dnat: dict[str, list[str]] = {}
    for plan in listed:
        cmds += _acl_cmds(plan)
        for fwd in plan.forwards:  # each element's text made once: 10,000 of them at a rebuild
            name, key, value = dnat_element(fwd)
            joined = " . ".join(key)
            dnat.setdefault(name, []).append(f"{joined} : {' . '.join(value)}")
            dnat.setdefault(traffic_set(fwd), []).append(joined)
    return batch(cmds + _elements("add", dnat))


def batch(cmds: Iterable[str]) -> str:
    return "".join(c + "\n" for c in cmds)


def change(old: GuestPlan | None, new: GuestPlan | None, *, hairpin: bool, last: bool = False,
           with_skeleton: bool = True, stale_marks: Iterable[str] = ()) -> str:
    """One transaction taking one guest from `old` (as recorded) to `new`.

    Its size depends on this guest's forwards only, never on other guests'.
    `last`: no guest is left after this one, so the whole table goes.
    `with_skeleton`: False when the table holds this skeleton's mark already.
    """
    if new is None and last:
        return batch(delete_table())
    cmds = skeleton(hairpin, stale_marks) if with_skeleton else []
    if old is not None:
        cmds += remove_guest(old, keep=new)
    if new is not None:
        cmds += add_guest(new)
    return batch(cmds)


# How nft lists a protocol depends on the host: its name from /etc/protocols, or its number
# where that file is missing (debootstrap's minbase, container images), and a port is a
# number unless -S asks for /etc/services' names.  We list with -p (numbers, whatever /etc
# holds) and read either form into the one our plans use (names, decimal ports): a listing
# read one way and the records rendered the other made every check fail and every repair
# loop.  The numbers are IANA's, fixed; these are the protocols an inet_proto key can hold
# in our maps.
PROTOCOL_NAMES = {"6": "tcp", "17": "udp", "33": "dccp", "132": "sctp"}


def _norm(part: object) -> str:
    """A part whose type is not known: an address in its normal form, anything else as text."""
    text = str(part)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def _norm_typed(kind: str, part: object) -> str:
    """A part of nft data type `kind` (the listing's `type` / `map`) in our plans' form."""
    text = str(part)
    if kind == "inet_proto":
        return PROTOCOL_NAMES.get(text, text.lower())
    if kind == "inet_service":
        return text if text.isdigit() else _service_port(text)
    return _norm(text)


def _service_port(name: str) -> str:
    """A port nft printed by its /etc/services name (as with -S), as a number; a name that
    file does not hold stays as it is (and then differs from every record: reported)."""
    import socket  # here: a port printed by name is rare, and the hook imports this module
    try:
        return str(socket.getservbyname(name))
    except OSError:
        return name


Types = tuple[str, ...]


def _types(declared: object) -> Types:
    """The data types of a map's key (`type`: a name or a list of names) or data (`map`:
    "ipv4_addr . inet_service"); () when the listing says nothing usable."""
    if isinstance(declared, list) and all(isinstance(t, str) for t in declared):
        return tuple(declared)
    if isinstance(declared, str):
        return tuple(declared.split(" . "))
    return ()


def _typed_parts(parts: Sequence[object], types: Types, memo: dict[tuple[str, str], str]) -> tuple[str, ...]:
    """Each part normalised by its type where the listing gave one per part, else untyped;
    remembered in `memo` for one listing or batch."""
    kinds = types if len(types) == len(parts) else ("",) * len(parts)
    out = []
    for kind, part in zip(kinds, parts):
        key = (kind, str(part))
        got = memo.get(key)
        if got is None:
            got = memo[key] = _norm_typed(kind, part) if kind else _norm(part)
        out.append(got)
    return tuple(out)


def parse_counters(listing: dict[str, Any]) -> dict[str, dict[tuple[str, ...], int]]:
    """{map: {key: NEW connections DNAT-ed}} from the element counters."""
    return {name: {key: c.packets for key, c in elems.items()}
            for name, elems in parse_element_counts(listing).items()}


@dataclass(frozen=True)
class ElementCount:
    """One dnat map element's counter, with the target it counted for.

    Only the first packet of a connection passes the nat hook, so `packets` is the
    number of NEW connections the forward DNAT-ed and `bytes` the size of those first
    packets alone: neither is the forward's traffic."""

    value: tuple[str, ...]
    packets: int
    bytes: int


def parse_element_counts(listing: dict[str, Any]) -> dict[str, dict[tuple[str, ...], ElementCount]]:
    """{map or set: {key: ElementCount}} of every counted element in `nft -j list table` output
    (the dnat maps' connections, the traffic sets' packets and bytes; a set's value is ())."""
    out: dict[str, dict[tuple[str, ...], ElementCount]] = {}
    # each part normalised once per listing: its parts repeat (protocols, addresses), and
    # parsing an address (or failing to) costs microseconds, 10,000 times over
    norm: dict[tuple[str, str], str] = {}
    for item in listing.get("nftables", []):
        m = item.get("map")
        if isinstance(m, dict):
            key_types, value_types = _types(m.get("type")), _types(m.get("map"))
            for elem in m.get("elem", []):
                if not (isinstance(elem, list) and len(elem) == 2):
                    continue
                key, value = elem
                if isinstance(key, dict) and "elem" in key and isinstance(key["elem"].get("counter"), dict):
                    counter = key["elem"]["counter"]
                    out.setdefault(str(m["name"]), {})[_parts_with(norm, key["elem"]["val"], key_types)] = \
                        ElementCount(_parts_with(norm, value, value_types), int(counter.get("packets", 0)),
                                     int(counter.get("bytes", 0)))
            continue
        st = item.get("set")
        if isinstance(st, dict):
            key_types = _types(st.get("type"))
            for elem in st.get("elem", []):
                if isinstance(elem, dict) and "elem" in elem and isinstance(elem["elem"].get("counter"), dict):
                    counter = elem["elem"]["counter"]
                    out.setdefault(str(st["name"]), {})[_parts_with(norm, elem["elem"]["val"], key_types)] = \
                        ElementCount((), int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
    return out


def _parts_with(memo: dict[tuple[str, str], str], expr: object, types: Types = ()) -> tuple[str, ...]:
    return _typed_parts(expr["concat"] if isinstance(expr, dict) and "concat" in expr else [expr], types, memo)


def carry_counters(text: str, live: dict[str, dict[tuple[str, ...], ElementCount]]) -> str:
    """`text` (an nft batch) with each dnat map element that is live with the same target
    given the live counter's values (`counter packets N bytes M`), so a rebuild of the
    table (delete, then add everything) does not reset the per-forward connection counts.

    `live`: parse_element_counts of the table as it was just before.  An element whose
    target changed starts at 0: its count belonged to another forward.  Only
    `add element` lines of maps named in `live` change; everything else is kept as is,
    so the batch stays one transaction of the same commands."""
    if not any(live.values()):
        return text
    import re  # here, not at the top: the hook's full path imports this module
    add_element = re.compile(rf"add element {re.escape(T)} (\S+) \{{ (.*) \}}")
    out = []
    norm: dict[tuple[str, str], str] = {}
    for line in text.split("\n"):
        m = add_element.fullmatch(line)
        counts = live.get(m.group(1)) if m else None
        if m and counts:
            elems = []
            # a key or value never holds ", " nor " : " (addresses, protocols, ports)
            for elem in m.group(2).split(", "):
                key, sep, value = elem.partition(" : ")  # a set's element has no value
                got = counts.get(_text_parts(norm, key))
                # a count of 0 needs no carrying: a new element's counter starts there
                if got is not None and (got.packets or got.bytes) and got.value == (
                        _text_parts(norm, value) if sep else ()):
                    elem = f"{key} counter packets {got.packets} bytes {got.bytes}" + (f" : {value}" if sep else "")
                elems.append(elem)
            line = f"add element {T} {m.group(1)} {{ {', '.join(elems)} }}"
        out.append(line)
    return "\n".join(out)


def _text_parts(memo: dict[tuple[str, str], str], text: str) -> tuple[str, ...]:
    """A concatenation as rendered here ("192.0.2.1 . tcp . 80") in parse_live's normal form
    (our own text: protocols by name, ports by number; only addresses need normalising)."""
    return _typed_parts(text.split(" . "), (), memo)


def parse_live(listing: dict[str, Any]) -> dict[str, dict[tuple[str, ...], tuple[str, ...]]]:
    """Map elements from `nft -j list table inet virt_forward`: {map: {key: value}}."""
    maps: dict[str, dict[tuple[str, ...], tuple[str, ...]]] = {}
    norm: dict[tuple[str, str], str] = {}
    for item in listing.get("nftables", []):
        m = item.get("map")
        if not isinstance(m, dict):
            continue
        elems = maps.setdefault(str(m.get("name")), {})
        key_types, value_types = _types(m.get("type")), _types(m.get("map"))
        for elem in m.get("elem", []):
            if isinstance(elem, list) and len(elem) == 2:
                key, value = elem
                if isinstance(key, dict) and "elem" in key:  # counters/comments wrap the key
                    key = key["elem"]["val"]
                if isinstance(value, dict) and "jump" in value:
                    elems[_parts_with(norm, key, key_types)] = ("jump " + str(value["jump"]["target"]),)
                else:
                    elems[_parts_with(norm, key, key_types)] = _parts_with(norm, value, value_types)
    return maps
