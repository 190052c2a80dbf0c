"""Smoke test of the e2e harness: a real libvirtd and a real guest, inside namespaces.

Runs once per libvirt firewall backend: "iptables" (the host's libvirt) and "nftables"
(libvirt >= 10.4: the host's on Debian 13, libvirt 11 from a trixie chroot on Debian 12).

Needs root.  Installs libvirt/qemu with apt if they are missing, builds the guest
into $VF_E2E_CACHE (default /var/cache/virt-forward-e2e).  Skips only when this
machine cannot run the lab at all (not root, no network namespaces, packages
not installable).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab_common import NS_PREFIX, LabUnavailable  # noqa: E402
from lab_guests import GuestSpec  # noqa: E402
from lab_probes import OutsideClient  # noqa: E402
from lab_provision import DEFAULT_CACHE_DIR, ensure_host_packages, libvirt_chroot_from_env  # noqa: E402
from libvirt_lab import LibvirtLab  # noqa: E402

pytestmark = pytest.mark.e2e


def _host_state() -> dict[str, str]:
    """The host namespace's firewall and forwarding sysctls (must not change)."""
    out: dict[str, str] = {}
    for cmd in (["iptables", "-S"], ["iptables", "-t", "nat", "-S"], ["ip6tables", "-S"]):
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=False)
        out[" ".join(cmd)] = r.stdout
    r = subprocess.run(["nft", "list", "ruleset"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       text=True, check=False)
    out["nft list ruleset"] = r.stdout
    for key in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
        out[key] = Path("/proc/sys", key).read_text().strip()
    # e.g. the chroot's proc/sys/dev or a bind over /etc/libvirt leaking out of the lab's
    # private mount namespace (/run/netns entries are namespaces, possibly other labs')
    out["lab mounts"] = "".join(ln for ln in Path("/proc/self/mountinfo").read_text().splitlines(True)
                                if ("libvirt" in ln or "vfe2e" in ln or "trixie" in ln) and "/run/netns/" not in ln)
    out["/run/libvirt"] = str(Path("/run/libvirt").exists())
    return out


@dataclass
class Setup:
    lab: LibvirtLab
    guest: GuestSpec
    host_before: dict[str, str]
    backend: str


@pytest.fixture(scope="module", params=["iptables", "nftables"])
def setup(request: pytest.FixtureRequest) -> Iterator[Setup]:
    backend: str = request.param
    if os.geteuid() != 0:
        pytest.skip("the libvirt lab needs root")
    try:
        ensure_host_packages()
    except LabUnavailable as e:
        pytest.skip(f"libvirt/qemu unavailable: {e}")
    host_before = _host_state()
    lab = LibvirtLab(os.environ.get("VF_E2E_CACHE", str(DEFAULT_CACHE_DIR)), guests=1, firewall_backend=backend,
                     libvirt_chroot=libvirt_chroot_from_env())
    try:
        lab.start()
    except LabUnavailable as e:
        lab.close()
        pytest.skip(f"cannot run the libvirt lab here: {e}")
    except BaseException:
        lab.close()
        raise
    try:
        print(f"\n[{backend}] libvirt {lab.libvirt_version} from {lab.chroot or 'the host'}: {lab.timings.values}")
        yield Setup(lab, lab.guest_specs[0], host_before, backend)
    finally:
        lab.close()


@pytest.fixture(scope="module")
def client(setup: Setup) -> OutsideClient:
    return setup.lab.add_client(route_to_guests=True)


def test_guest_answers_http_from_lab(setup: Setup) -> None:
    g = setup.guest
    assert f"guest={g.name} port=80" in setup.lab.http_get(g.ip, 80)
    assert f"guest={g.name} port=8080" in setup.lab.http_get(g.ip, 8080)


def test_guest_other_services(setup: Setup) -> None:
    g = setup.guest
    banner = setup.lab.probe_tcp(g.ip, 22, b"hello\n")
    assert banner.ok, banner
    assert banner.text.startswith(f"SSH-2.0-vfe2e {g.name}\n"), banner
    assert "hello" in banner.text
    udp = setup.lab.probe_udp(g.ip, 5353, b"ping")
    assert udp.ok, udp
    assert udp.data == f"{g.name} ping".encode()
    if g.ip6:
        assert f"guest={g.name} " in setup.lab.http_get(g.ip6, 80)


def test_libvirt_firewall_rules_in_lab(setup: Setup) -> None:
    if setup.backend == "nftables":
        ruleset = setup.lab.nft("list", "ruleset")
        assert "table ip libvirt_network" in ruleset and "table ip6 libvirt_network" in ruleset, ruleset
        assert re.search(r'oif "virbr0" counter packets \d+ bytes \d+ reject', ruleset), ruleset
        assert "masquerade" in ruleset
        assert "LIBVIRT" not in setup.lab.run(["iptables-save"], check=False).stdout
        # none of it in the host's namespace: compared with before the lab (a hypervisor, or a
        # box where libvirt ran, has libvirt's own rules there)
        assert _host_state()["nft list ruleset"] == setup.host_before["nft list ruleset"]
        return
    rules = setup.lab.run(["iptables", "-S"]).stdout
    assert "-N LIBVIRT_FWI" in rules
    assert re.search(r"^-A LIBVIRT_FWI -o virbr0 -j REJECT", rules, re.M), rules
    assert "-A FORWARD -j LIBVIRT_FWI" in rules
    nat = setup.lab.run(["iptables", "-t", "nat", "-S"]).stdout
    assert "MASQUERADE" in nat
    # ... and none of it in the host's namespace (compared with before the lab, as above)
    now = _host_state()
    assert [now[k] for k in ("iptables -S", "iptables -t nat -S")] == \
        [setup.host_before[k] for k in ("iptables -S", "iptables -t nat -S")]


def _reject_packets(lab: LibvirtLab) -> int:
    if lab.uses_nftables_backend:
        out = lab.nft("list", "chain", "ip", "libvirt_network", "guest_input")
        m = re.search(r'oif "virbr0" counter packets (\d+) bytes \d+ reject', out)
        assert m, out
        return int(m.group(1))
    out = lab.run(["iptables", "-L", "LIBVIRT_FWI", "-v", "-n", "-x"]).stdout
    for line in out.splitlines():
        f = line.split()
        if len(f) > 3 and f[2] == "REJECT" and "virbr0" in f:
            return int(f[0])
    raise AssertionError(f"no REJECT rule in LIBVIRT_FWI:\n{out}")


def test_outside_new_connection_is_rejected(setup: Setup, client: OutsideClient) -> None:
    lab, g = setup.lab, setup.guest
    # The client really is linked: the lab host's public address answers on the wire
    # (nothing listens on port 1, so the lab's own stack refuses it).
    assert client.probe_tcp(client.lab_ip, 1).status == "refused"
    before = _reject_packets(lab)
    r = client.probe_tcp(g.ip, 80, b"GET / HTTP/1.0\r\n\r\n")
    # The guest listens on 80 (see above), so a refusal can only be libvirt's REJECT.
    assert r.status == "refused", r
    assert _reject_packets(lab) > before
    u = client.probe_udp(g.ip, 5353, b"ping")
    assert u.status == "refused", u
    # From inside the lab the same port still works: the guest is fine.
    assert f"guest={g.name} " in lab.http_get(g.ip, 80)


def test_teardown_leaves_nothing(setup: Setup, client: OutsideClient) -> None:
    lab = setup.lab
    namespaces = [lab.ns, client.ns]
    lab.close()
    listed = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, text=True, check=True).stdout
    for ns in namespaces:
        assert ns not in listed
    assert not [ln for ln in listed.splitlines() if ln.startswith(f"{NS_PREFIX}{lab.token}")]
    assert not lab.workdir.exists()
    assert _host_state() == setup.host_before
