"""check, plan and status: read-only commands."""

from __future__ import annotations

import json
import sys
from typing import Any

from . import backends, engine, nft
from .config import guest_names, guests_dir, load_guest, load_settings, settings_or_default
from .errors import ConfigError, ExitCode, VirtForwardError
from .plan import GuestPlan, find_conflicts, host_limit_error, plan_guest


def collect_plans(ctx: engine.Context, later: list[str] | None = None) -> tuple[list[GuestPlan], list[str]]:
    """Every guest's plan and every config error, conflicts across guests included.  A guest
    whose targets are found only at its start (from its MAC, or '@network') is validated but
    not planned: its file is named in `later`."""
    errors: list[str] = []
    plans: list[tuple[GuestPlan, str]] = []
    try:
        settings = load_settings(ctx.config_dir)
    except ConfigError as exc:
        return [], [str(exc)]
    names = guest_names(ctx.config_dir)
    configs = {}
    for name in names:
        try:
            guest = load_guest(ctx.config_dir, name)
            if guest is not None and guest.found_at_start():
                if later is not None:
                    later.append(guest.path)
            elif guest is not None:
                plans.append((plan_guest(guest, settings), guest.path))
                configs[name] = guest
        except VirtForwardError as exc:
            errors.append(str(exc))
    errors += [str(e) for e in find_conflicts(plans, configs)]
    return [p for p, _ in plans], errors


def check(ctx: engine.Context) -> int:
    try:
        # the directories first: with one that others may write nothing below it counts,
        # and `guests` as a symlink would make every guest file repeat the same error
        guests_dir(ctx.config_dir)
    except ConfigError as exc:
        print(f"error: {exc}")
        print(f"FAILED: the config in {ctx.config_dir} is not trusted")
        return ExitCode.CONFIG
    later: list[str] = []
    plans, errors = collect_plans(ctx, later)
    names = guest_names(ctx.config_dir)
    # the host-wide cap: each plan is already within max_forwards_per_guest, so counting
    # them costs little; engine and reconcile check the same function with what they apply
    cap = host_limit_error(plans, settings_or_default(ctx.config_dir),
                           config_path=str(ctx.config_dir / "config.toml"))
    if cap is not None:
        errors.append(str(cap))
    for line in errors:
        print(f"error: {line}")
    for path in later:
        print(f"note: {path}: valid; its target addresses are found at the guest's start (from the domain XML), "
              "so its forwards and their conflicts are checked then")
    forwards = sum(len(p.forwards) for p in plans)
    print(f"{'FAILED' if errors else 'ok'}: {len(names)} guest file(s), {forwards} forward(s), "
          f"{len(errors)} error(s) in {ctx.config_dir}")
    return ExitCode.CONFIG if errors else ExitCode.OK


def plan(ctx: engine.Context, domain: str) -> int:
    """What `apply GUEST` would do, read from the live firewall but changing nothing."""
    from . import guards
    want = engine.desired(ctx, domain, ctx.store.read_xml(domain))
    old = ctx.store.read(domain)
    if want.pending is not None:
        print(f"# {domain}: {want.pending}")
    elif want.plan is None:
        print(f"# {domain}: no config file; applying would remove what is recorded")
    else:
        print(f"# {domain}: {len(want.plan.forwards)} forward(s) from {want.guest.path if want.guest else '?'}")
        for fwd in want.plan.forwards:
            print(f"#   {fwd.describe()}")
        if want.plan.allow is not None:
            print(f"#   only from: {', '.join(map(str, want.plan.allow))}")
    print(f"# recorded as applied now: {'nothing' if old is None else f'{len(old.forwards)} forward(s)'}")
    backend = backends.choose(want.settings)
    print(f"# backend: {backend.name}")
    if want.plan is None:
        return ExitCode.OK
    print(backend.plan_text(old, want.plan, lambda: engine.others_applied(ctx.store, domain), want.settings.hairpin),
          end="")
    return ExitCode.OK


def _painter() -> Any:
    """Colours only on a terminal (and not with NO_COLOR)."""
    import os
    if not sys.stdout.isatty() or os.environ.get("NO_COLOR"):
        return lambda text, _kind: text
    codes = {"live": "32", "MISSING": "31;1"}
    return lambda text, kind: f"\033[{codes[kind]}m{text}\033[0m" if kind in codes else text


def status(ctx: engine.Context, only: str | None, fmt: str = "text") -> int:
    """`fmt`: "text", "json", or "prometheus" (metrics.py: the watcher's textfile, on stdout)."""
    from . import drift, metrics
    settings_error = None
    try:
        settings = load_settings(ctx.config_dir)
    except VirtForwardError as exc:
        settings, settings_error = settings_or_default(ctx.config_dir), str(exc)
    backend = backends.choose(settings, fallback=True)
    if fmt == "prometheus":
        sys.stdout.write(metrics.exposition(drift.snapshot(ctx, backend, only)))
        return ExitCode.OK
    found = backend.read_live()
    live, counters = found.elements, found.connections
    from .reconcile import running_from_libvirt
    asked = running_from_libvirt()
    running = None if asked is None else set(asked)
    names = sorted(set(ctx.store.domains()) | set(guest_names(ctx.config_dir)))
    if only is not None:
        names = [n for n in names if n == only]
    report: list[dict[str, Any]] = []
    for name in names:
        applied = ctx.store.read(name)
        entry: dict[str, Any] = {"guest": name, "applied": applied is not None, "forwards": [],
                                 "running": None if running is None else name in running}
        try:
            if settings_error is not None:
                raise ConfigError(settings_error)
            # the same plan the hook would make (an address by MAC from the kept domain XML)
            configured = engine.desired(ctx, name, ctx.store.read_xml(name), settings).plan
        except VirtForwardError as exc:
            configured, entry["config_error"] = None, str(exc)
        shown = applied or configured
        for fwd in (shown.forwards if shown else ()):
            mname, key, value = nft.dnat_element(fwd)
            entry["forwards"].append({"forward": fwd.describe(), "live": live.get(mname, {}).get(key) == value,
                                      "connections": counters.get(mname, {}).get(key)})
        entry["config_differs"] = (applied is not None and configured is not None
                                   and applied.forwards != configured.forwards)
        report.append(entry)
    problems = drift.current_problems(ctx, backend)
    if fmt == "json":
        json.dump({"guests": report, "problems": [str(p) for p in problems]}, sys.stdout, indent=1)
        print()
        return ExitCode.OK
    if not report:
        print(f"no guests configured in {ctx.config_dir}")
    if ctx.store.domains():
        print("rules and guards: " + ("in place" if not problems else "; ".join(map(str, problems)) +
                                      " (virt-forward reconcile puts them back)"))
    paint = _painter()
    for entry in report:
        state = "applied" if entry["applied"] else "not applied (guest stopped, or no hook call yet)"
        if entry["running"] is not None:
            state += ", running" if entry["running"] else ", not running"
        print(f"{entry['guest']}: {state}")
        if "config_error" in entry:
            print(f"  config error: {entry['config_error']}")
        if entry["config_differs"]:
            print("  config changed since it was applied (runs `apply` to take it)")
        for f in entry["forwards"]:
            mark = "live" if f["live"] else ("MISSING" if entry["applied"] else "-")
            conns = "" if f["connections"] is None else f"{f['connections']:>8} connection(s)"
            print(f"  {f['forward']:<48} {paint(f'{mark:<8}', mark)}{conns}")
    return ExitCode.OK
