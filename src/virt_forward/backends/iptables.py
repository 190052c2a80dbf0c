"""The iptables backend (hosts without nft), and the guard in iptables' filter FORWARD that
both backends place where libvirt's iptables rules or Docker's would reject our forwards.

Reading the live tables is kept apart from rendering (iptables.py, pure) and running
(runner.py): `plan` prints what `batches` makes, and `sync` runs exactly that.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .. import guards, log
from ..errors import FirewallError
from ..plan import Family, GuestPlan
from ..problems import Kind, Problem
from ..runner import run, which

if TYPE_CHECKING:
    from .. import iptables
    from ..metrics import Live

IPTABLES_TOOLS: dict[Family, tuple[str, str]] = {4: ("iptables-save", "iptables-restore"),
                                                 6: ("ip6tables-save", "ip6tables-restore")}


class IptablesBackend:
    name = "iptables"
    tool = "iptables-restore"
    fast_path = False  # the hook's fast path knows nft batches only

    def is_supported(self) -> bool:
        return which(self.tool) is not None

    def apply(self, old: GuestPlan | None, new: GuestPlan, others: Callable[[], list[GuestPlan]],
              hairpin: bool) -> bool:
        families = new.families() | (old.families() if old else set())
        sync(others() + [new], [new], families, hairpin)
        return False

    def after_apply(self, families: set[Family]) -> None:
        pass  # the guard went with the same iptables-restore batch

    def remove(self, old: GuestPlan, others: Callable[[], list[GuestPlan]], hairpin: bool, last: bool) -> None:
        sync(others(), [], old.families(), hairpin)

    def rebuild(self, plans: list[GuestPlan], hairpin: bool) -> None:
        sync(plans, plans, {4, 6}, hairpin)

    def plan_text(self, old: GuestPlan | None, new: GuestPlan, others: Callable[[], list[GuestPlan]],
                  hairpin: bool) -> str:
        families = new.families() | (old.families() if old else set())
        out = ""
        for family, batch in batches(others() + [new], [new], families, hairpin):
            out += f"# {_tool(family)}-restore --noflush <<EOF (one transaction)\n{batch}EOF\n"
        return out

    def drift(self, plans: list[GuestPlan], hairpin: bool, waiting: bool) -> list[Problem]:
        return _iptables_problems(plans, hairpin)

    def read_live(self) -> Live:
        from ..metrics import iptables_live
        saves: dict[Family, str] = {}
        for family, (save, _) in IPTABLES_TOOLS.items():
            for table in ("nat", "mangle"):  # the DNAT rules' counters, the accounting rules' counters
                got = run([save, "-c", "-t", table], check=False) if which(save) else None
                if got is not None and got.returncode == 0:
                    saves[family] = saves.get(family, "") + got.stdout
        return iptables_live(saves)


def connected_routes() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Directly connected routes of this network namespace, from /proc (no process)."""
    routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    try:
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) > 7 and int(cols[2], 16) == 0:
                dest = ipaddress.IPv4Address(int(cols[1], 16).to_bytes(4, "little"))
                mask = ipaddress.IPv4Address(int(cols[7], 16).to_bytes(4, "little"))
                routes.append(ipaddress.ip_network(f"{dest}/{mask}", strict=False))
        for line in Path("/proc/net/ipv6_route").read_text().splitlines():
            cols = line.split()
            if len(cols) > 9 and int(cols[4], 16) == 0 and cols[9] != "lo":
                dest6 = ipaddress.IPv6Address(bytes.fromhex(cols[0]))
                routes.append(ipaddress.ip_network(f"{dest6}/{int(cols[1], 16)}", strict=False))
    except OSError:
        pass
    return routes


def sync(applied: list[GuestPlan], rebuild: list[GuestPlan], families: set[Family], hairpin: bool) -> None:
    """The iptables backend: one iptables-restore --noflush per family (nat and mangle chains, guard)."""
    for family, text in batches(applied, rebuild, families, hairpin):
        _restore(family, text)


def batches(applied: list[GuestPlan], rebuild: list[GuestPlan], families: set[Family],
            hairpin: bool) -> list[tuple[Family, str]]:
    """The iptables-restore --noflush input of each family, from the live tables (read, never
    changed: `plan` prints these)."""
    from .. import iptables  # the renderer: not imported on the nftables backend's path
    routes = connected_routes()
    subnets = {}
    for plan in applied:
        for guest in {f.guest for f in plan.forwards}:
            net = iptables.connected_subnet(guest, routes)
            if net is not None:
                subnets[str(guest)] = net
    out: list[tuple[Family, str]] = []
    for family in sorted(families):
        if which(IPTABLES_TOOLS[family][1]) is None:
            raise FirewallError(f"{IPTABLES_TOOLS[family][1]}: not installed, but IPv{family} forwards are configured")
        out.append((family, iptables.render(family, read_nat_state(family), applied, rebuild, hairpin, subnets,
                                            read_forward_chain(family))))
    return out


def read_nat_state(family: Family) -> iptables.NatState:
    """Our part of iptables' nat and mangle tables as they are now (empty where a table is not)."""
    from .. import iptables  # the renderer: not imported on the nftables backend's path
    save = IPTABLES_TOOLS[family][0]
    text = ""
    for table in ("nat", "mangle"):
        got = run([save, "-t", table], check=False) if which(save) else None
        if got is not None and got.returncode == 0:
            text += got.stdout
    return iptables.parse_nat(text)


def read_forward_chain(family: Family) -> guards.ForwardChain | None:
    save, _ = IPTABLES_TOOLS[family]
    if which(save) is None:
        return None
    result = run([save, "-t", "filter"], check=False)
    if result.returncode != 0:  # no filter table: nothing there can reject us
        return guards.ForwardChain(exists=False)
    return guards.parse_filter(result.stdout)


def _restore(family: Family, text: str) -> None:
    _, restore = IPTABLES_TOOLS[family]
    run([restore, "-w", "5", "--noflush"], stdin=text)


def ensure_guards(families: set[Family]) -> list[str]:
    """Put our guard on top of iptables' FORWARD where something there rejects or drops."""
    done = []
    for family in sorted(families):
        chain = read_forward_chain(family)
        if chain is None or not chain.needs_guard():
            continue
        text = guards.render(chain, want=True)
        if text is not None:
            _restore(family, text)
            done.append(f"ip{'6' if family == 6 else ''}tables FORWARD")
    if done:
        log.info("guard placed on top of " + ", ".join(done))
    return done


def remove_guards() -> None:
    families: tuple[Family, ...] = (4, 6)
    for family in families:
        chain = read_forward_chain(family)
        if chain is None:
            continue
        text = guards.render(chain, want=False)
        if text is not None:
            _restore(family, text)


def _tool(family: Family) -> str:
    return "iptables" if family == 4 else "ip6tables"


def guard_problems(families: set[Family]) -> list[Problem]:
    found = []
    for family in sorted(families):
        fchain = read_forward_chain(family)
        if fchain is not None and fchain.needs_guard() and not fchain.guard_in_place():
            found.append(Problem(Kind.GUARD, f"{_tool(family)} FORWARD", f"guard not on top of {_tool(family)} FORWARD"))
    return found


def _iptables_problems(plans: list[GuestPlan], hairpin: bool) -> list[Problem]:
    from .. import iptables  # the renderer: not imported on the nftables backend's path
    found: list[Problem] = []
    live: set[object] = set()
    families: tuple[Family, ...] = (4, 6)
    for family in families:
        state = read_nat_state(family)
        live |= iptables.live_forwards(state)
        if any(iptables.has_family(p, family) for p in plans):
            for chain, rule in iptables.base_jumps(family, hairpin).items():
                if state.jumps.get(chain, ()) != (rule,):
                    found.append(Problem(Kind.RULES, f"{_tool(family)} nat {chain}",
                                         f"{_tool(family)} nat {chain}: jump to our chain missing or doubled"))
            if state.acct_jumps != (iptables.ACCT_JUMP,):
                found.append(Problem(Kind.RULES, f"{_tool(family)} mangle FORWARD",
                                     f"{_tool(family)} mangle FORWARD: jump to our accounting chain missing or doubled"))
    found += guard_problems({f for p in plans for f in p.families()})
    if live != {f for p in plans for f in p.forwards}:
        found.append(Problem(Kind.RULES, "iptables nat", "iptables DNAT rules differ from the records"))
    return found
