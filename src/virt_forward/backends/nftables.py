"""The nftables backend: our own table `inet virt_forward`, changed by one `nft -f` per change,
with the guards in other nftables tables (libvirt's nftables backend, firewalld) in the same
transaction, and the iptables FORWARD guard beside it where iptables rules would reject.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from .. import guards, log, nft
from ..consts import SKELETON_MARK_PREFIX
from ..errors import FirewallError
from ..plan import Family, GuestPlan
from ..problems import Kind, Problem
from ..runner import nft_apply, run, which
from .iptables import ensure_guards, guard_problems, read_forward_chain, remove_guards

if TYPE_CHECKING:
    from ..metrics import Live


class NftablesBackend:
    name = "nftables"
    tool = "nft"
    fast_path = True  # fastpath.py replays this backend's batches

    def is_supported(self) -> bool:
        return which(self.tool) is not None

    def apply(self, old: GuestPlan | None, new: GuestPlan, others: Callable[[], list[GuestPlan]],
              hairpin: bool) -> bool:
        """True when our table is of an older schema: the caller rebuilds it whole."""
        return _apply_nft(old, new, hairpin)

    def after_apply(self, families: set[Family]) -> None:
        ensure_guards(families)

    def remove(self, old: GuestPlan, others: Callable[[], list[GuestPlan]], hairpin: bool, last: bool) -> None:
        if last:  # the last guest: the table and every guard go
            apply_with_nft_guards(lambda _live: nft.change(old, None, hairpin=hairpin, last=True), want=False)
            remove_guards()
            return
        try:  # the skeleton costs most of a batch: only when the table lost it
            nft_apply(nft.change(old, None, hairpin=hairpin, with_skeleton=False))
        except FirewallError:
            nft_apply(nft.change(old, None, hairpin=hairpin))

    def rebuild(self, plans: list[GuestPlan], hairpin: bool) -> None:
        # the per-forward counters of the table as it is carry over into the new one (metrics.py);
        # at 10,000 forwards listing them costs ~0.35 s, nothing when the table is gone
        apply_with_nft_guards(keep_counters(nft.full(plans, hairpin=hairpin)), want=bool(plans))
        if plans:
            ensure_guards(set().union(*(p.families() for p in plans)))
        else:
            remove_guards()

    def plan_text(self, old: GuestPlan | None, new: GuestPlan, others: Callable[[], list[GuestPlan]],
                  hairpin: bool) -> str:
        live = read_nft()
        guard_cmds = guards.nft_commands(list(live.guarded), want=True)
        out = "# nft -f - <<EOF (one transaction" + (", with the guards in nftables tables of others)\n"
                                                     if guard_cmds else "; no guard needed in others' tables)\n")
        out += change_batch(live, old, new, hairpin) + "EOF\n"
        for family in sorted(new.families()):
            chain = read_forward_chain(family)
            text = guards.render(chain, want=True) if chain is not None and chain.needs_guard() else None
            tool = "iptables" if family == 4 else "ip6tables"
            out += f"# {tool} filter FORWARD guard: " + ("in place or not needed\n" if text is None else
                                                          f"{tool}-restore --noflush <<EOF\n{text}EOF\n")
        return out

    def drift(self, plans: list[GuestPlan], hairpin: bool, waiting: bool) -> list[Problem]:
        found: list[Problem] = []
        listing = list_table()
        if not plans:
            if listing is not None and not waiting:
                found.append(Problem(Kind.TABLE, nft.T, "our table exists but no guest is recorded"))
            return found
        if listing is None:
            return [Problem(Kind.TABLE, nft.T, "table inet virt_forward is gone")]
        live = nft.parse_live(listing)
        want = expected_elements(plans)
        for name in sorted(set(want) | {n for n in live if n.startswith("dnat")}):
            if live.get(name, {}) != want.get(name, {}):
                found.append(Problem(Kind.RULES, name, f"map {name} differs from the records"))
        counts = _rule_counts(listing)
        for chain, n in _expected_counts(hairpin).items():
            if counts.get(chain, 0) != n:
                found.append(Problem(Kind.RULES, chain, f"chain {chain} has {counts.get(chain, 0)} rules, not {n}"))
        for guarded in nft_guard_chains():
            if not guarded.guard_in_place():
                found.append(Problem(Kind.GUARD, guarded.target.ref, f"guard not on top of nft {guarded.target.ref}"))
        return found + guard_problems(set().union(*(p.families() for p in plans)))

    def read_live(self) -> Live:
        from ..metrics import Live, live_from_listing
        if not self.is_supported():
            return Live({}, {})
        return live_from_listing(list_table() or {})


def _our_change(live: NftLive, old: GuestPlan | None, new: GuestPlan, hairpin: bool) -> str:
    """Our part of the transaction (pure): the fixed part only when the table lacks it."""
    return nft.change(old, new, hairpin=hairpin, with_skeleton=live.mark != nft.skeleton_mark(hairpin),
                      stale_marks=live.marks)


def change_batch(live: NftLive, old: GuestPlan | None, new: GuestPlan, hairpin: bool) -> str:
    """The transaction `apply` runs, from what is live (pure): our change and a guard where a
    chain of others needs one (apply_with_nft_guards adds them the same way).  `plan` prints it."""
    return _our_change(live, old, new, hairpin) + nft.batch(guards.nft_commands(list(live.guarded), want=True))


def _apply_nft(old: GuestPlan | None, plan: GuestPlan, hairpin: bool) -> bool:
    """Our change and the guards in one transaction; True when the table is of an older schema."""
    try:
        apply_with_nft_guards(lambda live: _our_change(live, old, plan, hairpin), want=True)
    except FirewallError:
        if not _old_schema(hairpin):
            raise
        return True
    return False


def _old_schema(hairpin: bool) -> bool:
    """Does our fixed part alone fail against the live table (checked, not applied)?"""
    return run(["nft", "-c", "-f", "-"], stdin=nft.batch(nft.skeleton(hairpin)), check=False).returncode != 0


@dataclass(frozen=True)
class NftLive:
    """What one change needs to know of the live ruleset (cheap to read: no set elements)."""

    guarded: tuple[guards.NftChain, ...]  # the foreign chains that get a guard, as they are now
    marks: tuple[str, ...]  # skeleton marks in our table (nft.skeleton_mark)

    @property
    def mark(self) -> str | None:
        return self.marks[0] if len(self.marks) == 1 else None


def read_nft() -> NftLive:
    listed = run(["nft", "-j", "list", "chains"], check=False)
    if listed.returncode != 0:
        return NftLive((), ())
    listing = json.loads(listed.stdout)
    marks = tuple(sorted(c["chain"]["name"] for c in listing.get("nftables", [])
                         if "chain" in c and c["chain"].get("family") == nft.FAMILY
                         and c["chain"].get("table") == nft.TABLE
                         and str(c["chain"].get("name", "")).startswith(SKELETON_MARK_PREFIX)))
    chains = []
    for target in guards.present_targets(listing):
        got = run(["nft", "-a", "-j", "list", "chain", target.family, target.table, target.chain], check=False)
        if got.returncode == 0:
            chain = guards.parse_nft_chain(target, json.loads(got.stdout))
            if chain is not None:
                chains.append(chain)
    return NftLive(tuple(chains), marks)


def nft_guard_chains() -> list[guards.NftChain]:
    """The foreign nftables chains that need a guard, as they are now (cheap: small tables)."""
    return list(read_nft().guarded)


def apply_with_nft_guards(body: str | Callable[[NftLive], str], want: bool) -> None:
    """Our change and the guards in other nftables tables: one transaction.

    `body`: our part, or a function making it from what is live (is the skeleton there?).
    The guards are deleted by handle; if their owner rewrote the chain between
    our read and our write the batch fails as a whole, so read again once.
    """
    for attempt in (1, 2):
        live = read_nft()
        chains = list(live.guarded)
        # a second attempt repeats the skeleton whatever the mark says (the table may be damaged)
        ours = body if isinstance(body, str) else body(live if attempt == 1 else replace(live, marks=()))
        try:
            nft_apply(ours + nft.batch(guards.nft_commands(chains, want)))
            break
        except FirewallError:
            if attempt == 2 or not (chains or live.marks):
                raise
    placed = [c.target.ref for c in chains if want and not c.guard_in_place()]
    if placed:
        log.info("guard placed on top of nft " + ", ".join(placed))


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


def keep_counters(batch: str) -> str:
    """`batch` (nft.full: our table deleted and made anew) carrying the per-forward counters
    of the table as it is now, so a rebuild does not reset them (nft.carry_counters).  Read
    it under the state lock, right before applying: connections DNAT-ed between this read and
    the batch are not counted.  A table that is gone (nft flush ruleset) has nothing left to
    carry: Prometheus sees a counter reset, as after a reboot."""
    listing = list_table() if which("nft") else None
    return batch if listing is None else nft.carry_counters(batch, nft.parse_element_counts(listing))


def list_table() -> dict[str, Any] | None:
    """`nft -j list table inet virt_forward`, set elements and counters included; None when the
    table is not there.  It costs ~0.35 s at 10,000 forwards: never on a guest's start.
    -p: protocols as numbers on every host (by name only where /etc/protocols exists); the
    parsers (nft.parse_live and co.) read either form."""
    got = run(["nft", "-j", "-p", "list", "table", nft.FAMILY, nft.TABLE], check=False)
    return json.loads(got.stdout) if got.returncode == 0 else None
