"""doctor: the classic reasons a forward does not work, each with a verdict and the fix.

`gather()` reads the host (sysctls, addresses, sockets, libvirt's files, the
firewall); `diagnose()` is pure and turns those facts into verdicts, so every
check is testable with made-up facts.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import engine
from .errors import VirtForwardError
from .plan import GuestPlan
from .ports import IPAddress

if TYPE_CHECKING:
    from .drift import Problem

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
# libvirt looks for hooks while it starts, a while after its process began; and the start
# time is known to a clock tick: a hook written within this of the start counts as seen
DAEMON_START_SLACK = 0.05


@dataclass(frozen=True)
class Verdict:
    level: str
    check: str
    message: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.level:<4} {self.check}: {self.message}" + (f" -- fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class Facts:
    sysctl: dict[str, str]
    local_addresses: frozenset[IPAddress]
    listening: frozenset[tuple[str, int]]  # (proto, port) the host itself listens on
    networks: dict[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]  # libvirt network -> subnets
    plans: tuple[GuestPlan, ...]  # every configured guest
    config_errors: tuple[str, ...]
    firewall_problems: tuple[Problem, ...]  # recorded vs live (drift.problems)
    applied: frozenset[str]
    docker_drop: bool
    firewalld_strict: bool | None  # None: no firewalld config
    hook_path: str
    hook_installed: bool
    hook_mtime: float | None
    daemon_started: float | None  # libvirtd/virtqemud start time (epoch), None: not running
    nft_installed: bool
    hook_problem: str | None = None  # the hook run as libvirt runs it failed: why
    packaged: bool = False  # the Debian package is installed: apt, not `virt-forward install`, puts hooks back
    unit_problems: tuple[str, ...] = ()
    hairpin: bool = True  # config.toml's `hairpin`: hairpin mode on the ports of guests with forwards
    conntrack_installed: bool = True  # the conntrack command (forgets the flows of a changed forward)
    ambiguous_leases: tuple[str, ...] = ()  # discovery.ambiguous_leases: guests whose address is not taken
    orphan_claims: tuple[str, ...] = ()  # holders in the claims index with no record (a start killed mid-way)
    # the watcher's repair that left what it repaired (metrics.Repairs): the problems, since when, tries
    repair_failing: tuple[str, ...] = ()
    repair_failing_since: float | None = None
    repair_attempts: int = 0
    extra: dict[str, str] = field(default_factory=dict)


def diagnose(f: Facts) -> list[Verdict]:
    v: list[Verdict] = []
    families = {fwd.family for p in f.plans for fwd in p.forwards}

    v.append(Verdict(OK, "nftables", "nft is installed") if f.nft_installed else
             Verdict(FAIL, "nftables", "the nft command is missing", "apt-get install nftables"))
    # the Debian package depends on it; a venv install may lack it, and nothing else would say so
    v.append(Verdict(OK, "conntrack", "conntrack is installed") if f.conntrack_installed else
             Verdict(FAIL, "conntrack", "the conntrack command is missing: the flows of a forward that was removed "
                     "or now leads elsewhere keep reaching the old guest (a steady UDP sender for ever)",
                     "apt-get install conntrack"))

    for fam, key in ((4, "net.ipv4.ip_forward"), (6, "net.ipv6.conf.all.forwarding")):
        if fam not in families:
            continue
        if f.sysctl.get(key) == "1":
            v.append(Verdict(OK, "ip_forward", f"{key} = 1"))
        else:
            v.append(Verdict(FAIL, "ip_forward", f"{key} = {f.sysctl.get(key, '?')}: the host routes nothing",
                             f"sysctl -w {key}=1 and persist it in /etc/sysctl.d/"))

    if f.config_errors:
        v += [Verdict(FAIL, "config", e, "virt-forward check") for e in f.config_errors]
    else:
        v.append(Verdict(OK, "config", f"{len(f.plans)} guest file(s) valid"))

    missing = sorted({str(fwd.public) for p in f.plans for fwd in p.forwards
                      if fwd.public is not None and fwd.public not in f.local_addresses})
    for missing_addr in missing:
        addr = missing_addr
        v.append(Verdict(FAIL, "public address", f"{addr} is not on any interface of this host; "
                         "packets to it never reach us", f"ip addr add {addr}/... dev <uplink>, or fix `public`"))
    if f.plans and not missing:
        v.append(Verdict(OK, "public address", "every public address is on an interface"))

    clashes = sorted({(fwd.proto, fwd.public_port) for p in f.plans for fwd in p.forwards}
                     & set(f.listening))
    for proto, port in clashes:
        v.append(Verdict(WARN, "host listener", f"a host service listens on {port}/{proto}: outside clients reach "
                         "the guest, but it is easy to test from the host and hit the host's own service instead",
                         f"ss -ltnup | grep :{port}"))

    if f.networks:
        for plan in f.plans:
            for guest_addr in sorted({fwd.guest for fwd in plan.forwards}, key=str):
                inside = [n for n, subnets in f.networks.items() if any(guest_addr in s for s in subnets)]
                if not inside:
                    v.append(Verdict(FAIL, "guest address", f"{plan.domain}: {guest_addr} is in no libvirt network "
                                     f"({', '.join(sorted(f.networks))})", "fix `address` in its guest file"))
    else:
        v.append(Verdict(SKIP, "guest address", "no libvirt network definitions found to check against"))

    if f.firewall_problems:
        v += [Verdict(FAIL, "live rules", str(p), "virt-forward reconcile (and run virt-forward watch)")
              for p in f.firewall_problems]
    elif f.applied:
        v.append(Verdict(OK, "live rules", f"{len(f.applied)} guest(s) applied, rules and guards in place"))
    if f.repair_failing:
        import time
        since = "" if f.repair_failing_since is None else \
            time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(f.repair_failing_since))
        v.append(Verdict(FAIL, "watcher", f"its repair does not fix {'; '.join(f.repair_failing)}{since} "
                         f"({f.repair_attempts} tries; it retries less and less often, up to every 5 min)",
                         "journalctl -t virt-forward VIRT_FORWARD_EVENT=repair_failing tells when it began; "
                         "virt-forward status shows what differs"))

    if f.docker_drop:
        v.append(Verdict(OK if not f.firewall_problems else WARN, "docker",
                         "iptables FORWARD policy is DROP (Docker); our guard on top of FORWARD lets our forwards "
                         "through"))
    if f.firewalld_strict:
        v.append(Verdict(FAIL, "firewalld", "StrictForwardPorts=yes: firewalld drops DNAT it did not make",
                         "set StrictForwardPorts=no in /etc/firewalld/firewalld.conf, then firewall-cmd --reload"))

    for key, value in sorted(f.sysctl.items()):
        if key.endswith(".rp_filter") and value == "1":
            v.append(Verdict(WARN, "rp_filter", f"{key} = 1 (strict): replies or asymmetric routes may be dropped",
                             f"sysctl -w {key}=2 (loose)"))
    if f.sysctl.get("net.bridge.bridge-nf-call-iptables") == "1":
        if f.hairpin:
            v.append(Verdict(OK, "br_netfilter", "bridge-nf-call-iptables = 1: a guest calling its own public port "
                             "needs hairpin mode on its bridge port; the hook sets it on the ports of guests with "
                             "forwards (hairpin = true)"))
        else:
            v.append(Verdict(WARN, "br_netfilter", "bridge-nf-call-iptables = 1 and hairpin = false: a guest calling "
                             "its own public port gets no answer", "hairpin = true in config.toml"))

    reinstall = ("apt install --reinstall virt-forward" if f.packaged else
                 "virt-forward install (run with the Python virt-forward is installed in)")
    if not f.hook_installed:
        v.append(Verdict(FAIL, "hook", f"{f.hook_path} is missing or not executable", reinstall))
    elif f.hook_problem is not None:
        v.append(Verdict(FAIL, "hook", f"it does not run: {f.hook_problem}; guests start without forwards", reinstall))
    elif f.daemon_started is None:
        v.append(Verdict(WARN, "hook", "installed, but no libvirtd/virtqemud is running"))
    elif f.hook_mtime is not None and f.hook_mtime > f.daemon_started + DAEMON_START_SLACK:
        v.append(Verdict(FAIL, "hook", "installed after libvirt started: libvirt has not seen it",
                         "systemctl restart libvirtd (or virtqemud)"))
    else:
        v.append(Verdict(OK, "hook", f"{f.hook_path} installed, runs, and libvirt started after it"))
    # a guest may ask DHCP with another guest's MAC: two leases make its address a guess, so none is taken
    for problem in f.ambiguous_leases:
        v.append(Verdict(FAIL, "leases", f"{problem}: the guest's forwards wait until one of them expires",
                         "give the guest a static DHCP host: virsh net-update NETWORK add ip-dhcp-host "
                         "\"<host mac='MAC' ip='ADDRESS'/>\" --live --config (or `address` in its guest file)"))
    for problem in f.unit_problems:
        v.append(Verdict(FAIL, "units", problem, reinstall))
    for holder in f.orphan_claims:
        v.append(Verdict(FAIL, "claims", f"{holder}: holds ports in the claims index without a record of what was "
                         "applied: other guests are refused those ports", "virt-forward reconcile"))
    return v


# ---------------------------------------------------------------- reading the host

SYSCTLS = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv4.conf.all.rp_filter",
           "net.ipv4.conf.default.rp_filter", "net.bridge.bridge-nf-call-iptables")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _sysctls() -> dict[str, str]:
    out = {}
    for key in SYSCTLS:
        value = _read(Path("/proc/sys") / key.replace(".", "/"))
        if value is not None:
            out[key] = value
    return out


def _local_addresses() -> frozenset[IPAddress]:
    from .runner import run
    found: set[IPAddress] = set()
    result = run(["ip", "-j", "addr", "show"], check=False)
    if result.returncode == 0:
        for link in json.loads(result.stdout):
            for a in link.get("addr_info", []):
                try:
                    found.add(ipaddress.ip_address(a["local"]))
                except (KeyError, ValueError):
                    pass
    return frozenset(found)


def _listening() -> frozenset[tuple[str, int]]:
    found: set[tuple[str, int]] = set()
    for proto, files, state in (("tcp", ("tcp", "tcp6"), "0A"), ("udp", ("udp", "udp6"), "07")):
        for name in files:
            text = _read(Path("/proc/net") / name) or ""
            for line in text.splitlines()[1:]:
                cols = line.split()
                if len(cols) > 3 and cols[3] == state:
                    found.add((proto, int(cols[1].rsplit(":", 1)[1], 16)))
    return frozenset(found)


def _libvirt_networks(libvirt_dir: Path) -> dict[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]:
    nets: dict[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]] = {}
    for xml in sorted((libvirt_dir / "qemu" / "networks").glob("*.xml")):
        try:
            root = ET.parse(xml).getroot()
        except (ET.ParseError, OSError):
            continue
        subnets = []
        for ip in root.findall("ip"):
            addr, prefix, mask = ip.get("address"), ip.get("prefix"), ip.get("netmask")
            if not addr:
                continue
            try:
                subnets.append(ipaddress.ip_interface(f"{addr}/{prefix or mask or 24}").network)
            except ValueError:
                continue
        nets[root.findtext("name") or xml.stem] = tuple(subnets)
    return nets


def _daemon_started() -> float | None:
    """Start time (epoch) of libvirtd or virtqemud, to about 10 ms: now minus how long ago it
    started by the boot clock (/proc/uptime and the process's start in clock ticks).  Not
    /proc/stat's btime: it is whole seconds, so a daemon restarted in the second the hook was
    written looked older than the hook (seen in the field tier)."""
    try:
        uptime = float((_read(Path("/proc/uptime")) or "").split()[0])
    except (IndexError, ValueError):
        return None
    now = time.time()
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if _read(Path("/proc", pid, "comm")) in ("libvirtd", "virtqemud"):
            stat = _read(Path("/proc", pid, "stat")) or ""
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) > 19:
                return now - (uptime - int(fields[19]) / ticks)
    return None


def gather(ctx: engine.Context, libvirt_dir: Path = Path("/etc/libvirt")) -> Facts:
    from .commands import collect_plans
    from .config import settings_or_default
    from .runner import run, which
    from .drift import Kind, Problem, problems
    plans, errors = collect_plans(ctx)
    applied = frozenset(ctx.store.domains())
    try:
        fw = tuple(problems(ctx)) if which("nft") else ()
    except VirtForwardError as exc:
        fw = (Problem(Kind.UNREADABLE, str(ctx.state_dir), str(exc)),)
    docker = False
    save = run(["iptables-save", "-t", "filter"], check=False) if which("iptables-save") else None
    if save is not None and save.returncode == 0:
        docker = bool(re.search(r"^:FORWARD DROP", save.stdout, re.M)) and "DOCKER" in save.stdout
    conf = _read(Path("/etc/firewalld/firewalld.conf"))
    strict = None if conf is None else bool(re.search(r"^\s*StrictForwardPorts\s*=\s*yes", conf, re.M | re.I))
    hook = libvirt_dir / "hooks" / "qemu.d" / "virt-forward"
    from .install import PACKAGE_HOOKS, installed_hook_problem, unit_problems
    from .discovery import ambiguous_leases
    try:
        # The time the entry appeared in qemu.d, which is what libvirt notices: the Debian
        # package's hook is a symlink, and its target keeps the package's build time.
        installed, mtime = bool(os.stat(hook).st_mode & 0o111), os.lstat(hook).st_mtime
    except OSError:
        installed, mtime = False, None
    hook_problem = installed_hook_problem(hook, ctx.config_dir) if installed else None
    root = libvirt_dir.parent.parent  # /etc/libvirt -> /
    from .metrics import read_repairs
    repairs = read_repairs(ctx.store.root)
    return Facts(sysctl=_sysctls(), local_addresses=_local_addresses(), listening=_listening(),
                 networks=_libvirt_networks(libvirt_dir), plans=tuple(plans), config_errors=tuple(errors),
                 firewall_problems=fw, applied=applied, docker_drop=docker, firewalld_strict=strict,
                 hook_path=str(hook), hook_installed=installed, hook_mtime=mtime,
                 daemon_started=_daemon_started(), nft_installed=which("nft") is not None,
                 hook_problem=hook_problem, unit_problems=tuple(unit_problems(root)),
                 hairpin=settings_or_default(ctx.config_dir).hairpin,
                 conntrack_installed=which("conntrack") is not None,
                 ambiguous_leases=tuple(ambiguous_leases(root)),
                 orphan_claims=_orphan_claims(ctx),
                 repair_failing=repairs.failing, repair_failing_since=repairs.since,
                 repair_attempts=repairs.attempts,
                 packaged=(root / PACKAGE_HOOKS.lstrip("/") / "qemu").is_file())


def _orphan_claims(ctx: engine.Context) -> tuple[str, ...]:
    """Holders of claims with neither a record nor a start in progress (pending)."""
    from . import claims, state
    store = ctx.store
    known = {state.stem(d) for d in store.domains() + store.pending_domains()}
    return tuple(sorted(h for h in claims.all_holders(str(store.root)) if h not in known))


def doctor(ctx: engine.Context, libvirt_dir: Path = Path("/etc/libvirt")) -> int:
    verdicts = diagnose(gather(ctx, libvirt_dir))
    for verdict in verdicts:
        print(verdict.line())
    failed = sum(v.level == FAIL for v in verdicts)
    print(f"{failed} problem(s) found" if failed else "no problem found")
    return 1 if failed else 0
