"""A daemon that stays flat (issue 19 item 13): the watcher and its `nft monitor` child, under
guest starts and stops, do not grow.

Measured on the landed code (3 guests of 2 forwards, the cycles below): ~3.8 KB per cycle in
`nft monitor` (nft 1.0.6 keeps ~1.2 KB per element-adding transaction it reports) and ~0.3 KB in
the watcher; 1,500 cycles grew them by ~6 MB.  The watcher now replaces its monitor once it
grew MONITOR_GROWTH_KB, and reads it into buffers made once.

The number compared is what the processes' own /proc/PID/status says (VmRSS): the watcher's,
plus its monitor's.  A monitor's RSS is a sawtooth (replaced every ~17 cycles here, and a fresh
one pages in ~0.5 MB at its first report), so each window's figure is its highest sample (the
highest monitor of each sample: a replacement overlaps the old one for a moment), and the
growth is that of the last window over the first one after warm-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from netns_util import World, lab_world, live_processes
from vflab.lab import PUBLIC4, domain_xml

pytestmark = pytest.mark.netns

GUESTS = ("guest1", "guest2", "guest3")
CYCLES = 120  # each: the three guests started, then stopped (6 hook calls, ~0.25 s here)
WARM_UP = 20  # cycles before the first window: Python's and nft's first allocations settle
WINDOW = 30  # cycles per window
BOUND_KB = 160  # the landed code grew 400 KB from the first window to the last at 140 cycles

# In the lab host: guest start/stop cycles through the hook's own entry, in this one process
# (an interpreter per call would take 6x as long); prints the number of each cycle done.
DRIVER = r"""
import io, os, sys
from virt_forward import hook
cfg, state, xmls, cycles = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
guests = sys.argv[5:]
xml = {g: open(os.path.join(xmls, g + ".xml"), "rb").read() for g in guests}
for i in range(1, cycles + 1):
    for g in guests:
        assert hook.qemu_main([g, "start", "begin", "-"], cfg, state, io.BytesIO(xml[g])) == 0
    for g in guests:
        assert hook.qemu_main([g, "stopped", "end", "-"], cfg, state, io.BytesIO(b"")) == 0
    while True:  # the hook's detached clean-ups: a real hook exits, this driver reaps them
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    print(i, flush=True)
"""


def rss_kb(pid: int) -> int:
    """VmRSS of `pid` in kB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def monitors(pid: int) -> list[int]:
    """The `nft monitor` children of `pid`."""
    def monitor(entry: int, _: str, fields: list[str]) -> bool:
        try:
            return fields[1] == str(pid) and \
                Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[1:2] == [b"monitor"]
        except OSError:
            return False
    return live_processes(monitor)


@pytest.fixture
def world() -> Iterator[World]:
    with lab_world(backend="nftables", guests=len(GUESTS)) as w:
        w.write("config.toml", f'public = "{PUBLIC4}"\n')
        for i, name in enumerate(GUESTS):
            w.guest_file(name, f'address = "192.168.122.{10 + i}"\nports = ["{8000 + i}:80", "{9000 + i}:22/udp"]\n')
            (w.root / f"{name}.xml").write_text(domain_xml(name))
        yield w


def test_watcher_and_its_monitor_stay_flat_over_guest_cycles(world: World) -> None:
    w = world
    env = {**os.environ, **w.env()}
    # `ip netns exec` execs the interpreter: this pid is the watcher's
    watcher = subprocess.Popen(["ip", "netns", "exec", w.lab.host, sys.executable, "-m", "virt_forward", "watch",
                                "--interval", "30"], env=env, stdout=subprocess.DEVNULL,
                               stderr=open(w.root / "watch.log", "w"))
    driver: subprocess.Popen[str] | None = None
    samples: dict[int, tuple[int, int]] = {}  # cycle -> (watcher kB, highest monitor kB)
    try:
        deadline = time.monotonic() + 30
        while not monitors(watcher.pid):
            assert watcher.poll() is None and time.monotonic() < deadline, (w.root / "watch.log").read_text()
            time.sleep(0.05)
        t0 = time.monotonic()
        driver = subprocess.Popen(["ip", "netns", "exec", w.lab.host, sys.executable, "-c", DRIVER, str(w.cfg),
                                   str(w.state), str(w.root), str(CYCLES), *GUESTS], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=open(w.root / "driver.log", "w"))
        assert driver.stdout is not None
        for line in driver.stdout:
            assert watcher.poll() is None, (w.root / "watch.log").read_text()
            samples[int(line)] = (rss_kb(watcher.pid), max(map(rss_kb, monitors(watcher.pid)), default=0))
        assert driver.wait() == 0, (w.root / "driver.log").read_text()[-2000:]
        took = time.monotonic() - t0
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        watcher.send_signal(signal.SIGINT)
        try:
            watcher.wait(timeout=15)
        except subprocess.TimeoutExpired:
            watcher.kill()
            watcher.wait()
    log = (w.root / "watch.log").read_text()
    assert sorted(samples) == list(range(1, CYCLES + 1))
    first = [samples[c] for c in range(WARM_UP + 1, WARM_UP + WINDOW + 1)]
    last = [samples[c] for c in range(CYCLES - WINDOW + 1, CYCLES + 1)]

    def high(window: list[tuple[int, int]]) -> tuple[int, int]:
        return max(s[0] for s in window), max(s[1] for s in window)

    (w1, m1), (w2, m2) = high(first), high(last)
    growth = (w2 + m2) - (w1 + m1)
    print(f"{CYCLES} cycles of {len(GUESTS)} guests in {took:.1f} s; watcher {w1} -> {w2} kB, nft monitor {m1} -> "
          f"{m2} kB (highest of cycles {WARM_UP + 1}-{WARM_UP + WINDOW} and {CYCLES - WINDOW + 1}-{CYCLES}): "
          f"{growth:+d} kB, {growth / (CYCLES - WARM_UP - WINDOW):+.2f} kB per cycle")
    assert "repairing" not in log, log  # the hooks keep records and kernel in step: nothing to repair
    assert growth < BOUND_KB, f"grew {growth} kB (bound {BOUND_KB}): watcher {w1} -> {w2}, monitor {m1} -> {m2}"


# In the lab host: the watcher's monitor thread alone, told to replace its `nft monitor` after
# every report; each ruleset change must still wake it.  Prints "replacements missed".
REPLACED_ALWAYS = r"""
import queue, shutil, subprocess, sys, threading
from virt_forward import watch
watch.MONITOR_GROWTH_KB, watch.MONITOR_MIN_LIFE, watch.MONITOR_LIFE_FACTOR = 0, 0.0, 0
wake = watch._Wakeups()
threading.Thread(target=wake.nft_monitor, daemon=True).start()
assert wake.monitoring.wait(30), "no nft monitor listening"
nft = shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin")
missed = 0
for i in range(int(sys.argv[1])):
    while True:  # what earlier changes woke
        try:
            wake.q.get_nowait()
        except queue.Empty:
            break
    subprocess.run([nft, "add", "table", "inet", f"vf_wake_{i}"], check=True)
    try:
        wake.q.get(timeout=10)
    except queue.Empty:
        missed += 1
print(wake.restarts, missed)
"""


def test_a_replaced_monitor_misses_no_change(world: World) -> None:
    """Replaced after every report (the new one listens before the old one goes, then the
    watcher checks), the monitor still wakes the watcher after each of 60 changes."""
    w = world
    got = w.lab.sh(w.lab.host, sys.executable, "-c", REPLACED_ALWAYS, "60", env={**os.environ, **w.env()},
                   timeout=300)
    restarts, missed = map(int, got.stdout.split())
    print(f"60 ruleset changes, nft monitor replaced {restarts} times: {missed} change(s) woke nothing")
    assert restarts >= 20 and missed == 0
