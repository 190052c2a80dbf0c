"""The hook's fast path replays the full path's output: same kernel state, same records, or it steps aside.

Namespace tests drive the installed hook with VIRT_FORWARD_TRACE=1, which makes it say
which path it took, and compare what the kernel holds after the fast path with what the
full path left.  The pure tests check the text checks against guards.py on real listings.
"""

from __future__ import annotations

import fcntl
import json
import marshal
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from netns_util import World, lab_world
from vflab.lab import CLIENT4, PUBLIC4, domain_xml
from virt_forward import fastpath, guards

DATA = Path(__file__).parent / "data"
G1, G2 = "192.168.122.10", "192.168.122.11"


# ---------------------------------------------------------------- pure

@pytest.mark.parametrize("name", sorted(p.name for p in (DATA / "guards").glob("*.save")))
def test_iptables_text_check_agrees_with_guards(name: str) -> None:
    save = (DATA / "guards" / name).read_text()
    chain = guards.parse_filter(save)
    slow_says_ok = not chain.needs_guard() or chain.guard_in_place()
    assert (fastpath.iptables_guard_state(save) == "ok") == slow_says_ok


NFT_CHAIN = """table ip libvirt_network {{
\tchain forward {{ # handle 1
\t\ttype filter hook forward priority filter; policy accept;
{rules}\t}}
}}
"""
GUARD = '\t\tct mark & 0x10000000 == 0x10000000 ct status dnat counter packets 3 bytes 180 accept comment "{c}" # handle {h}\n'
JUMP = "\t\tcounter packets 0 bytes 0 jump guest_{n} # handle {h}\n"


@pytest.mark.parametrize("rules, ok", [
    (GUARD.format(c="virt-forward:guard 0x10000000", h=9) + JUMP.format(n="cross", h=5), True),
    (JUMP.format(n="cross", h=5) + GUARD.format(c="virt-forward:guard 0x10000000", h=9), False),  # not on top
    (GUARD.format(c="virt-forward:guard 0x20000000", h=9) + JUMP.format(n="cross", h=5), False),  # older version
    (GUARD.format(c="virt-forward:guard 0x10000000", h=9) * 2, False),  # two
    (JUMP.format(n="cross", h=5), False),  # none
    ("", False),
])
def test_nft_text_check(rules: str, ok: bool) -> None:
    assert (fastpath.nft_guard_state(NFT_CHAIN.format(rules=rules)) == "ok") is ok


def test_racy_files_get_no_fast_file() -> None:
    now = time.time()
    fresh = (1, 2, 3, int((now - 0.5) * 1e9), int((now - 0.5) * 1e9), 0o100644, 0)
    old = (1, 2, 3, int((now - 60) * 1e9), int((now - 60) * 1e9), 0o100644, 0)
    assert fastpath.racy({"a": old, "b": fresh}, now) and not fastpath.racy({"a": old, "b": None}, now)


def test_the_code_fingerprint_covers_every_module_of_the_package() -> None:
    """An upgrade of any module (hairpin.py was missing from a hand-kept list) stales every fast file."""
    pkg = Path(fastpath.__file__).parent
    modules = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if "__pycache__" not in p.parts}
    assert {"hairpin.py", "fastpath.py", "backends/nftables.py"} <= modules
    assert set(fastpath.code_now()) == modules
    assert fastpath.code_now() == fastpath.code()


@pytest.mark.parametrize("name, stem", [("web", "web"), ("web-1.example_x~", "web-1.example_x~"), (".web", None),
                                        ("web 1", None), ("wéb", None), ("a/b", None), ("", None), ("x" * 201, None)])
def test_only_names_that_need_no_quoting(name: str, stem: str | None) -> None:
    assert fastpath.file_name(name) == stem


KEY = bytes(range(fastpath.KEY_SIZE))


@pytest.mark.parametrize("data", [
    b"", b"\x00garbage", marshal.dumps([1, 2]), marshal.dumps({"format": 99}),
    marshal.dumps({"format": fastpath.FORMAT, "record": 1}),
    # sealed right, but not what the full path writes
    fastpath.seal(KEY, "web", b"\x00garbage"), fastpath.seal(KEY, "web", marshal.dumps({"format": 99})),
    # not sealed with this key, or for this guest, or cut short
    fastpath.seal(bytes(fastpath.KEY_SIZE), "web", marshal.dumps({"format": fastpath.FORMAT})),
    fastpath.seal(KEY, "db", marshal.dumps({"format": fastpath.FORMAT})),
    fastpath.seal(KEY, "web", marshal.dumps({"format": fastpath.FORMAT}))[:fastpath.MAC_SIZE],
])
def test_a_bad_fast_file_is_a_miss(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "fast").mkdir(mode=0o700)
    (tmp_path / "fast" / fastpath.KEY).write_bytes(KEY)
    (tmp_path / "fast" / fastpath.KEY).chmod(0o600)
    path = tmp_path / "fast" / "web.fast"
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises((fastpath.Miss, ValueError, EOFError, TypeError)):
        fastpath._load(str(tmp_path), "web")


# ---------------------------------------------------------------- in namespaces

@pytest.fixture(params=["iptables", "nftables"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    with lab_world(backend=request.param) as w:
        yield w


def hook(w: World, domain: str, op: str, timeout: float = 60) -> tuple[str, str]:
    """(path taken, stderr) of one hook call as libvirt makes it."""
    sub = "end" if op in ("stopped", "release") else "begin"
    r = w.lab.sh(w.lab.host, str(w.hook_path), domain, op, sub, "-", stdin=domain_xml(domain),
                 env={**w.env(), "VIRT_FORWARD_TRACE": "1"}, check=False, timeout=timeout)
    assert r.returncode == 0 and r.stdout == "", r
    path = "fast" if "trace: fast path" in r.stderr else "full"
    return path, r.stderr


def guard_first(w: World) -> bool:
    """Our guard is the first rule of the chain libvirt's rules are in."""
    first = w.forward_chain("iptables")[1] if w.backend == "iptables" else w.foreign()[0]
    return "virt-forward:guard" in first


def snapshot(w: World) -> tuple[str, str, dict[str, str]]:
    """The kernel's rules (no counters, no handles) and the records."""
    ruleset = w.nft("-s", "list", "ruleset").stdout
    save = w.lab.sh(w.lab.host, "iptables-save").stdout + w.lab.sh(w.lab.host, "ip6tables-save").stdout
    save = "\n".join(ln for ln in save.splitlines() if not ln.startswith("#"))
    records = {p.name: p.read_text() for p in sorted((w.state / "guests").glob("*.json"))}
    return ruleset, save, records


def settle(w: World) -> None:
    """Until no config file is racily fresh for the hook: it writes no fast file for a file
    changed within fastpath.RACY_SECONDS, by max(mtime, ctime).  Waiting is the only honest way
    here: os.utime cannot age a file (it sets ctime to now), and the hook runs `python -I -S`
    in a process of its own, with the real clock."""
    from netns_util import wait_until
    cfg = str(w.cfg)

    def fresh() -> list[str]:
        taken = {p: fp for guest in (w.cfg / "guests").glob("*.toml")
                 for p, fp in fastpath.inputs(cfg, guest.stem).items()}
        return sorted(p for p, fp in taken.items() if fastpath.racy({p: fp}))

    wait_until(fresh, lambda paths: not paths, timeout=10 * fastpath.RACY_SECONDS,
               what=f"config files older than fastpath.RACY_SECONDS ({fastpath.RACY_SECONDS:g} s) for the hook")


def two_guests_one_stopped(w: World) -> None:
    """guest2 runs (443); guest1 (80) ran and stopped, its fast file written for settled files."""
    w.write("config.toml", f'public = ["{PUBLIC4}"]\n')
    w.guest_file("guest1", f'address = "{G1}"\nports = ["80"]\n')
    w.guest_file("guest2", f'address = "{G2}"\nports = ["443"]\n')
    settle(w)
    hook(w, "guest2", "start")
    hook(w, "guest1", "start")
    hook(w, "guest1", "stopped")


def test_fast_start_and_stop_leave_what_the_full_path_leaves(world: World) -> None:
    w = world
    w.write("config.toml", f'public = ["{PUBLIC4}"]\n')
    w.guest_file("guest1", f'address = "{G1}"\nports = ["80", "2222:22", "8000-8002:9000-9002/udp"]\n')
    w.guest_file("guest2", f'address = "{G2}"\nports = ["443"]\n')
    settle(w)
    assert hook(w, "guest2", "start")[0] == "full"
    assert hook(w, "guest1", "start")[0] == "full"  # the full path writes the fast file
    assert (w.state / "fast" / "guest1.fast").exists()
    by_full = snapshot(w)
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"

    path, err = hook(w, "guest1", "stopped")
    assert path == "fast" and "guest1: removed 5 forward(s) (stopped end)" in err, err
    assert w.probe("tcp", PUBLIC4, 80).startswith("ERR")
    assert not (w.state / "guests" / "guest1.json").exists() and (w.state / "fast" / "guest1.fast").exists()
    assert w.probe("tcp", PUBLIC4, 443) == f"guest2:443 from {CLIENT4}"

    for op in ("prepare", "start", "started", "reconnect"):
        path, err = hook(w, "guest1", op)
        assert path == "fast", (op, err)
    assert snapshot(w) == by_full  # exactly what the full path made, records included
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    assert w.probe("udp", PUBLIC4, 8001) == f"guest1:9001 from {CLIENT4}"

    # the last guest's stop removes the table and the guards, on the fast path too
    assert hook(w, "guest1", "stopped")[0] == "fast"
    assert hook(w, "guest2", "stopped")[0] == "fast"
    assert w.elements() == {} and w.no_guards()
    assert w.nft("list", "table", "inet", "virt_forward", check=False).returncode != 0
    # the first guest of an idle host: the fast path makes the table and places the guards,
    # exactly as the full path did
    assert hook(w, "guest2", "start")[0] == "fast"
    assert hook(w, "guest1", "start")[0] == "fast"
    assert snapshot(w) == by_full
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"


def test_the_fast_path_steps_aside_when_anything_changed(world: World) -> None:
    w = world
    two_guests_one_stopped(w)

    # an edited guest file: the fast file no longer matches, the full path applies the new ports
    w.guest_file("guest1", f'address = "{G1}"\nports = ["80", "8080:80"]\n')
    path, err = hook(w, "guest1", "start")
    assert path == "full" and "changed since" in err, err
    assert w.probe("tcp", PUBLIC4, 8080) == f"guest1:80 from {CLIENT4}"
    settle(w)
    hook(w, "guest1", "stopped")  # its record differs from the old fast file: full path
    assert w.probe("tcp", PUBLIC4, 8080).startswith("ERR")
    hook(w, "guest1", "start")  # not racy any more: writes a fast file for the new plan
    hook(w, "guest1", "stopped")
    assert hook(w, "guest1", "start")[0] == "fast"
    assert w.probe("tcp", PUBLIC4, 8080) == f"guest1:80 from {CLIENT4}"
    hook(w, "guest1", "stopped")

    # a config.toml edit (another public address) is an input too
    w.write("config.toml", f'public = ["{PUBLIC4}"]\nhairpin = true\n')
    assert hook(w, "guest1", "start")[0] == "full"
    hook(w, "guest1", "stopped")
    settle(w)
    hook(w, "guest1", "start")  # a fast file for the settled files
    assert hook(w, "guest1", "stopped")[0] == "fast"

    # libvirt put its rules back above our guard: the full path re-places it
    if w.backend == "iptables":
        for chain in ("LIBVIRT_FWO", "LIBVIRT_FWI", "LIBVIRT_FWX"):
            w.lab.sh(w.lab.host, "iptables", "-w", "-I", "FORWARD", "1", "-j", chain)
    else:
        w.lab.sh(w.lab.host, "nft", "insert", "rule", "ip", "libvirt_network", "forward", "counter",
                 "jump", "guest_input")
    path, err = hook(w, "guest1", "start")
    assert path == "full" and "guard not on top" in err, err
    assert guard_first(w), w.foreign()
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    hook(w, "guest1", "stopped")

    # someone flushed the whole ruleset (libvirt's rules came back): our table and guard are gone;
    # the fast path makes them again, as the full path would
    w.nft("flush", "ruleset")
    w.lab.load_libvirt_rules()
    path, err = hook(w, "guest1", "start")
    assert path == "fast", err
    assert guard_first(w), w.foreign()
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
    # a table that is there but lacks this skeleton's mark (another version made it): full path
    hook(w, "guest1", "stopped")
    w.nft("flush", "ruleset")
    w.lab.load_libvirt_rules()
    w.nft("add", "table", "inet", "virt_forward")
    w.nft("add", "chain", "inet", "virt_forward", "lookup")
    path, err = hook(w, "guest1", "start")
    assert path == "full" and "lacks this skeleton's mark" in err, err
    assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"


def test_a_guest_without_forwards_costs_nothing(world: World) -> None:
    w = world
    w.write("config.toml", f'public = ["{PUBLIC4}"]\n')
    for op in ("prepare", "start", "started", "reconnect", "stopped", "release"):
        assert hook(w, "plain-vm", op)[0] == "fast"
    # metadata forwards enabled: unconfigured guests may be ours, the full path decides
    w.write("config.toml", "metadata = true\n")
    assert hook(w, "plain-vm", "start")[0] == "full"
    w.write("config.toml", '"\\u006detadata" = true\n')  # TOML may spell a key with escapes
    assert hook(w, "plain-vm", "start")[0] == "full"


def test_a_forged_fast_file_is_not_trusted(world: World) -> None:
    w = world
    two_guests_one_stopped(w)
    fast = w.state / "fast" / "guest1.fast"
    fast.chmod(0o666)  # writable by others: someone else could have written it
    path, err = hook(w, "guest1", "start")
    assert path == "full" and "only we may write" in err, err
    (w.state / "guests").chmod(0o777)
    try:
        assert hook(w, "guest1", "stopped")[0] == "full"
    finally:
        (w.state / "guests").chmod(0o700)


def test_the_installed_hook_is_lean(tmp_path: Path) -> None:
    """What the fast path imports: nothing of the planner, no typing/re/json/dataclasses/subprocess."""
    code = ("import sys; sys.path.append(sys.argv[1]); from virt_forward import hook, fastpath, runner;"
            "heavy = {'typing', 're', 'json', 'dataclasses', 'subprocess', 'tomllib', 'ipaddress', 'pathlib',"
            " 'virt_forward.engine', 'virt_forward.config', 'virt_forward.plan', 'virt_forward.nft'};"
            "print(sorted(heavy & set(sys.modules)))")
    src = str(Path(fastpath.__file__).parents[1])
    r = subprocess.run([os.path.realpath(sys.executable), "-I", "-S", "-c", code, src],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout


def test_reconcile_plans_from_unchanged_fast_files_and_rereads_edited_ones() -> None:
    """reconcile takes a guest's plan from its fast file only while the files it came from are
    unchanged, and leaves fast files behind for the guests it planned from their files."""
    with lab_world(backend="nftables") as w:
        w.write("config.toml", f'public = ["{PUBLIC4}"]\n')
        w.guest_file("guest1", f'address = "{G1}"\nports = ["80"]\n')
        w.guest_file("guest2", f'address = "{G2}"\nports = ["443"]\n')
        settle(w)
        w.cli("reconcile", "--running", "guest1", "guest2")
        assert sorted(p.name for p in (w.state / "fast").glob("*.fast")) == ["guest1.fast", "guest2.fast"]
        before = snapshot(w)
        assert hook(w, "guest1", "stopped")[0] == "fast"  # what reconcile left serves the hook
        # reconcile had no domain XML (no libvirt here): where hairpin mode goes is not known, so
        # the next start takes the full path once, and leaves a fast file that knows it
        path, err = hook(w, "guest1", "start")
        assert path == "full" and "hairpin mode goes is not known" in err, err
        assert hook(w, "guest1", "stopped")[0] == "fast" and hook(w, "guest1", "start")[0] == "fast"
        assert snapshot(w) == before

        w.nft("flush", "ruleset")  # plans from the fast files: the same rules and records
        w.lab.load_libvirt_rules()
        w.cli("reconcile", "--running", "guest1", "guest2")
        assert snapshot(w) == before
        assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"

        w.guest_file("guest1", f'address = "{G1}"\nports = ["8080:80"]\n')  # edited: its fast file is stale
        w.nft("flush", "ruleset")
        w.lab.load_libvirt_rules()
        w.cli("reconcile", "--running", "guest1", "guest2")
        assert w.probe("tcp", PUBLIC4, 8080) == f"guest1:80 from {CLIENT4}"
        assert w.probe("tcp", PUBLIC4, 80).startswith("ERR")
        assert w.probe("tcp", PUBLIC4, 443) == f"guest2:443 from {CLIENT4}"
        assert ",8080," in (w.state / "guests" / "guest1.json").read_text()


# ---------------------------------------------------------------- trust (issue 19: items 3, 5, 12)

def timed_hook(w: World, domain: str, op: str, deadline: float = 20.0) -> tuple[str, str, float]:
    """hook() with a deadline: (path, stderr, seconds).  A hook that hangs fails the test
    (TimeoutExpired kills it) instead of hanging the run."""
    start = time.monotonic()
    path, err = hook(w, domain, op, timeout=deadline)
    return path, err, time.monotonic() - start


@pytest.mark.parametrize("what", ["fifo", "symlink to a fifo", "symlink to a file"])
def test_config_toml_that_is_no_regular_file_of_ours_never_hangs_the_hook(what: str) -> None:
    """A FIFO at config.toml, or a symlink there (to a FIFO, or to a file saying
    `metadata = true`), with a guest that has no file: the fast path opened config.toml
    blocking and followed the link; now it steps aside at once and the full path refuses."""
    with lab_world(backend="nftables") as w:
        w.write("config.toml", f'public = ["{PUBLIC4}"]\n')
        config = w.cfg / "config.toml"
        config.unlink()
        if what == "fifo":
            os.mkfifo(config, 0o644)
        else:
            target = w.root / "elsewhere"
            if what == "symlink to a fifo":
                os.mkfifo(target, 0o644)
            else:
                target.write_text("metadata = true\n")
            config.symlink_to(target)
        for op in ("prepare", "start", "reconnect"):
            path, err, took = timed_hook(w, "plain-vm", op)
            trace = [ln for ln in err.splitlines() if "trace:" in ln]
            assert path == "full" and "config.toml" in trace[0], (op, err)
            assert took < fastpath.HOOK_LOCK_DEADLINE, (op, took)


def fast_payload(w: World, name: str) -> dict[str, object]:
    data = marshal.loads((w.state / "fast" / f"{name}.fast").read_bytes()[fastpath.MAC_SIZE:])
    assert isinstance(data, dict)
    return data


def put_fast(w: World, name: str, data: bytes) -> None:
    """As a root process tricked into writing it would: our owner, our mode."""
    path = w.state / "fast" / f"{name}.fast"
    path.write_bytes(data)
    path.chmod(0o600)
    os.chown(path, os.geteuid(), -1)


def test_a_forged_fast_file_of_our_owner_and_mode_is_not_replayed() -> None:
    with lab_world(backend="nftables") as w:
        two_guests_one_stopped(w)
        genuine = (w.state / "fast" / "guest1.fast").read_bytes()
        payload = fast_payload(w, "guest1")
        payload["add"] = str(payload["add"]) + "add table ip pwned\n"
        payload["claims"] = []  # would have registered no claim
        forged = marshal.dumps(payload)
        forgeries = {
            "the old format: no MAC at all": forged,
            "a MAC of another payload": genuine[:fastpath.MAC_SIZE] + forged,
            "another guest's genuine file": (w.state / "fast" / "guest2.fast").read_bytes(),
        }
        for why, data in forgeries.items():
            put_fast(w, "guest1", data)
            path, err = hook(w, "guest1", "start")
            assert path == "full", (why, err)
            assert w.nft("list", "table", "ip", "pwned", check=False).returncode != 0, why
            assert any("guest1" in p.read_text() for p in (w.state / "claims").iterdir()
                       if not p.name.startswith(".")), why
            assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}", why
            hook(w, "guest1", "stopped")


def test_a_stop_with_a_fast_file_in_doubt_takes_the_full_path() -> None:
    with lab_world(backend="nftables") as w:
        two_guests_one_stopped(w)
        key = (w.state / "fast" / fastpath.KEY).read_bytes()

        def other_code(genuine: bytes) -> bytes:
            payload = marshal.loads(genuine[fastpath.MAC_SIZE:])
            payload["code"] = {**payload["code"], "engine.py": (0, 0, 0, 0, 0, 0o100644, 0)}  # an upgrade
            return fastpath.seal(key, "guest1", marshal.dumps(payload))

        doubts = {
            "a wrong MAC": lambda g: bytes([g[0] ^ 1]) + g[1:],
            "cut short": lambda g: g[:len(g) // 2],
            "only the MAC": lambda g: g[:fastpath.MAC_SIZE],
            "another version of our code": other_code,
        }
        for why, spoil in doubts.items():
            assert hook(w, "guest1", "start")[0] == "fast", why
            assert G1 in str(w.elements()), why
            put_fast(w, "guest1", spoil((w.state / "fast" / "guest1.fast").read_bytes()))
            path, err = hook(w, "guest1", "stopped")
            assert path == "full" and "guest1: removed 1 forward(s)" in err, (why, err)
            assert G1 not in str(w.elements()) and not (w.state / "guests" / "guest1.json").exists(), why
            hook(w, "guest1", "start")  # the full path: a fast file written again, sealed right
            hook(w, "guest1", "stopped")
        # the same fast file, untouched: the fast path
        assert hook(w, "guest1", "start")[0] == "fast"
        assert hook(w, "guest1", "stopped")[0] == "fast"


def test_a_guest_file_edited_while_the_hook_waits_for_the_lock_is_seen() -> None:
    """The fingerprints are compared under the lock: an edit made (and applied) by a process
    that held it is not overridden by a start replaying the plan from before."""
    with lab_world(backend="nftables") as w:
        two_guests_one_stopped(w)
        lock = os.open(w.state / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            proc = hook_process(w, "guest1", "start", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**w.env(), "VIRT_FORWARD_TRACE": "1"})
            wait_for(lambda: holds_open(proc.pid, w.state / "lock"), "the hook to wait for the lock")
            w.guest_file("guest1", f'address = "{G1}"\nports = ["8080:80"]\n')  # port 80 goes, 8080 comes
        finally:
            os.close(lock)  # releases the flock
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and out == "", err
        assert "trace: full path" in err and "changed since" in err, err
        record = (w.state / "guests" / "guest1.json").read_text()
        assert ",8080," in record and ",80," not in record, record
        assert w.probe("tcp", PUBLIC4, 8080) == f"guest1:80 from {CLIENT4}"


def hook_process(w: World, domain: str, op: str, **kwargs: object) -> subprocess.Popen[str]:
    """The hook started as libvirt starts it (the domain XML on stdin), not waited for."""
    xml = w.root / f"{domain}.xml"
    xml.write_text(domain_xml(domain))
    with open(xml) as stdin:
        return subprocess.Popen(["ip", "netns", "exec", w.lab.host, str(w.hook_path), domain, op, "begin", "-"],
                                stdin=stdin, text=True, **kwargs)  # type: ignore[call-overload]


def holds_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:  # an fd closed while we looked
        return False


def wait_for(cond: Callable[[], bool], what: str, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.001)


def claims_of_guest(w: World, name: str) -> list[str]:
    """The guest's lines in the claims index's block files ("4-tcp-78"; not ".total", nor the
    temp file of a write the kill cut short, which no lookup reads)."""
    return [ln for p in sorted((w.state / "claims").iterdir()) if "." not in p.name
            for ln in p.read_text().splitlines() if ln.endswith(f" {name}")]


def test_a_pending_start_sends_start_and_stop_to_the_full_path() -> None:
    """A start killed between its claims and its record leaves guests/NAME.pending: the fast
    path leaves the clean-up to the full path, also when no record exists."""
    with lab_world(backend="nftables") as w:
        two_guests_one_stopped(w)
        assert hook(w, "guest1", "start")[0] == "fast"
        assert not (w.state / "guests" / "guest1.pending").exists()  # gone once the record is there
        record = (w.state / "guests" / "guest1.json").read_text()
        pending = w.state / "guests" / "guest1.pending"
        for op in ("stopped", "start"):
            pending.write_text(record)
            pending.chmod(0o600)
            path, err = hook(w, "guest1", op)
            assert path == "full" and "did not finish" in err, (op, err)
        # no record, only what a killed start left: not "nothing of ours" (a no-op)
        hook(w, "guest1", "stopped")
        pending.write_text(record)
        pending.chmod(0o600)
        path, err = hook(w, "guest1", "stopped")
        assert path == "full", err


def test_a_fast_start_killed_at_any_moment_leaves_nothing_that_holds_the_port() -> None:
    """SIGKILL (the hook and its nft) after the fast start took the guest's claims: the claims
    are covered by a pending record, `stopped` releases them, and another guest gets the port."""
    with lab_world(backend="nftables") as w:
        w.write("config.toml", f'public = ["{PUBLIC4}"]\n')
        w.guest_file("guest1", f'address = "{G1}"\nports = ["20000-20299"]\n')  # a batch that takes a while
        w.guest_file("guest2", f'address = "{G2}"\nports = ["443"]\n')
        settle(w)
        hook(w, "guest2", "start")
        hook(w, "guest1", "start")
        hook(w, "guest1", "stopped")
        killed_in_between = 0
        for _ in range(15):
            proc = hook_process(w, "guest1", "start", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=w.env(), start_new_session=True)
            wait_for(lambda: bool(claims_of_guest(w, "guest1")) or proc.poll() is not None, "guest1's claims")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            wait_for(lambda: not group_alive(proc.pid), "the killed hook's processes to go")
            if (w.state / "guests" / "guest1.json").exists():  # killed too late: the start had finished
                assert hook(w, "guest1", "stopped")[0] == "fast"
                continue
            killed_in_between += 1
            assert claims_of_guest(w, "guest1")
            pending = w.state / "guests" / "guest1.pending"
            assert pending.exists(), "claims that no record and no pending record accounts for"
            assert json.loads(pending.read_text())["plan"]["domain"] == "guest1"
            path, err = hook(w, "guest1", "stopped")
            assert path == "full", err
            assert not claims_of_guest(w, "guest1") and not pending.exists(), err
            assert G1 not in str(w.elements())
        print(f"killed between the claims and the record: {killed_in_between} of 15")
        assert killed_in_between > 0, "no kill landed between the claims and the record: the test proved nothing"
        # another guest asks for one of those ports: it gets it
        w.guest_file("guest2", f'address = "{G2}"\nports = ["443", "20005:80"]\n')
        path, err = hook(w, "guest2", "start")
        assert "not applied" not in err and "2 forward(s) live" in err, err
        assert w.probe("tcp", PUBLIC4, 20005) == f"guest2:80 from {CLIENT4}"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("what", ["fifo", "device", "symlink"])
def test_no_file_the_fast_path_reads_is_opened_blocking_or_through_a_symlink(what: str) -> None:
    """The record, the fast file and the key: a FIFO, a device that never ends (/dev/zero's)
    or a symlink (to the very file it replaces) there sends the hook to the full path at once."""
    with lab_world(backend="nftables") as w:
        two_guests_one_stopped(w)
        for rel, op in (("guests/guest1.json", "stopped"), ("fast/guest1.fast", "stopped"), ("fast/.key", "stopped"),
                        ("fast/guest1.fast", "start"), ("fast/.key", "start")):
            if op == "stopped":
                hook(w, "guest1", "start")
            path = w.state / rel
            original = w.root / "original"
            original.write_bytes(path.read_bytes())
            original.chmod(0o600)
            path.unlink()
            if what == "fifo":
                os.mkfifo(path, 0o600)
            elif what == "device":
                os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's
            else:
                path.symlink_to(original)
            taken, err, took = timed_hook(w, "guest1", op)
            trace = [ln for ln in err.splitlines() if "trace:" in ln]
            assert taken == "full" and path.name in trace[0], (rel, op, err)
            assert took < fastpath.HOOK_LOCK_DEADLINE, (rel, op, took)
            if path.is_symlink() or not path.is_file():  # left as it was (the full path refused it): put back
                path.unlink()
                os.rename(original, path)
            if op == "stopped" and (w.state / "guests" / "guest1.json").exists():
                hook(w, "guest1", "stopped")
            hook(w, "guest1", "start")  # a fast file sealed with the key there now
            hook(w, "guest1", "stopped")


def test_reconcile_takes_a_plan_only_from_a_sealed_fast_file(tmp_path: Path) -> None:
    """fastpath.Unchanged (reconcile's shortcut) checks the MAC as the hook does."""
    cfg, state = tmp_path / "cfg", tmp_path / "state"
    (cfg / "guests").mkdir(parents=True)
    (cfg / "guests" / "web.toml").write_text('address = "192.168.122.10"\nports = ["80"]\n')
    (state / "fast").mkdir(parents=True)
    for d in (cfg, cfg / "guests", state, state / "fast"):
        d.chmod(0o755 if d.is_relative_to(cfg) else 0o700)
    record = '{"backend":"nftables","plan":{}}\n'
    payload = {"format": fastpath.FORMAT, "code": fastpath.code(), "inputs": fastpath.inputs(str(cfg), "web"),
               "record": record, "claims": [["4-tcp-80", "*"]]}
    sealed = fastpath.seal(fastpath.make_key(str(state)), "web", marshal.dumps(payload))
    fast = state / "fast" / "web.fast"

    def served(data: bytes) -> tuple[str, list[tuple[str, str]]] | None:
        fast.write_bytes(data)
        fast.chmod(0o600)
        return fastpath.Unchanged(str(cfg), str(state)).record("web")

    assert served(sealed) == (record, [("4-tcp-80", "*")])
    forged = marshal.dumps({**payload, "record": record.replace("{}", '{"forwards":[]}')})
    assert served(forged) is None  # no MAC
    assert served(sealed[:fastpath.MAC_SIZE] + forged) is None  # another payload's MAC
    assert served(sealed[:-1]) is None
    (state / "fast" / fastpath.KEY).chmod(0o640)  # a key others may read is no secret
    assert served(sealed) is None
