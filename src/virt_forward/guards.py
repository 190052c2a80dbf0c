"""Guards: the one rule we put into firewall tables we do not own.

An accept in our nftables table cannot override a reject in another table
(iptables' FORWARD with libvirt's LIBVIRT_FWI ... REJECT, Docker's policy DROP):
every base chain of every table must accept.  So above those rules we insert a
single rule that accepts only connections carrying our conntrack mark, which
only our DNAT sets.  The per-forward data stays in our own maps.

Pure parsing and rendering; the engine runs the commands.
"""

from __future__ import annotations

from dataclasses import dataclass

from .nft import MARK_FORWARDED

GUARD_COMMENT = "virt-forward:guard"
GUARD_SPEC = (f"-m conntrack --ctstate DNAT -m connmark --mark {MARK_FORWARDED:#x}/{MARK_FORWARDED:#x}"
              f" -m comment --comment {GUARD_COMMENT} -j ACCEPT")


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
        return self.guard_positions() == [0]


def parse_filter(save_output: str) -> ForwardChain:
    in_filter = False
    policy: str | None = None
    rules: list[str] = []
    for line in save_output.splitlines():
        if line.startswith("*"):
            in_filter = line == "*filter"
        elif in_filter and line.startswith(":FORWARD "):
            policy = line.split()[1]
        elif in_filter and line.startswith("-A FORWARD "):
            rules.append(line[len("-A FORWARD "):])
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
