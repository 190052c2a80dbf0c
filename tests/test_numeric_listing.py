"""Kernel state read the same on every host (issue 19 item 14).

Where /etc/protocols is missing (debootstrap's minbase, container images) nft lists a protocol
by its number (`198.51.100.1 . 6 . 8080`); with /etc/services and -S it lists ports by name.
The parsers read every form into the one the records use, and the listing asks for numbers.

The namespace tests hide /etc/protocols from the commands they run, and only from those: each
runs in a private mount namespace of its own (`unshare --mount`) with /dev/null bound over the
file; the machine's own /etc/protocols is never touched.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest

import netns_util
from netns_util import World, lab_world
from vflab.lab import CLIENT4, PUBLIC4
from virt_forward import metrics, nft

DATA = Path(__file__).parent / "data" / "metrics"
NUMBERS = {"tcp": 6, "udp": 17}
T = TypeVar("T")


def captured() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / "nft-listing.json").read_text())
    return data


def rewritten(listing: dict[str, Any], change: Callable[[str, object], object]) -> dict[str, Any]:
    """`listing` with each part of each element's key and value passed through change(type, part),
    the types as the listing declares them (as nft would print them on another host)."""
    out = copy.deepcopy(listing)

    def parts(expr: Any, types: list[str]) -> Any:
        if isinstance(expr, dict) and "concat" in expr:
            return {"concat": [change(t, p) for t, p in zip(types, expr["concat"])]}
        return expr

    for item in out["nftables"]:
        obj = item.get("map") or item.get("set")
        if not isinstance(obj, dict):
            continue
        key_types = obj["type"] if isinstance(obj["type"], list) else [obj["type"]]
        value_types = str(obj.get("map", "")).split(" . ")
        elems = []
        for elem in obj.get("elem", []):
            if isinstance(elem, list):  # a map's [key, value]
                key, value = elem
                if isinstance(key, dict) and "elem" in key:
                    key = {**key, "elem": {**key["elem"], "val": parts(key["elem"]["val"], key_types)}}
                else:
                    key = parts(key, key_types)
                elems.append([key, parts(value, value_types)])
            else:  # a counted set's {"elem": {"val": ...}}
                elems.append({**elem, "elem": {**elem["elem"], "val": parts(elem["elem"]["val"], key_types)}})
        obj["elem"] = elems
    return out


def protocol_numbers(kind: str, part: object) -> object:
    return NUMBERS.get(str(part), part) if kind == "inet_proto" else part


def service_names(kind: str, part: object) -> object:
    """A port as /etc/services names it (nft -S), where this host's file has a name for it."""
    if kind != "inet_service":
        return part
    try:
        return socket.getservbyport(int(str(part)))
    except OSError:
        return part


def test_protocol_numbers_read_as_names() -> None:
    numeric = rewritten(captured(), protocol_numbers)
    assert '"concat": ["198.51.100.1", 17, 8001]' in json.dumps(numeric)  # the rewrite did something
    assert nft.parse_live(numeric) == nft.parse_live(captured())
    assert nft.parse_element_counts(numeric) == nft.parse_element_counts(captured())
    assert metrics.live_from_listing(numeric) == metrics.live_from_listing(captured())


def test_service_names_read_as_port_numbers() -> None:
    if socket.getservbyport(443) != "https":
        pytest.skip("this host's /etc/services has no name for 443")
    named = rewritten(captured(), lambda k, p: service_names(k, protocol_numbers(k, p)))
    assert '"https"' in json.dumps(named)
    assert nft.parse_live(named) == nft.parse_live(captured())
    assert nft.parse_element_counts(named) == nft.parse_element_counts(captured())


def test_a_port_numbered_like_a_protocol_stays_a_port() -> None:
    """17 is udp only where the listing's type says inet_proto: port 17 and port 6 stay ports."""
    listing = {"nftables": [{"map": {
        "family": "inet", "name": "dnat4", "table": "virt_forward", "type": ["ipv4_addr", "inet_proto", "inet_service"],
        "map": "ipv4_addr . inet_service",
        "elem": [[{"concat": ["198.51.100.1", 17, 6]}, {"concat": ["192.168.122.10", 17]}],
                 [{"concat": ["198.51.100.1", "tcp", 17]}, {"concat": ["192.168.122.10", 6]}],
                 [{"concat": ["198.51.100.1", 132, 80]}, {"concat": ["192.168.122.10", 80]}]]}}]}
    assert nft.parse_live(listing) == {"dnat4": {
        ("198.51.100.1", "udp", "6"): ("192.168.122.10", "17"),
        ("198.51.100.1", "tcp", "17"): ("192.168.122.10", "6"),
        ("198.51.100.1", "sctp", "80"): ("192.168.122.10", "80")}}


# ---------------------------------------------------------------- in namespaces, /etc/protocols hidden

def hidden(w: World, *argv: str) -> list[str]:
    """`argv` in the lab host's network namespace and a mount namespace of its own where
    /etc/protocols reads as empty (only there: the mount goes with the last process in it)."""
    hide = 'mount --bind /dev/null /etc/protocols && exec "$@"' if Path("/etc/protocols").exists() else 'exec "$@"'
    return ["ip", "netns", "exec", w.lab.host, "unshare", "--mount", "--propagation", "private",
            "sh", "-c", hide, "sh", *argv]


def run_hidden(w: World, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    got = subprocess.run(hidden(w, *argv), input=stdin, capture_output=True, text=True, timeout=120,
                         env={**os.environ, **w.env()})
    assert got.returncode == 0, f"{argv}: exit {got.returncode}: {got.stderr}"
    return got


def cli_hidden(w: World, *args: str) -> str:
    return run_hidden(w, sys.executable, "-m", "virt_forward", *args).stdout


def hook_hidden(w: World, domain: str, op: str = "start", sub: str = "begin") -> None:
    from vflab.lab import domain_xml
    run_hidden(w, str(w.hook_path), domain, op, sub, "-", stdin=domain_xml(domain))


def wait_until(what: str, observe: Callable[[], T], ok: Callable[[T], object] = bool, timeout: float = 30.0) -> T:
    return netns_util.wait_until(observe, ok, timeout=timeout, what=what)


def listening(pid: int) -> bool:
    """Has process `pid` a NETLINK_NETFILTER socket (12) in group NFNLGRP_NFTABLES (7, bit 6)?
    /proc/PID/net/netlink: sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode."""
    try:
        sockets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        rows = Path(f"/proc/{pid}/net/netlink").read_text().splitlines()[1:]
    except OSError:  # gone meanwhile
        return False
    return any(len(c) >= 10 and c[1] == "12" and int(c[3], 16) & (1 << 6) and f"socket:[{c[9]}]" in sockets
               for c in map(str.split, rows))


def monitor_children(pid: int) -> list[int]:
    """The `nft monitor` processes among the children of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
            if not stat or stat[stat.rindex(")") + 2:].split()[1] != str(pid):
                continue
            if Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[:2][-1:] == [b"monitor"]:
                found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


class HiddenWatcher:
    """`virt-forward watch` in the lab host with /etc/protocols hidden; its log collected."""

    def __init__(self, w: World) -> None:
        # `ip netns exec`, `unshare` and `sh` each exec the next: the pid is the watcher's
        self.proc = subprocess.Popen(hidden(w, sys.executable, "-m", "virt_forward", "watch", "--interval", "30"),
                                     env={**os.environ, **w.env()}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        import threading
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def listening(self) -> bool:
        assert self.proc.poll() is None, "\n".join(self.lines)
        return any(listening(pid) for pid in monitor_children(self.proc.pid))

    def count(self, text: str) -> int:
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
        w.guest_file("guest1", 'address = "192.168.122.10"\nports = ["80", "2222:22", "8001:9001/udp"]\n')
        w.guest_file("guest2", 'address = "192.168.122.11"\nports = ["443", "17:22"]\n')
        yield w
    assert Path("/etc/protocols").stat().st_size > 0 or not Path("/etc/protocols").exists()


def assert_all_live(w: World, status: str, prometheus: str) -> None:
    rows = [ln for ln in status.splitlines() if ln.startswith("  ") and "->" in ln]
    assert len(rows) == 5 and all(ln.split()[-1] == "live" or " live " in ln for ln in rows), status
    assert "MISSING" not in status and "rules and guards: in place" in status, status
    assert "virt_forward_rules_in_place 1" in prometheus, prometheus
    live = [ln for ln in prometheus.splitlines() if ln.startswith("virt_forward_forward_live{")]
    assert len(live) == 5 and all(ln.endswith("} 1") for ln in live), prometheus


@pytest.mark.netns
def test_status_live_and_no_drift_with_protocols_hidden(world: World) -> None:
    w = world
    hook_hidden(w, "guest1")
    hook_hidden(w, "guest2")
    # what the host sees: nft prints protocols by number there, and only there
    nft_exe = shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin")
    assert nft_exe is not None
    assert " . 6 . 80 " in run_hidden(w, nft_exe, "list", "table", "inet", "virt_forward").stdout
    assert " . tcp . 80 " in w.nft("list", "table", "inet", "virt_forward").stdout
    assert_all_live(w, cli_hidden(w, "status"), cli_hidden(w, "status", "--format", "prometheus"))
    assert json.loads(cli_hidden(w, "status", "--format", "json"))["problems"] == []
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"


@pytest.mark.netns
def test_watcher_with_protocols_hidden_repairs_nothing(world: World) -> None:
    """The watcher's first check and the check after a guest's start find nothing to repair;
    the one real fault (our table deleted) is repaired once, and converges."""
    w = world
    hook_hidden(w, "guest1")
    watcher = HiddenWatcher(w)
    try:
        wait_until("the watcher's nft monitor listening", watcher.listening)
        hook_hidden(w, "guest2")  # wakes it: a check with both guests' forwards live
        w.nft("delete", "table", "inet", "virt_forward")  # then a real fault, to repair once
        wait_until("the repair of the deleted table", lambda: watcher.count("repairing:"))
        wait_until("guest1's forward back", lambda: w.probe("tcp", PUBLIC4, 80, timeout=0.5),
                   lambda got: got == f"guest1:80 from {CLIENT4}")
        assert_all_live(w, cli_hidden(w, "status"), cli_hidden(w, "status", "--format", "prometheus"))
    finally:
        log = watcher.stop()
    repairs = [ln for ln in log.splitlines() if "repairing:" in ln]
    assert len(repairs) == 1 and "table inet virt_forward is gone" in repairs[0], log
    assert "repair did not fix" not in log and metrics.read_repairs(w.state).count == 1, log
