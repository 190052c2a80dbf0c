"""Flows of a removed or re-pointed forward end with it (their conntrack entries are deleted).

Without that, a sender that never pauses (WireGuard, DNS, game servers) keeps its
conntrack entry alive and keeps reaching the old target long after the forward is gone.
Real UDP and TCP from the client namespace; `conntrack` must be installed (setup.sh does).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

import pytest

from netns_util import World, lab_world
from vflab.lab import CLIENT4, PUBLIC4

pytestmark = pytest.mark.netns

G1, G2 = "192.168.122.10", "192.168.122.11"

# One UDP socket (one 5-tuple: one conntrack entry) sending every 50 ms.  Each reply is printed
# as "reply <its time> <reply>"; a line on stdin is the test's mark ("rm returned"), printed as
# "mark <its time>" at once, and the sender goes on for `after` seconds more, then exits.  Every
# time is the sender's own clock (time.monotonic() in this process): what a late reply is late
# against is the moment the mark reached the sender, never a guess of when the sender started.
SENDER = r"""
import socket, sys, threading, time
addr, port, after = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 40123))
s.settimeout(0.05)
marked = []
def wait_mark():
    sys.stdin.readline()
    marked.append(time.monotonic())
    print(f"mark {marked[0]:.3f}", flush=True)
threading.Thread(target=wait_mark, daemon=True).start()
limit = time.monotonic() + 60  # the test marks long before; never outlive a crashed test
while time.monotonic() < (marked[0] + after if marked else limit):
    s.sendto(b"ping", (addr, port))
    try:
        data = s.recv(200)
        print(f"reply {time.monotonic():.3f} {data.decode().strip()}", flush=True)
    except OSError:
        pass
    time.sleep(0.05)
"""


def _wait_until(cond: Callable[[], bool], limit: float, what: str, seen: list[str]) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"{what} within {limit:g} s: {seen[-5:]}"
        time.sleep(0.02)


class Sender:
    """SENDER in the client namespace; its lines are collected as they come."""

    def __init__(self, w: World, port: int, after: float) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", w.lab.client, sys.executable, "-I", "-c", SENDER,
                                      PUBLIC4, str(port), str(after)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def replies(self, sender: str) -> list[float]:
        """The sender's times of the replies from `sender` (e.g. "guest1:5353")."""
        return [float(ln.split()[1]) for ln in list(self.lines) if ln.startswith("reply ") and sender in ln]

    def wait_reply(self, sender: str, limit: float = 10) -> None:
        """Until a reply from `sender` came: the forward works before the change."""
        deadline = time.monotonic() + limit
        while not self.replies(sender) and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.replies(sender), f"no reply from {sender} within {limit:g} s: {self.lines[-5:]}"

    def mark(self) -> None:
        """Tell the sender that the change has returned; it notes the moment on its clock."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("mark\n")
        self.proc.stdin.flush()

    def finish(self) -> float:
        """Wait for the sender to end; the mark's time on its clock."""
        self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        marks = [float(ln.split()[1]) for ln in self.lines if ln.startswith("mark ")]
        assert len(marks) == 1, self.lines[-5:]
        return marks[0]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


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
    sender = Sender(w, 5353, after=2.0)
    try:
        sender.wait_reply("guest1:5353")  # it works before
        w.cli("rm", "guest1", "5353/udp")  # edits the file and applies at once: the guest runs
        sender.mark()  # at once: the mark is at most a pipe write later than rm's return
        removed_at = sender.finish()
    finally:
        sender.kill()
    replies = sender.replies("guest1:5353")
    late = [round(t - removed_at, 3) for t in replies if t > removed_at + 1.0]
    # after the mark the sender ran 2 s, 40 sends: a reply 1 s after rm returned is a stale flow
    assert not late, f"the old guest still answered {len(late)} time(s) more than 1 s after rm returned: {late[:5]}"
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
    sender = Sender(w, 5353, after=2.0)
    try:
        sender.wait_reply("guest1:5353")
        assert w.hook("guest1", "stopped", "end").returncode == 0
        sender.mark()
        stopped_at = sender.finish()
    finally:
        sender.kill()
    late = [round(t - stopped_at, 3) for t in sender.replies("guest1:5353") if t > stopped_at + 1.0]
    assert not late, f"the stopped guest still answered {len(late)} time(s) more than 1 s after its hook returned: {late[:5]}"
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
        # one connection, a line every 100 ms, until it fails (or 60 s: a test that went wrong)
        client = subprocess.Popen(
            ["ip", "netns", "exec", w.lab.client, sys.executable, "-I", "-c",
             "import socket, sys, time\n"
             f"s = socket.create_connection(('{PUBLIC4}', 7000), timeout=2)\n"
             "f = s.makefile()\n"
             "for i in range(600):\n"
             "    try:\n"
             "        s.sendall(f'{i}\\n'.encode()); print(f.readline().strip(), flush=True)\n"
             "    except OSError as e:\n"
             "        print('ERR', type(e).__name__, flush=True); break\n"
             "    time.sleep(0.1)\n"],
            stdout=subprocess.PIPE, text=True)
        lines: list[str] = []

        def read() -> None:
            assert client.stdout is not None
            lines.extend(ln.strip() for ln in client.stdout)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            _wait_until(lambda: any(ln.startswith("guest1 ") for ln in lines), 10, "no answer from guest1", lines)
            # 7000 moves from guest1 to guest2: guest1 gives it up, guest2 takes it
            moved = len(lines)
            w.cli("rm", "guest1", "7000")
            w.cli("add", "guest2", "7000")
            # the old connection must end (its next segment finds no flow: reset or timeout, 2 s)
            _wait_until(lambda: any(not ln.startswith("guest1 ") for ln in lines[moved:]), 10,
                        "the connection to the old target went on after the forward moved", lines)
        finally:
            client.kill()
            client.wait()
            reader.join(timeout=10)
        first_other = next(i for i, ln in enumerate(lines) if not ln.startswith("guest1 "))
        assert not any(ln.startswith("guest1 ") for ln in lines[first_other:]), lines
        reply = subprocess.run(["ip", "netns", "exec", w.lab.client, sys.executable, "-c",
                                f"import socket; s = socket.create_connection(('{PUBLIC4}', 7000), timeout=2);"
                                "s.sendall(b'x\\n'); print(s.makefile().readline().strip())"],
                               capture_output=True, text=True, timeout=30)
        assert reply.stdout.strip() == "guest2 x", reply
    finally:
        for k in keepers:
            k.kill()
            k.wait()
