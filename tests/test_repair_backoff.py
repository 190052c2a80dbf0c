"""Every repair converges or backs off (issue 19 item 14): a repair that leaves what it repaired
is reported once (the journal, the repairs record that status --format prometheus and doctor
read) and retried after 1 s, 2 s, 4 s ... up to 5 min, never in a tight loop.

The pure tests drive check_and_repair with a clock of their own; the namespace test runs the
watcher against an nft whose listings of our table never match the records (a wrapper bound
over nft in the watcher's own mount namespace), so that each repair rebuilds the table for
real, wakes the watcher again through `nft monitor`, and never converges.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

import netns_util
from netns_util import World, lab_world
from vflab.lab import CLIENT4, PUBLIC4
from virt_forward import engine, metrics, watch
from virt_forward.doctor import FAIL, Facts, diagnose
from virt_forward.drift import Kind, Problem
from virt_forward.plan import Forward, GuestPlan

T = TypeVar("T")
MAP = Problem(Kind.RULES, "dnat4", "map dnat4 differs from the records")
GUARD = Problem(Kind.GUARD, "ip filter forward", "guard not on top of nft ip filter forward")


def test_the_delay_doubles_from_1_s_to_5_min() -> None:
    assert [watch.Backoff.delay(n) for n in range(1, 12)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert watch.Backoff.delay(10**6) == 300  # days of failing: no overflow


class Host:
    """What check_and_repair sees and does, scripted: `found` is what each check finds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.now = 0.0
        self.found: list[Problem] = [MAP]
        self.fixed_by_repair = False  # the next repair works
        self.repairs: list[float] = []
        self.lines: list[tuple[str, str]] = []
        self.ctx = engine.Context(tmp_path / "etc", tmp_path / "run")
        self.backoff = watch.Backoff(clock=lambda: self.now)
        monkeypatch.setattr(watch, "problems", lambda ctx, running: list(self.found))
        monkeypatch.setattr(watch, "reconcile", lambda ctx, running, xmls: self.repair())
        for level in ("info", "warning", "error"):
            monkeypatch.setattr(watch.log, level,
                                lambda message, level=level, **_event: self.lines.append((level, message)))

    def repair(self) -> None:
        self.repairs.append(self.now)
        if self.fixed_by_repair:
            self.found = []

    def check(self) -> None:
        watch.check_and_repair(self.ctx, running=None, xmls=None, backoff=self.backoff)

    def said(self, text: str) -> int:
        return sum(text in message for _, message in self.lines)

    def record(self) -> metrics.Repairs:
        return metrics.read_repairs(self.ctx.store.root)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Host:
    return Host(monkeypatch, tmp_path)


def test_a_repair_that_does_not_converge_is_reported_once_and_retried_less_and_less_often(host: Host) -> None:
    # a check at every quarter second for 40 s: as often as a busy host's events could wake it
    while host.now < 40:
        host.check()
        host.now += 0.25
    assert host.repairs == [0, 1, 3, 7, 15, 31]
    assert host.said("repair did not fix: map dnat4 differs from the records") == 1
    assert host.said("repairing:") == 1  # the retries add no line
    got = host.record()
    assert got.count == 6 and got.failing == ("map dnat4 differs from the records",) and got.attempts == 6
    assert got.since is not None and got.retry_at is not None and got.retry_at > got.since
    # the metrics say so, from the same record
    text = metrics.exposition(metrics.Snapshot((), (MAP,), got))
    assert "virt_forward_repair_failing 1\n" in text and "virt_forward_repair_failing_since_timestamp_seconds" in text


def test_a_new_problem_is_repaired_at_once_and_the_count_goes_on(host: Host) -> None:
    host.check()  # fails: next try at 1 s
    host.now = 0.5
    host.found = [MAP, GUARD]  # something else broke meanwhile: no waiting for it
    host.check()
    assert host.repairs == [0, 0.5]
    # both left: the new one is reported, the old one not again; the delay grows on (2 s)
    assert host.said("repair did not fix: map dnat4") == 1 and host.said("repair did not fix: guard not on top") == 1
    assert host.backoff.failing is not None and host.backoff.failing.attempts == 2
    assert host.backoff.retry_in() == 2


def test_a_repair_that_converges_at_last_clears_the_record(host: Host) -> None:
    host.check()
    assert host.record().failing
    host.now, host.fixed_by_repair = 1.0, True
    host.check()
    assert host.repairs == [0, 1.0] and host.record().failing == () and host.backoff.failing is None
    assert host.said("is over (repaired at attempt 2)") == 1
    assert "virt_forward_repair_failing" not in metrics.exposition(metrics.Snapshot((), (), host.record()))


def test_a_failing_problem_that_goes_by_itself_clears_the_record(host: Host) -> None:
    host.check()
    host.now, host.found = 0.5, []  # fixed by someone else before the next try
    host.check()
    assert host.repairs == [0] and host.record().failing == () and host.said("is over (gone)") == 1


def test_without_a_backoff_every_call_repairs(host: Host) -> None:
    for _ in range(3):
        watch.check_and_repair(host.ctx, running=None, xmls=None)
    assert host.repairs == [0, 0, 0] and host.record().failing == () and not host.said("did not fix")


def test_the_failing_record_reads_back_and_a_damaged_one_reads_as_not_failing(tmp_path: Path) -> None:
    metrics.record_repair(tmp_path, now=10.0)
    got = metrics.record_failing(tmp_path, ("a", "b"), 3, 99.0, now=20.0)
    assert got == metrics.Repairs(1, 10.0, ("a", "b"), 20.0, 3, 99.0) == metrics.read_repairs(tmp_path)
    assert metrics.record_failing(tmp_path, ("a",), 4, 199.0, now=30.0).since == 20.0  # since the first
    assert metrics.record_repair(tmp_path, now=40.0).failing == ("a",)  # a repair keeps the failing part
    assert metrics.clear_failing(tmp_path) == metrics.Repairs(2, 40.0)
    (tmp_path / metrics.REPAIRS_FILE).write_text(json.dumps({"count": 2, "last": 1, "failing": "x", "attempts": 1}))
    assert metrics.read_repairs(tmp_path) == metrics.Repairs(2, 1.0)


def test_doctor_fails_a_repair_that_does_not_converge() -> None:
    pub, guest = ipaddress.ip_address("198.51.100.1"), ipaddress.ip_address("192.168.122.10")
    good = Facts(sysctl={"net.ipv4.ip_forward": "1"}, local_addresses=frozenset({pub}), listening=frozenset(),
                 networks={"default": (ipaddress.ip_network("192.168.122.0/24"),)},
                 plans=(GuestPlan("web", (Forward(4, "tcp", 80, pub, guest, 80),)),), config_errors=(),
                 firewall_problems=(), applied=frozenset({"web"}), docker_drop=False, firewalld_strict=None,
                 hook_path="/etc/libvirt/hooks/qemu.d/virt-forward", hook_installed=True, hook_mtime=100.0,
                 daemon_started=200.0, nft_installed=True)
    assert not [v for v in diagnose(good) if v.check == "watcher"]
    [verdict] = [v for v in diagnose(replace(good, repair_failing=("map dnat4 differs from the records",),
                                             repair_failing_since=1.7e9, repair_attempts=5)) if v.check == "watcher"]
    assert verdict.level == FAIL and "map dnat4 differs from the records" in verdict.message
    assert "5 tries" in verdict.message and "repair_failing" in verdict.fix


# ---------------------------------------------------------------- the watcher, in namespaces

# nft, but our table's listings say protocol 255 where the kernel holds tcp (6): no record ever
# matches them, whatever the watcher does.  Only while FLAG exists.
WRAPPER = """#!/bin/sh
case "$*" in
*"list table inet virt_forward"*)
    if [ -e {flag} ]; then
        out=$({real} "$@") || exit $?
        printf '%s\\n' "$out" | sed -e 's/", 6, /", 255, /g' -e 's/\\[6, /[255, /g' -e 's/"tcp"/"255"/g'
        exit 0
    fi;;
esac
exec {real} "$@"
"""


def wait_until(what: str, observe: Callable[[], T], ok: Callable[[T], object] = bool, timeout: float = 30.0) -> T:
    return netns_util.wait_until(observe, ok, timeout=timeout, what=what)


class WrappedWatcher:
    """`virt-forward watch` in the lab host, in a mount namespace of its own where nft is WRAPPER
    (the real one bound at .../real/nft: commands keep nft's name, which the runner relies on)."""

    def __init__(self, w: World) -> None:
        nft = shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin")
        assert nft is not None
        self.flag = w.root / "mangle"
        self.flag.touch()
        real = w.root / "real" / "nft"
        real.parent.mkdir()
        real.touch()
        wrapper = w.root / "nft-wrapper"
        wrapper.write_text(WRAPPER.format(flag=self.flag, real=real))
        wrapper.chmod(0o755)
        setup = f'mount --bind {nft} {real} && mount --bind {wrapper} {nft} && exec "$@"'
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", w.lab.host, "unshare", "--mount", "--propagation", "private", "sh", "-c", setup,
             "sh", sys.executable, "-m", "virt_forward", "watch", "--interval", "30"],
            env={**os.environ, **w.env()}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def count(self, text: str) -> int:
        assert self.proc.poll() is None, "\n".join(self.lines)
        return sum(text in line for line in self.lines)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return "\n".join(self.lines)


@pytest.fixture
def world() -> Iterator[World]:
    with lab_world(backend="nftables") as w:
        w.write("config.toml", f'public = "{PUBLIC4}"\n')
        w.guest_file("guest1", 'address = "192.168.122.10"\nports = ["80"]\n')
        yield w


@pytest.mark.netns
def test_the_watcher_backs_off_a_repair_that_never_converges(world: World) -> None:
    w = world
    assert w.hook("guest1", "start").returncode == 0
    watcher = WrappedWatcher(w)
    times: dict[int, float] = {}  # repair number -> when the record said so

    def repairs() -> int:
        got = metrics.read_repairs(w.state).count
        times.setdefault(got, time.monotonic())
        return got

    try:
        # its first check repairs (the listing never matches), then waits 1 s, 2 s, 4 s
        wait_until("the 4th repair", repairs, lambda n: n >= 4, timeout=60)
        gaps = [times[n + 1] - times[n] for n in (1, 2, 3)]
        print(f"repairs that do not converge: {', '.join(f'{g:.2f}' for g in gaps)} s apart")
        assert gaps[0] >= 0.8 and gaps[1] >= 1.6 and gaps[2] >= 3.2, gaps  # 1 s, 2 s, 4 s (the poll's slack)
        got = metrics.read_repairs(w.state)
        assert watcher.count("repair did not fix: map dnat4 differs from the records") == 1, watcher.lines
        assert watcher.count("repairing:") == 1, watcher.lines
        assert got.failing == ("map dnat4 differs from the records",) and got.attempts >= 3
        assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"  # the rules themselves are fine
        # status (which reads the kernel as it is) and its metrics name the failing repair
        assert "virt_forward_repair_failing 1" in w.cli("status", "--format", "prometheus").stdout
        # the host is fixed: the next check sees nothing to repair, and says it is over
        watcher.flag.unlink()
        w.nft("add", "table", "inet", "vf_test_wake")  # any change wakes the watcher
        wait_until("the record cleared", lambda: metrics.read_repairs(w.state).failing, lambda f: f == ())
        assert watcher.count("is over") == 1
        assert "virt_forward_repair_failing" not in w.cli("status", "--format", "prometheus").stdout
    finally:
        log = watcher.stop()
    assert "Traceback" not in log, log
