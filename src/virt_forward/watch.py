"""watch: a small daemon that puts forwards and guards back after any reset.

Nothing tells a hook when libvirt (SIGHUP, network restart), firewalld (reload)
or an admin (`nft flush ruleset`) rewrites the firewall.  We listen to every
nftables change (`nft monitor`; iptables-nft changes show up there too), to
libvirt's domain and network events when libvirt-python is installed, and to a
timer as a safety net (iptables-legacy has no events).  Each wake-up runs a
*check* under the lock; only a check that finds something wrong reconciles, so
our own changes (which nft monitor reports too) cannot loop.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from typing import Any

from . import engine, hairpin, log, metrics, nft
from .plan import Family, GuestPlan
from .reconcile import libvirt_uri, reconcile, running_from_libvirt
from .runner import SEARCH_PATH, run, which


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


def problems(ctx: engine.Context, running: list[str] | None = None) -> list[str]:
    """What differs between the records and the kernel (and libvirt's running guests,
    when known); [] when all is in place."""
    from .config import guest_names, settings_or_default
    settings = settings_or_default(ctx.config_dir)
    store = ctx.store
    found: list[str] = []
    with store.lock():
        plans = [p for p in (store.read(d) for d in store.domains()) if p is not None]
        waiting = [d for d in store.xml_domains() if store.read(d) is None]
        found += [f"{d}: {WAITING}" for d in waiting
                  if running is None or d in running]
        if running is not None:
            recorded = {p.domain for p in plans}
            configured = set(guest_names(ctx.config_dir))
            found += [f"{d}: running but not applied" for d in sorted((set(running) & configured) - recorded)
                      if d not in waiting]
            found += [f"{d}: applied but not running" for d in sorted(recorded - set(running))]
        found += hairpin.problems(str(store.root))
        try:
            backend = engine.resolve_backend(settings)
        except Exception:
            backend = "nftables"
        if backend == "iptables":
            return found + _iptables_problems(plans, settings.hairpin)
        got = run(["nft", "-j", "list", "table", nft.FAMILY, nft.TABLE], check=False)
        if not plans:
            if got.returncode == 0 and not waiting:
                found.append("our table exists but no guest is recorded")
            return found
        if got.returncode != 0:
            return found + ["table inet virt_forward is gone"]
        listing = json.loads(got.stdout)
        live = nft.parse_live(listing)
        want = expected_elements(plans)
        for name in sorted(set(want) | {n for n in live if n.startswith("dnat")}):
            if live.get(name, {}) != want.get(name, {}):
                found.append(f"map {name} differs from the records")
        counts = _rule_counts(listing)
        for chain, n in _expected_counts(settings.hairpin).items():
            if counts.get(chain, 0) != n:
                found.append(f"chain {chain} has {counts.get(chain, 0)} rules, not {n}")
        for guarded in engine.nft_guard_chains():
            if not guarded.guard_in_place():
                found.append(f"guard not on top of nft {guarded.target.ref}")
        found += _iptables_guard_problems(set().union(*(p.families() for p in plans)))
    return found


def _tool(family: Family) -> str:
    return "iptables" if family == 4 else "ip6tables"


def _iptables_guard_problems(families: set[Family]) -> list[str]:
    found = []
    for family in sorted(families):
        fchain = engine.read_forward_chain(family)
        if fchain is not None and fchain.needs_guard() and not fchain.guard_in_place():
            found.append(f"guard not on top of {_tool(family)} FORWARD")
    return found


def _iptables_problems(plans: list[GuestPlan], hairpin: bool) -> list[str]:
    from . import iptables
    found: list[str] = []
    live: set[object] = set()
    families: tuple[Family, ...] = (4, 6)
    for family in families:
        state = engine.read_nat_state(family)
        live |= iptables.live_forwards(state)
        if any(iptables.has_family(p, family) for p in plans):
            for chain, rule in iptables.base_jumps(family, hairpin).items():
                if state.jumps.get(chain, ()) != (rule,):
                    found.append(f"{_tool(family)} nat {chain}: jump to our chain missing or doubled")
            if state.acct_jumps != (iptables.ACCT_JUMP,):
                found.append(f"{_tool(family)} mangle FORWARD: jump to our accounting chain missing or doubled")
    found += _iptables_guard_problems({f for p in plans for f in p.families()})
    if live != {f for p in plans for f in p.forwards}:
        found.append("iptables DNAT rules differ from the records")
    return found


WAITING = "running but not applied (waiting for its address)"


def check_and_repair(ctx: engine.Context, running: list[str] | None = None,
                     xmls: dict[str, str] | None = None) -> list[str]:
    """`xmls`: the running guests' live XML when libvirt gave it (hairpin mode needs their taps)."""
    found = problems(ctx, running)
    if found and all(hairpin.PROBLEM in p for p in found):
        # only ports that lost hairpin mode (a network restart re-made them): set it again where
        # libvirt told us the guest's taps; no firewall change, so no event to wake us again
        log.warning("repairing: " + "; ".join(found), event="repair")
        _repair_hairpin(ctx, xmls or {})
    elif found and all(p.endswith(WAITING) for p in found):
        # only guests waiting for a lease: try each alone, the rest of the table stays untouched
        for p in found:
            domain = p[: -len(WAITING) - 2]
            engine.apply(ctx, domain, ctx.store.read_xml(domain))
    elif found:
        log.warning("repairing: " + "; ".join(found), event="repair")
        reconcile(ctx, running=running, xmls=xmls)
        with ctx.store.lock():  # two watchers (a unit and one by hand) must not lose a count
            metrics.record_repair(ctx.store.root)
    return found


def _repair_hairpin(ctx: engine.Context, xmls: dict[str, str]) -> None:
    from .config import settings_or_default
    with ctx.store.lock():
        plans = [p for p in (ctx.store.read(d) for d in ctx.store.domains()) if p is not None]
        engine.set_hairpins(ctx, plans, xmls.get, settings_or_default(ctx.config_dir))


def write_metrics(ctx: engine.Context, path: str) -> None:
    """`status --format prometheus`, into node_exporter's textfile collector, atomically."""
    from .config import settings_or_default
    try:
        backend = engine.resolve_backend(settings_or_default(ctx.config_dir))
    except Exception:
        backend = "nftables"
    metrics.write_textfile(path, metrics.exposition(metrics.snapshot(ctx, backend)))


def metrics_loop(ctx: engine.Context, stop: threading.Event) -> None:
    """Rewrite config.toml's metrics_file every metrics_interval seconds until `stop`.

    config.toml is read at each round, so metrics can be turned on, moved or off without a
    restart; a config.toml that does not load keeps the last good values (a typo elsewhere
    in it must not stop the metrics an alert may watch)."""
    from .config import load_settings
    from .errors import ConfigError
    path: str | None = None
    every = 15.0
    reported = ""
    while not stop.is_set():
        try:
            settings = load_settings(ctx.config_dir)
            path, every = settings.metrics_file, settings.metrics_interval
        except ConfigError:
            pass
        error = ""
        if path is not None:
            try:
                write_metrics(ctx, path)
            except Exception as exc:  # the next round tries again
                error = f"metrics_file {path}: {exc}"
        if error != reported:  # once per new error, not every 15 s; and say when it is over
            if error:
                log.error(error)
            else:
                log.info(f"metrics_file {path}: written again")
            reported = error
        stop.wait(every)


class _Wakeups:
    def __init__(self) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.stop = threading.Event()

    def nft_monitor(self) -> None:
        exe = which("nft")
        while not self.stop.is_set() and exe:
            proc = subprocess.Popen([exe, "monitor"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True, env={"PATH": SEARCH_PATH, "LC_ALL": "C"})
            assert proc.stdout is not None
            for line in proc.stdout:
                if self.stop.is_set():
                    break
                if line.strip():
                    self.q.put("nftables changed")
            proc.kill()
            proc.wait()
            time.sleep(1)

    def libvirt_events(self) -> None:
        uri = libvirt_uri()
        try:
            import libvirt
        except ImportError:
            return
        if uri is None:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=self._libvirt_loop, args=(libvirt,), daemon=True).start()
        while not self.stop.is_set():
            try:
                conn = libvirt.openReadOnly(uri)
            except libvirt.libvirtError:
                time.sleep(2)  # libvirtd away: keep trying, it comes back
                continue
            closed = threading.Event()
            conn.registerCloseCallback(lambda *_a: closed.set(), None)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        lambda *_a: self.q.put("libvirt domain event"), None)
            conn.networkEventRegisterAny(None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE,
                                         lambda *_a: self.q.put("libvirt network event"), None)
            conn.setKeepAlive(5, 3)
            self.q.put("libvirt connected")
            while not closed.wait(1) and not self.stop.is_set():
                pass

    def _libvirt_loop(self, libvirt: Any) -> None:
        while not self.stop.is_set():
            libvirt.virEventRunDefaultImpl()


def watch(ctx: engine.Context, interval: float = 30.0, debounce: float = 0.2) -> int:
    wake = _Wakeups()
    threading.Thread(target=wake.nft_monitor, daemon=True).start()
    threading.Thread(target=wake.libvirt_events, daemon=True).start()
    # its own thread: a slow check or repair must not delay the metrics, nor they the repair
    threading.Thread(target=metrics_loop, args=(ctx, wake.stop), daemon=True).start()
    log.info(f"watching (safety check every {interval:g} s)")
    reason = "start"
    try:
        while True:
            asked = running_from_libvirt()
            running = None if asked is None else sorted(asked)
            pending = False
            try:
                found = check_and_repair(ctx, running=running, xmls=asked)
                # a guest waiting for its DHCP lease: look again soon, not at the next tick
                pending = any(p.endswith(WAITING) for p in found)
            except Exception as exc:  # keep watching: the next event or tick retries
                log.error(f"check after {reason}: {exc}")
            try:
                reason = wake.q.get(timeout=min(interval, 2.0) if pending else interval)
            except queue.Empty:
                reason = "timer"
                continue
            # let a burst of changes (a whole ruleset reload) settle, but not for long
            deadline = time.monotonic() + 5 * debounce
            while time.monotonic() < deadline:
                try:
                    wake.q.get(timeout=debounce)
                except queue.Empty:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        wake.stop.set()
    return 0
