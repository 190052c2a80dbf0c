"""The iptables backend, for hosts without nft: render one iptables-restore batch per family.

Pure functions.  Own chains only, in the nat table:

  PREROUTING (dst-type LOCAL)  -> VF-PREROUTING -> one jump per guest -> VF-<tag>
  OUTPUT     (LOCAL, not lo)   -> VF-PREROUTING                 (hairpin from the host)
  VF-<tag>:   the guest's allow list (-s CIDR -g VF-<tag>-D), or a plain goto
  VF-<tag>-D: per forward, CONNMARK our mark + DNAT to guest:port
  POSTROUTING -> VF-POSTROUTING: masquerade our connections from the guest's own subnet (hairpin)

and, in the mangle table, the packets and bytes of each forward (the nat table sees only
the first packet of a connection):

  FORWARD (our mark) -> VF-ACCT -> one jump per guest -> VF-<tag>-A: per forward, a rule
              matching the connection's original destination (conntrack), -j RETURN

plus the same guard as the nftables backend on top of filter FORWARD.  A change
rebuilds the changed guest's chains and the two dispatch chains (one line per
guest), so its cost grows with the number of guests, not with their forwards;
a packet walks the guests' rules linearly, as with any iptables setup: the
nftables backend is the fast one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterator

from . import guards
from .nft import MARK_FORWARDED
from .plan import Family, Forward, GuestPlan

PRE, POST, ACCT = "VF-PREROUTING", "VF-POSTROUTING", "VF-ACCT"
ACCT_JUMP = f"-m connmark --mark {MARK_FORWARDED:#x}/{MARK_FORWARDED:#x} -j {ACCT}"
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


def base_jumps(family: Family, hairpin: bool) -> dict[str, str]:
    lo = "127.0.0.0/8" if family == 4 else "::1/128"
    jumps = {"PREROUTING": f"-m addrtype --dst-type LOCAL -j {PRE}"}
    if hairpin:
        jumps["OUTPUT"] = f"! -d {lo} -m addrtype --dst-type LOCAL -j {PRE}"
        jumps["POSTROUTING"] = f"-j {POST}"
    return jumps


def guest_chain(plan: GuestPlan) -> str:
    return f"VF-{plan.tag}"


def dnat_chain(plan: GuestPlan) -> str:
    return f"VF-{plan.tag}-D"


def acct_chain(plan: GuestPlan) -> str:
    return f"VF-{plan.tag}-A"


@dataclass(frozen=True)
class NatState:
    """Our part of the nat table as iptables-save shows it."""

    chains: frozenset[str] = frozenset()
    jumps: dict[str, tuple[str, ...]] = field(default_factory=dict)  # base chain -> our jump rules
    dnat: dict[tuple[str | None, str, int], tuple[str, int]] = field(default_factory=dict)
    # the mangle table's accounting: our chains there, our jumps from its FORWARD
    acct_chains: frozenset[str] = frozenset()
    acct_jumps: tuple[str, ...] = ()


def parse_nat(save: str) -> NatState:
    """Our part of the nat and mangle tables in `iptables-save` output (both, or either)."""
    chains: set[str] = set()
    jumps: dict[str, list[str]] = {}
    dnat: dict[tuple[str | None, str, int], tuple[str, int]] = {}
    acct_chains: set[str] = set()
    acct_jumps: list[str] = []
    in_nat = in_mangle = False
    for line in save.splitlines():
        if line.startswith("*"):
            in_nat, in_mangle = line == "*nat", line == "*mangle"
        elif in_mangle:
            if line.startswith(":VF-"):
                acct_chains.add(line[1:].split()[0])
            elif line.startswith("-A FORWARD ") and line.endswith(f"-j {ACCT}"):
                acct_jumps.append(line[len("-A FORWARD "):])
            continue
        elif not in_nat:
            continue
        elif line.startswith(":VF-"):
            chains.add(line[1:].split()[0])
        elif line.startswith("-A "):
            parts = line.split()
            chain = parts[1]
            if chain in ("PREROUTING", "OUTPUT", "POSTROUTING") and parts[-1].startswith("VF-"):
                jumps.setdefault(chain, []).append(" ".join(parts[2:]))
            elif chain.startswith("VF-") and chain.endswith("-D") and "--to-destination" in parts:
                pub = parts[parts.index("-d") + 1].split("/")[0] if "-d" in parts else None
                proto = parts[parts.index("-p") + 1]
                port = int(parts[parts.index("--dport") + 1])
                to = parts[parts.index("--to-destination") + 1]
                addr, _, gport = to.rpartition(":")
                dnat[(pub, proto, port)] = (addr.strip("[]"), int(gport))
    return NatState(frozenset(chains), {k: tuple(v) for k, v in jumps.items()}, dnat, frozenset(acct_chains),
                    tuple(acct_jumps))


@dataclass(frozen=True)
class RuleCount:
    """The counters of one forward's DNAT rule (`iptables-save -c`).  The nat table sees only
    the first packet of a connection: `packets` is the NEW connections DNAT-ed."""

    guest: str
    guest_port: int
    packets: int
    bytes: int


def _counted_rules(save: str, table: str, suffix: str, needs: str) -> Iterator[tuple[int, int, list[str]]]:
    """(packets, bytes, words) of each rule of ours in `table` of `iptables-save -c` output: in a
    chain VF-...`suffix`, holding the word `needs` (lines "[packets:bytes] -A VF-<tag><suffix> ...")."""
    inside = False
    for line in save.splitlines():
        if line.startswith("*"):
            inside = line == f"*{table}"
            continue
        counts, _, rule = line.partition("] ")
        parts = rule.split()
        if not (inside and counts.startswith("[") and parts[:1] == ["-A"] and len(parts) > 1
                and parts[1].startswith("VF-") and parts[1].endswith(suffix) and needs in parts):
            continue
        try:
            packets, nbytes = (int(n) for n in counts[1:].split(":"))
        except ValueError:  # not a rule we wrote
            continue
        yield packets, nbytes, parts


def _after(parts: list[str], flag: str) -> str | None:
    """The word after `flag` (an address without its /prefix), None when absent."""
    return parts[parts.index(flag) + 1].split("/")[0] if flag in parts else None


def parse_counters(save: str) -> dict[tuple[str | None, str, int], RuleCount]:
    """{(public address or None, protocol, public port): RuleCount} of our DNAT rules in
    `iptables-save -c -t nat` output."""
    out: dict[tuple[str | None, str, int], RuleCount] = {}
    for packets, nbytes, parts in _counted_rules(save, "nat", "-D", "--to-destination"):
        try:
            key = (_after(parts, "-d"), parts[parts.index("-p") + 1], int(parts[parts.index("--dport") + 1]))
            addr, _, gport = parts[parts.index("--to-destination") + 1].rpartition(":")
            out[key] = RuleCount(addr.strip("[]"), int(gport), packets, nbytes)
        except (ValueError, IndexError):  # not a rule we wrote
            continue
    return out


def parse_traffic(save: str) -> dict[tuple[str | None, str, int], tuple[int, int]]:
    """{(public address or None, protocol, public port): (packets, bytes)} of our accounting
    rules in `iptables-save -c -t mangle` output: every packet of the forward's connections."""
    out: dict[tuple[str | None, str, int], tuple[int, int]] = {}
    for packets, nbytes, parts in _counted_rules(save, "mangle", "-A", "--ctorigdstport"):
        try:
            key = (_after(parts, "--ctorigdst"), parts[parts.index("-p") + 1],
                   int(parts[parts.index("--ctorigdstport") + 1]))
        except (ValueError, IndexError):  # not a rule we wrote
            continue
        out[key] = (packets, nbytes)
    return out


def _acct_rules(plan: GuestPlan, family: Family) -> list[str]:
    out = []
    for fwd in plan.forwards:
        if fwd.family == family:
            dest = f"--ctorigdst {fwd.public} " if fwd.public is not None else ""
            out.append(f"-A {acct_chain(plan)} -p {fwd.proto} -m conntrack {dest}--ctorigdstport {fwd.public_port}"
                       " -j RETURN")
    return out


def _mangle(family: Family, state: NatState, mine: list[GuestPlan], rebuild: list[GuestPlan]) -> list[str]:
    """The mangle table's part of the batch: accounting chains as the nat part does its own."""
    lines = ["*mangle", f":{ACCT} - [0:0]"]
    keep = {acct_chain(p) for p in mine}
    for plan in rebuild:
        if has_family(plan, family):
            lines += [f":{acct_chain(plan)} - [0:0]"] + _acct_rules(plan, family)
    gone = sorted(c for c in state.acct_chains if c not in keep and c != ACCT)
    lines += [f":{c} - [0:0]" for c in gone]
    present = list(state.acct_jumps)
    if mine and ACCT_JUMP in present:
        present.remove(ACCT_JUMP)  # keep one, delete the others
    lines += [f"-D FORWARD {rule}" for rule in present]
    if mine and ACCT_JUMP not in state.acct_jumps:
        lines.append(f"-A FORWARD {ACCT_JUMP}")
    lines += [f"-A {ACCT} -j {acct_chain(p)}" for p in mine]
    lines += [f"-X {c}" for c in gone]
    if not mine:
        lines.append(f"-X {ACCT}")
    return lines + ["COMMIT"]


def _dnat_rules(plan: GuestPlan, family: Family) -> list[str]:
    chain = dnat_chain(plan)
    out = []
    for fwd in plan.forwards:
        if fwd.family != family:
            continue
        dest = f"-d {fwd.public} " if fwd.public is not None else ""
        match = f"{dest}-p {fwd.proto} -m {fwd.proto} --dport {fwd.public_port}"
        to = f"{fwd.guest}:{fwd.guest_port}" if family == 4 else f"[{fwd.guest}]:{fwd.guest_port}"
        out += [f"-A {chain} {match} -j CONNMARK --or-mark {MARK_FORWARDED:#x}",
                f"-A {chain} {match} -j DNAT --to-destination {to}"]
    return out


def _guest_rules(plan: GuestPlan, family: Family) -> list[str]:
    nets = plan.allow_of(family) if plan.allow is not None else None
    head = guest_chain(plan)
    if nets is None:
        sources = [f"-A {head} -g {dnat_chain(plan)}"]
    else:
        sources = [f"-A {head} -s {n} -g {dnat_chain(plan)}" for n in nets]
    return sources + _dnat_rules(plan, family)


def has_family(plan: GuestPlan, family: Family) -> bool:
    return any(f.family == family for f in plan.forwards)


def render(family: Family, state: NatState, applied: list[GuestPlan], rebuild: list[GuestPlan],
           hairpin: bool, subnets: dict[str, IPNet], filter_chain: guards.ForwardChain | None) -> str:
    """iptables-restore --noflush input taking our nat chains (and the guard) to:
    exactly `applied` (every guest that stays), with `rebuild` (changed guests) rewritten."""
    mine = [p for p in applied if has_family(p, family)]
    lines = ["*nat", f":{PRE} - [0:0]", f":{POST} - [0:0]"]  # declaring a chain flushes it
    keep = {guest_chain(p) for p in mine} | {dnat_chain(p) for p in mine}
    for plan in rebuild:
        if has_family(plan, family):
            lines += [f":{guest_chain(plan)} - [0:0]", f":{dnat_chain(plan)} - [0:0]"]
            lines += _guest_rules(plan, family)
    gone = sorted(c for c in state.chains if c not in keep and c not in (PRE, POST))
    lines += [f":{c} - [0:0]" for c in gone]
    want = base_jumps(family, hairpin) if mine else {}
    for chain in ("PREROUTING", "OUTPUT", "POSTROUTING"):
        present = list(state.jumps.get(chain, ()))
        target = want.get(chain)
        if target is not None and target in present:
            present.remove(target)  # keep one, delete the others
        lines += [f"-D {chain} {rule}" for rule in present]
        if target is not None and target not in state.jumps.get(chain, ()):
            lines.append(f"-A {chain} {target}")
    for plan in mine:
        lines.append(f"-A {PRE} -j {guest_chain(plan)}")
    if hairpin:
        for plan in mine:
            for guest in sorted({f.guest for f in plan.forwards if f.family == family}, key=str):
                net = subnets.get(str(guest))
                if net is not None:
                    lines.append(f"-A {POST} -s {net} -d {guest} -m connmark --mark "
                                 f"{MARK_FORWARDED:#x}/{MARK_FORWARDED:#x} -j MASQUERADE")
    lines += [f"-X {c}" for c in gone]
    if not mine:
        lines += [f"-X {PRE}", f"-X {POST}"]
    lines.append("COMMIT")
    lines += _mangle(family, state, mine, rebuild)
    if filter_chain is not None:
        text = guards.render(filter_chain, want=bool(mine) and filter_chain.needs_guard())
        if text is not None:
            lines += text.splitlines()
    return "\n".join(lines) + "\n"


def connected_subnet(guest: ipaddress.IPv4Address | ipaddress.IPv6Address,
                     routes: list[IPNet]) -> IPNet | None:
    """The longest directly connected route holding the guest: its network, for hairpin."""
    hits = [n for n in routes if n.version == guest.version and guest in n and n.prefixlen > 0]
    return max(hits, key=lambda n: n.prefixlen) if hits else None


def live_forwards(state: NatState) -> set[Forward]:
    out = set()
    for (pub, proto, port), (addr, gport) in state.dnat.items():
        guest = ipaddress.ip_address(addr)
        fam: Family = 4 if guest.version == 4 else 6
        out.add(Forward(fam, proto, port, None if pub is None else ipaddress.ip_address(pub),  # type: ignore[arg-type]
                        guest, gport))
    return out
