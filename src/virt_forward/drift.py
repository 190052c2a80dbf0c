"""Drift: what differs between the records (what we applied) and the kernel, libvirt's running
guests and the bridge ports.  Reading only: the watcher repairs by kind, `status` and
`doctor` show the same values, and no caller parses their text back.  The firewall part is
the backend's (backends/).
"""

from __future__ import annotations

from . import backends, engine, hairpin, metrics
from .problems import Kind, Problem

__all__ = ["Kind", "Problem", "WAITING", "current_problems", "problems", "snapshot"]


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
        found += backends.choose(settings, fallback=True).drift(plans, settings.hairpin, bool(waiting))
    return found


WAITING = "running but not applied (waiting for its address)"


def current_problems(ctx: engine.Context, backend: backends.Backend) -> list[Problem]:
    """`problems`, run when something is recorded, as `status` has always run it."""
    if not ctx.store.domains():
        return []
    if not backend.is_supported():
        return [Problem(Kind.TOOL, backend.tool, f"{backend.tool} is not installed")]
    return problems(ctx)


def snapshot(ctx: engine.Context, backend: backends.Backend, only: str | None = None) -> metrics.Snapshot:
    """The recorded forwards (what should be live), their counters and the checks, now."""
    live = backend.read_live()
    forwards: list[metrics.ForwardCount] = []
    for domain in ctx.store.domains():
        if only is not None and domain != only:
            continue
        plan = ctx.store.read(domain)
        if plan is not None:
            forwards += metrics.forward_counts(domain, plan.forwards, live)
    return metrics.Snapshot(tuple(forwards), tuple(current_problems(ctx, backend)),
                            metrics.read_repairs(ctx.store.root))
