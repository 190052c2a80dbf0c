"""Field tier, the README's other install: a venv, `pip install`, `virt-forward install`.

A fresh system per Debian release, run by systemd; the same life as the apt path (guests
running before the install, a libvirt restart, a firewall flush, a reboot) and `uninstall`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from field.admin import System, booted, one_set, our_rules, qemu_pids, report, restart_libvirt

pytestmark = pytest.mark.field

VENV = "/opt/virt-forward"
SYSTEMS = [pytest.param(("debian12-venv", "bookworm", False), id="debian12"),
           pytest.param(("debian13-venv", "trixie", False), id="debian13")]


@pytest.fixture(scope="module", params=SYSTEMS)
def system(request: pytest.FixtureRequest, wheels: list[Path],
           guest_files: tuple[Path, Path]) -> Iterator[System]:
    name, suite, nft_backend = request.param
    with booted(name, suite, nft_backend, guest_files, {f"/root/wheels/{w.name}": w for w in wheels}) as s:
        yield s


def test_venv_install_on_a_host_with_a_running_guest(system: System) -> None:
    c = system.c
    system.start_guest("vfguest1")
    t0 = time.monotonic()
    # the README's recipe, with PyPI replaced by the files fetched outside
    c.run(f"python3 -m venv {VENV} && {VENV}/bin/pip install -q --no-index --find-links /root/wheels"
          f" \"$(ls /root/wheels/virt_forward-*.whl)[libvirt]\"", timeout=300)
    c.run(f"ln -sf {VENV}/bin/virt-forward /usr/local/sbin/virt-forward")
    out = c.run("virt-forward install 2>&1").stdout
    report(system.name, "venv + pip install + virt-forward install (s)", round(time.monotonic() - t0, 1))
    assert "checked: the hooks run as libvirt runs them" in out, out
    first = c.run("head -n1 /etc/libvirt/hooks/qemu.d/virt-forward").stdout.strip()
    assert first.startswith(f"#!{VENV}/bin/python"), first
    assert c.run("systemctl is-active virt-forward-watch").stdout.strip() == "active"
    assert c.run("systemctl is-enabled virt-forward-reconcile").stdout.strip() == "enabled"
    c.wait_http(8080, "guest=vfguest1 port=80", limit=60)
    report(system.name, "install started to forward answering (s)", round(time.monotonic() - t0, 1))


def test_libvirt_restart_then_the_hook_forwards_a_new_guest(system: System) -> None:
    c = system.c
    pids = qemu_pids(c)
    before = one_set(c)
    restart_libvirt(c)
    c.run("for i in $(seq 100); do virsh -q list >/dev/null 2>&1 && break; sleep 0.1; done")
    assert qemu_pids(c) == pids
    system.start_guest("vfguest2")
    c.wait_http(8081, "guest=vfguest2 port=80", limit=90)
    c.wait_http(8080, "guest=vfguest1 port=80", limit=5)
    assert one_set(c) == before
    doctor = c.run("virt-forward doctor 2>&1", check=False)
    assert doctor.returncode == 0, doctor.stdout


def test_firewall_flush_is_repaired_by_the_watcher(system: System) -> None:
    c = system.c
    t0 = time.monotonic()
    c.run("systemctl restart nftables")
    c.wait_http(8080, "guest=vfguest1 port=80", limit=10)
    took = time.monotonic() - t0
    report(system.name, "nftables restart to forward answering (s)", round(took, 2))
    assert took <= 2.0
    restart_libvirt(c)  # libvirt's own rules back (the flush took them)
    c.wait_http(8081, "guest=vfguest2 port=80", limit=5)


def test_reboot_with_an_autostart_guest(system: System) -> None:
    c = system.c
    c.run("virsh autostart vfguest1")
    c.reboot()
    c.wait_http(8080, "guest=vfguest1 port=80", limit=180)
    answered = time.monotonic()
    report(system.name, "boot to forward answering (s)", round(answered - c.boots[-1], 1))
    report(system.name, "libvirt started to forward answering (s, guest boot included)",
           round(answered - c.mono("libvirtd", "ActiveEnterTimestampMonotonic"), 1))
    assert one_set(c)[0] == 1


def test_uninstall_leaves_nothing_and_guests_run_on(system: System) -> None:
    c = system.c
    system.start_guest("vfguest2")
    pids = qemu_pids(c)
    c.run("virt-forward uninstall 2>&1")
    assert our_rules(c) == []
    for path in ("/etc/libvirt/hooks/qemu.d/virt-forward", "/etc/libvirt/hooks/network.d/virt-forward",
                 "/etc/systemd/system/virt-forward-watch.service",
                 "/etc/systemd/system/virt-forward-reconcile.service"):
        assert c.run(f"test -e {path}", check=False).returncode != 0, f"{path} left after uninstall"
    assert c.run("systemctl is-active virt-forward-watch", check=False).stdout.strip() != "active"
    assert qemu_pids(c) == pids
