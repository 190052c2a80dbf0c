"""What the field tests do to a system, as an admin would: guests, restarts, checks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

from field.container import Container, FieldUnavailable, build_root, cleanup_stale  # noqa: E402
from lab_guests import default_guests, domain_xml, network_xml  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BOOT_DIR = "/var/lib/libvirt/boot"
GUESTS = {g.name: g for g in default_guests(2)}
PORTS = {"vfguest1": 8080, "vfguest2": 8081}
# what postinst says on a first install only
FIRST_INSTALL_NOTE = "restart libvirtd"


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
              f'address = "{spec.ip}"\nports = ["{PORTS[name]}:80"]\n')




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
