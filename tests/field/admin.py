"""What the field tests do to a system, as an admin would: guests, restarts, checks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

from field.container import PUBLIC4, Container, FieldUnavailable, build_root, cleanup_stale  # noqa: E402
from lab_guests import default_guests, domain_xml, network_xml  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BOOT_DIR = "/var/lib/libvirt/boot"
GUESTS = {g.name: g for g in default_guests(2)}
PORTS = {"vfguest1": 8080, "vfguest2": 8081}
# a second forward per guest, to its TCP greeter (build_guest.sh: port 9000, no fork per
# connection), for the load generator
LOAD_PORTS = {"vfguest1": 9000, "vfguest2": 9001}
# what postinst says on a first install only
FIRST_INSTALL_NOTE = "restart libvirtd"
# The second build's code differs from the first's: its watcher says this when it starts
# (watch.py, changed in a copy of the tree: conftest.second_tree), so the upgrade test can tell
# which code the running watcher has, beyond the version the package's files say.
UPGRADE_MARK = "field-upgrade: second build"


def report(system: str, what: str, value: object) -> None:
    line = json.dumps({"system": system, "what": what, "value": value})
    print(f"FIELD {line}")
    path = os.environ.get("FIELD_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")


# --------------------------------------------------------------------------- a system


def restart_libvirt(c: Container) -> str:
    """Restart whatever libvirt daemons the system runs: libvirtd, or the modular ones."""
    if c.run("systemctl is-active -q libvirtd", check=False).returncode == 0:
        units = "libvirtd"
    else:
        units = "virtqemud virtnetworkd"
    c.run(f"systemctl restart {units}")
    return units


def qemu_pids(c: Container) -> dict[str, int]:
    out = c.run("virsh -q list --name").stdout.split()
    return {name: int(c.run(f"cat /run/libvirt/qemu/{name}.pid").stdout) for name in out}


def our_rules(c: Container) -> list[str]:
    """Every line of ours in the firewall: our table and the guards in others' chains."""
    nft = c.run("nft list ruleset", check=False).stdout
    ipt = c.run("iptables-save 2>/dev/null; ip6tables-save 2>/dev/null", check=False).stdout
    lines = [line for line in nft.splitlines() if "virt_forward" in line or "virt-forward" in line]
    lines += [line for line in ipt.splitlines() if "virt-forward" in line or "VF-" in line]
    return lines


def wait_rule(c: Container, address: str, present: bool, limit: float) -> None:
    """Until a forward to `address` is (or is no longer) in our rules; `limit` 0: it must
    already be so."""
    deadline = time.monotonic() + limit
    while True:
        live = c.run("nft list table inet virt_forward 2>/dev/null; iptables-save -t nat 2>/dev/null",
                     check=False).stdout
        if (address in live) == present:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"[{c.suite}] a forward to {address} is {'not ' if present else 'still '}in our "
                                 f"rules after {limit:g} s")
        time.sleep(0.1)


def one_set(c: Container) -> tuple[int, list[str]]:
    """(tables of ours, the guard lines): after any restart there must be one table and
    the same guards as before, never a second copy."""
    tables = c.run("nft list tables").stdout.split("\n").count("table inet virt_forward")
    # a guard's counter moves with traffic; which guards, and how many, is what counts
    return tables, sorted(re.sub(r"counter packets \d+ bytes \d+", "counter", line)
                          for line in our_rules(c) if "guard" in line)


def table_and_guards(c: Container) -> tuple[int | None, list[str]]:
    """Our table's nft handle and every guard as "TABLE CHAIN #POSITION handle H" (iptables-nft
    shows its rules to nft too): a table or guard deleted and made again gets a new handle."""
    table_handle: int | None = None
    guards: list[str] = []
    table = chain = ""
    position = 0
    for line in c.run("nft -a list ruleset").stdout.splitlines():
        ln = line.strip()
        if ln.startswith("table "):
            table, chain = " ".join(ln.split()[1:3]), ""
            if table == "inet virt_forward":
                table_handle = int(ln.rsplit("# handle ", 1)[1])
        elif ln.startswith("chain "):
            chain, position = ln.split()[1], 0
        elif ln == "}":
            chain = ""
        elif chain and "# handle " in ln and not ln.startswith(("type ", "policy ")):
            # nft shows our comment; of iptables-nft's guard only its conntrack/connmark matches
            if table != "inet virt_forward" and ("virt-forward:guard" in ln or (
                    "ct status dnat" in ln and "0x10000000" in ln and ln.split("# handle")[0].strip().endswith("accept"))):
                guards.append(f"{table} {chain} #{position} handle {ln.rsplit('# handle ', 1)[1]}")
            position += 1
    return table_handle, sorted(guards)


# One process in the client namespace making connections through the forwards without a
# pause, `workers` at a time, until its stdin closes; then one line per connection: its start,
# its end (time.monotonic(): CLOCK_MONOTONIC, the same clock as the test's and the
# container's) and "" or what went wrong.  "ready" once a first connection succeeded.  Each
# connection reads what the server says until it closes (the guests' greeter: "NAME\n"); the
# answer must be exactly `want`.
LOADGEN = r"""
import socket, sys, threading, time
host, workers = sys.argv[1], int(sys.argv[2])
targets = [(int(a.split(":", 1)[0]), a.split(":", 1)[1].encode()) for a in sys.argv[3:]]
stop = threading.Event()
results = []
def one(port, want):
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.settimeout(2)
            data = b""
            while True:
                b = s.recv(4096)
                if not b:
                    break
                data += b
        err = "" if data.strip() == want else "port %d: answer %r" % (port, data[-80:])
    except OSError as e:
        err = "port %d: %s %s" % (port, type(e).__name__, e)
    results.append((t0, time.monotonic(), err.replace("\n", " ")))
def work(i):
    n = i
    while not stop.is_set():
        one(*targets[n % len(targets)])
        n += 1
threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
for t in threads:
    t.start()
deadline = time.monotonic() + 60
while not any(not r[2] for r in results) and time.monotonic() < deadline:
    time.sleep(0.01)
print("ready" if any(not r[2] for r in results) else "never ready", flush=True)
sys.stdin.read()
stop.set()
for t in threads:
    t.join()
for t0, t1, err in results:
    print("%.4f %.4f %s" % (t0, t1, err))
"""


@dataclass(frozen=True)
class Connection:
    start: float
    end: float
    error: str


class Load:
    """LOADGEN running in the container's client namespace."""

    def __init__(self, c: Container, targets: dict[int, str], workers: int = 4) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", c.client_ns, sys.executable, "-I", "-S", "-c", LOADGEN, PUBLIC4, str(workers),
             *(f"{port}:{want}" for port, want in targets.items())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 90)
        first = self.proc.stdout.readline().strip() if ready else "no line within 90 s"
        if first != "ready":
            self.proc.kill()
            raise AssertionError(f"the load generator did not get a first answer: {first}")

    def stop(self) -> list[Connection]:
        out, _ = self.proc.communicate(input="", timeout=60)
        return [Connection(float(a), float(b), err) for a, b, err in
                (ln.split(" ", 2) if ln.count(" ") >= 2 else [*ln.split(" ", 1), ""] for ln in out.splitlines())]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class System:
    def __init__(self, name: str, c: Container) -> None:
        self.name = name
        self.c = c
        self.failed = False

    def start_guest(self, name: str) -> None:
        self.c.run(f"virsh start {name}")


def _provision(c: Container, kernel: Path, initrd: Path) -> None:
    c.put(f"{BOOT_DIR}/vf-guest.vmlinuz", kernel.read_bytes())
    c.put(f"{BOOT_DIR}/vf-guest.initrd", initrd.read_bytes())
    c.put("/root/net.xml", network_xml(True))
    for name, spec in GUESTS.items():
        c.put(f"/root/{name}.xml", domain_xml(spec, Path(f"{BOOT_DIR}/vf-guest.vmlinuz"),
                                                Path(f"{BOOT_DIR}/vf-guest.initrd"),
                                                f"/var/log/libvirt/qemu/{name}.console", "qemu"))
    c.run("cd /root && virsh net-define net.xml && virsh net-autostart default && virsh net-start default"
          " && virsh define vfguest1.xml && virsh define vfguest2.xml")
    # what the admin writes before installing: one file per guest
    for name, spec in GUESTS.items():
        c.put(f"/etc/virt-forward/guests/{name}.toml",
              f'address = "{spec.ip}"\nports = ["{PORTS[name]}:80", "{LOAD_PORTS[name]}:9000"]\n')




@contextlib.contextmanager
def booted(name: str, suite: str, nft_backend: bool, guest_files: tuple[Path, Path],
           files: dict[str, Path]) -> Iterator[System]:
    """A freshly booted system with libvirt's network and two guests defined (not started),
    their virt-forward files written, and `files` copied in."""
    cleanup_stale()
    try:
        root = build_root(suite)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"cannot build the {suite} root file system: {exc}")
    try:
        with Container(suite, root, libvirt_nftables=nft_backend) as c:
            _provision(c, *guest_files)
            for dest, src in files.items():
                c.put(dest, src.read_bytes())
            yield System(name, c)
    except FieldUnavailable as exc:
        pytest.skip(str(exc))
