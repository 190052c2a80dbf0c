"""doctor: pure verdicts from made-up facts, and one run on a lab host."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from virt_forward.doctor import FAIL, OK, SKIP, WARN, Facts, diagnose
from virt_forward.plan import Forward, GuestPlan

PUB = ipaddress.ip_address("198.51.100.1")
G = ipaddress.ip_address("192.168.122.10")
PLAN = GuestPlan("web", (Forward(4, "tcp", 80, PUB, G, 80), Forward(4, "udp", 53, None, G, 53)))
GOOD = Facts(
    sysctl={"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "2"},
    local_addresses=frozenset({PUB}), listening=frozenset({("tcp", 22)}),
    networks={"default": (ipaddress.ip_network("192.168.122.0/24"),)}, plans=(PLAN,), config_errors=(),
    firewall_problems=(), applied=frozenset({"web"}), docker_drop=False, firewalld_strict=None,
    hook_path="/etc/libvirt/hooks/qemu.d/virt-forward", hook_installed=True, hook_mtime=100.0,
    daemon_started=200.0, nft_installed=True)


def levels(facts: Facts) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in diagnose(facts):
        out.setdefault(v.check, []).append(v.level)
    return out


def test_a_healthy_host_has_no_failure() -> None:
    got = levels(GOOD)
    assert all(FAIL not in lv for lv in got.values()), got
    assert got["ip_forward"] == [OK] and got["hook"] == [OK] and got["live rules"] == [OK]


@pytest.mark.parametrize("change, check, level, words", [
    ({"sysctl": {"net.ipv4.ip_forward": "0"}}, "ip_forward", FAIL, "sysctl -w net.ipv4.ip_forward=1"),
    ({"local_addresses": frozenset()}, "public address", FAIL, "198.51.100.1 is not on any interface"),
    ({"listening": frozenset({("tcp", 80)})}, "host listener", WARN, "80/tcp"),
    ({"networks": {"other": (ipaddress.ip_network("10.0.0.0/8"),)}}, "guest address", FAIL, "in no libvirt network"),
    ({"networks": {}}, "guest address", SKIP, "no libvirt network"),
    ({"firewall_problems": ("guard not on top of iptables FORWARD",)}, "live rules", FAIL, "virt-forward reconcile"),
    ({"firewalld_strict": True}, "firewalld", FAIL, "StrictForwardPorts"),
    ({"sysctl": {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.rp_filter": "1"}}, "rp_filter", WARN, "loose"),
    ({"sysctl": {"net.ipv4.ip_forward": "1", "net.bridge.bridge-nf-call-iptables": "1"}}, "br_netfilter", OK,
     "the hook sets it"),
    ({"sysctl": {"net.ipv4.ip_forward": "1", "net.bridge.bridge-nf-call-iptables": "1"}, "hairpin": False},
     "br_netfilter", WARN, "hairpin = true in config.toml"),
    ({"hook_installed": False}, "hook", FAIL, "virt-forward install"),
    ({"hook_installed": False, "packaged": True}, "hook", FAIL, "apt install --reinstall virt-forward"),
    ({"hook_problem": "/x: exit 1", "packaged": True}, "hook", FAIL, "apt install --reinstall virt-forward"),
    ({"hook_mtime": 300.0}, "hook", FAIL, "restart libvirtd"),
    ({"hook_problem": "/x: its interpreter /opt/vf/bin/python is gone"}, "hook", FAIL, "virt-forward install"),
    ({"unit_problems": ("/etc/systemd/system/virt-forward-watch.service: its interpreter /x is gone",)}, "units",
     FAIL, "virt-forward install"),
    ({"daemon_started": None}, "hook", WARN, "no libvirtd"),
    ({"config_errors": ("/etc/virt-forward/guests/a.toml:2: ports: bad",)}, "config", FAIL, "a.toml:2"),
    ({"nft_installed": False}, "nftables", FAIL, "apt-get install nftables"),
    ({"conntrack_installed": False}, "conntrack", FAIL, "-- fix: apt-get install conntrack"),
    ({"docker_drop": True}, "docker", OK, "policy is DROP"),
])
def test_each_classic_cause(change: dict[str, object], check: str, level: str, words: str) -> None:
    verdicts = [v for v in diagnose(replace(GOOD, **change)) if v.check == check]  # type: ignore[arg-type]
    assert [v.level for v in verdicts] == [level], verdicts
    assert words in verdicts[0].line()


def test_ipv6_forwarding_only_checked_with_ipv6_forwards() -> None:
    assert "net.ipv6" not in " ".join(v.line() for v in diagnose(GOOD))
    v6 = GuestPlan("v6", (Forward(6, "tcp", 80, None, ipaddress.ip_address("fd00::2"), 80),))
    got = [v for v in diagnose(replace(GOOD, plans=(v6,), networks={})) if v.check == "ip_forward"]
    assert [v.level for v in got] == [FAIL] and "net.ipv6.conf.all.forwarding" in got[0].message


@pytest.mark.netns
def test_doctor_on_a_lab_host(tmp_path: Path) -> None:
    from netns_util import make_world
    w, lab = make_world()
    try:
        w.write("guests/guest1.toml", 'address = "192.168.122.10"\npublic = "198.51.100.1"\nports = ["80"]\n')
        w.write("guests/guest2.toml", 'address = "10.9.9.9"\npublic = "203.0.113.77"\nports = ["81"]\n')
        lv = tmp_path / "libvirt"
        (lv / "qemu/networks").mkdir(parents=True)
        (lv / "qemu/networks/default.xml").write_text(
            "<network><name>default</name><ip address='192.168.122.1' netmask='255.255.255.0'/></network>")
        args = ["doctor", "--libvirt-dir", str(lv)]
        r = w.cli(*args, check=False)
        assert r.returncode == 1
        out = r.stdout
        assert "ok   ip_forward: net.ipv4.ip_forward = 1" in out
        assert "FAIL public address: 203.0.113.77 is not on any interface" in out
        assert "FAIL guest address: guest2: 10.9.9.9 is in no libvirt network (default)" in out
        assert "FAIL hook:" in out
        (w.cfg / "guests/guest2.toml").unlink()
        assert w.hook("guest1", "start").returncode == 0
        w.lab.sh(w.lab.host, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        w.lab.sh(w.lab.host, "iptables", "-w", "-I", "FORWARD", "1", "-j", "LIBVIRT_FWI")
        out = w.cli(*args, check=False).stdout
        assert "FAIL ip_forward: net.ipv4.ip_forward = 0" in out
        assert "FAIL live rules: guard not on top of iptables FORWARD" in out
    finally:
        lab.close()
        shutil.rmtree(w.root, ignore_errors=True)


@pytest.mark.netns
def test_doctor_fails_where_conntrack_is_missing(cdir: Path, tmp_path: Path) -> None:
    """A venv install may lack conntrack (the .deb depends on it): doctor must say so, with the fix.
    Hidden by a bind mount of /dev/null (not executable) in a mount namespace of the test's own,
    and run in a network namespace of its own (doctor reads the firewall)."""
    from virt_forward.runner import which
    found = which("conntrack")
    if found is None or shutil.which("unshare") is None:
        pytest.skip("needs conntrack and unshare to hide it")
    args = ["-m", "virt_forward", "--config-dir", str(cdir), "--state-dir", str(tmp_path / "state"), "doctor",
            "--libvirt-dir", str(tmp_path / "libvirt")]

    def doctor(hide: bool) -> subprocess.CompletedProcess[str]:
        script = (f"mount --bind /dev/null {os.path.realpath(found)} && " if hide else "") + 'exec "$@"'
        return subprocess.run(["unshare", "--mount", "--net", "sh", "-c", script, "sh", sys.executable, *args],
                              capture_output=True, text=True, timeout=120)

    hidden = doctor(hide=True)
    assert hidden.returncode == 1, hidden.stderr
    assert ("FAIL conntrack: the conntrack command is missing: the flows of a forward that was removed or now leads "
            "elsewhere keep reaching the old guest (a steady UDP sender for ever) -- fix: apt-get install conntrack"
            in hidden.stdout.splitlines()), hidden.stdout
    assert "ok   conntrack: conntrack is installed" in doctor(hide=False).stdout.splitlines()
