"""The two contenders, each driven the way libvirt (or an admin) drives it, inside one lab.

Ours: guest files under a temp config dir, the hook script `lab.write_hook_script`
writes (what `install` will put in /etc/libvirt/hooks), `virt-forward apply` for
the bulk installs.  The post's: its three scripts from shared/seed, copied to a
temp dir with only their paths and IP variables changed, run as the post runs
them (one iptables process per rule).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from virt_forward import lab as labmod
from virt_forward.lab import PUBLIC4, Lab

from .netns import netns

REPO = Path(__file__).resolve().parents[1]
SEED = Path(os.environ.get("BENCH_SEED_DIR") or REPO.parent / "shared" / "seed")
# libvirt runs hooks with exactly this PATH
HOOK_PATH = "/bin:/usr/bin"


@dataclass
class Run:
    seconds: float
    rc: int
    stdout: str
    stderr: str


def timed(argv: list[str], env: dict[str, str], stdin: str = "") -> Run:
    t0 = time.perf_counter()
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, timeout=120)
    return Run(time.perf_counter() - t0, p.returncode, p.stdout, p.stderr)


def console_script(name: str) -> str:
    """The real entry point (not a pyenv shim, which would add its own ~50 ms)."""
    path = Path(sys.prefix) / "bin" / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name}: not installed (pip install -e . in the repo)")
    return found


def tmpfs_dir() -> Path | None:
    """A fresh directory on a tmpfs (/dev/shm), like /run on a real host; None if there is none."""
    import tempfile
    try:
        with open("/proc/mounts") as fh:
            if not any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in fh):
                return None
        return Path(tempfile.mkdtemp(prefix="vf-bench-run-", dir="/dev/shm"))
    except OSError:
        return None


def _trusted(path: Path, text: str | None = None, mode: int = 0o644) -> None:
    if text is not None:
        path.write_text(text)
    os.chown(path, 0, 0)
    os.chmod(path, mode)


class Ours:
    name = "virt-forward"

    def __init__(self, lab: Lab, root: Path, run_root: Path | None = None) -> None:
        self.lab = lab
        self.cfg = root / "etc-virt-forward"
        # /run is a tmpfs on real hosts (fsync of a record is free there): keep the state on one too
        self.state = (run_root or root) / "run-virt-forward"
        (self.cfg / "guests").mkdir(parents=True)
        _trusted(self.cfg, mode=0o755)
        _trusted(self.cfg / "guests", mode=0o755)
        _trusted(self.cfg / "config.toml", f'public = ["{PUBLIC4}"]\n')
        self.hook_script = root / "qemu-hook"
        labmod.write_hook_script(self.hook_script)
        self.cli = console_script("virt-forward")
        self.env = {"PATH": HOOK_PATH, "VIRT_FORWARD_CONFIG_DIR": str(self.cfg),
                    "VIRT_FORWARD_STATE_DIR": str(self.state)}
        if os.environ.get("PYTHONPATH"):  # bench/run's snapshot of src/ (see bench/run)
            self.env["PYTHONPATH"] = os.environ["PYTHONPATH"]

    def write_guest(self, name: str, address: str, ports: list[int]) -> None:
        quoted = ", ".join(f'"{p}"' for p in ports)
        _trusted(self.cfg / "guests" / f"{name}.toml", f'address = "{address}"\nports = [{quoted}]\n')

    def hook(self, domain: str, op: str, sub: str) -> Run:
        with netns(self.lab.host):
            r = timed([str(self.hook_script), domain, op, sub, "-"], self.env, labmod.domain_xml(domain))
        want = "forward(s) live" if op == "start" else "removed"
        if r.rc != 0 or want not in r.stderr:
            raise RuntimeError(f"ours: hook {domain} {op}: exit {r.rc}: {r.stderr.strip()}")
        return r

    def apply(self, domain: str) -> Run:
        with netns(self.lab.host):
            r = timed([self.cli, "apply", domain], self.env)
        if r.rc != 0 or "live" not in r.stdout:
            raise RuntimeError(f"ours: apply {domain}: exit {r.rc}: {r.stderr.strip()} {r.stdout.strip()}")
        return r

    def remove(self, domain: str) -> Run:
        with netns(self.lab.host):
            r = timed([self.cli, "remove", domain], self.env)
        if r.rc != 0:
            raise RuntimeError(f"ours: remove {domain}: exit {r.rc}: {r.stderr.strip()}")
        return r

    def count(self) -> int:
        """Elements in the IPv4 DNAT map: the forwards the kernel holds."""
        out = self.lab.sh(self.lab.host, "nft", "-j", "list", "map", "inet", "virt_forward", "dnat4",
                          check=False)
        if out.returncode != 0:
            return 0
        return sum(len(item["map"].get("elem", [])) for item in json.loads(out.stdout)["nftables"]
                   if "map" in item)

    def records(self) -> int:
        d = self.state / "guests"
        return len(list(d.glob("*.json"))) if d.is_dir() else 0


class Post:
    name = "the post"

    def __init__(self, lab: Lab, root: Path) -> None:
        self.lab = lab
        self.dir = root / "kvm-networks"
        self.dir.mkdir(parents=True)
        self.hook_script = root / "qemu"
        # the post's paths, moved: /home/kvm/networks -> our temp dir; nothing else changes
        hook = (SEED / "qemu").read_text().replace("/home/kvm/networks", str(self.dir))
        _trusted(self.hook_script, hook, 0o755)
        shutil.copy(SEED / "modify_network", self.dir / "modify_network")
        os.chmod(self.dir / "modify_network", 0o755)
        self.template = (SEED / "example-vm").read_text().replace("/home/kvm/networks", str(self.dir))
        self.env = {"PATH": HOOK_PATH}
        self.public = PUBLIC4

    def write_guest(self, name: str, address: str, ports: list[int]) -> None:
        text = self.template
        for var, value in (("PUBLIC_IP", self.public), ("PRIVATE_IP", address),
                           ("PORTS", ",".join(f"tcp:{p}" for p in ports))):
            text, n = re.subn(rf"^{var}=.*$", f"{var}={value}", text, flags=re.M)
            assert n == 1, f"example-vm has no {var}= line"
        _trusted(self.dir / name, text, 0o755)

    def hook(self, domain: str, op: str, sub: str) -> Run:
        with netns(self.lab.host):
            r = timed([str(self.hook_script), domain, op, sub, "-"], self.env, labmod.domain_xml(domain))
        if r.rc != 0 or r.stderr.strip():
            raise RuntimeError(f"post: hook {domain} {op}: exit {r.rc}: {r.stderr.strip()}")
        return r

    def install_as_if_started_first(self, address: str, port: int) -> None:
        """The kernel state the post leaves when this guest started before all others.

        Its `-I` puts the newest guest on top, so the first-started guest's DNAT is
        the last rule of nat PREROUTING and its FORWARD accept the last of the post's
        FORWARD rules (just above libvirt's jumps): the worst case for a linear chain.
        The rules are the post's own, word for word, so its `stopped` removes them.
        """
        rules = self.lab.sh(self.lab.host, "iptables", "-w", "-S", "FORWARD").stdout.splitlines()
        post_rules = sum(1 for r in rules if "-m state" in r)
        self.lab.sh(self.lab.host, "iptables", "-w", "-I", "FORWARD", str(post_rules + 1), "-m", "state",
                    "-d", f"{address}/32", "--state", "NEW,RELATED,ESTABLISHED", "-j", "ACCEPT")
        self.lab.sh(self.lab.host, "iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-p", "tcp",
                    "--dport", str(port), "-d", self.public, "-j", "DNAT", "--to", address)

    def count(self) -> int:
        out = self.lab.sh(self.lab.host, "iptables", "-w", "-t", "nat", "-S", "PREROUTING").stdout
        return sum(1 for line in out.splitlines() if "-j DNAT" in line)

    def forward_rules(self) -> int:
        out = self.lab.sh(self.lab.host, "iptables", "-w", "-S", "FORWARD").stdout
        return sum(1 for line in out.splitlines() if "-m state" in line)
