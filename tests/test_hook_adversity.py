"""The installed hook file under every adversity, at every operation: it never takes a guest down.

libvirt kills a guest whose `reconnect` hook fails and aborts a start whose `prepare`/`start`
hook fails; it waits for the hook while it holds the domain's lock.  So each case of this
table runs the hook file exactly as `virt-forward install` writes it (config and state dirs
baked in, PATH=/bin:/usr/bin, XML on stdin) in a network namespace of its own, after the
operations that lead to it in a guest's life (`stopped` comes after a `start`), under one
adversity, and asserts:
- exit status 0 (strict = true with an invalid guest file at prepare/start aside: non-zero);
- finished within consts.HOOK_LOCK_DEADLINE + MARGIN (the hook's only wait is for our lock; a
  second wait shows as 10 s more);
- records and kernel agree: the guest's record is there iff its forwards are in the kernel
  (or, where the record itself was tampered with, the kernel is as it was before).

Adversities that need another view of the file system (state dir read-only or full, nft or
iptables missing or failing) run the hook in a private mount namespace (`unshare -m`): the
host's mounts are never touched.  The lock cases wait out the whole deadline (10 s, no
setting lowers it), so they run in parallel; the others a few at a time.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import write_trusted
from netns_util import empty_netns, need_root_and_tools
from virt_forward import consts, fastpath, install
from virt_forward.errors import VirtForwardError
from virt_forward.state import StateStore

pytestmark = pytest.mark.netns

MARGIN = 8.0  # interpreter start, nft, a loaded 2-core machine (load 20+ seen); a second wait is 10 s more
LIMIT = consts.HOOK_LOCK_DEADLINE + MARGIN
BARE = {"PATH": "/bin:/usr/bin"}  # what libvirt gives a hook

WEB_ADDR = "192.168.122.10"   # web.toml names its address: the fast path can serve it
DYN_ADDR = "192.168.122.20"   # dyn.toml does not: its address comes from the lease file
MACS = {"web": "52:54:00:00:00:0a", "dyn": "52:54:00:00:00:14", "nobody": "52:54:00:00:00:99"}
ADDRS = {"web": WEB_ADDR, "dyn": DYN_ADDR}
NETWORK = ("<network><name>default</name><bridge name='virbr0'/>"
           "<ip address='192.168.122.1' netmask='255.255.255.0'><dhcp/></ip></network>")
LEASE_FILE = "var/lib/libvirt/dnsmasq/virbr0.status"
OPS = ("prepare", "start", "start-again", "started", "reconnect", "stopped", "release")
# what libvirt has called before: each operation in the state a guest's life leaves it in
BEFORE = {"prepare": (), "start": (), "start-again": ("start", "stopped"), "started": ("start",),
          "reconnect": ("start",), "stopped": ("start",), "release": ("start",)}


def domain_xml(domain: str) -> bytes:
    return (f"<domain type='kvm' id='1'><name>{domain}</name><devices><interface type='network'>"
            f"<mac address='{MACS[domain]}'/><source network='default' bridge='virbr0'/></interface>"
            "</devices></domain>").encode()


@dataclass
class Case:
    """One run: the prepared files, then the hook under the adversity."""
    root: Path
    ns: str
    op: str
    hook: Path = field(init=False)
    cdir: Path = field(init=False)
    env: dict[str, str] = field(default_factory=lambda: dict(BARE))

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def libvirt(self) -> Path:
        return self.root / "libvirt"


@dataclass
class Run:
    status: int | None  # None: still running at the limit (killed)
    took: float
    stderr: bytes


@dataclass(frozen=True)
class Adversity:
    name: str
    domains: tuple[str, ...] = ("web",)
    # after the operations before: change files (own config dir when it touches the config)
    setup: Callable[[Case], None] | None = None
    own_config: bool = False
    # the shell words run before `exec` of the hook (in a private mount namespace when mounting)
    shell: Callable[[Case], str] | None = None
    redirect: str = ""          # e.g. `>&-`: a closed stdout
    broken: str = ""            # "stdout" / "stderr": a pipe whose reader is gone
    lock: bool = False          # another process holds our lock throughout
    strict_invalid: bool = False
    record_tampered: bool = False


def _replace(path: Path, how: str, elsewhere: Path) -> None:
    """A FIFO or a symlink (to a copy of what was there) where the hook expects a file."""
    elsewhere.mkdir(parents=True, exist_ok=True)
    target = elsewhere / path.name
    if path.is_file() and not path.is_symlink():
        shutil.copy2(path, target)
    else:
        target.write_bytes(b"{}")
    if os.path.lexists(path):
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "fifo":
        os.mkfifo(path, 0o600)
    else:
        os.symlink(target, path)


def _file_of(which: str, case: Case, domain: str) -> Path:
    return {"config.toml": case.cdir / "config.toml",
            "guest file": case.cdir / "guests" / f"{domain}.toml",
            "record": case.state / "guests" / f"{domain}.json",
            "fast file": Path(fastpath.fast_file(str(case.state), domain)),
            "lease file": case.libvirt / LEASE_FILE}[which]


def _tamper(which: str, how: str) -> Callable[[Case], None]:
    def setup(case: Case) -> None:
        domain = "dyn" if which == "lease file" else "web"
        _replace(_file_of(which, case, domain), how, case.root / "elsewhere")
    return setup


def _fail_script(root: Path) -> Path:
    return root / "fail"


def _read_only(case: Case) -> str:
    s = shlex.quote(str(case.state))
    return f"mount --bind {s} {s} && mount -o remount,bind,ro {s}"


def _full(case: Case) -> str:
    """A tiny tmpfs at the state dir holding what was there, filled to the last byte; what the
    hook leaves is copied out after it (the mount dies with the namespace)."""
    s, pre, post = (shlex.quote(str(p)) for p in (case.state, case.root / "state-pre", case.root / "state-post"))
    mode = stat.S_IMODE(os.stat(case.state).st_mode)
    return (f"mount -t tmpfs -o size=256k,mode={mode:o} tmpfs {s} && cp -a {pre}/. {s}/ && "
            f"{{ cat /dev/zero > {s}/.fill 2>/dev/null; true; }}")


def _sbin_gone(case: Case) -> str:
    return "mount -t tmpfs tmpfs /usr/sbin && mount -t tmpfs tmpfs /usr/local/sbin 2>/dev/null; true"


def _failing(*tools: str) -> Callable[[Case], str]:
    def shell(case: Case) -> str:
        fail = shlex.quote(str(_fail_script(case.root)))
        return " && ".join(f"mount --bind {fail} {shlex.quote(os.path.realpath(shutil.which(t, path='/usr/sbin') or t))}"
                           for t in tools)
    return shell


def _no_libvirt(case: Case) -> None:
    shutil.rmtree(case.libvirt)
    case.libvirt.mkdir()
    case.env["VIRT_FORWARD_LIBVIRT_URI"] = f"qemu+unix:///system?socket={case.root}/no-such-socket"


def _strict_invalid(case: Case) -> None:
    write_trusted(case.cdir / "config.toml", "strict = true\n")
    write_trusted(case.cdir / "guests" / "web.toml", f'address = "{WEB_ADDR}"\nports = ["80", "x"]\n')


def _guest_file_gone(case: Case) -> None:
    (case.cdir / "guests" / "web.toml").unlink()


def _metadata_host(case: Case) -> None:
    write_trusted(case.cdir / "config.toml", "metadata = true\n")


ADVERSITIES: tuple[Adversity, ...] = (
    Adversity("stdout closed", redirect=">&-"),
    Adversity("stdout a closed pipe", broken="stdout"),
    Adversity("stderr closed", redirect="2>&-"),
    Adversity("stderr a closed pipe", broken="stderr"),
    Adversity("stdin closed", redirect="<&-"),
    Adversity("lock held", lock=True),
    # a start without a plan (guest file deleted): apply takes the remove path
    Adversity("lock held, guest file deleted", setup=_guest_file_gone, own_config=True, lock=True),
    # a domain without a guest file on a host trusting metadata: no fast file, the full path
    Adversity("lock held, metadata host", domains=("nobody",), setup=_metadata_host, own_config=True, lock=True),
    *(Adversity(f"{how} at {which}", domains=("web", "nobody") if which == "config.toml" else
                ("dyn",) if which == "lease file" else ("web",),
                setup=_tamper(which, how), own_config=which in ("config.toml", "guest file"),
                record_tampered=which == "record")
      for which in ("config.toml", "guest file", "record", "fast file", "lease file") for how in ("fifo", "symlink")),
    Adversity("state dir read-only", shell=_read_only),
    Adversity("state dir full", shell=_full),
    Adversity("nft and iptables missing", shell=_sbin_gone),
    Adversity("nft failing", shell=_failing("nft")),
    Adversity("iptables failing", shell=_failing("iptables", "ip6tables")),
    Adversity("libvirt absent", domains=("dyn",), setup=_no_libvirt),
    Adversity("strict, invalid guest file", setup=_strict_invalid, own_config=True, strict_invalid=True),
)
CASES = [(a.name, op) for a in ADVERSITIES for op in OPS]
BY_NAME = {a.name: a for a in ADVERSITIES}


def _write_config(cdir: Path) -> None:
    (cdir / "guests").mkdir(parents=True, exist_ok=True)
    for d in (cdir, cdir / "guests"):
        os.chown(d, 0, 0)
        os.chmod(d, 0o755)
    write_trusted(cdir / "config.toml", "# defaults\n")
    write_trusted(cdir / "guests" / "web.toml", f'address = "{WEB_ADDR}"\nports = ["8080:80", "53/udp"]\n')
    write_trusted(cdir / "guests" / "dyn.toml", 'ports = ["2222:22"]\n')


def _write_libvirt(root: Path) -> None:
    net = root / "etc/libvirt/qemu/networks/default.xml"
    net.parent.mkdir(parents=True)
    net.write_text(NETWORK)
    lease = root / LEASE_FILE
    lease.parent.mkdir(parents=True)
    lease.write_text(json.dumps([{"ip-address": DYN_ADDR, "mac-address": MACS["dyn"],
                                  "expiry-time": int(time.time()) + 86400, "hostname": "dyn"}]))


def _case_root(base: Path, adv: Adversity, op: str) -> Path:
    return base / re.sub(r"[^a-z0-9]+", "-", f"{adv.name}-{op}")


def _config_dir(base: Path, adv: Adversity, op: str) -> Path:
    return _case_root(base, adv, op) / "config" if adv.own_config else base / "shared-config"


def _hook_file(root: Path) -> Path:
    return root / "fsroot" / install.QEMU_HOOK


def _write_executables(base: Path, adv: Adversity, op: str) -> None:
    """The case's hook file (what `virt-forward install --config-dir C --state-dir S` writes as
    the qemu hook) and failing stub, before any thread runs: a child forked by another thread
    while a file is open for writing inherits that fd, and exec of that file fails (ETXTBSY)."""
    root = _case_root(base, adv, op)
    hook = _hook_file(root)
    hook.parent.mkdir(parents=True)
    hook.write_text(install.hook_script("qemu", ("--config-dir", str(_config_dir(base, adv, op)),
                                                 "--state-dir", str(root / "state"))))
    hook.chmod(0o755)
    fail = _fail_script(root)
    fail.write_text("#!/bin/sh\necho \"$0: failing on purpose\" >&2\nexit 1\n")
    fail.chmod(0o755)


def _run(case: Case, domain: str, op: str, adversity: Adversity | None = None) -> Run:
    """The hook as libvirt runs it, in the case's namespace; killed (status None) past LIMIT + 5 s."""
    op = "start" if op == "start-again" else op
    sub = "end" if op in ("stopped", "release") else "begin"
    shell, redirect = "", ""
    if adversity is not None:
        shell = adversity.shell(case) if adversity.shell else ""
        redirect = adversity.redirect
    script = f'{shell + " && " if shell else ""}'
    if adversity is not None and adversity.shell is _full:
        state, post = shlex.quote(str(case.state)), shlex.quote(str(case.root / "state-post"))
        script += (f'"$@" {redirect}; rc=$?; rm -f {state}/.fill; mkdir -p {post} && cp -a {state}/. {post}/; '
                   'exit $rc')
    else:
        script += f'exec "$@" {redirect}'
    argv = ["ip", "netns", "exec", case.ns] + (["unshare", "-m"] if shell else []) + \
        ["sh", "-c", script, "sh", str(case.hook), domain, op, sub, "-"]
    pipes: dict[str, int] = {}
    for name in ("stdout", "stderr"):
        if adversity is not None and adversity.broken == name:
            r, w = os.pipe()
            os.close(r)
            pipes[name] = w
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=pipes.get("stdout", subprocess.PIPE),
                            stderr=pipes.get("stderr", subprocess.PIPE), env=case.env, start_new_session=True)
    for fd in pipes.values():
        os.close(fd)
    try:
        out, err = proc.communicate(domain_xml(domain), timeout=LIMIT + 5)
        status: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        status = None
    took = time.monotonic() - t0
    if out:
        err += b"\n(stdout: " + out[:200] + b")"  # libvirt reads stdout at migrate/restore: nothing belongs there
        status = -1000 if status == 0 else status
    return Run(status, took, err or b"")


def _in_kernel(ns: str, domain: str) -> bool:
    pattern = re.compile(re.escape(ADDRS[domain]).encode() + rb"(?![0-9])")
    text = b""
    for cmd in (["nft", "list", "ruleset"], ["iptables-save"], ["ip6tables-save"]):
        text += subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, timeout=30).stdout
    return bool(pattern.search(text))


def _recorded(state: Path, domain: str) -> bool:
    """A record StateStore reads: a regular file, valid (a FIFO or symlink there is no record)."""
    path = state / "guests" / f"{domain}.json"
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        return StateStore(state).read(domain) is not None
    except (OSError, VirtForwardError):
        return False


def run_case(base: Path, adv: Adversity, op: str) -> list[str]:
    """Problems of one case ([]: none)."""
    root = _case_root(base, adv, op)
    problems: list[str] = []
    with empty_netns("vfadv") as ns:
        case = Case(root, ns, op)
        case.cdir = _config_dir(base, adv, op)
        if adv.own_config:
            _write_config(case.cdir)
        _write_libvirt(case.libvirt)
        case.env["VIRT_FORWARD_LIBVIRT_ROOT"] = str(case.libvirt)
        case.hook = _hook_file(root)
        for domain in adv.domains:
            if domain in ADDRS:
                for earlier in BEFORE[op]:
                    r = _run(case, domain, earlier)
                    if r.status != 0:
                        return [f"{domain} {earlier} (before the adversity) exited {r.status}: {r.stderr.decode(errors='replace')}"]
        case.state.mkdir(mode=0o700, exist_ok=True)  # a cold start made none: the mounts need one
        kernel_before = {d: _in_kernel(ns, d) for d in adv.domains if d in ADDRS}
        if adv.setup is not None:
            adv.setup(case)
        if adv.shell is _full:
            shutil.copytree(case.state, root / "state-pre", symlinks=True)
        holder = None
        if adv.lock:
            holder = os.open(case.state / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(holder, fcntl.LOCK_EX)
        try:
            for domain in adv.domains:
                r = _run(case, domain, op, adv)
                if adv.shell is _full and (root / "state-post").exists():
                    shutil.rmtree(case.state)
                    os.rename(root / "state-post", case.state)
                want_nonzero = adv.strict_invalid and op in ("prepare", "start", "start-again")
                said = r.stderr.decode(errors="replace").strip()[-600:]
                if r.status is None:
                    problems.append(f"{domain}: still running after {r.took:.1f} s (killed); stderr: {said}")
                elif want_nonzero and r.status == 0:
                    problems.append(f"{domain}: exited 0, but strict = true with an invalid file must refuse {op}")
                elif not want_nonzero and r.status != 0:
                    problems.append(f"{domain}: exited {r.status}; stderr: {said}")
                if r.took > LIMIT:
                    problems.append(f"{domain}: took {r.took:.1f} s, more than {LIMIT:g} s")
        finally:
            if holder is not None:
                os.close(holder)
        for domain, before in kernel_before.items():
            kernel, record = _in_kernel(ns, domain), _recorded(case.state, domain)
            if kernel != record and not (adv.record_tampered and kernel == before):
                problems.append(f"{domain}: inconsistent after {op}: record {'there' if record else 'absent'}, "
                                f"forwards {'in' if kernel else 'not in'} the kernel (before: "
                                f"{'in' if before else 'not in'})")
    return problems


@pytest.fixture(scope="module")
def table(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], list[str]]]:
    """Every selected case, run in parallel: the lock cases all at once (they only wait), the
    others three at a time (2 cores shared)."""
    need_root_and_tools()
    base = tmp_path_factory.mktemp("adversity")
    _write_config(base / "shared-config")
    # the fast path serves only files older than its racy window: poll until they are
    deadline = time.monotonic() + fastpath.RACY_SECONDS + 5
    while fastpath.racy(fastpath.inputs(str(base / "shared-config"), "web")):
        assert time.monotonic() < deadline, "the config files stay racily fresh"
        time.sleep(0.1)
    selected = [tuple(item.callspec.params["case"]) for item in request.session.items  # type: ignore[attr-defined]
                if getattr(item, "originalname", "") == "test_the_hook_under_adversity"]
    wanted = [c for c in CASES if c in selected] or CASES
    results: dict[tuple[str, str], list[str]] = {}
    for name, op in wanted:
        _write_executables(base, BY_NAME[name], op)

    def one(key: tuple[str, str]) -> None:
        try:
            results[key] = run_case(base, BY_NAME[key[0]], key[1])
        except Exception as exc:  # the case's own setup failed: report it as the case's failure
            results[key] = [f"the test's setup failed: {type(exc).__name__}: {exc}"]

    locked = [k for k in wanted if BY_NAME[k[0]].lock]
    others = [k for k in wanted if not BY_NAME[k[0]].lock]
    with ThreadPoolExecutor(max_workers=max(1, len(locked))) as waiting, ThreadPoolExecutor(max_workers=3) as busy:
        futures = [waiting.submit(one, k) for k in locked] + [busy.submit(one, k) for k in others]
        for f in futures:
            f.result()
    yield results


@pytest.mark.parametrize("case", CASES, ids=[re.sub(r"[^a-z0-9]+", "-", f"{a} {op}") for a, op in CASES])
def test_the_hook_under_adversity(table: dict[tuple[str, str], list[str]], case: tuple[str, str]) -> None:
    assert table[case] == []
