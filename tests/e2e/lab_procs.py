"""Processes and network namespaces: find, signal and end them; delete leftover lab namespaces."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

from lab_common import NS_PREFIX, log_default


def host_netns_pids(names: Sequence[str]) -> set[int]:
    """PIDs of processes called one of ``names`` that live in the host's network namespace."""
    try:
        host_ns = os.readlink("/proc/1/ns/net")
    except OSError:
        return set()
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            if comm in names and os.readlink(f"/proc/{entry}/ns/net") == host_ns:
                found.add(int(entry))
        except OSError:
            continue
    return found


def kill_pid(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def terminate(pids: Sequence[int], grace: float = 5.0) -> None:
    live = [p for p in pids if kill_pid(p, signal.SIGTERM)]
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        live = [p for p in live if pid_alive(p)]
        if live:
            time.sleep(0.05)
    for p in live:
        kill_pid(p, signal.SIGKILL)


def netns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       text=True, check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit() and int(x) != os.getpid()]


def list_netns() -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       text=True, check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def delete_netns(ns: str) -> None:
    for _ in range(3):
        pids = netns_pids(ns)
        if not pids:
            break
        terminate(pids, grace=3.0)
    subprocess.run(["ip", "netns", "del", ns], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cleanup_stale(log: Callable[[str], None] = log_default) -> list[str]:
    """Kill the processes in, and delete, every leftover ``vfe2e-*`` namespace (from a crashed run).

    Do not call while another lab is running on this machine.
    """
    gone = []
    for ns in list_netns():
        if ns.startswith(NS_PREFIX):
            log(f"removing stale namespace {ns}")
            delete_netns(ns)
            gone.append(ns)
    return gone
