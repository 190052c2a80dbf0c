"""The demo (`python -m vflab`, run by scripts/demo.sh): the whole product in throw-away
namespaces, no libvirt needed.

A host with a libvirt-like NAT network (and libvirt 9.0's reject rules), a guest
with small servers, an outside client.  The hook is called exactly as libvirt
calls it: the script with argv, the domain XML on stdin, PATH=/bin:/usr/bin.
Everything made here is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from vflab.lab import CLIENT4, PUBLIC4, PUBLIC6, Lab, domain_xml, install_hooks

GUEST_TOML = """\
# /etc/virt-forward/guests/guest1.toml (here in a temp dir)
address = ["192.168.122.10", "fd00:122::a"]
public  = ["{public4}", "{public6}"]
ports   = ["80", "2222:22", "8000-8002:9000-9002/udp"]
"""


def _say(text: str) -> None:
    print(text, flush=True)


def _step(title: str) -> None:
    _say(f"\n== {title}")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo() -> int:
    if os.geteuid() != 0:
        print("demo: needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    for tool in ("nft", "ip"):
        if shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
            print(f"demo: {tool} is not installed (apt-get install nftables iproute2)", file=sys.stderr)
            return 1
    signal.signal(signal.SIGTERM, _interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="virt-forward-demo-"))
    lab = Lab(guests=1)
    ok = False
    try:
        tmp.chmod(0o755)
        ok = _demo(lab, tmp)
    except KeyboardInterrupt:
        _say("\ninterrupted")
    finally:
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
        left = [ns for ns in lab.namespaces]
        _say(f"\ncleaned up: namespaces and {tmp} removed{'' if not left else ' (left: ' + ', '.join(left) + ')'}")
    return 0 if ok else 1


def _demo(lab: Lab, tmp: Path) -> bool:
    cfg, state = tmp / "etc" / "virt-forward", tmp / "run" / "virt-forward"
    (cfg / "guests").mkdir(parents=True)
    for d in (tmp / "etc", cfg, cfg / "guests"):
        d.chmod(0o755)
    hook = install_hooks(tmp, cfg, state)  # what `virt-forward install` writes, checked as it does
    guest_file = cfg / "guests" / "guest1.toml"
    guest_file.write_text(GUEST_TOML.format(public4=PUBLIC4, public6=PUBLIC6))
    guest_file.chmod(0o644)
    env = {"PATH": "/bin:/usr/bin", "VIRT_FORWARD_CONFIG_DIR": str(cfg), "VIRT_FORWARD_STATE_DIR": str(state)}

    _step("a hypervisor in namespaces")
    lab.start()
    _say(f"host {lab.host}: public {PUBLIC4} / {PUBLIC6}, NAT network virbr0 192.168.122.0/24 "
         "with libvirt 9.0's iptables rules (LIBVIRT_FWI ends in REJECT)")
    _say(f"guest1 {lab.members[0].ns}: 192.168.122.10, servers on tcp 22, 80, 3306 and udp 9000-9002")
    _say(f"client {lab.client}: {CLIENT4}")
    _say(guest_file.read_text().rstrip())

    def probe(label: str, proto: str, addr: str, port: int, ns: str | None = None) -> str:
        reply = lab.probe(ns or lab.client, proto, addr, port, timeout=1.5)
        _say(f"  {label:<44} {reply}")
        return reply

    def hook_call(op: str, sub: str) -> None:
        t0 = time.perf_counter()
        r = lab.sh(lab.host, str(hook), "guest1", op, sub, "-", stdin=domain_xml("guest1"), env=env, check=False)
        ms = (time.perf_counter() - t0) * 1000
        _say(f"$ {hook.name} guest1 {op} {sub} -   < domain.xml    (exit {r.returncode}, {ms:.0f} ms)")
        for line in r.stderr.splitlines():
            _say(f"  {line}")
        if r.returncode != 0:
            raise RuntimeError(f"hook {op} failed")

    _step("before: libvirt rejects new connections to its guests")
    before = probe(f"client -> {PUBLIC4}:80/tcp", "tcp", PUBLIC4, 80)

    _step("the guest starts: libvirt calls the qemu hook")
    for op in ("prepare", "start", "started"):
        hook_call(op, "begin")

    _step("forwards work; other ports and direct routes stay closed")
    results = [
        probe(f"client -> {PUBLIC4}:80/tcp", "tcp", PUBLIC4, 80),
        probe(f"client -> {PUBLIC4}:2222/tcp", "tcp", PUBLIC4, 2222),
        probe(f"client -> {PUBLIC4}:8001/udp", "udp", PUBLIC4, 8001),
        probe(f"client -> [{PUBLIC6}]:80/tcp", "tcp", PUBLIC6, 80),
        probe(f"host itself -> {PUBLIC4}:80/tcp (hairpin)", "tcp", PUBLIC4, 80, ns=lab.host),
    ]
    lab.sh(lab.client, "ip", "route", "add", "192.168.122.0/24", "via", PUBLIC4)
    closed = [
        probe(f"client -> {PUBLIC4}:3306/tcp (not forwarded)", "tcp", PUBLIC4, 3306),
        probe("client -> 192.168.122.10:3306 (routed)", "tcp", "192.168.122.10", 3306),
        probe("client -> 192.168.122.10:80 (routed)", "tcp", "192.168.122.10", 80),
    ]

    _step("virt-forward status")
    st = lab.sh(lab.host, sys.executable, "-m", "virt_forward", "status", env={**os.environ, **env}, check=False)
    _say(st.stdout.rstrip())
    for name in ("dnat4", "dnat6"):
        _say(f"\n$ nft list map inet virt_forward {name}   (one hash lookup per NEW connection)")
        listing = lab.sh(lab.host, "nft", "list", "map", "inet", "virt_forward", name).stdout
        for line in listing.splitlines():
            if "elements" in line or (" : " in line and "type" not in line):
                _say("  " + line.strip())
    _say("\n$ iptables -S FORWARD   (our guard on top of libvirt's jumps)")
    for line in lab.sh(lab.host, "iptables", "-S", "FORWARD").stdout.splitlines():
        _say("  " + line)

    _step("the guest stops")
    hook_call("stopped", "end")
    hook_call("release", "end")
    after = probe(f"client -> {PUBLIC4}:80/tcp", "tcp", PUBLIC4, 80)
    gone = subprocess.run(["ip", "netns", "exec", lab.host, "nft", "list", "table", "inet", "virt_forward"],
                          capture_output=True).returncode != 0
    _say(f"  table inet virt_forward removed with the last guest: {gone}")

    ok = (before.startswith("ERR") and all(r.startswith("guest1:") for r in results)
          and all(r.startswith("ERR") for r in closed) and after.startswith("ERR") and gone)
    _step("result: " + ("every check passed" if ok else "SOMETHING FAILED (see above)"))
    return ok
