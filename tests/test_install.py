"""install writes hooks that work under libvirt's bare PATH; uninstall removes them and every rule."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

from netns_util import World, lab_world
from vflab.lab import CLIENT4, PUBLIC4, domain_xml


@pytest.fixture
def world() -> Iterator[World]:
    with lab_world() as w:
        yield w


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    import subprocess
    r = subprocess.run([sys.executable, "-m", "virt_forward", "install", "--dry-run", "--root", str(tmp_path)],
                       capture_output=True, text=True, check=True)
    assert "would write" in r.stdout and "qemu.d/virt-forward" in r.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.netns
def test_installed_hook_works_with_libvirts_bare_path_and_uninstall_removes_all(world: World) -> None:
    w = world
    root = w.root / "fsroot"
    env = {**os.environ, "VIRT_FORWARD_STATE_DIR": str(w.state)}
    r = w.lab.sh(None, sys.executable, "-m", "virt_forward", "install", "--root", str(root), env=env)
    assert "restart" in r.stdout
    cfg = root / "etc/virt-forward"
    assert (cfg / "config.toml").read_text().startswith("# virt-forward host settings")
    assert (cfg / "guests/example.toml.sample").exists()
    hook = root / "etc/libvirt/hooks/qemu.d/virt-forward"
    assert os.stat(hook).st_mode & 0o777 == 0o755
    assert (root / "etc/systemd/system/virt-forward-watch.service").read_text().count("ExecStart=/") == 1

    (cfg / "guests/guest1.toml").write_text(f'address = "192.168.122.10"\npublic = "{PUBLIC4}"\nports = ["80"]\n')
    (cfg / "guests/guest1.toml").chmod(0o644)
    bare = {"PATH": "/bin:/usr/bin", "VIRT_FORWARD_CONFIG_DIR": str(cfg), "VIRT_FORWARD_STATE_DIR": str(w.state)}
    r = w.lab.sh(w.lab.host, str(hook), "guest1", "start", "begin", "-", stdin=domain_xml("guest1"), env=bare)
    assert r.stdout == ""
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    # the network hook: libvirt restarted a network and re-inserted its jumps above our guard
    for chain in ("LIBVIRT_FWO", "LIBVIRT_FWI", "LIBVIRT_FWX"):
        w.lab.sh(w.lab.host, "iptables", "-w", "-I", "FORWARD", "1", "-j", chain)
    assert w.probe("tcp", PUBLIC4, 80).startswith("ERR")
    net_hook = root / "etc/libvirt/hooks/network.d/virt-forward"
    w.lab.sh(w.lab.host, str(net_hook), "default", "started", "begin", "-", stdin="<network/>", env=bare)
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    rules = w.forward_chain()
    assert "virt-forward:guard" in rules[1] and sum("virt-forward" in r for r in rules) == 1, rules

    # the watcher's metrics file goes too (node_exporter would serve its last values for ever)
    prom = root / "var/lib/prometheus/node-exporter/virt_forward.prom"
    prom.parent.mkdir(parents=True)
    prom.write_text("virt_forward_rules_in_place 1\n")
    with open(cfg / "config.toml", "a") as fh:
        fh.write('metrics_file = "/var/lib/prometheus/node-exporter/virt_forward.prom"\n')
    r = w.lab.sh(w.lab.host, sys.executable, "-m", "virt_forward", "--config-dir", str(cfg), "uninstall",
                 "--root", str(root), env=env)
    assert f"removed {prom}" in r.stdout and not prom.exists(), r.stdout
    assert not hook.exists() and not net_hook.exists()
    assert not (root / "etc/systemd/system/virt-forward-watch.service").exists()
    assert (cfg / "guests/guest1.toml").exists()  # the admin's config stays
    assert w.elements() == {} and w.no_guards()
    assert w.probe("tcp", PUBLIC4, 80).startswith("ERR")
