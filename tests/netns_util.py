"""A lab plus a config dir and a hook called exactly as libvirt calls it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vflab.lab import Lab, domain_xml, install_hooks


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
    """`virt-forward watch` in the lab host's namespace (stopped with SIGINT, like Ctrl-C)."""

    def __init__(self, w: World) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", w.lab.host, sys.executable, "-m", "virt_forward", "watch", "--interval", "30"],
            env={**os.environ, **w.env()}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


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
