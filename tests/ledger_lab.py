"""What the ledger tests (test_ownership_property.py, test_killed_start.py) share: the engine run
in-process inside the lab host's network namespace, the kernel's forwards read back without our
own readers, the claims index read from its files, and TCP probes from the client namespace.

In-process calls cost no interpreter start, so a property test can afford thousands of
sequences; the installed hook file and the CLI still run as subprocesses for a sample.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from netns_util import World, need_root_and_tools
from vflab.lab import Lab, install_hooks

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

BLOCK_FILE = re.compile(r"[46]-(tcp|udp|sctp)-[0-9]+")
# (public address or "*", port) of an IPv4 TCP forward -> the guest address it DNATs to
Forwards = dict[tuple[str, int], str]


def _enter(ns: str) -> None:
    """Move the calling thread (only it: a network namespace is per thread) into `ns`."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


class InNetns:
    """One thread that lives in a network namespace: what it runs sees that namespace's
    firewall, and the processes it starts (nft, iptables-restore) are born there.  The
    test's own thread never leaves the initial namespace, whatever fails."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"netns-{ns}", initializer=_enter, initargs=(ns,))

    def __call__(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def capture(self, fn: Callable[[], T]) -> tuple[T, str]:
        """fn() there, with what it prints to stdout and stderr (log lines, the hook's trace)."""
        def call() -> tuple[T, str]:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                result = fn()
            return result, out.getvalue()
        return self(call)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def run_here(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """A command in the calling thread's namespace (call it through an InNetns)."""
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=60)


def nft_forwards() -> Forwards:
    """Our IPv4 DNAT elements as the kernel lists them (nft's JSON), {} without our table."""
    out = run_here("nft", "-j", "list", "table", "inet", "virt_forward")
    if out.returncode != 0:
        if "No such file or directory" in out.stderr:
            return {}
        raise AssertionError(f"nft -j list table inet virt_forward: {out.stderr.strip()}")
    found: Forwards = {}
    for item in json.loads(out.stdout)["nftables"]:
        m = item.get("map")
        if m is None or m["name"] not in ("dnat4", "dnat4_any"):
            continue
        for elem in m.get("elem", []):
            key, value = elem
            if isinstance(key, dict) and "elem" in key:  # counted elements are wrapped
                key = key["elem"]["val"]
            parts = key["concat"]
            public = parts[0] if m["name"] == "dnat4" else "*"
            assert parts[-2] == "tcp", f"a forward of protocol {parts[-2]!r} in {m['name']}: {elem}"
            found[(public, int(parts[-1]))] = value["concat"][0]
    return found


def iptables_forwards() -> Forwards:
    """Our IPv4 DNAT rules as the kernel lists them (iptables-save -t nat, chains VF-*-D)."""
    out = run_here("iptables-save", "-t", "nat")
    assert out.returncode == 0, out.stderr
    found: Forwards = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0] != "-A" or not (parts[1].startswith("VF-") and parts[1].endswith("-D")):
            continue
        if "--to-destination" not in parts:
            continue
        public = parts[parts.index("-d") + 1].split("/")[0] if "-d" in parts else "*"
        assert parts[parts.index("-p") + 1] == "tcp", line
        key = (public, int(parts[parts.index("--dport") + 1]))
        assert key not in found, f"two DNAT rules for {key}: {line}"
        found[key] = parts[parts.index("--to-destination") + 1].rpartition(":")[0]
    return found


def kernel_forwards(backend: str) -> Forwards:
    return nft_forwards() if backend == "nftables" else iptables_forwards()


def claims_index(state: Path) -> dict[tuple[str, int], str]:
    """The claims index as its files say (claims/4-tcp-<block>: "<port> <public or *> <holder>")."""
    found: dict[tuple[str, int], str] = {}
    folder = state / "claims"
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        if not BLOCK_FILE.fullmatch(path.name):  # ".total", a killed writer's "NAME.PID.tmp"
            continue
        for line in path.read_text().splitlines():
            port, public, holder = line.split(" ")
            found[(public, int(port))] = holder
    return found


def tcp_answer(addr: str, port: int, timeout: float = 2.0) -> str:
    """Who answers a TCP connection from the calling thread's namespace: the lab server's
    "<guest>:<port> from <peer>" line, or "ERR <reason>"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(200)
                if not chunk:
                    break
                data += chunk
            return data.decode().strip()
        except OSError as exc:
            return f"ERR {type(exc).__name__} {exc}"


def tcp_answer_retried(addr: str, port: int) -> tuple[str, bool]:
    """tcp_answer, asked once more (with a longer timeout) when the first one timed out, and
    whether it had to be: on a loaded machine a handshake can take longer than 2 s, and a
    guest started again right after its stop can lose its first flow to the stop's conntrack
    clean-up, which runs detached (engine.forget_flows)."""
    first = tcp_answer(addr, port)
    if "TimeoutError" not in first:
        return first, False
    return tcp_answer(addr, port, timeout=5.0), True


@contextmanager
def shm_world(guests: int, backend: str = "iptables") -> Iterator[World]:
    """A lab world whose config and state dirs live on tmpfs (/dev/shm): every file written
    there through a rename has a new inode number, so a file's fingerprint (fastpath.py)
    changes with every edit, however close together two edits are.  Removed afterwards,
    also on failure."""
    need_root_and_tools()
    root = Path(tempfile.mkdtemp(prefix="vf-ledger-", dir="/dev/shm"))
    root.chmod(0o755)
    lab = Lab(guests=guests, libvirt_backend=backend)
    try:
        lab.__enter__()
        w = World(lab, root)
        w.cfg.mkdir(mode=0o755)
        install_hooks(w.fsroot, w.cfg, w.state)
        yield w
    finally:
        lab.close()
        shutil.rmtree(root, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    """As an editor saving a file does: a new file renamed over the old one (a new inode)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)
