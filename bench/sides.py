"""The contenders, each driven the way libvirt (or an admin) drives it, inside one lab.

Ours: guest files under a temp config dir; for each interpreter measured (see
`interpreters()`), the hook that interpreter's own `virt-forward install --root R
--config-dir C --state-dir S` writes, run as libvirt runs it (argv, the domain XML on
stdin, env exactly PATH=/bin:/usr/bin).  `virt-forward apply`/`remove`/`reconcile`
for the bulk work, through the CLI of an interpreter measured.  The post's: its three
scripts from shared/seed, copied to a temp dir with only their paths and IP variables
changed, run as the post runs them (one iptables process per rule).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vflab import lab as labmod
from vflab.lab import PUBLIC4, Lab

from .netns import netns

REPO = Path(__file__).resolve().parents[1]
SEED = Path(os.environ.get("BENCH_SEED_DIR") or REPO.parent / "shared" / "seed")
# libvirt runs hooks with exactly this environment
HOOK_PATH = "/bin:/usr/bin"
HOOK_ENV = {"PATH": HOOK_PATH}
QEMU_HOOK = "etc/libvirt/hooks/qemu.d/virt-forward"  # where `install --root R` puts it
DEBIAN_PYTHON = "/usr/bin/python3"


@dataclass
class Run:
    seconds: float
    rc: int
    stdout: str
    stderr: str


def timed(argv: list[str], env: dict[str, str], stdin: str = "", timeout: float = 120) -> Run:
    """Wall time of one process, started from / (as libvirtd and systemd start theirs)."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, timeout=timeout, cwd="/")
    return Run(time.perf_counter() - t0, p.returncode, p.stdout, p.stderr)


# ------------------------------------------------------------------ the interpreters measured

@dataclass(frozen=True)
class Interp:
    """One Python with the snapshot installed into it (non-editable, by bench/run)."""

    key: str  # "venv" | "debian"
    label: str
    python: str  # as the hook's #! names it (a venv's bin/python stays a symlink: not resolved)
    location: str  # the directory holding the virt_forward package
    env: dict[str, str] = field(default_factory=dict)  # for its CLI (Debian's: PYTHONPATH, as a .deb's path)

    def cli(self, *args: str) -> list[str]:
        return [self.python, "-m", "virt_forward", *args]

    def bare(self) -> list[str]:
        return [self.python, "-I", "-S", "-c", "pass"]

    def imports(self, modules: str) -> list[str]:
        """`python -IS` importing as the hook file does (the package location appended to sys.path)."""
        return [self.python, "-I", "-S", "-c", f"import sys; sys.path.append({self.location!r}); {modules}"]


def _version(python: str) -> str:
    out = subprocess.run([python, "-I", "-S", "-c", "import platform; print(platform.python_version())"],
                         capture_output=True, text=True, env=HOOK_ENV)
    return out.stdout.strip() or "?"


def interpreters() -> list[Interp]:
    """The venv bench/run made (this process runs in it) and Debian's /usr/bin/python3 with the
    `pip install --target` copy.  bench/run exports where they are."""
    venv = os.environ.get("BENCH_VENV")
    debian_site = os.environ.get("BENCH_DEBIAN_SITE")
    if not venv or not debian_site:
        raise SystemExit("run the benchmark with bench/run: it builds the interpreters it measures")
    if os.path.realpath(sys.prefix) != os.path.realpath(venv):
        raise SystemExit(f"the benchmark driver must run in {venv} (it runs in {sys.prefix})")
    import virt_forward
    vloc = os.path.dirname(os.path.dirname(os.path.abspath(virt_forward.__file__)))
    vpy = os.path.join(venv, "bin", "python")
    base = os.path.realpath(vpy)
    out = [Interp("venv", f"venv of pyenv {_version(vpy)} (bin/python -> {base})", vpy, vloc, {"PATH": HOOK_PATH}),
           Interp("debian", f"Debian {DEBIAN_PYTHON} {_version(DEBIAN_PYTHON)}, package in a dist-packages dir",
                  DEBIAN_PYTHON, debian_site, {"PATH": HOOK_PATH, "PYTHONPATH": debian_site})]
    for ip in out:
        probe = subprocess.run(ip.imports("import virt_forward; print(virt_forward.__file__)"),
                               capture_output=True, text=True, env=HOOK_ENV)
        if probe.returncode != 0 or not probe.stdout.strip().startswith(ip.location):
            raise SystemExit(f"{ip.python}: virt_forward is not importable from {ip.location}: {probe.stderr}")
    return out


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

    def __init__(self, lab: Lab, root: Path, interps: list[Interp], run_root: Path | None = None) -> None:
        self.lab = lab
        self.root = root
        self.cfg = root / "etc-virt-forward"
        # /run is a tmpfs on real hosts (fsync of a record is free there): keep the state on one too.
        # One state dir per interpreter: a real host has one install, and what one install leaves in
        # its state dir (the fast path's files name its own package's files) must not be taken for
        # stale by the other.  The kernel table is shared; the main interpreter's dir is the truth,
        # mirrored into the others (records of the other guests) before their hooks run.
        self.states = {ip.key: (run_root or root) / f"run-virt-forward-{ip.key}" for ip in interps}
        self.state = self.states[interps[0].key]
        self._dirty = False
        (self.cfg / "guests").mkdir(parents=True)
        _trusted(self.cfg, mode=0o755)
        _trusted(self.cfg / "guests", mode=0o755)
        _trusted(self.cfg / "config.toml", f'public = ["{PUBLIC4}"]\n')
        self.interps = {ip.key: ip for ip in interps}
        self.main = interps[0]  # whose CLI does the bulk work
        self.hooks: dict[str, Path] = {}
        self.hook_text: dict[str, str] = {}
        for ip in interps:
            self.hooks[ip.key] = self.install(ip)

    def dirs(self, state: Path | None = None) -> list[str]:
        return ["--config-dir", str(self.cfg), "--state-dir", str(state or self.state)]

    def sync(self) -> None:
        """Mirror the main state dir (records of every guest) into the other interpreters' dirs;
        each keeps its own fast/ dir and lock.  After bulk work through the main CLI."""
        if not self._dirty:
            return
        for key, dst in self.states.items():
            if dst == self.state:
                continue
            dst.mkdir(parents=True, exist_ok=True, mode=0o700)
            keep = {"fast", "lock"}
            for entry in dst.iterdir():
                if entry.name not in keep:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            if self.state.is_dir():
                for entry in self.state.iterdir():
                    if entry.name not in keep:
                        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, dst / entry.name)
        self._dirty = False

    def forget_fast(self, domain: str, key: str) -> int:
        """Remove that interpreter's fast-path files of `domain` (as before its first start, or after
        any change): its next start takes the full path.  How many were there."""
        d = self.states[key] / "fast"
        gone = 0
        if d.is_dir():
            for f in d.iterdir():
                if f.name.split(".")[0] == domain:
                    f.unlink()
                    gone += 1
        return gone

    def install(self, ip: Interp) -> Path:
        """That interpreter's own `virt-forward install --root R`: the hook file it writes is the
        one timed.  Checked: it names this interpreter, -IS, and this package location."""
        r = self.root / f"install-{ip.key}"
        with netns(self.lab.host):
            got = timed(ip.cli(*self.dirs(self.states[ip.key]), "install", "--root", str(r)), ip.env)
        hook = r / QEMU_HOOK
        if got.rc != 0 or not hook.is_file():
            raise RuntimeError(f"{ip.key}: virt-forward install failed: exit {got.rc}: {got.stderr.strip()} "
                               f"{got.stdout.strip()}")
        text = hook.read_text()
        first = text.split("\n", 1)[0]
        want = f"#!{ip.python} -IS"
        if (first != want or f"sys.path.append({ip.location!r})" not in text or str(self.cfg) not in text
                or str(self.states[ip.key]) not in text):
            raise RuntimeError(f"{hook}: not the hook expected for {ip.python} (first line {first!r}, "
                               f"package {ip.location})")
        self.hook_text[ip.key] = text
        return hook

    def write_guest(self, name: str, address: str, ports: list[int]) -> None:
        quoted = ", ".join(f'"{p}"' for p in ports)
        _trusted(self.cfg / "guests" / f"{name}.toml", f'address = "{address}"\nports = [{quoted}]\n')

    def hook(self, domain: str, op: str, sub: str, key: str | None = None, full_path: bool = False) -> Run:
        """The installed hook file of interpreter `key`, as libvirt runs it.  `full_path`: its
        fast-path files of `domain` removed first (a first start, or one after any change)."""
        self.sync()
        if full_path:
            self.forget_fast(domain, key or self.main.key)
        with netns(self.lab.host):
            r = timed([str(self.hooks[key or self.main.key]), domain, op, sub, "-"], HOOK_ENV,
                      labmod.domain_xml(domain))
        want = "forward(s) live" if op == "start" else "removed"
        if r.rc != 0 or want not in r.stderr:
            raise RuntimeError(f"ours ({key}): hook {domain} {op}: exit {r.rc}: {r.stderr.strip()}")
        return r

    def cli(self, *args: str, key: str | None = None, state: Path | None = None,
            env: dict[str, str] | None = None) -> Run:
        ip = self.interps[key or self.main.key]
        self._dirty = True
        with netns(self.lab.host):
            return timed(ip.cli(*self.dirs(state), *args), {**ip.env, **(env or {})})

    def apply(self, domain: str, key: str | None = None) -> Run:
        r = self.cli("apply", domain, key=key)
        if r.rc != 0 or "live" not in r.stdout:
            raise RuntimeError(f"ours: apply {domain}: exit {r.rc}: {r.stderr.strip()} {r.stdout.strip()}")
        return r

    def remove(self, domain: str, key: str | None = None) -> Run:
        r = self.cli("remove", domain, key=key)
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

    def records(self, state: Path | None = None) -> int:
        d = (state or self.state) / "guests"
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
        self.env = dict(HOOK_ENV)
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
