"""A Debian system booted with systemd as PID 1 (systemd-nspawn), with its own network.

The field tier installs virt-forward the way an admin does (apt, or a venv and `install`) and
drives the system through systemd, as a host would be.  Each container boots an overlay of a
root file system built once by build_root.sh, so the tree stays clean and a "reboot" keeps
what the system wrote (the overlay's upper dir is its disk).

Network: the container lives in a network namespace made here (never the host's), with
`pub0` 198.51.100.1/24 (and 2001:db8:5100::1/64), the host's public address, linked to a client
namespace at 198.51.100.2 / ::2 that plays the outside world.

What the container needs beyond nspawn's defaults, each seen failing without it:
- `--capability=all`: with a network namespace given by path, nspawn still drops CAP_NET_ADMIN
  ("error creating bridge interface virbr0: Operation not permitted");
- SYSTEMD_NSPAWN_API_VFS_WRITABLE=network: /proc/sys/net is read-only otherwise and libvirt
  cannot set up its bridge;
- `--bind=/dev/net/tun` for the guests' taps.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

FIELD_DIR = Path(__file__).resolve().parent
ROOTS = Path(os.environ.get("VF_FIELD_ROOTS", "/var/tmp/virt-forward-field"))
PREFIX = "vffld-"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PUBLIC4, CLIENT4 = "198.51.100.1", "198.51.100.2"
PUBLIC6, CLIENT6 = "2001:db8:5100::1", "2001:db8:5100::2"


class FieldUnavailable(Exception):
    """This machine cannot boot the container (not root, no nspawn, no namespaces)."""


def build_root(suite: str) -> Path:
    root = ROOTS / suite
    subprocess.run(["bash", str(FIELD_DIR / "build_root.sh"), suite, str(root)], check=True)
    return root


def _sh(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=timeout)


def cleanup_stale() -> None:
    """Namespaces, mounts and containers left by a run that was killed."""
    for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(PREFIX):
            _sh("ip", "netns", "del", ns, check=False)
    for line in Path("/proc/mounts").read_text().splitlines():
        target = line.split()[1]
        if f"/{PREFIX}" in target:
            _sh("umount", "-l", target, check=False)


class Container:
    def __init__(self, suite: str, root: Path, libvirt_nftables: bool = False) -> None:
        self.suite = suite
        self.lower = root
        self.token = secrets.token_hex(3)
        self.name = f"{PREFIX}{self.token}"
        self.ns = self.name
        self.client_ns = f"{self.name}-c"
        self.work = ROOTS / "run" / self.name
        self.merged = self.work / "root"
        self.libvirt_nftables = libvirt_nftables
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.log_path = self.work / "console.log"
        self.boots: list[float] = []  # monotonic time of each boot's nspawn start

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> Container:
        try:
            self.create()
            self.boot()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.destroy()

    def create(self) -> None:
        if os.geteuid() != 0:
            raise FieldUnavailable("needs root")
        if shutil.which("systemd-nspawn") is None:
            raise FieldUnavailable("systemd-nspawn is not installed (apt install systemd-container)")
        for sub in ("up", "ovl-work", "root"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        _sh("mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={self.lower},upperdir={self.work / 'up'},workdir={self.work / 'ovl-work'}",
            str(self.merged))
        self._network()
        if self.libvirt_nftables:
            conf = self.merged / "etc/libvirt/network.conf"
            conf.write_text(conf.read_text() + '\nfirewall_backend = "nftables"\n')

    def _network(self) -> None:
        _sh("ip", "netns", "add", self.ns)
        _sh("ip", "netns", "add", self.client_ns)
        _sh("ip", "link", "add", "pub0", "netns", self.ns, "type", "veth", "peer", "name", "eth0",
            "netns", self.client_ns)
        for ns, addr4, addr6 in ((self.ns, PUBLIC4, PUBLIC6), (self.client_ns, CLIENT4, CLIENT6)):
            dev = "pub0" if ns == self.ns else "eth0"
            for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{addr4}/24", "dev", dev],
                        ["ip", "addr", "add", f"{addr6}/64", "dev", dev, "nodad"], ["ip", "link", "set", dev, "up"]):
                _sh("ip", "netns", "exec", ns, *cmd)

    def boot(self, timeout: float = 90) -> None:
        env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network")
        log = open(self.log_path, "ab")
        self.boots.append(time.monotonic())
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.merged), "--boot", "--register=no", "--keep-unit",
             f"--machine={self.name}", f"--network-namespace-path=/run/netns/{self.ns}",
             "--console=read-only", "--capability=all", "--bind=/dev/net/tun"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        self.leader = self._find_init(deadline)
        while True:
            if not os.path.exists(f"/proc/{self.leader}"):
                self.leader = self._find_init(deadline)
            state = self.run("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"system not up after {timeout:g} s ({state}): {self.console_tail()}")
            time.sleep(0.2)

    def _find_init(self, deadline: float) -> int:
        """The container's PID 1: nspawn's child that runs systemd.  nspawn forks an outer child
        first, which exits once the container runs: taking that one (seen once, at a reboot)
        leaves nsenter pointing at a process that is gone."""
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nspawn exited {self.proc.returncode}: {self.console_tail()}")
            try:
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                kids = []
            for kid in kids:
                try:
                    if Path(f"/proc/{kid}/comm").read_text().strip() == "systemd":
                        return int(kid)
                except OSError:
                    continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"no systemd in the container: {self.console_tail()}")
            time.sleep(0.05)

    def poweroff(self, timeout: float = 60) -> None:
        """`systemctl poweroff` and wait; a system that does not go down in time is killed
        (the kernel then kills every process of its PID namespace)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.run("systemctl --no-block poweroff", check=False)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None
        self.leader = 0

    def reboot(self) -> None:
        """Power off and boot again.  The network namespaces are made anew, as a machine's
        network stack starts empty: rules and bridges must not survive into the next boot."""
        self.poweroff()
        for ns in (self.client_ns, self.ns):
            _sh("ip", "netns", "del", ns, check=False)
        self._network()
        self.boot()

    def kill(self) -> None:
        if self.leader:
            try:
                os.kill(self.leader, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.leader = 0

    def destroy(self) -> None:
        if self.proc is not None:
            self.kill()
        if os.path.ismount(self.merged):
            _sh("umount", str(self.merged), check=False)
            if os.path.ismount(self.merged):
                _sh("umount", "-l", str(self.merged), check=False)
        for ns in (self.client_ns, self.ns):
            _sh("ip", "netns", "del", ns, check=False)
        if not os.environ.get("VF_FIELD_KEEP"):
            shutil.rmtree(self.work, ignore_errors=True)

    def console_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ inside

    def run(self, script: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """A shell command inside the container, as root in a login-less environment."""
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "--", "/usr/bin/env", "-i", f"PATH={PATH}",
             "LC_ALL=C.UTF-8", "HOME=/root", "bash", "-c", script],
            capture_output=True, text=True, timeout=timeout, input=input,
            stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"[{self.suite}] `{script}` exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def put(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file into the running system (through the overlay, as root)."""
        dest = self.merged / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(dest, mode)

    def mono(self, unit: str, prop: str) -> float:
        """A unit's monotonic timestamp, in seconds (the container shares the host's clock)."""
        out = self.run(f"systemctl show -P {prop} {unit}").stdout.strip()
        return int(out or 0) / 1e6

    # ------------------------------------------------------------------ outside

    def client(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.client_ns, *argv], capture_output=True, text=True,
                              timeout=timeout)

    def http(self, port: int, host: str = PUBLIC4, timeout: float = 2.0) -> str:
        """One HTTP GET from the client namespace; the body, or '' when it failed."""
        code = ("import socket,sys\n"
                f"s=socket.create_connection(({host!r},{port}),timeout={timeout})\n"
                "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
                "d=b''\n"
                "while True:\n"
                "    b=s.recv(4096)\n"
                "    if not b: break\n"
                "    d+=b\n"
                "sys.stdout.write(d.decode(errors='replace').split('\\r\\n\\r\\n',1)[-1])\n")
        try:
            proc = self.client("python3", "-I", "-S", "-c", code, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return ""
        return proc.stdout if proc.returncode == 0 else ""

    def wait_http(self, port: int, want: str, limit: float, host: str = PUBLIC4) -> float:
        """Seconds until the forward answers with `want`; fails after `limit`."""
        t0 = time.monotonic()
        while True:
            if want in self.http(port, host, timeout=1.0):
                return time.monotonic() - t0
            if time.monotonic() - t0 > limit:
                raise AssertionError(f"[{self.suite}] {host}:{port} did not answer {want!r} within {limit:g} s")
            time.sleep(0.1)
