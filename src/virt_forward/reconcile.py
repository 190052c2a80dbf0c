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
from .config import Settings
from .plan import GuestPlan, claims_of


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
    except Exception as exc:  # libvirt down: fall back to the records, and say why
        log.warning(f"libvirt at {uri} not asked, the records say which guests run: {type(exc).__name__}: {exc}")
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

        # Each running guest's (what it holds now: its record; what it wants now).  What it
        # holds is the ledger every decision starts from (claims.settle).
        held_plan: dict[str, GuestPlan | None] = {}
        wanted_plan: dict[str, GuestPlan | None] = {}
        fresh: dict[str, engine.Desired] = {}  # planned from their files just now: fast files to write
        # recorded exactly as their fast file says: their record need not be rendered again to compare
        as_recorded: set[str] = set()
        unchanged = fastpath.Unchanged(str(ctx.config_dir), str(store.root)) if backend.fast_path else None
        known_claims: dict[str, list[tuple[str, str]]] = {}  # of the plans from fast files: computed before
        for domain in sorted(set(running)):
            try:
                cached = _from_fast_file(unchanged, domain)
                if cached is not None:
                    wanted_plan[domain] = cached[0]
                    known_claims[domain] = cached[2]
                    if cached[1] == texts.get(domain):
                        as_recorded.add(domain)
                        held_plan[domain] = cached[0]
                    else:
                        held_plan[domain] = recorded(domain)
                    continue
                held_plan[domain] = recorded(domain)
                want = engine.desired(ctx, domain, xml_of(domain), settings)
                if want.plan is not None:
                    wanted_plan[domain] = want.plan
                    fresh[domain] = want
                elif want.pending is not None:
                    problems.append(f"{domain}: {want.pending}")
                    wanted_plan[domain] = held_plan[domain]  # known from an earlier start: keep it
                else:
                    wanted_plan[domain] = None  # no config any more: what it held goes
            except VirtForwardError as exc:
                # nothing lost, nothing opened: what was live for it stays as it was
                kept = held_plan.get(domain)
                problems.append(f"{exc}" + ("; keeping what was applied" if kept else ""))
                wanted_plan[domain] = kept

        def claims_for(domain: str, plan: GuestPlan | None, same_as_wanted: bool) -> list[tuple[str, str]] | None:
            if plan is None:
                return None
            if same_as_wanted and domain in known_claims:
                return known_claims[domain]
            return claims_of(plan)

        held_claims = {d: claims_for(d, p, d in as_recorded) for d, p in held_plan.items()}
        wanted_claims = {d: (held_claims[d] if wanted_plan[d] is held_plan[d] else claims_for(d, p, True))
                         for d, p in wanted_plan.items()}
        choice, refused, corrupt = claims.settle(
            [(d, held_claims[d], wanted_claims[d]) for d in sorted(wanted_plan)], settings.max_forwards)
        for domain, (k, public), other in corrupt:
            problems.append(f"{domain}: its record overlaps guest {other!r}'s at "
                            f"{engine.claim_text(k, public)}: not kept")
        plans: list[GuestPlan] = []
        held: dict[str, list[tuple[str, str]]] = {}  # each kept guest's claims, for the index
        for domain in sorted(wanted_plan):
            picked = choice[domain]
            plan = wanted_plan[domain] if picked == claims.WANTED else held_plan[domain] if picked == claims.HELD \
                else None
            if domain in refused:
                problems.append(_refusal(domain, refused[domain], settings, kept=plan is not None))
            if plan is None:
                continue
            plans.append(plan)
            held[domain] = (wanted_claims if picked == claims.WANTED else held_claims)[domain] or []
        fresh_kept = [w for d, w in fresh.items() if choice[d] == claims.WANTED]

        backend.rebuild(plans, settings.hairpin)
        wanted = {p.domain for p in plans}
        claims.rebuild(str(store.root), {state.stem(p.domain): held[p.domain] for p in plans})
        for domain in store.pending_domains():  # a start killed mid-way: what it claimed is free again
            store.delete_pending(domain)
        store.sweep_temp()
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
            for want in fresh_kept:
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


def _refusal(domain: str, why: tuple[tuple[str, str] | None, str],
             settings: Settings, kept: bool) -> str:
    """One line for a guest whose wish was refused: by whom, and what it keeps."""
    claim, other = why
    keeping = "; keeping what it held" if kept else ""
    if claim is None:
        where = f" ({settings.path}, max_forwards)" if settings.path else ""
        return (f"{domain}: not applied: its forwards would take the host past max_forwards = "
                f"{settings.max_forwards}{where}{keeping}")
    return (f"{domain}: not applied: {engine.claim_text(*claim)} is forwarded to guest {other!r}, "
            f"which holds it{keeping}")
