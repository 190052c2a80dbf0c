"""reconcile: make the whole firewall match every running guest, in one transaction.

For the times no hook runs: libvirtd reloads, firewalld reloads, someone's
`nft flush ruleset`, a wiped /run after a reboot, a config edited while guests
run.  It rebuilds our table from scratch (cheap: hash maps), re-places guards,
and rewrites the records, so afterwards there is no orphan and no duplicate.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from . import backends, claims, engine, fastpath, log, state
from .config import load_settings
from .errors import StateError, VirtForwardError
from .plan import GuestPlan, claims_of, within_host_limit


@dataclass(frozen=True)
class Outcome:
    guests: int
    forwards: int
    source: str
    problems: tuple[str, ...]

    def describe(self) -> str:
        text = f"reconciled: {self.guests} running guest(s) with {self.forwards} forward(s) (guests from {self.source})"
        return text + "".join(f"\n  {p}" for p in self.problems)


def libvirt_uri() -> str | None:
    """VIRT_FORWARD_LIBVIRT_URI overrides qemu:///system; "none" means: do not ask libvirt."""
    uri = os.environ.get("VIRT_FORWARD_LIBVIRT_URI", "qemu:///system")
    return None if uri == "none" else uri


def running_from_libvirt() -> dict[str, str] | None:
    """Running domains and their live XML, or None when libvirt cannot be asked (never from the hook)."""
    uri = libvirt_uri()
    if uri is None:
        return None
    try:
        import libvirt
    except ImportError:
        return None
    try:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        conn = libvirt.openReadOnly(uri)
        try:
            return {d.name(): d.XMLDesc(0) for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
        finally:
            conn.close()
    except Exception:  # libvirt down: fall back to the records
        return None


def reconcile(ctx: engine.Context, running: list[str] | None = None, lock_timeout: float | None = None,
              xmls: dict[str, str] | None = None) -> Outcome:
    """`running`: the running domains if the caller knows them; else libvirt, else the records.
    `lock_timeout`: how long to wait for another virt-forward process (None: as long as it takes).
    `xmls`: their live domain XML, when the caller asked libvirt already."""
    settings = load_settings(ctx.config_dir)
    backend = backends.choose(settings)
    store = ctx.store
    problems: list[str] = []
    source, xmls = "caller", dict(xmls or {})
    if running is None:
        # Asked before taking our lock, never under it: libvirt holds a starting domain's lock
        # while our hook runs, and the hook waits for ours (a deadlock, seen with virsh start).
        asked = running_from_libvirt()
        if asked is not None:
            running, xmls, source = sorted(asked), asked, "libvirt"
    with store.lock(lock_timeout):
        # Record texts; a record is parsed only when it is needed (a guest kept as it was):
        # an unchanged one is recognised by its text, 1,000 of them cost 0.2 s to parse.
        texts: dict[str, str] = {}
        for domain in store.domains():
            try:
                text = store.read_text(domain)
            except StateError as exc:
                problems.append(str(exc))
                continue
            if text is not None:
                texts[domain] = text

        def recorded(domain: str) -> GuestPlan | None:
            if domain not in texts:
                return None
            try:
                return store.parse(domain, texts[domain])
            except StateError as exc:
                problems.append(str(exc))
                return None

        # the domain XMLs kept for guests (hook's start): listed once, read only where there is one
        kept_xml = set(store.xml_domains())

        def xml_of(domain: str) -> str | None:
            return xmls.get(domain) or (store.read_xml(domain) if domain in kept_xml else None)

        if running is None:
            running, source = sorted(set(texts) | kept_xml), "records (libvirt not reachable)"

        plans: list[GuestPlan] = []
        fresh: list[engine.Desired] = []  # planned from their files just now: fast files to write
        # recorded exactly as their fast file says: their record need not be rendered again to compare
        as_recorded: set[str] = set()
        unchanged = fastpath.Unchanged(str(ctx.config_dir), str(store.root)) if backend.fast_path else None
        known_claims: dict[str, list[tuple[str, str]]] = {}  # of the plans from fast files: computed before
        for domain in sorted(set(running)):
            try:
                cached = _from_fast_file(unchanged, domain)
                if cached is not None:
                    plans.append(cached[0])
                    known_claims[domain] = cached[2]
                    if cached[1] == texts.get(domain):
                        as_recorded.add(domain)
                    continue
                want = engine.desired(ctx, domain, xml_of(domain), settings)
                if want.plan is not None:
                    plans.append(want.plan)
                    fresh.append(want)
                elif want.pending is not None:
                    problems.append(f"{domain}: {want.pending}")
                    known = recorded(domain)
                    if known is not None:  # known from an earlier start: keep it
                        plans.append(known)
            except VirtForwardError as exc:
                # nothing lost, nothing opened: what was live for it stays as it was
                kept = recorded(domain)
                problems.append(f"{exc}" + ("; keeping what was applied" if kept else ""))
                if kept is not None:
                    plans.append(kept)
        # a port stays with the guest that holds it now: recorded guests are served first
        held: dict[str, list[tuple[str, str]]] = {}  # each guest's claims, computed once
        plans = _without_conflicts(sorted(plans, key=lambda p: (p.domain not in texts, p.domain)), problems, held,
                                   known_claims)
        plans, over = within_host_limit(plans, settings)  # the same order: who holds ports now keeps them
        problems += [str(e) for e in over]

        backend.rebuild(plans, settings.hairpin)
        wanted = {p.domain for p in plans}
        claims.rebuild(str(store.root), {state.stem(p.domain): held[p.domain] for p in plans})
        for domain in texts:
            if domain not in wanted:
                engine.forget_flows(recorded(domain), None)
                store.delete(domain)
                engine.release_hairpin(ctx, domain)
        for domain in kept_xml:
            if domain not in running:
                store.delete_xml(domain)
        for plan in plans:
            if plan.domain not in as_recorded and texts.get(plan.domain) != store.record_text(plan, backend.name):
                engine.forget_flows(recorded(plan.domain), plan)
                store.write(plan, backend.name)
        # hairpin mode where the domain XML says which ports are the guest's (libvirt's, or kept)
        bridges = engine.set_hairpins(ctx, plans, xml_of, settings)
        if backend.fast_path:
            # the next stop and start of these guests take the hook's fast path
            for want in fresh:
                if want.plan is not None and want.plan.domain in wanted:
                    engine.write_fast(store, want, bridges[want.plan.domain])
    outcome = Outcome(len(plans), sum(len(p.forwards) for p in plans), source, tuple(problems))
    for p in problems:
        log.error(p, event="problem")
    log.info(outcome.describe().splitlines()[0], event="reconcile")
    return outcome


def _from_fast_file(unchanged: fastpath.Unchanged | None,
                    domain: str) -> tuple[GuestPlan, str, list[tuple[str, str]]] | None:
    """The plan the guest's fast file recorded, its record text and its claims, when none of the
    files it came from (nor our code) changed since: what `engine.desired` would compute again,
    at a third of the cost."""
    cached = None if unchanged is None else unchanged.record(domain)
    if cached is None:
        return None
    text, held = cached
    try:
        # the full path wrote this text from a validated plan into a file only root may write,
        # and the hook's fast path trusts it as it is: not validated again here
        plan = GuestPlan.from_record(json.loads(text)["plan"])
    except (ValueError, KeyError, TypeError):
        return None
    return (plan, text, held) if plan.domain == domain else None


def _without_conflicts(plans: list[GuestPlan], problems: list[str], held: dict[str, list[tuple[str, str]]],
                       known: dict[str, list[tuple[str, str]]]) -> list[GuestPlan]:
    """The ownership rule (claims.py) among all guests at once: who comes first keeps a port,
    a guest that would overlap is left out whole, with a problem naming the holder.  `held`
    gets each kept guest's claims; `known`: claims already computed, by guest."""
    ledger = claims.Ledger()
    kept: list[GuestPlan] = []
    for plan in plans:
        wanted = known.get(plan.domain) or claims_of(plan)
        other = ledger.clash(plan.domain, wanted)
        if other is not None:
            problems.append(f"{plan.domain}: not applied: a forward of it is also forwarded by guest {other!r}, "
                            "which holds it")
            continue
        ledger.take(plan.domain, wanted)
        held[plan.domain] = wanted
        kept.append(plan)
    return kept
