"""watch: a small daemon that puts forwards and guards back after any reset.

Nothing tells a hook when libvirt (SIGHUP, network restart), firewalld (reload)
or an admin (`nft flush ruleset`) rewrites the firewall.  We listen to every
nftables change (`nft monitor`; iptables-nft changes show up there too), to
libvirt's domain and network events when libvirt-python is installed, and to a
timer as a safety net (iptables-legacy has no events).  Each wake-up runs a
*check* under the lock; only a check that finds something wrong reconciles, so
our own changes (which nft monitor reports too) cannot loop.

A repair is checked again at once: one that leaves what it repaired (a host whose
firewall we cannot read or write as we think) is reported once (journal, the
repairs record that status, metrics and doctor read) and retried after 1 s, 2 s,
4 s ... up to 5 min, never in a tight loop: its own changes wake us again.

`nft monitor` grows by about 1 KB per element change it reports (nft 1.0.6's own
memory, ~4 KB per start and stop of three guests): it is replaced by a fresh one when
it has grown by MONITOR_GROWTH_KB, and the watcher checks once the new one listens
(nothing that changed in between goes unseen).
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import backends, drift, engine, log, metrics
from .drift import Kind, Problem, problems
from .reconcile import libvirt_uri, reconcile, running_from_libvirt
from .runner import SEARCH_PATH, which


Signature = frozenset[tuple[Kind, str]]


def signature(found: list[Problem]) -> Signature:
    """What a repair is about, to tell "the same problem again" (text aside: counts in it vary)."""
    return frozenset((p.kind, p.subject) for p in found if p.kind is not Kind.WAITING)


@dataclass(frozen=True)
class Failing:
    """Problems that repairs left as they were, and when to try again."""

    problems: Signature
    attempts: int  # repairs in a row that left (some of) them
    retry_at: float  # the clock's time of the next repair


class Backoff:
    """The watcher's memory of a repair that does not converge: retried after 1 s, then twice
    as long each time, up to 5 min.  Pure but for the clock, which tests pass in."""

    FIRST, LAST = 1.0, 300.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.failing: Failing | None = None

    @classmethod
    def delay(cls, attempts: int) -> float:
        return min(cls.LAST, cls.FIRST * (1 << max(0, min(attempts - 1, 30))))  # capped: 2**1024 overflows a float

    def holds(self, found: list[Problem]) -> bool:
        """Are these (some of) the failing repair's problems, before its next try?  A new
        problem makes a repair due at once."""
        sig = signature(found)
        return (self.failing is not None and bool(sig) and sig <= self.failing.problems
                and self.clock() < self.failing.retry_at)

    def failed(self, left: list[Problem]) -> frozenset[tuple[Kind, str]]:
        """A repair left `left`; returns the problems among them not failing before (to report).
        Problems shared with the failing ones continue its count: a set that changes while it
        does not converge must not start the delay again from 1 s."""
        sig = signature(left)
        before = self.failing.problems if self.failing is not None else frozenset()
        attempts = self.failing.attempts + 1 if self.failing is not None and sig & before else 1
        self.failing = Failing(sig, attempts, self.clock() + self.delay(attempts))
        return sig - before

    def retry_in(self) -> float | None:
        """Seconds until the failing repair is due again; None when nothing fails."""
        return None if self.failing is None else max(0.0, self.failing.retry_at - self.clock())


def check_and_repair(ctx: engine.Context, running: list[str] | None = None,
                     xmls: dict[str, str] | None = None, backoff: Backoff | None = None) -> list[Problem]:
    """`xmls`: the running guests' live XML when libvirt gave it (hairpin mode needs their taps).
    `backoff`: the watcher's; with it, a repair is checked again at once and one that leaves
    the same problems waits its delay (reported once), without it every call repairs."""
    found = problems(ctx, running)
    if backoff is not None and backoff.failing is not None and not signature(found) & backoff.failing.problems:
        _resolved(ctx, backoff, "gone")  # fixed by someone else, or gone with its guest
    held = backoff is not None and backoff.holds(found)
    # a retry of problems reported as failing already: no new line for them
    quiet = backoff is not None and backoff.failing is not None and signature(found) <= backoff.failing.problems
    text = "; ".join(map(str, found))
    repaired = True
    if found and all(p.kind is Kind.WAITING for p in found) or held:
        # only guests waiting for a lease (or, besides them, a repair that waits its delay): try
        # each alone, the rest of the table stays untouched
        for p in found:
            if p.kind is Kind.WAITING:
                engine.apply(ctx, p.subject, ctx.store.read_xml(p.subject))
        repaired = False
    elif found and all(p.kind is Kind.HAIRPIN for p in found):
        # only ports that lost hairpin mode (a network restart re-made them): set it again where
        # libvirt told us the guest's taps; no firewall change, so no event to wake us again
        if not quiet:
            log.warning("repairing: " + text, event="repair")
        _repair_hairpin(ctx, xmls or {})
    elif found:
        if not quiet:
            log.warning("repairing: " + text, event="repair")
        reconcile(ctx, running=running, xmls=xmls)
        with ctx.store.lock():  # two watchers (a unit and one by hand) must not lose a count
            metrics.record_repair(ctx.store.root)
    else:
        repaired = False
    if backoff is not None and repaired:
        _converged(ctx, backoff, found, problems(ctx, running))
    return found


def _converged(ctx: engine.Context, backoff: Backoff, before: list[Problem], after: list[Problem]) -> None:
    """After a repair of `before`: did it leave any of them?  Then back off, reported once."""
    repaired = signature(before)
    left = [p for p in after if (p.kind, p.subject) in repaired]
    if not left:
        if backoff.failing is not None:
            _resolved(ctx, backoff, f"repaired at attempt {backoff.failing.attempts + 1}")
        return
    new = backoff.failed(left)
    assert backoff.failing is not None
    if new:
        texts = "; ".join(p.text for p in left if (p.kind, p.subject) in new)
        log.error(f"repair did not fix: {texts}; trying again in {Backoff.delay(backoff.failing.attempts):g} s, "
                  f"then less and less often (up to every {Backoff.LAST:g} s) until it is fixed or gone",
                  event="repair_failing")
    with ctx.store.lock():
        metrics.record_failing(ctx.store.root, tuple(p.text for p in left), backoff.failing.attempts,
                               time.time() + (backoff.failing.retry_at - backoff.clock()))


def _resolved(ctx: engine.Context, backoff: Backoff, how: str) -> None:
    assert backoff.failing is not None
    log.info(f"the repair that did not converge is over ({how})", event="repair")
    backoff.failing = None
    with ctx.store.lock():
        metrics.clear_failing(ctx.store.root)


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


# `nft monitor` is replaced once its resident memory grew this much since its first report
# (nft 1.0.6 keeps ~1 KB per element change it reports), but it lives at least
# MONITOR_LIFE_FACTOR times as long as it took to start listening, and 1 s: a fresh one
# reads the whole ruleset first (~0.5 s at 10,000 forwards), and a storm of changes must not
# keep the host busy with that more than 1/20 of the time.
MONITOR_GROWTH_KB = 64
MONITOR_LIFE_FACTOR = 20
MONITOR_MIN_LIFE = 1.0
SUBSCRIBE_DEADLINE = 10.0  # s for a new `nft monitor` to read the ruleset and listen
NETLINK_NETFILTER = "12"  # /proc/net/netlink's Eth column
NFTABLES_GROUP = 1 << (7 - 1)  # NFNLGRP_NFTABLES in its Groups bit mask


def rss_kb(pid: int, buf: bytearray | None = None) -> int | None:
    """VmRSS of process `pid` in kB, None when it is gone.  `buf`: a buffer to read into, kept by
    a caller that asks often (see _Wakeups._follow)."""
    buf = bytearray(1 << 12) if buf is None else buf
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.readv(fd, [buf])  # VmRSS comes within its first 4 KiB
        at = buf.find(b"\nVmRSS:", 0, size)
        end = buf.find(b"kB", at, size)
        return None if at < 0 or end < 0 else int(buf[at + 7:end])
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(fd)


def listening(pid: int) -> bool:
    """Has process `pid` a netlink socket in nf_tables' notification group?  From then on it
    sees every ruleset change.  (/proc/PID/net/netlink, of pid's network namespace: sk Eth Pid
    Groups Rmem Wmem Dump Locks Drops Inode.)"""
    sockets = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
        with open(f"/proc/{pid}/net/netlink", encoding="ascii", errors="replace") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return False
    for fd in fds:
        try:
            sockets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    for row in rows:
        cols = row.split()
        try:
            if (len(cols) >= 10 and cols[1] == NETLINK_NETFILTER and int(cols[3], 16) & NFTABLES_GROUP
                    and f"socket:[{cols[9]}]" in sockets):
                return True
        except ValueError:
            continue
    return False


class _Wakeups:
    def __init__(self) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.stop = threading.Event()
        self.monitoring = threading.Event()  # the first `nft monitor` listens (or there is none)
        self.monitor: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def nft_monitor(self) -> None:
        """Wake the watcher at every ruleset change, for ever: a monitor that exits or grows is
        replaced, and the watcher checks once the new one listens, so that what changed while
        none listened is seen."""
        exe = which("nft")
        try:
            while exe and not self.stop.is_set():
                t0 = time.monotonic()
                old, self.monitor = self.monitor, self._listen(exe)
                life = max(MONITOR_MIN_LIFE, MONITOR_LIFE_FACTOR * (time.monotonic() - t0))
                if old is not None:
                    _end(old)
                    self.q.put("nft monitor replaced")
                self.monitoring.set()
                if self._follow(self.monitor, life):  # it exited: nft failing at once must not spin
                    self.stop.wait(1)
        finally:
            self.monitoring.set()

    def _listen(self, exe: str) -> subprocess.Popen[bytes]:
        """A new `nft monitor`, once it listens (or its deadline passed: reported)."""
        proc = subprocess.Popen([exe, "monitor"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env={"PATH": SEARCH_PATH, "LC_ALL": "C"})
        deadline = time.monotonic() + SUBSCRIBE_DEADLINE
        while not listening(proc.pid):
            if proc.poll() is not None or self.stop.is_set():
                break
            if time.monotonic() > deadline:
                log.warning(f"nft monitor (pid {proc.pid}) does not listen to nf_tables' events after "
                            f"{SUBSCRIBE_DEADLINE:g} s; changes may be seen late (at the next check)")
                break
            time.sleep(0.01)
        return proc

    def _follow(self, proc: subprocess.Popen[bytes], life: float) -> bool:
        """A wake-up for each output of `proc`, until it exits (True) or has grown by
        MONITOR_GROWTH_KB, once `life` seconds old (False: replace it).  Its text is never
        parsed: any change wakes."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        # read into buffers made once: a fresh 64 KiB bytes per read, shrunk to what came, left
        # glibc's arena of this thread growing by ~1 KB per guest start and stop (measured)
        buf, status = bytearray(1 << 16), bytearray(1 << 12)
        # measured after its first report: nft pages in ~0.5 MB for it, once
        base: int | None = None
        born = time.monotonic()
        while not self.stop.is_set():
            try:
                got = os.readv(fd, [buf])
            except OSError:
                got = 0
            if not got:
                return True
            self.q.put("nftables changed")
            now = rss_kb(proc.pid, status)
            if base is None:
                base = now
            elif now is not None and now - base >= MONITOR_GROWTH_KB and time.monotonic() - born >= life:
                self.restarts += 1
                return False
        return True

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


def _end(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def watch(ctx: engine.Context, interval: float = 30.0, debounce: float = 0.2) -> int:
    wake = _Wakeups()
    threading.Thread(target=wake.nft_monitor, daemon=True).start()
    threading.Thread(target=wake.libvirt_events, daemon=True).start()
    # its own thread: a slow check or repair must not delay the metrics, nor they the repair
    threading.Thread(target=metrics_loop, args=(ctx, wake.stop), daemon=True).start()
    # the first check once nft monitor listens: a change between them would wait for the timer
    wake.monitoring.wait(SUBSCRIBE_DEADLINE + 1)
    log.info(f"watching (safety check every {interval:g} s)")
    try:
        with ctx.store.lock():  # a failing repair of an earlier watcher: this one finds out anew
            metrics.clear_failing(ctx.store.root)
    except Exception as exc:  # the loop's checks say more about a state dir we cannot write
        log.error(f"repairs record in {ctx.store.root}: {exc}")
    backoff = Backoff()
    reason = "start"
    try:
        while True:
            asked = running_from_libvirt()
            running = None if asked is None else sorted(asked)
            pending = False
            try:
                found = check_and_repair(ctx, running=running, xmls=asked, backoff=backoff)
                # a guest waiting for its DHCP lease: look again soon, not at the next tick
                pending = any(p.kind is Kind.WAITING for p in found)
            except Exception as exc:  # keep watching: the next event or tick retries
                log.error(f"check after {reason}: {exc}")
            timeout = min(interval, 2.0) if pending else interval
            retry = backoff.retry_in()
            if retry is not None:  # a repair that did not converge is due then
                timeout = min(timeout, max(retry, 0.01))
            try:
                reason = wake.q.get(timeout=timeout)
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
        if wake.monitor is not None and wake.monitor.poll() is None:
            _end(wake.monitor)  # not left behind until the next ruleset change
    return 0
