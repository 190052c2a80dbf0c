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

import queue
import subprocess
import threading
import time
from typing import Any

from . import backends, drift, engine, log, metrics
from .drift import Kind, Problem, problems
from .reconcile import libvirt_uri, reconcile, running_from_libvirt
from .runner import SEARCH_PATH, which


def check_and_repair(ctx: engine.Context, running: list[str] | None = None,
                     xmls: dict[str, str] | None = None) -> list[Problem]:
    """`xmls`: the running guests' live XML when libvirt gave it (hairpin mode needs their taps)."""
    found = problems(ctx, running)
    text = "; ".join(map(str, found))
    if found and all(p.kind is Kind.HAIRPIN for p in found):
        # only ports that lost hairpin mode (a network restart re-made them): set it again where
        # libvirt told us the guest's taps; no firewall change, so no event to wake us again
        log.warning("repairing: " + text, event="repair")
        _repair_hairpin(ctx, xmls or {})
    elif found and all(p.kind is Kind.WAITING for p in found):
        # only guests waiting for a lease: try each alone, the rest of the table stays untouched
        for p in found:
            engine.apply(ctx, p.subject, ctx.store.read_xml(p.subject))
    elif found:
        log.warning("repairing: " + text, event="repair")
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
    backend = backends.choose(settings_or_default(ctx.config_dir), fallback=True)
    metrics.write_textfile(path, metrics.exposition(drift.snapshot(ctx, backend)))


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
                pending = any(p.kind is Kind.WAITING for p in found)
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
