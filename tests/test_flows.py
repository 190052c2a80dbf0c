"""Flows of a removed or re-pointed forward end with it (their conntrack entries are deleted).

Without that, a sender that never pauses (WireGuard, DNS, game servers) keeps its
conntrack entry alive and keeps reaching the old target long after the forward is gone.
Real UDP and TCP from the client namespace; `conntrack` must be installed (setup.sh does).
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Iterator

import pytest

from netns_util import World, lab_world
from vflab.lab import CLIENT4, PUBLIC4

pytestmark = pytest.mark.netns

G1, G2 = "192.168.122.10", "192.168.122.11"

# One UDP socket (one 5-tuple: one conntrack entry) sending every 50 ms for `seconds`;
# prints "<time since start> <reply>" for each reply.
SENDER = r"""
import socket, sys, time
addr, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 40123))
s.settimeout(0.05)
t0 = time.monotonic()
while time.monotonic() - t0 < seconds:
    s.sendto(b"ping", (addr, port))
    try:
        data = s.recv(200)
        print(f"{time.monotonic() - t0:.3f} {data.decode().strip()}", flush=True)
    except OSError:
        pass
    time.sleep(0.05)
"""

# A TCP server that keeps each connection and answers every line with "<name> <line>".
KEEPER = r"""
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(8)
print("ready", flush=True)
def serve(c):
    with c:
        for line in c.makefile():
            c.sendall(f"{name} {line}".encode())
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""


@pytest.fixture
def world() -> Iterator[World]:
    if subprocess.run(["sh", "-c", "command -v conntrack || test -x /usr/sbin/conntrack"],
                      capture_output=True).returncode != 0:
        pytest.fail("conntrack is not installed: scripts/setup.sh installs it")
    with lab_world() as w:
        yield w


def test_a_removed_udp_forward_stops_reaching_the_guest_at_once(world: World) -> None:
    w = world
    w.write("config.toml", f'public = ["{PUBLIC4}"]\n')
    w.guest_file("guest1", f'address = "{G1}"\nports = ["5353/udp", "80"]\n')
    assert w.hook("guest1", "start").returncode == 0
    sender = subprocess.Popen(["ip", "netns", "exec", w.lab.client, sys.executable, "-c", SENDER, PUBLIC4, "5353",
                               "4"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    removed_at = 1.5
    w.cli("rm", "guest1", "5353/udp")  # edits the file and applies at once: the guest runs
    out, _ = sender.communicate(timeout=30)
    replies = [float(line.split()[0]) for line in out.splitlines() if "guest1:5353" in line]
    assert replies and replies[0] < 1.0, out  # it worked before
    late = [t for t in replies if t > removed_at + 1.0]
    assert not late, f"the old guest still answered {len(late)} time(s) more than 1 s after rm: {late[:5]}"
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"  # the other forward lives on


def test_a_stopped_guests_udp_flows_are_forgotten(world: World) -> None:
    """The stop (fast or full path) forgets the guest's flows too: a new guest given the same
    address later must not receive a stream meant for the old one."""
    w = world
    w.write("config.toml", f'public = ["{PUBLIC4}"]\n')
    w.guest_file("guest1", f'address = "{G1}"\nports = ["5353/udp"]\n')
    w.guest_file("guest2", f'address = "{G2}"\nports = ["443"]\n')
    for name in ("guest2", "guest1"):
        assert w.hook(name, "start").returncode == 0
    sender = subprocess.Popen(["ip", "netns", "exec", w.lab.client, sys.executable, "-c", SENDER, PUBLIC4, "5353",
                               "3.5"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert w.hook("guest1", "stopped", "end").returncode == 0
    out, _ = sender.communicate(timeout=30)
    replies = [float(line.split()[0]) for line in out.splitlines() if "guest1:5353" in line]
    assert replies and not [t for t in replies if t > 2.0], out
    flows = w.lab.sh(w.lab.host, "conntrack", "-L", "-p", "udp", "--orig-port-dst", "5353", check=False).stdout
    assert G1 not in flows, flows


def test_a_re_pointed_tcp_forward_ends_the_old_connection(world: World) -> None:
    w = world
    g1, g2 = w.lab.guest("guest1").ns, w.lab.guest("guest2").ns
    keepers = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", KEEPER, name, "7000"],
                                stdout=subprocess.PIPE, text=True) for ns, name in ((g1, "guest1"), (g2, "guest2"))]
    try:
        for k in keepers:
            assert k.stdout is not None and k.stdout.readline().strip() == "ready"
        w.write("config.toml", f'public = ["{PUBLIC4}"]\n')
        w.guest_file("guest1", f'address = "{G1}"\nports = ["7000"]\n')
        w.guest_file("guest2", f'address = "{G2}"\nports = ["443"]\n')
        for name in ("guest2", "guest1"):
            assert w.hook(name, "start").returncode == 0
        client = subprocess.Popen(
            ["ip", "netns", "exec", w.lab.client, sys.executable, "-c",
             "import socket, sys, time\n"
             f"s = socket.create_connection(('{PUBLIC4}', 7000), timeout=2)\n"
             "f = s.makefile()\n"
             "for i in range(30):\n"
             "    try:\n"
             "        s.sendall(f'{i}\\n'.encode()); print(f.readline().strip(), flush=True)\n"
             "    except OSError as e:\n"
             "        print('ERR', type(e).__name__, flush=True); break\n"
             "    time.sleep(0.1)\n"],
            stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        # 7000 moves from guest1 to guest2: guest1 gives it up, guest2 takes it
        w.cli("rm", "guest1", "7000")
        w.cli("add", "guest2", "7000")
        out, _ = client.communicate(timeout=30)
        lines = out.splitlines()
        assert any(ln.startswith("guest1 ") for ln in lines[:5]), out
        after = lines[lines.index(next(ln for ln in lines if not ln.startswith("guest1 "))):] if any(
            not ln.startswith("guest1 ") for ln in lines) else []
        assert after, f"the connection to the old target went on after the forward moved: {out}"
        assert not any(ln.startswith("guest1 ") for ln in after), out
        reply = subprocess.run(["ip", "netns", "exec", w.lab.client, sys.executable, "-c",
                                f"import socket; s = socket.create_connection(('{PUBLIC4}', 7000), timeout=2);"
                                "s.sendall(b'x\\n'); print(s.makefile().readline().strip())"],
                               capture_output=True, text=True, timeout=30)
        assert reply.stdout.strip() == "guest2 x", reply
    finally:
        for k in keepers:
            k.kill()
            k.wait()
