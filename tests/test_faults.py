"""Faults: resets nobody tells a hook about, crashes, concurrency.  Each prints what it measured.

The watcher runs inside the lab's host namespace; time to recovery is measured
from the fault to the first successful connection through the public address.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest

from netns_util import Watcher, World, make_world
from vflab.lab import CLIENT4, PUBLIC4

pytestmark = pytest.mark.netns
G1 = "192.168.122.10"


@pytest.fixture(params=["iptables", "nftables"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    w, lab = make_world(backend=request.param)
    try:
        w.write("config.toml", f'public = "{PUBLIC4}"\n')
        w.guest_file("guest1", f'address = "{G1}"\nports = ["80", "2222:22"]\n')
        w.guest_file("guest2", 'address = "192.168.122.11"\nports = ["443"]\n')
        yield w
    finally:
        lab.close()
        shutil.rmtree(w.root, ignore_errors=True)



@pytest.fixture
def watched(world: World) -> Iterator[World]:
    for name in ("guest1", "guest2"):
        assert world.hook(name, "start").returncode == 0
    watcher = Watcher(world)
    time.sleep(1.0)  # the watcher's first check and its nft monitor are up
    try:
        yield world
    finally:
        print(watcher.stop()[-2000:])


def recovery(w: World, fault: str, limit: float = 6.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if w.probe("tcp", PUBLIC4, 80, timeout=0.3) == f"guest1:80 from {CLIENT4}":
            took = time.monotonic() - t0
            print(f"recovery after {fault}: {took:.2f} s")
            return took
        time.sleep(0.05)
    raise AssertionError(f"no recovery within {limit} s after {fault}")


def exactly_right(w: World) -> None:
    """One set of our rules, one guard per chain that needs one, nothing else of ours."""
    dnat = sorted(str(e) for e in w.elements().get("dnat4", []))
    assert len(dnat) == 3, dnat
    assert w.guards_on_top() if w.backend == "nftables" else "virt-forward:guard" in w.forward_chain()[1]
    assert sum("virt-forward" in ln for ln in w.foreign()) <= 2


def test_nft_flush_ruleset(watched: World) -> None:
    w = watched
    w.nft("flush", "ruleset")
    w.lab.load_libvirt_rules()  # libvirt puts its own back (its reload); ours is the watcher's job
    assert recovery(w, "nft flush ruleset") < 2.0
    time.sleep(0.5)
    exactly_right(w)


def test_our_table_deleted(watched: World) -> None:
    w = watched
    w.nft("delete", "table", "inet", "virt_forward")
    assert recovery(w, "delete table inet virt_forward") < 2.0
    exactly_right(w)


def test_libvirt_reinserts_its_rules_above_the_guard(watched: World) -> None:
    w = watched
    if w.backend == "iptables":
        w.lab.sh(w.lab.host, "iptables", "-w", "-F", "FORWARD")  # iptables -F FORWARD, then libvirt's reload
        for chain in ("LIBVIRT_FWO", "LIBVIRT_FWI", "LIBVIRT_FWX"):
            w.lab.sh(w.lab.host, "iptables", "-w", "-I", "FORWARD", "1", "-j", chain)
        fault = "iptables -F FORWARD + libvirt re-inserting its jumps"
    else:
        # a network restart on libvirt's nftables backend: its tables are made anew
        w.nft("delete", "table", "ip", "libvirt_network")
        w.nft("delete", "table", "ip6", "libvirt_network")
        w.lab.load_libvirt_rules()
        fault = "libvirt_network tables re-created"
    assert recovery(w, fault) < 2.0
    time.sleep(0.5)
    exactly_right(w)


def test_kill_9_during_apply_never_leaves_a_mix(world: World) -> None:
    """The nft transaction is all or nothing; a killed hook is repaired by the next reconcile."""
    w = world
    assert w.hook("guest1", "start").returncode == 0
    w.guest_file("guest1", f'address = "{G1}"\nports = ["8080:80", "8081:80", "8082:80"]\n')
    old = {(PUBLIC4, "tcp", 80), (PUBLIC4, "tcp", 2222)}
    new = {(PUBLIC4, "tcp", p) for p in (8080, 8081, 8082)}
    rng = random.Random(7)
    seen = {"old": 0, "new": 0}
    for _ in range(25):
        proc = subprocess.Popen(["ip", "netns", "exec", w.lab.host, str(w.hook_path), "guest1", "reconnect",
                                 "begin", "-"], env=w.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        keys = {tuple(e[0]["concat"]) for e in w.elements().get("dnat4", [])}  # type: ignore[index]
        assert keys in (old, new), keys  # never a mix
        seen["old" if keys == old else "new"] += 1
        w.cli("reconcile", "--running", "guest1")  # what the watcher does on the next event
        keys = {tuple(e[0]["concat"]) for e in w.elements().get("dnat4", [])}  # type: ignore[index]
        assert keys == new
        w.guest_file("guest1", f'address = "{G1}"\nports = ["80", "2222:22"]\n')
        w.cli("reconcile", "--running", "guest1")
        w.guest_file("guest1", f'address = "{G1}"\nports = ["8080:80", "8081:80", "8082:80"]\n')
    print(f"kill -9 at random points of 25 applies: old ruleset seen {seen['old']}x, new {seen['new']}x, mix 0x")


def test_fifty_concurrent_hook_calls(world: World) -> None:
    w = world
    for i in range(50):
        w.guest_file(f"vm{i}", f'address = "192.168.122.{100 + i}"\nports = ["{10000 + i}:80"]\n')
    codes: list[int] = []
    t0 = time.monotonic()
    threads = [threading.Thread(target=lambda i=i: codes.append(w.hook(f"vm{i}", "start").returncode))
               for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"50 concurrent hook calls: {time.monotonic() - t0:.2f} s")
    assert codes == [0] * 50
    keys = sorted(e[0]["concat"][2] for e in w.elements()["dnat4"])  # type: ignore[index]
    assert keys == list(range(10000, 10050))
    assert w.cli("status").stdout.count(" live") == 50
