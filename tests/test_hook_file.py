"""The hook file `install` writes, run as libvirt runs it: it must never take a guest down.

Each test runs the real file (shebang and all) with a bare environment, as libvirtd
does.  Calls that could touch a firewall run inside a network namespace made here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from virt_forward import install
from virt_forward.errors import StateError
from virt_forward.state import StateStore

from conftest import write_trusted
from netns_util import empty_netns

BARE = {"PATH": "/bin:/usr/bin"}


@pytest.fixture
def installed(cdir: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(qemu hook, config dir, state dir) written by install into a temp root."""
    root, state = tmp_path / "root", tmp_path / "state"
    install.install(root, cdir, dry_run=False, dirs=("--config-dir", str(cdir), "--state-dir", str(state)))
    return root / install.QEMU_HOOK, cdir, state


@pytest.fixture
def netns() -> Iterator[str]:
    with empty_netns("vfhook") as name:
        yield name


def run(hook: Path, *argv: str | bytes, stdin: bytes | None = b"", ns: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    cmd: list[str | bytes] = (["ip", "netns", "exec", ns] if ns else []) + [str(hook), *argv]
    return subprocess.run(cmd, input=stdin, stdin=subprocess.DEVNULL if stdin is None else None,
                          capture_output=True, env=BARE, timeout=timeout)


def test_the_hook_names_the_interpreter_it_was_installed_with_unresolved(installed: tuple[Path, Path, Path]) -> None:
    hook, _, _ = installed
    first, *rest = hook.read_text().splitlines()
    # a venv's bin/python is a symlink to the base interpreter: resolving it would leave the venv
    assert first == f"#!{os.path.normpath(sys.executable)} -IS"
    assert f"sys.path.append({install.package_location()!r})" in rest
    assert os.stat(hook).st_mode & 0o777 == 0o755


@pytest.mark.parametrize("op", ["migrate", "restore", "attach", "nonsense", ""])
def test_operations_not_ours_print_nothing_and_import_nothing(installed: tuple[Path, Path, Path], tmp_path: Path,
                                                              op: str) -> None:
    hook, _, _ = installed
    # the same file with a package location that does not exist: it must not even try to import
    broken = tmp_path / "broken-hook"
    broken.write_text(hook.read_text().replace(repr(install.package_location()), repr("/nonexistent")))
    broken.chmod(0o755)
    for path in (hook, broken):
        r = run(path, "web", op, "begin", "-", stdin=b"<domain/>")
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b""), (path, r)


def test_an_import_failure_is_logged_and_the_guest_starts(installed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    hook, _, _ = installed
    broken = tmp_path / "broken-hook"
    broken.write_text(hook.read_text().replace(repr(install.package_location()), repr("/nonexistent")))
    broken.chmod(0o755)
    for op in ("prepare", "start", "reconnect", "stopped"):
        r = run(broken, "web", op, "begin", "-", stdin=b"<domain/>")
        assert r.returncode == 0 and r.stdout == b"", r
        assert b"cannot import virt_forward from /nonexistent" in r.stderr, r.stderr


@pytest.mark.parametrize("name", [b"-h", b"--help", b"-x", b"web\xff\xfe", b"--", b"web\x1b[31m"])
def test_any_domain_name_is_just_a_name(installed: tuple[Path, Path, Path], name: bytes) -> None:
    hook, _, _ = installed
    for op in ("prepare", "start", "stopped"):
        r = run(hook, name, op, "begin", "-", stdin=b"<domain/>")
        assert r.returncode == 0 and r.stdout == b"", r  # no argparse help on stdout
        assert b"\x1b" not in r.stderr and b"\xff" not in r.stderr  # escaped in the log line


def test_strict_blocks_only_prepare_and_start(installed: tuple[Path, Path, Path]) -> None:
    hook, cdir, _ = installed
    write_trusted(cdir / "config.toml", "strict = true\n")
    write_trusted(cdir / "guests" / "web.toml", 'address = "192.168.122.10"\nports = ["80", "x"]\n')
    codes = {op: run(hook, "web", op, "begin", "-", stdin=b"<domain/>").returncode
             for op in ("prepare", "start", "started", "reconnect", "stopped", "release")}
    assert codes == {"prepare": 3, "start": 3, "started": 0, "reconnect": 0, "stopped": 0, "release": 0}
    r = run(hook, "web", "start", "begin", "-")
    assert b"web.toml:2: ports: 'x'" in r.stderr and r.stdout == b""


def test_not_strict_an_invalid_file_does_not_block(installed: tuple[Path, Path, Path]) -> None:
    hook, cdir, _ = installed
    write_trusted(cdir / "guests" / "web.toml", 'ports = [1]\naddress = "nope"\n')
    r = run(hook, "web", "prepare", "begin", "-")
    assert r.returncode == 0 and b"web.toml" in r.stderr


def test_stdin_is_capped_and_may_be_closed(installed: tuple[Path, Path, Path], netns: str) -> None:
    hook, cdir, _ = installed
    write_trusted(cdir / "guests" / "web.toml", 'address = "192.168.122.10"\nports = ["80"]\n')
    big = b"<domain>" + b" " * (2 << 20) + b"</domain>"
    r = run(hook, "web", "start", "begin", "-", stdin=big, ns=netns)
    assert r.returncode == 0 and b"more than 1048576 bytes" in r.stderr, r
    r = run(hook, "web", "stopped", "end", "-", stdin=big, ns=netns)  # removal never needs the XML
    assert r.returncode == 0 and r.stdout == b"", r
    r = run(hook, "nobody", "start", "begin", "-", stdin=None, ns=netns)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b""), r


def test_a_held_lock_does_not_hang_a_guest_start(installed: tuple[Path, Path, Path], netns: str) -> None:
    hook, cdir, state = installed
    write_trusted(cdir / "guests" / "web.toml", 'address = "192.168.122.10"\nports = ["80"]\n')
    with StateStore(state).lock():
        t0 = time.monotonic()
        r = run(hook, "web", "start", "begin", "-", stdin=b"<domain/>", ns=netns)
        took = time.monotonic() - t0
    assert r.returncode == 0 and b"held the lock for more than 10 s" in r.stderr, r
    assert 9.5 < took < 20, took
    assert StateStore(state).read("web") is None  # nothing half done


def test_the_lock_deadline_in_process(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    with store.lock():
        t0 = time.monotonic()
        with pytest.raises(StateError, match="held the lock for more than 0.2 s"):
            with store.lock(timeout=0.2):
                pass
        assert time.monotonic() - t0 < 2
    with store.lock(timeout=0.2):  # free again
        pass


def test_install_refuses_a_hook_that_cannot_run(cdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what happened: the hook ran an interpreter without our package
    monkeypatch.setattr(install, "package_location", lambda: str(tmp_path / "no-package-here"))
    root = tmp_path / "root"
    with pytest.raises(install.InstallError, match="nothing installed.*cannot import virt_forward"):
        install.install(root, cdir, dry_run=False)
    assert not (root / install.QEMU_HOOK).exists() and not (root / install.NETWORK_HOOK).exists()


def test_doctor_finds_a_hook_whose_interpreter_or_package_is_gone(installed: tuple[Path, Path, Path],
                                                                  tmp_path: Path) -> None:
    hook, cdir, _ = installed
    assert install.installed_hook_problem(hook, cdir) is None
    text = hook.read_text()
    gone_python = tmp_path / "a"
    gone_python.write_text(text.replace(f"#!{os.path.normpath(sys.executable)}", "#!/opt/gone/bin/python", 1))
    assert "interpreter /opt/gone/bin/python is gone" in (install.installed_hook_problem(gone_python, cdir) or "")
    gone_pkg = tmp_path / "b"
    gone_pkg.write_text(text.replace(repr(install.package_location()), repr(str(tmp_path))))
    gone_pkg.chmod(0o755)
    assert "no longer in" in (install.installed_hook_problem(gone_pkg, cdir) or "")


def test_install_writes_units_with_the_same_interpreter(installed: tuple[Path, Path, Path]) -> None:
    hook, _, _ = installed
    root = hook.parents[4]
    unit = (root / install.UNIT_DIR / install.WATCH_UNIT).read_text()
    assert f"ExecStart={os.path.normpath(sys.executable)} -I -m virt_forward watch" in unit
    assert install.unit_problems(root) == []
    (root / install.UNIT_DIR / install.WATCH_UNIT).write_text(unit.replace(sys.executable, "/opt/gone/python"))
    assert install.unit_problems(root) == [f"{root / install.UNIT_DIR / install.WATCH_UNIT}: its interpreter "
                                           "/opt/gone/python is gone"]


def test_the_cli_hook_takes_every_word_after_it_as_libvirts(installed: tuple[Path, Path, Path], netns: str) -> None:
    # what happened: `virt-forward hook -h ...` printed argparse's usage (a domain may be named -h)
    _, cdir, state = installed
    write_trusted(cdir / "guests" / "-h.toml", 'address = "192.168.122.10"\nports = ["8080:80"]\n')
    cli = ["ip", "netns", "exec", netns, sys.executable, "-m", "virt_forward", "--config-dir", str(cdir),
           "--state-dir", str(state)]
    r = subprocess.run([*cli, "hook", "-h", "start", "begin", "-"], input=b"<domain/>", capture_output=True,
                       env=BARE, timeout=60, cwd="/")
    assert (r.returncode, r.stdout) == (0, b""), r
    assert b"-h: 1 forward(s) live" in r.stderr, r.stderr
    assert StateStore(state).read("-h") is not None
    r = subprocess.run([*cli, "hook", "-h", "stopped", "end", "--debug"], input=b"", capture_output=True,
                       env=BARE, timeout=60, cwd="/")
    assert (r.returncode, r.stdout) == (0, b""), r
    assert StateStore(state).read("-h") is None
    r = subprocess.run([*cli, "network-hook", "--help", "started", "begin", "-"], input=b"", capture_output=True,
                       env=BARE, timeout=60, cwd="/")
    assert (r.returncode, r.stdout) == (0, b""), r


NETWORK_XML = ("<network><name>default</name><bridge name='virbr0'/>"
               "<ip address='192.168.122.1' netmask='255.255.255.0'><dhcp/></ip></network>")


def test_the_network_hook_keeps_guests_waiting_for_a_lease(cdir: Path, tmp_path: Path, netns: str) -> None:
    # what happened: the network hook passed only recorded guests as running, reconcile deleted
    # the kept XML of a guest still waiting for its lease, and without libvirt-python nothing
    # ever applied that guest once the lease came
    state, libvirt = tmp_path / "state", tmp_path / "libvirt"
    install.install(tmp_path / "root", cdir, dry_run=False, dirs=("--config-dir", str(cdir), "--state-dir", str(state)))
    qemu, network = tmp_path / "root" / install.QEMU_HOOK, tmp_path / "root" / install.NETWORK_HOOK
    (libvirt / "etc/libvirt/qemu/networks").mkdir(parents=True)
    (libvirt / "etc/libvirt/qemu/networks/default.xml").write_text(NETWORK_XML)
    env = {**BARE, "VIRT_FORWARD_LIBVIRT_ROOT": str(libvirt),
           "VIRT_FORWARD_LIBVIRT_URI": f"qemu+unix:///system?socket={tmp_path}/no-libvirtd"}
    write_trusted(cdir / "guests" / "web.toml", 'address = "192.168.122.10"\nports = ["8080:80"]\n')
    write_trusted(cdir / "guests" / "dyn.toml", 'ports = ["2222:22"]\n')
    mac = "52:54:00:00:00:14"
    dyn_xml = (f"<domain type='kvm'><name>dyn</name><devices><interface type='network'><mac address='{mac}'/>"
               "<source network='default' bridge='virbr0'/></interface></devices></domain>").encode()

    def hook(path: Path, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run(["ip", "netns", "exec", netns, str(path), *argv], input=stdin, capture_output=True,
                           env=env, timeout=60)
        assert (r.returncode, r.stdout) == (0, b""), r
        return r

    store = StateStore(state)
    hook(qemu, "web", "start", "begin", "-", stdin=b"<domain/>")
    r = hook(qemu, "dyn", "start", "begin", "-", stdin=dyn_xml)
    assert b"address not known yet" in r.stderr, r.stderr
    assert store.read("web") is not None and store.read("dyn") is None and store.xml_domains() == ["dyn"]
    hook(network, "default", "started", "begin", "-")
    assert store.xml_domains() == ["dyn"]  # still waiting, still known to be running
    lease = libvirt / "var/lib/libvirt/dnsmasq/virbr0.status"
    lease.parent.mkdir(parents=True)
    lease.write_text(f'[{{"ip-address": "192.168.122.20", "mac-address": "{mac}", '
                     f'"expiry-time": {int(time.time()) + 3600}, "hostname": "dyn"}}]')
    hook(network, "default", "started", "begin", "-")
    recorded = store.read("dyn")
    assert recorded is not None and [str(f.guest) for f in recorded.forwards] == ["192.168.122.20"], recorded
    ruleset = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "ruleset"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    assert "192.168.122.20" in ruleset and "192.168.122.10" in ruleset


def test_the_network_hook_fails_quietly_into_a_closed_pipe(cdir: Path, tmp_path: Path, netns: str) -> None:
    state = tmp_path / "state"
    state.write_text("not a directory")  # every step fails, and the catch-all's line cannot be written
    install.install(tmp_path / "root", cdir, dry_run=False, dirs=("--config-dir", str(cdir), "--state-dir", str(state)))
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    try:
        r = subprocess.run(["ip", "netns", "exec", netns, str(tmp_path / "root" / install.NETWORK_HOOK), "default", "started", "begin", "-"],
                           input=b"<network/>", stdout=subprocess.PIPE, stderr=w_fd, env=BARE, timeout=60)
    finally:
        os.close(w_fd)
    assert (r.returncode, r.stdout) == (0, b""), r
