"""The service the hook, the CLI and the watcher call: read config and state, plan, hold the
lock, apply the one ownership rule (claims.py), let the backend change the firewall, record.

The firewall is the backend's (backends/: chosen once, by name); reading state and producing
commands stay apart there too: nft.py, iptables.py and guards.py are pure renderers,
runner.py executes.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import backends, claims, fastpath, hairpin, log, nft, state
from .config import (GuestConfig, Settings, check_domain_name, guest_from_metadata, load_guest, load_settings,
                     settings_or_default)
from .errors import FirewallError, StateError
from .plan import GuestPlan, claims_of, host_limit_error, plan_guest
from .runner import run, spawn_detached_twice, which
from .state import StateStore

if TYPE_CHECKING:
    from . import discovery
    from .domainxml import Nic
    from .ports import IPAddress

@dataclass(frozen=True)
class Context:
    config_dir: Path
    state_dir: Path
    libvirt_root: Path = Path("/")  # where libvirt's network XMLs and lease files are (tests move it)

    @property
    def store(self) -> StateStore:
        return StateStore(self.state_dir)


@dataclass(frozen=True)
class Desired:
    settings: Settings
    guest: GuestConfig | None
    plan: GuestPlan | None
    pending: str | None = None  # why there is no plan yet although the guest is ours
    uses_xml: bool = False  # the plan came from the domain XML (metadata, or an address by MAC)
    # fingerprints of the files the plan came from, taken before they were read (fastpath.py)
    inputs: dict[str, fastpath.Fingerprint] | None = None


def desired(ctx: Context, domain: str, xml: str | None = None, settings: Settings | None = None) -> Desired:
    """The guest's plan now: from its file, else (if trusted) the domain XML's metadata;
    plan None when neither exists.  Raises ConfigError."""
    check_domain_name(domain)
    taken = fastpath.inputs(str(ctx.config_dir), domain)  # before reading: an edit after this is seen
    settings = load_settings(ctx.config_dir) if settings is None else settings
    guest = load_guest(ctx.config_dir, domain)
    networks = guest.network_targets() if guest is not None else set()
    # a forward without '@' goes to `address`; without it, to what the guest's MACs find
    needs_default = guest is not None and any(e.spec.target is None for e in guest.ports)
    need_xml = (guest is None and settings.metadata
                or guest is not None and (not guest.addresses and needs_default or bool(networks)))
    if not (need_xml and xml):
        dom = None
    else:
        from . import domainxml
        dom = domainxml.parse(xml)
    if guest is None and settings.metadata and dom is not None and dom.metadata is not None:
        from . import discovery
        from .config import check_metadata_scope
        # whoever may edit the domain wrote it: it may only point into the domain's own networks,
        # and open only addresses of this host within metadata_public, never a bridge's own
        guest = guest_from_metadata(domain, dom.metadata, subnets=discovery.nic_interfaces(dom.nics, ctx.libvirt_root))
        check_metadata_scope(guest, settings, host=discovery.host_addresses,
                             networks=discovery.network_host_addresses(ctx.libvirt_root))
    if guest is None:
        return Desired(settings, None, None)
    if not need_xml:
        return Desired(settings, guest, plan_guest(guest, settings), inputs=taken)
    # a guest from <metadata> is known only now
    networks = guest.network_targets()
    needs_default = any(e.spec.target is None for e in guest.ports)
    from . import discovery
    if not guest.addresses and needs_default:
        found = discovery.find(dom.nics, ctx.libvirt_root) if dom is not None else discovery.Found(())
        if found.ambiguous:  # another guest may have asked DHCP with this one's MAC: never a guess
            return Desired(settings, guest, None, pending=_ambiguous(found), uses_xml=True)
        if not found.addresses:
            return Desired(settings, guest, None, pending=f"address not known yet ({_macs(dom.nics if dom else ())}"
                           ": no static DHCP host, no lease); `virt-forward watch` applies it when a lease appears",
                           uses_xml=True)
        guest = replace(guest, addresses=found.addresses)
    if networks:
        # '@network': the guest's `address` entries in that network's subnets, else what the MAC
        # of its NIC on that network finds there (static DHCP host, lease)
        resolved: list[tuple[str, tuple[IPAddress, ...]]] = []
        for name in sorted(networks):
            ifaces = discovery.network_interfaces(name, ctx.libvirt_root)
            mine = tuple(a for a in guest.addresses if discovery.inside(a, ifaces))
            nics = discovery.on_network(dom.nics, name, ctx.libvirt_root) if dom is not None else ()
            if not mine and nics:
                on_net = discovery.find(nics, ctx.libvirt_root)
                if on_net.ambiguous:
                    return Desired(settings, guest, None, pending=f"address on network {name!r}: " + _ambiguous(on_net),
                                   uses_xml=True)
                mine = on_net.addresses
            if not mine:
                why = "no libvirt network of that name" if not ifaces else \
                    f"no `address` in it, {_macs(nics)}: no static DHCP host, no lease"
                return Desired(settings, guest, None, pending=f"address on network {name!r} not known yet ({why}); "
                               "`virt-forward watch` applies it when a lease appears", uses_xml=True)
            resolved.append((name, mine))
        guest = replace(guest, network_addresses=tuple(resolved))
    return Desired(settings, guest, plan_guest(guest, settings), uses_xml=True)


def _ambiguous(found: discovery.Found) -> str:
    return ("address not taken, the leases are ambiguous: " + "; ".join(found.ambiguous)
            + "; a static DHCP host for the guest's MAC settles it (`virt-forward doctor`)")


def _macs(nics: tuple[Nic, ...]) -> str:
    return "MAC " + ", ".join(n.mac for n in nics) if nics else "no NIC of it in the domain XML"


def apply(ctx: Context, domain: str, xml: str | None = None, want: Desired | None = None,
          lock_timeout: float | None = None, hook: bool = False) -> str:
    """Make the kernel hold exactly this guest's current forwards.  Idempotent.

    `want`: `desired(ctx, domain, xml)` when the caller computed it already (the hook has).
    `lock_timeout`: how long to wait for another virt-forward process (None: as long as it takes).
    `hook`: libvirt is waiting (flows are forgotten in the background)."""
    want = desired(ctx, domain, xml) if want is None else want
    if xml and want.uses_xml:
        # kept so that reconcile/watch can plan this guest again without asking libvirt
        ctx.store.write_xml(domain, xml)
    if want.pending is not None:
        log.warning(f"{domain}: {want.pending}", event="waiting", guest=domain)
        return f"{domain}: {want.pending}"
    if want.plan is None:
        return remove(ctx, domain, why="no config file", lock_timeout=lock_timeout, hook=hook)
    backend = backends.choose(want.settings)
    store = ctx.store
    plan, hairpin = want.plan, want.settings.hairpin
    holder = state.stem(domain)
    with store.lock(lock_timeout):
        _undo_left_pending(ctx, domain, want.settings.hairpin, wait=not hook)
        old = store.read(domain)
        # The ledger first: a clash or the cap refuses the new plan before anything of the old
        # one is touched, so the guest keeps exactly what it held.
        wanted, had = claims_of(plan), claims_of(old)
        refused = _ledger_refusal(store, domain, wanted, had, plan, want.settings, "which applied it first")
        if refused is not None:
            raise FirewallError(f"{domain}: not applied: {refused}" + ("; keeping what it held" if old else ""))
        old_backend = store.read_backend(domain) if old is not None else None
        if old is not None and old_backend not in (None, backend.name):
            # applied with the other backend (config changed, or nft installed since): take that off first
            _remove_locked(ctx, domain, old, backends.by_name(old_backend or backend.name), want.settings.hairpin,
                           wait=not hook)
            old = None
        # before the claims and the kernel: a start killed from here on leaves this, and the
        # guest's `stopped` (or reconcile) takes back what it may have applied
        store.write_pending(plan, backend.name)
        claims.update(str(store.root), holder, add=wanted, drop=[])  # before the kernel: a crash errs on refusing
        try:
            if backend.apply(old, plan, lambda: others_applied(store, domain), hairpin):
                # a table made by an older virt-forward (other map flags): rebuild it whole, once
                log.warning("table inet virt_forward is from an older version: rebuilding it")
                backend.rebuild(others_applied(store, domain) + [plan], hairpin)
        except BaseException:
            claims.update(str(store.root), holder, add=had, drop=[c for c in wanted if c not in had])
            store.delete_pending(domain)
            raise
        claims.update(str(store.root), holder, add=[], drop=[c for c in had if c not in wanted])
        store.commit_pending(domain)  # the pending record's text is the record's
        forget_flows(old, plan, wait=not hook)
        if old is None:
            warn_without_conntrack(store, domain)
        bridges = hairpin_bridges(ctx, xml, plan, want.settings)
        if xml:  # without the domain XML the guest's ports are not known: left as they are
            set_hairpin(ctx, domain, xml, bridges or ())
        backend.after_apply(plan.families())
        if backend.fast_path:
            write_fast(store, want, bridges)
    return _done(f"{domain}: {len(want.plan.forwards)} forward(s) live" + _summary(want.plan), "apply", domain,
                 want.plan)


def check_ledger(ctx: Context, domain: str, plan: GuestPlan, settings: Settings) -> None:
    """FirewallError when `plan` would take a port another guest holds, or take the host past
    max_forwards (`add`: before the file is written; the caller holds the lock).  A guest that
    does not run holds nothing now: only a clash is refused for it (its start checks the cap)."""
    store = ctx.store
    wanted, had = claims_of(plan), claims_of(store.read(domain))
    refused = _ledger_refusal(store, domain, wanted, had or wanted, plan, settings, "which holds it")
    if refused is not None:
        raise FirewallError(f"{domain}: {refused} (file left unchanged)")


def _ledger_refusal(store: StateStore, domain: str, wanted: list[tuple[str, str]], had: list[tuple[str, str]],
                    plan: GuestPlan, settings: Settings, holds: str) -> str | None:
    """Why the ledger refuses `plan` (a port another guest holds; growth past max_forwards,
    counted from the index: no scan of the other guests), or None.  `had`: what it holds now."""
    clash = claims.conflicts(str(store.root), state.stem(domain), wanted)
    if clash:
        (k, public), other = clash[0]
        return f"{claim_text(k, public)} is forwarded to guest {holder_name(store, other)!r}, {holds}"
    if len(wanted) <= len(had):
        return None  # not growing: never refused by the cap (one lowered below what is held)
    over = host_limit_error([("the other guests", claims.total(str(store.root)) - len(had)), plan], settings)
    return None if over is None else str(over)


def hairpin_bridges(ctx: Context, xml: str | None, plan: GuestPlan | None, settings: Settings,
                    nat: dict[str, tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]] | None = None
                    ) -> tuple[str, ...] | None:
    """The bridges on which the guest's ports need hairpin mode (hairpin.py): the libvirt NAT
    bridges its NICs are on and its forwards point into, when `hairpin = true`.  None: it
    depends on the domain XML, which is not known here.  `nat`: discovery.nat_networks()."""
    if plan is None or not plan.forwards or not settings.hairpin:
        return ()
    if not xml:
        return None
    from . import discovery
    nat = discovery.nat_networks(ctx.libvirt_root) if nat is None else nat
    targets = {f.guest for f in plan.forwards}
    return tuple(sorted({bridge for bridge, _ in hairpin.ports(xml)
                         if bridge in nat and any(discovery.inside(t, nat[bridge]) for t in targets)}))


def set_hairpins(ctx: Context, plans: list[GuestPlan], xml_of: Callable[[str], str | None],
                 settings: Settings) -> dict[str, tuple[str, ...] | None]:
    """set_hairpin for every guest whose domain XML `xml_of` knows (reconcile, the watcher),
    reading the NAT networks once; each guest's hairpin_bridges."""
    nat = None
    bridges: dict[str, tuple[str, ...] | None] = {}
    for plan in plans:
        xml = xml_of(plan.domain)
        if xml and settings.hairpin and nat is None:
            from .discovery import nat_networks
            nat = nat_networks(ctx.libvirt_root)
        bridges[plan.domain] = hairpin_bridges(ctx, xml, plan, settings, nat)
        if xml:
            set_hairpin(ctx, plan.domain, xml, bridges[plan.domain] or ())
    return bridges


def set_hairpin(ctx: Context, domain: str, xml: str, bridges: tuple[str, ...]) -> None:
    """Hairpin mode on the guest's ports on `bridges`, off where we set it and it is no longer
    wanted.  A failure is logged: a guest reaching its own forward is not worth failing a start."""
    try:
        hairpin.set_for(str(ctx.store.root), state.stem(domain), hairpin.taps(xml, bridges), bridges)
    except OSError as exc:
        log.warning(f"{domain}: hairpin mode on its bridge port: {exc}")


def release_hairpin(ctx: Context, domain: str) -> None:
    try:
        hairpin.release(str(ctx.store.root), state.stem(domain))
    except OSError as exc:
        log.warning(f"{domain}: hairpin mode off on its bridge port: {exc}")


def write_fast(store: StateStore, want: Desired, bridges: tuple[str, ...] | None) -> None:
    """The guest's fast file (fastpath.py), after its plan was applied with nftables and
    recorded; none when the plan came from the domain XML or from a racily fresh file.
    `bridges`: hairpin_bridges() for it; None (not known without the domain XML) sends the
    guest's next start to the full path.  The network definitions are not fingerprinted: a
    NAT bridge renamed since is seen at the guest's next full path, or by reconcile."""
    plan = want.plan
    if plan is None or want.inputs is None or fastpath.racy(want.inputs):
        return
    hairpin = want.settings.hairpin
    message = f"{plan.domain}: {len(plan.forwards)} forward(s) live" + _summary(plan)
    try:
        store.write_fast(plan.domain, fastpath.compile_fast(
            state_dir=str(store.root), domain=plan.domain,
            taken=want.inputs, record=store.record_text(plan, "nftables"), add=nft.batch(nft.add_guest(plan)),
            remove=nft.batch(nft.remove_guest(plan)), mark=nft.skeleton_mark(hairpin),
            skeleton=nft.batch(nft.skeleton(hairpin)), families=sorted(plan.families()), forwards=len(plan.forwards),
            message=message, claims=claims_of(plan), flows=flow_filters(plan), max_forwards=want.settings.max_forwards,
            bridges=None if bridges is None else list(bridges), described=[f.describe() for f in plan.forwards]))
    except (OSError, fastpath.Miss) as exc:  # applied and recorded already: only the next start is slower
        log.warning(f"{plan.domain}: no fast file for its next start: {exc}")


def claim_text(k: str, public: str) -> str:
    family, proto, port = k.split("-")
    where = f"every IPv{family} address" if public == claims.ANY else (f"[{public}]" if family == "6" else public)
    return f"{where}:{port}/{proto}"


def holder_name(store: StateStore, holder: str) -> str:
    if holder.startswith(state.HASHED):
        for name in store.domains():
            if state.stem(name) == holder:
                return name
    import urllib.parse
    return urllib.parse.unquote(holder)


def flow_filters(plan: GuestPlan) -> list[list[str]]:
    """conntrack -D arguments that delete the flows our DNAT sent to this guest (each family)."""
    mark = f"{nft.MARK_FORWARDED:#x}/{nft.MARK_FORWARDED:#x}"
    guests = sorted({(f.family, str(f.guest)) for f in plan.forwards})
    return [["-f", "ipv4" if fam == 4 else "ipv6", "--mark", mark, "--reply-src", guest] for fam, guest in guests]


def forget_flows(old: GuestPlan | None, new: GuestPlan | None, wait: bool = True) -> None:
    """Flows through forwards that are gone or lead elsewhere now: their conntrack entries would
    keep a steady UDP sender (WireGuard, DNS, games) reaching the old target for ever.  Matched
    on the host side (original destination address, protocol, port) and our mark, after the
    kernel change, so a packet cannot re-create one through the old DNAT.
    `wait`: False from the hook: a conntrack dump walks the host's whole flow table (~25 ms
    here, whatever it holds) and libvirt waits for the hook; the deletion ends a few ms later."""
    if old is None or which("conntrack") is None:
        return
    kept = {(f.key, f.guest, f.guest_port) for f in new.forwards} if new is not None else set()
    gone = [f for f in old.forwards if (f.key, f.guest, f.guest_port) not in kept]
    if new is None:  # the whole guest: one call per family and guest address
        argvs = [["conntrack", "-D", *flt] for flt in flow_filters(old)]
    else:
        mark = f"{nft.MARK_FORWARDED:#x}/{nft.MARK_FORWARDED:#x}"
        argvs = [["conntrack", "-D", "-f", "ipv4" if f.family == 4 else "ipv6", "-p", f.proto,
                  "--orig-port-dst", str(f.public_port), "--mark", mark, "--reply-src", str(f.guest)]
                 + ([] if f.public is None else ["--orig-dst", str(f.public)]) for f in gone]
    if not wait:
        spawn_detached_twice(argvs)
        return
    for argv in argvs:
        run(argv, check=False, timeout=5)  # exit 1 means "none matched": nothing to report


def _done(message: str, event: str, domain: str, plan: GuestPlan) -> str:
    log.info(message, event=event, guest=domain, forwards=[f.describe() for f in plan.forwards])
    return message


def remove(ctx: Context, domain: str, why: str = "", lock_timeout: float | None = None, hook: bool = False) -> str:
    """Remove what was applied for the guest (its record), whatever its file says now, and
    what a start killed half-way may have applied (its pending record)."""
    check_domain_name(domain)
    store = ctx.store
    with store.lock(lock_timeout):
        store.delete_xml(domain)
        old = store.read(domain)
        settings = settings_or_default(ctx.config_dir)  # a broken config.toml must not block removal
        _undo_left_pending(ctx, domain, settings.hairpin, wait=not hook)
        old = store.read(domain)
        if old is None:
            return f"{domain}: nothing applied" + (f" ({why})" if why else "")
        # the backend it was applied with, not the one config.toml names now
        _remove_locked(ctx, domain, old, backends.by_name(store.read_backend(domain) or "nftables"), settings.hairpin,
                       wait=not hook)
    return _done(f"{domain}: removed {len(old.forwards)} forward(s)" + (f" ({why})" if why else ""), "remove", domain,
                 old)


def _undo_pending(ctx: Context, domain: str, old: GuestPlan | None, pending: tuple[GuestPlan, str], hairpin: bool,
                  wait: bool) -> None:
    """A start that was killed between its pending record and its record: the kernel holds
    the old plan or the new one (one transaction), the index holds the claims of both.  When
    the kernel may hold the new one, take it out (a removal of elements that are not there
    fails whole and changes nothing); release the claims the start took; forget it."""
    store = ctx.store
    plan, backend_name = pending
    drop = claims_of(plan)
    if old is None or plan != old:
        try:
            backends.by_name(backend_name).remove(plan, lambda: others_applied(store, domain), hairpin,
                                                  last=not store.any_other(domain))
        except FirewallError:
            pass  # it never reached the kernel
        else:
            if old is not None:  # it had replaced the old plan in the kernel: nothing of that is left
                store.delete(domain)
                release_hairpin(ctx, domain)
                drop += claims_of(old)
            forget_flows(plan, None, wait=wait)
    keep = claims_of(store.read(domain))
    claims.update(str(store.root), state.stem(domain), add=[], drop=[c for c in drop if c not in keep])
    store.delete_pending(domain)
    log.warning(f"{domain}: a start of it did not finish (killed?): took back what it may have applied",
                event="remove", guest=domain)


def _undo_left_pending(ctx: Context, domain: str, hairpin: bool, wait: bool) -> None:
    """What an earlier start of this guest, killed before its record, may have left (under the lock)."""
    store = ctx.store
    try:
        pending = store.read_pending(domain)
    except StateError as exc:  # forged or torn: nothing in it is used
        log.error(f"{domain}: {exc}; removed")
        store.delete_pending(domain)
        claims.drop_holder(str(store.root), state.stem(domain))
        claims.update(str(store.root), state.stem(domain), add=claims_of(store.read(domain)), drop=[])
        return
    if pending is not None:
        _undo_pending(ctx, domain, store.read(domain), pending, hairpin, wait)


def warn_without_conntrack(store: StateStore, domain: str) -> None:
    """Without conntrack(8) the flows of a removed or re-pointed forward stay: said once per
    guest (per boot: the marks live in the state dir) instead of at every stop."""
    if which("conntrack") is not None:
        return
    marks = os.path.join(str(store.root), "conntrack-missing")
    holder = state.stem(domain).encode()
    try:
        fd = os.open(marks, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            told = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
    except FileNotFoundError:
        told = b""
    if holder in told.split(b"\n"):
        return
    log.warning(f"{domain}: conntrack(8) is not installed: when its forwards are removed or re-pointed, flows "
                "through them keep reaching the old target (install conntrack; `virt-forward doctor`)",
                event="warning", guest=domain)
    from . import files
    files.replace(marks, told + holder + b"\n")


def others_applied(store: StateStore, domain: str) -> list[GuestPlan]:
    """Every other applied guest (the iptables backend rewrites them; nft never asks)."""
    return [p for p in (store.read(d) for d in store.domains() if d != domain) if p is not None]


def _remove_locked(ctx: Context, domain: str, old: GuestPlan, backend: backends.Backend, hairpin: bool,
                   wait: bool = True) -> None:
    store = ctx.store
    backend.remove(old, lambda: others_applied(store, domain), hairpin, last=not store.any_other(domain))
    store.delete(domain)
    release_hairpin(ctx, domain)
    claims.update(str(store.root), state.stem(domain), add=[], drop=claims_of(old))
    forget_flows(old, None, wait=wait)


def _summary(plan: GuestPlan) -> str:
    shown = [f.describe() for f in plan.forwards[:4]]
    more = len(plan.forwards) - len(shown)
    return (": " + ", ".join(shown) + (f", +{more} more" if more > 0 else "")) if shown else ""


def default_context(config_dir: str | None = None, state_dir: str | None = None) -> Context:
    from .config import config_dir as cdir
    from .state import state_dir as sdir
    return Context(cdir(config_dir), sdir(state_dir), Path(os.environ.get("VIRT_FORWARD_LIBVIRT_ROOT", "/")))


__all__ = ["Context", "apply", "remove", "desired", "default_context"]
