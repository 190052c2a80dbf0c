"""A lab plus a config dir and a hook called exactly as libvirt calls it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar
from dataclasses import dataclass
from pathlib import Path

import pytest

from vflab.lab import Lab, domain_xml, install_hooks

T = TypeVar("T")


def wait_until(observe: Callable[[], T], ok: Callable[[T], object] = bool, *, timeout: float, what: str,
               every: float = 0.05) -> T:
    """Poll `observe` until `ok` holds for what it returned (that value is returned); past
    `timeout` seconds, fail naming what was awaited and the last value seen.  Tests wait for
    a condition, never for a fixed time: on a loaded machine any fixed time is too short."""
    deadline = time.monotonic() + timeout
    while True:
        seen = observe()
        if ok(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what} (last seen: {seen!r})")
        time.sleep(every)


def need_root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("namespace tests need root")
    for tool in ("nft", "ip", "iptables-restore"):
        if shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
            pytest.skip(f"{tool} is not installed (the README's test command installs it)")


@dataclass
class World:
    lab: Lab
    root: Path

    @property
    def backend(self) -> str:
        return self.lab.libvirt_backend if self.lab.libvirt_rules else "none"

    def foreign(self) -> list[str]:
        """The chains where libvirt's rules (and our guard) live, one line per rule, no counters."""
        if self.backend == "iptables":
            return self.forward_chain("iptables") + self.forward_chain("ip6tables")
        if self.backend == "nftables":
            out = []
            for fam in ("ip", "ip6"):
                text = self.nft("-s", "list", "chain", fam, "libvirt_network", "forward").stdout
                out += [f"{fam}: {ln.strip()}" for ln in text.splitlines()
                        if ("jump" in ln or "accept" in ln) and "hook" not in ln]
            return out
        return []

    def guards_on_top(self) -> bool:
        """Exactly one guard, first, in every chain that needs one."""
        if self.backend == "iptables":
            return all(sum("virt-forward:guard" in r for r in rules) == 1 and "virt-forward:guard" in rules[1]
                       for rules in (self.forward_chain("iptables"), self.forward_chain("ip6tables")))
        if self.backend == "nftables":
            lines = self.foreign()
            return all(sum("virt-forward:guard" in ln for ln in lines if ln.startswith(f"{fam}:")) == 1
                       and "virt-forward:guard" in next(ln for ln in lines if ln.startswith(f"{fam}:"))
                       for fam in ("ip", "ip6"))
        return True

    def no_guards(self) -> bool:
        return not any("virt-forward" in ln for ln in self.foreign())

    @property
    def cfg(self) -> Path:
        return self.root / "cfg"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def fsroot(self) -> Path:
        """Where `install --root` put the hooks and units."""
        return self.root / "fsroot"

    @property
    def hook_path(self) -> Path:
        return self.fsroot / "etc/libvirt/hooks/qemu.d/virt-forward"

    @property
    def network_hook_path(self) -> Path:
        return self.fsroot / "etc/libvirt/hooks/network.d/virt-forward"

    def env(self) -> dict[str, str]:
        # never ask a libvirtd that may run on the machine running the tests
        return {"PATH": "/bin:/usr/bin", "VIRT_FORWARD_CONFIG_DIR": str(self.cfg),
                "VIRT_FORWARD_STATE_DIR": str(self.state), "VIRT_FORWARD_LIBVIRT_URI": "none"}

    def write(self, rel: str, text: str) -> Path:
        path = self.cfg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o755)
        path.write_text(text)
        path.chmod(0o644)
        return path

    def guest_file(self, name: str, text: str) -> Path:
        return self.write(f"guests/{name}.toml", text)

    def hook(self, domain: str, op: str, sub: str = "begin", extra: str = "-",
             xml: str | None = None) -> subprocess.CompletedProcess[str]:
        """As libvirt does: the script with argv, the domain XML on stdin, a bare PATH."""
        return self.lab.sh(self.lab.host, str(self.hook_path), domain, op, sub, extra,
                           stdin=domain_xml(domain) if xml is None else xml, env=self.env(), check=False)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.lab.sh(self.lab.host, sys.executable, "-m", "virt_forward", *args,
                           env={**os.environ, **self.env()}, check=check)

    def nft(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.lab.sh(self.lab.host, "nft", *args, check=check)

    def elements(self) -> dict[str, list[object]]:
        """Every element of every map/set of our table, {} when the table is gone."""
        out = self.nft("-j", "list", "table", "inet", "virt_forward", check=False)
        if out.returncode != 0:
            return {}
        found: dict[str, list[object]] = {}
        for item in json.loads(out.stdout)["nftables"]:
            for kind in ("map", "set"):
                if kind in item:
                    found[item[kind]["name"]] = [_unwrap(e) for e in item[kind].get("elem", [])]
        return found

    def ruleset(self) -> str:
        return self.nft("-s", "list", "ruleset").stdout  # -s: no counters

    def forward_chain(self, tool: str = "iptables") -> list[str]:
        return self.lab.sh(self.lab.host, tool, "-w", "-S", "FORWARD").stdout.splitlines()

    def probe(self, proto: str, addr: str, port: int, *, ns: str | None = None, src: str = "",
              timeout: float = 2.0) -> str:
        return self.lab.probe(ns or self.lab.client, proto, addr, port, src=src, timeout=timeout)


def _unwrap(elem: object) -> object:
    """Drop the per-element counter wrapper: [{"elem": {"val": K, "counter": ..}}, V] -> [K, V]."""
    if isinstance(elem, list) and elem and isinstance(elem[0], dict) and "elem" in elem[0]:
        return [elem[0]["elem"]["val"], *elem[1:]]
    return elem


class Watcher:
    """`virt-forward watch` in the lab host's namespace (stopped with SIGINT, like Ctrl-C).
    Its stderr (its log) is collected as it comes, so a test can wait for a line of it."""

    def __init__(self, w: World, *, env: dict[str, str] | None = None, interval: str = "30") -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", w.lab.host, sys.executable, "-m", "virt_forward", "watch", "--interval", interval],
            env={**os.environ, **w.env(), **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, *, after: int = 0, timeout: float = 30.0) -> int:
        """Index of the first line from `after` on that holds `text`, once the watcher logged it."""
        def find() -> int | None:
            self._alive()
            return next((i for i in range(after, len(self.lines)) if text in self.lines[i]), None)
        try:
            found = wait_until(find, lambda i: i is not None, timeout=timeout,
                               what=f"a watcher log line holding {text!r} from line {after} on")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the watcher's log: {self.log()[-1500:]}") from None
        assert found is not None
        return found

    def wait_monitoring(self, timeout: float = 30.0) -> None:
        """Until its `nft monitor` has joined nf_tables' notification group: from then on every
        change to the ruleset wakes the watcher (the tests slept 1 s and hoped)."""
        try:
            wait_until(self._monitor_sockets, lambda found: found.startswith("subscribed"),
                       timeout=timeout, what="the watcher's nft monitor subscribed to nf_tables' notifications")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the watcher's log: {self.log()[-1500:]}") from None

    def wait_checked(self, w: World, timeout: float = 30.0) -> None:
        """Until the watcher has checked the ruleset as it is now, and repaired what it found.

        A check that finds nothing logs nothing, so it is seen in the files it opens:
        config.toml (read before the lock), then the state lock taken and released.  Events are
        watched from this call on, and a throw-away table made and deleted wakes the watcher
        (nft monitor reports it); a check whose config.toml read and lock both come after that
        has seen every earlier change.  A reconcile already under way is not taken for it: its
        lock was taken before config.toml was read again.  It replaces `sleep(0.5)` before
        asserting that what a repair left stays right."""
        start = len(self.lines)
        with _FileEvents({"config": w.cfg / "config.toml", "lock": w.state / "lock"}) as events:
            w.lab.sh(w.lab.host, "nft", "-f", "-",
                     stdin="add table inet vftest_wake\ndelete table inet vftest_wake\n")
            phase = ["none"]  # none -> config read -> lock taken -> lock released (a whole check)

            def step() -> str:
                self._alive()
                for name, opened in events.read():
                    if name == "config" and opened and phase[0] != "lock taken":
                        phase[0] = "config read"
                    elif name == "lock" and phase[0] == "config read":
                        phase[0] = "lock taken" if opened else "none"  # a release: that lock predates the read
                    elif name == "lock" and phase[0] == "lock taken" and not opened:
                        phase[0] = "lock released"
                repairing = [i for i in range(start, len(self.lines)) if "repairing:" in self.lines[i]]
                done = [i for i in range(start, len(self.lines)) if "reconciled:" in self.lines[i]]
                if repairing and (not done or done[-1] < repairing[-1]):
                    return "a repair under way"
                return phase[0]

            try:
                wait_until(step, lambda seen: seen == "lock released", timeout=timeout,
                           what="a check of the watcher begun after a wake-up (config.toml read, then the lock "
                                "taken and released) and no repair under way")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the watcher's log: {self.log()[-1500:]}") from None

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the watcher exited ({self.proc.returncode}): {self.log()[-1500:]}")

    def _monitor_sockets(self) -> str:
        """What can be seen of the watcher's `nft monitor`: "no nft monitor", "not subscribed:
        pid N" or "subscribed: pid N" -- a NETLINK_NETFILTER socket of that process in group
        NFNLGRP_NFTABLES.  (Only `nft monitor`: an `nft -f` child holds the runner's commit
        listener, subscribed to that group too.)"""
        self._alive()
        seen = "no nft monitor"
        for pid in _children(self.proc.pid, "nft"):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:2] != [b"monitor"]:
                    continue
                inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
                rows = Path(f"/proc/{pid}/net/netlink").read_text().splitlines()[1:]
            except OSError:  # it exited meanwhile: the watcher starts another one
                continue
            seen = f"not subscribed: pid {pid}"
            for row in rows:
                # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode; NETLINK_NETFILTER is 12,
                # NFNLGRP_NFTABLES (7) is bit 6 of Groups
                cols = row.split()
                if (len(cols) >= 10 and cols[1] == "12" and int(cols[3], 16) & (1 << 6)
                        and f"socket:[{cols[9]}]" in inodes):
                    return f"subscribed: pid {pid}"
        return seen

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)
        return self.log()


class _FileEvents:
    """inotify (through libc: the standard library has no binding) on a few files: which of
    them was opened or closed, in the order it happened."""

    IN_CLOSE_WRITE, IN_CLOSE_NOWRITE, IN_OPEN = 0x08, 0x10, 0x20

    def __init__(self, files: dict[str, Path]) -> None:
        import ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.names: dict[int, str] = {}
        for name, path in files.items():
            wd = self.libc.inotify_add_watch(self.fd, bytes(path),
                                             self.IN_OPEN | self.IN_CLOSE_WRITE | self.IN_CLOSE_NOWRITE)
            if wd < 0:
                os.close(self.fd)
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
            self.names[wd] = name

    def __enter__(self) -> "_FileEvents":
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def read(self) -> list[tuple[str, bool]]:
        """(name, True for an open / False for a close) of what happened since the last read."""
        import struct
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        out, at = [], 0
        while at + 16 <= len(data):
            wd, mask, _cookie, size = struct.unpack_from("iIII", data, at)
            at += 16 + size
            if wd in self.names and mask & (self.IN_OPEN | self.IN_CLOSE_WRITE | self.IN_CLOSE_NOWRITE):
                out.append((self.names[wd], bool(mask & self.IN_OPEN)))
        return out


def live_processes(match: Callable[[int, str, list[str]], bool]) -> list[int]:
    """Pids of the processes that are not zombies and `match(pid, comm, stat fields after the
    comm)` (fields[1] is the parent, fields[2] the process group)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and match(int(entry), comm, fields):
            found.append(int(entry))
    return found


def _children(pid: int, comm: str) -> list[int]:
    """The live child processes of `pid` named `comm`."""
    return live_processes(lambda _, name, fields: name == comm and int(fields[1]) == pid)


@contextmanager
def lab_world(**kwargs: object) -> Iterator[World]:
    """A World for one test; its namespaces and files go, also on failure."""
    w, lab = make_world(**kwargs)  # type: ignore[arg-type]
    try:
        yield w
    finally:
        lab.close()
        shutil.rmtree(w.root, ignore_errors=True)


def make_world(libvirt_rules: bool = True, guests: int = 2, backend: str = "iptables",
               hairpin_ports: bool = True) -> tuple[World, Lab]:
    need_root_and_tools()
    root = Path(tempfile.mkdtemp(prefix="vf-test-"))
    root.chmod(0o755)
    lab = Lab(libvirt_rules=libvirt_rules, guests=guests, libvirt_backend=backend, hairpin_ports=hairpin_ports)
    lab.__enter__()
    world = World(lab, root)
    world.cfg.mkdir(mode=0o755)
    install_hooks(world.fsroot, world.cfg, world.state)  # the very files `install` writes
    return world, lab


@contextmanager
def empty_netns(prefix: str) -> Iterator[str]:
    """A network namespace with nothing in it, removed afterwards (also on failure)."""
    import secrets
    name = f"{prefix}{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
