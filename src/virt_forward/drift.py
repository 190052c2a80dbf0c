"""Drift: what differs between the records (what we applied) and the kernel, libvirt's running
guests and the bridge ports, as typed values.  Reading only: the watcher repairs by kind,
`status` and `doctor` show the same values, and no caller parses their text back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from . import engine, hairpin, nft
from .plan import Family, GuestPlan
from .runner import run


class Kind(Enum):
    WAITING = "waiting"  # a guest's start is pending its address (DHCP lease): apply it alone, soon
    NOT_APPLIED = "not-applied"  # running, configured, not applied
    NOT_RUNNING = "not-running"  # applied, libvirt says not running
    HAIRPIN = "hairpin"  # a bridge port of ours lost hairpin mode: set it again, no firewall change
    TABLE = "table"  # our table gone, or there without any guest recorded
    RULES = "rules"  # our maps, chains or iptables rules differ from the records
    GUARD = "guard"  # a guard missing, misplaced or doubled in a chain of others
    TOOL = "tool"  # the backend's tool is not installed
    UNREADABLE = "unreadable"  # the records could not be read


@dataclass(frozen=True)
class Problem:
    kind: Kind
    subject: str  # the guest, chain, map or port it is about
    text: str  # one line for people: status, doctor, the journal

    def __str__(self) -> str:
        return self.text


def expected_elements(plans: list[GuestPlan]) -> dict[str, dict[tuple[str, ...], tuple[str, ...]]]:
    want: dict[str, dict[tuple[str, ...], tuple[str, ...]]] = {}
    for plan in plans:
        for fwd in plan.forwards:
            name, key, value = nft.dnat_element(fwd)
            want.setdefault(name, {})[key] = value
    return want


def _rule_counts(listing: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in listing.get("nftables", []):
        rule = item.get("rule")
        if isinstance(rule, dict):
            counts[rule["chain"]] = counts.get(rule["chain"], 0) + 1
    return counts


def _expected_counts(hairpin: bool) -> dict[str, int]:
    counts: dict[str, int] = {}
    for cmd in nft.skeleton(hairpin):
        if cmd.startswith(f"add rule {nft.T} "):
            chain = cmd.split()[4]
            counts[chain] = counts.get(chain, 0) + 1
    return counts


def problems(ctx: engine.Context, running: list[str] | None = None) -> list[Problem]:
    """What differs between the records and the kernel (and libvirt's running guests,
    when known); [] when all is in place."""
    from .config import guest_names, settings_or_default
    settings = settings_or_default(ctx.config_dir)
    store = ctx.store
    found: list[Problem] = []
    with store.lock():
        plans = [p for p in (store.read(d) for d in store.domains()) if p is not None]
        waiting = [d for d in store.xml_domains() if store.read(d) is None]
        found += [Problem(Kind.WAITING, d, f"{d}: {WAITING}") for d in waiting
                  if running is None or d in running]
        if running is not None:
            recorded = {p.domain for p in plans}
            configured = set(guest_names(ctx.config_dir))
            found += [Problem(Kind.NOT_APPLIED, d, f"{d}: running but not applied")
                      for d in sorted((set(running) & configured) - recorded) if d not in waiting]
            found += [Problem(Kind.NOT_RUNNING, d, f"{d}: applied but not running") for d in sorted(recorded - set(running))]
        found += [Problem(Kind.HAIRPIN, stem, f"{stem}: {hairpin.PROBLEM} {dev}")
                  for stem, dev in hairpin.problems(str(store.root))]
        try:
            backend = engine.resolve_backend(settings)
        except Exception:
            backend = "nftables"
        if backend == "iptables":
            return found + _iptables_problems(plans, settings.hairpin)
        got = run(["nft", "-j", "list", "table", nft.FAMILY, nft.TABLE], check=False)
        if not plans:
            if got.returncode == 0 and not waiting:
                found.append(Problem(Kind.TABLE, nft.T, "our table exists but no guest is recorded"))
            return found
        if got.returncode != 0:
            return found + [Problem(Kind.TABLE, nft.T, "table inet virt_forward is gone")]
        listing = json.loads(got.stdout)
        live = nft.parse_live(listing)
        want = expected_elements(plans)
        for name in sorted(set(want) | {n for n in live if n.startswith("dnat")}):
            if live.get(name, {}) != want.get(name, {}):
                found.append(Problem(Kind.RULES, name, f"map {name} differs from the records"))
        counts = _rule_counts(listing)
        for chain, n in _expected_counts(settings.hairpin).items():
            if counts.get(chain, 0) != n:
                found.append(Problem(Kind.RULES, chain, f"chain {chain} has {counts.get(chain, 0)} rules, not {n}"))
        for guarded in engine.nft_guard_chains():
            if not guarded.guard_in_place():
                found.append(Problem(Kind.GUARD, guarded.target.ref, f"guard not on top of nft {guarded.target.ref}"))
        found += _iptables_guard_problems(set().union(*(p.families() for p in plans)))
    return found


def _tool(family: Family) -> str:
    return "iptables" if family == 4 else "ip6tables"


def _iptables_guard_problems(families: set[Family]) -> list[Problem]:
    found = []
    for family in sorted(families):
        fchain = engine.read_forward_chain(family)
        if fchain is not None and fchain.needs_guard() and not fchain.guard_in_place():
            found.append(Problem(Kind.GUARD, f"{_tool(family)} FORWARD", f"guard not on top of {_tool(family)} FORWARD"))
    return found


def _iptables_problems(plans: list[GuestPlan], hairpin: bool) -> list[Problem]:
    from . import iptables
    found: list[Problem] = []
    live: set[object] = set()
    families: tuple[Family, ...] = (4, 6)
    for family in families:
        state = engine.read_nat_state(family)
        live |= iptables.live_forwards(state)
        if any(iptables.has_family(p, family) for p in plans):
            for chain, rule in iptables.base_jumps(family, hairpin).items():
                if state.jumps.get(chain, ()) != (rule,):
                    found.append(Problem(Kind.RULES, f"{_tool(family)} nat {chain}",
                                         f"{_tool(family)} nat {chain}: jump to our chain missing or doubled"))
            if state.acct_jumps != (iptables.ACCT_JUMP,):
                found.append(Problem(Kind.RULES, f"{_tool(family)} mangle FORWARD",
                                     f"{_tool(family)} mangle FORWARD: jump to our accounting chain missing or doubled"))
    found += _iptables_guard_problems({f for p in plans for f in p.families()})
    if live != {f for p in plans for f in p.forwards}:
        found.append(Problem(Kind.RULES, "iptables nat", "iptables DNAT rules differ from the records"))
    return found


WAITING = "running but not applied (waiting for its address)"
