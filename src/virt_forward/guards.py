"""Guards: the one rule we put into firewall tables we do not own.

An accept in our nftables table cannot override a reject in another table
(iptables' FORWARD with libvirt's LIBVIRT_FWI ... REJECT, Docker's policy DROP,
libvirt's own nftables table `guest_input ... reject`, firewalld's
filter_FORWARD): every base chain of every table must accept.  So above those
rules we insert a single rule that accepts only connections carrying our
conntrack mark, which only our DNAT sets.  The per-forward data stays in our
own maps.

Pure parsing and rendering; the engine runs the commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .consts import GUARD_COMMENT, GUARD_SPEC, NFT_GUARD_COMMENT, NFT_GUARD_RULE, NFT_GUARD_TARGETS

__all__ = ["GUARD_COMMENT", "GUARD_SPEC", "NFT_GUARD_COMMENT", "NFT_GUARD_RULE", "NFT_TARGETS", "ForwardChain",
           "NftChain", "NftTarget", "nft_commands", "parse_filter", "parse_nft_chain", "present_targets", "render"]


@dataclass(frozen=True)
class ForwardChain:
    """iptables' filter FORWARD chain as iptables-save shows it."""

    exists: bool
    policy: str = "ACCEPT"
    rules: tuple[str, ...] = ()  # the text after "-A FORWARD "

    def guard_positions(self) -> list[int]:
        return [i for i, r in enumerate(self.rules) if GUARD_COMMENT in r]

    def foreign_rules(self) -> list[str]:
        return [r for r in self.rules if GUARD_COMMENT not in r]

    def needs_guard(self) -> bool:
        """Something there may drop or reject our forwarded connections."""
        return self.exists and (self.policy != "ACCEPT" or bool(self.foreign_rules()))

    def guard_in_place(self) -> bool:
        """One guard, first, and the current one (an older mark or spec gets replaced)."""
        return self.guard_positions() == [0] and self.rules[0].replace('"', "") == GUARD_SPEC


def parse_filter(save_output: str) -> ForwardChain:
    from .fastpath import forward_chain  # the hook's fast path reads the same text without us
    policy, rules = forward_chain(save_output)
    if policy is None:
        return ForwardChain(exists=False)
    return ForwardChain(exists=True, policy=policy, rules=tuple(rules))


def render(chain: ForwardChain, want: bool) -> str | None:
    """iptables-restore --noflush input that leaves exactly one guard on top (want) or none.

    Deletes name the rules exactly as iptables-save printed them, so older
    variants of the guard are removed too.  None: nothing to change.
    """
    if want and (chain.guard_in_place() or not chain.exists):
        return None
    if not want and not chain.guard_positions():
        return None
    lines = ["*filter"]
    lines += [f"-D FORWARD {chain.rules[i]}" for i in chain.guard_positions()]
    if want:
        lines.append(f"-I FORWARD 1 {GUARD_SPEC}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- nftables tables of others

@dataclass(frozen=True)
class NftTarget:
    """A base chain of someone else's nftables table that may reject our forwards."""

    family: str
    table: str
    chain: str

    @property
    def ref(self) -> str:
        return f"{self.family} {self.table} {self.chain}"


# libvirt >= 10.4 with firewall_backend = "nftables": its `forward` base chain jumps to
# guest_input, which ends with `oif virbrN reject`.  We go to the top of `forward`
# rather than guest_input: libvirt inserts every network's rules at the top of
# guest_input when a network (re)starts, while `forward` is only written when
# the table is made.  firewalld: filter_FORWARD ends with a reject.
NFT_TARGETS = tuple(NftTarget(*t) for t in NFT_GUARD_TARGETS)



@dataclass(frozen=True)
class NftChain:
    target: NftTarget
    handles: tuple[int, ...]  # every rule's handle, in order
    guards: tuple[int, ...]  # handles of our guards
    current: tuple[int, ...] = ()  # handles of guards that are this version's
    # accepts every DNAT-ed connection before anything could reject it: needs no guard
    # (firewalld's filter_FORWARD; fastpath.accepts_dnat_first says why it matters)
    accepts_dnat: bool = False

    def guard_in_place(self) -> bool:
        if not self.guards and self.accepts_dnat:
            return True
        return list(self.guards) == list(self.handles[:1]) == list(self.current)


def present_targets(chains_listing: dict[str, Any]) -> list[NftTarget]:
    """Targets whose chain exists, from `nft -j list chains`.

    Not `list tables`: nft 1.0.6 loads every set element to answer that (148 ms with
    10,000 forwards, measured), while `list chains` stays at a few ms at any size.
    """
    have = {(c["chain"]["family"], c["chain"]["table"], c["chain"]["name"])
            for c in chains_listing.get("nftables", []) if "chain" in c}
    return [t for t in NFT_TARGETS if (t.family, t.table, t.chain) in have]


def parse_nft_chain(target: NftTarget, listing: dict[str, Any]) -> NftChain | None:
    """From `nft -a -j list chain FAMILY TABLE CHAIN`; None when the chain is not there."""
    handles: list[int] = []
    ours: list[int] = []
    current: list[int] = []
    found = False
    for item in listing.get("nftables", []):
        if "chain" in item:
            found = True
        rule = item.get("rule")
        if isinstance(rule, dict):
            handles.append(int(rule["handle"]))
            comment = str(rule.get("comment", ""))
            if comment.startswith(GUARD_COMMENT):
                ours.append(int(rule["handle"]))
                if comment == NFT_GUARD_COMMENT:
                    current.append(int(rule["handle"]))
    return NftChain(target, tuple(handles), tuple(ours), tuple(current), _accepts_dnat(listing)) if found else None


_DNAT_ACCEPT = [{"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}, {"accept": None}]


def _accepts_dnat(listing: dict[str, Any]) -> bool:
    """The JSON twin of fastpath.accepts_dnat_first."""
    for item in listing.get("nftables", []):
        rule = item.get("rule")
        if not isinstance(rule, dict):
            continue
        exprs = [e for e in rule.get("expr", []) if not (isinstance(e, dict) and "counter" in e)]
        if [dict(e, match=dict(e["match"], op="in")) if isinstance(e, dict) and "match" in e else e
                for e in exprs] == _DNAT_ACCEPT:
            return True
        if not exprs or exprs[-1] != {"accept": None}:
            return False
    return False


def nft_commands(chains: list[NftChain], want: bool) -> list[str]:
    """nft commands leaving exactly one guard on top of each chain (want) or none."""
    cmds: list[str] = []
    for chain in chains:
        if want and chain.guard_in_place():
            continue
        cmds += [f"delete rule {chain.target.ref} handle {h}" for h in chain.guards]
        if want:
            cmds.append(f"insert rule {chain.target.ref} {NFT_GUARD_RULE}")
    return cmds
