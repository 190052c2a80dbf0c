"""install / uninstall: the libvirt hooks, the config dir and the systemd units.

libvirt runs hooks with PATH=/bin:/usr/bin and only finds new hooks when the
daemon starts, so the hook names our interpreter by absolute path and we tell
the admin to restart libvirtd (or virtqemud/virtnetworkd) once.

The Debian package (debian/) makes its hooks and units with these same functions
at build time, naming /usr/bin/python3 and /usr/lib/python3/dist-packages instead
of the running interpreter and package.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import engine
from .errors import VirtForwardError

QEMU_HOOK = "etc/libvirt/hooks/qemu.d/virt-forward"
NETWORK_HOOK = "etc/libvirt/hooks/network.d/virt-forward"
UNIT_DIR = "etc/systemd/system"
WATCH_UNIT = "virt-forward-watch.service"
BOOT_UNIT = "virt-forward-reconcile.service"

CONFIG_EXAMPLE = """\
# virt-forward host settings.  Every key is optional; see `virt-forward --help`.
#
# backend = "auto"          # "auto" | "nftables" | "iptables"
# public  = ["192.0.2.10"]  # default host addresses forwards listen on; none: every local address
# hairpin = true            # forward from the host and from guests to the public addresses too
# strict  = false           # true: an invalid guest file aborts that guest's start
"""

GUEST_EXAMPLE = """\
# Copy to <domain-name>.toml (the libvirt domain's name) to forward ports to that guest.
address = "192.168.122.10"          # the guest's address on its libvirt network (IPv4 and/or IPv6)
# public = "192.0.2.10"             # host address(es); default: config.toml's public
ports = ["2222:22", "80", "443/tcp", "8000-8009:9000-9009/udp"]
# allow = ["203.0.113.0/24"]        # only these sources
"""


@dataclass(frozen=True)
class FileSpec:
    path: Path
    text: str
    mode: int


class InstallError(VirtForwardError):
    pass


def interpreter() -> str:
    """The interpreter the user installed into, as it was named: a venv's bin/python is a
    symlink to the base interpreter, and resolving it would leave the venv (and the package)."""
    exe = sys.executable
    if not exe or not os.path.isabs(exe):
        raise InstallError(f"cannot tell which Python runs virt-forward (sys.executable is {exe!r})")
    return os.path.normpath(exe)


def package_location() -> str:
    """The directory holding the `virt_forward` package now running (site-packages, or src/)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


HOOK_TEMPLATE = """\
#!{python} -IS
# virt-forward's libvirt {kind} hook, written by {writer} (version {version}).
# It runs {python} with -I -S (no environment, no .pth files: nothing but our code runs as
# root at a guest start) and takes the package from {location}.
# If either goes away (a Python upgrade, a removed venv), run {writer} again;
# `virt-forward doctor` checks both.  Whatever fails, this hook exits 0 and logs why.
import os, sys
if len(sys.argv) < 3 or sys.argv[2] not in {ops!r}:
    sys.exit(0)  # not an operation we act on; print nothing (libvirt reads stdout at migrate/restore)
sys.path.append({location!r})
status = 0
try:
    # fd 0, 1 or 2 closed: the next file opened (the lock, a record) would get that number and
    # receive what is meant for stdout/stderr, ours or a child's; /dev/null takes the place
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)
    try:
        from virt_forward.hook import {entry}
    except BaseException as exc:
        msg = ("virt-forward: hook not run (no forwards changed): cannot import virt_forward from "
               + {location!r} + " with " + sys.executable + ": " + type(exc).__name__ + ": " + str(exc)
               + "; run `virt-forward doctor`")
        try:
            import syslog
            syslog.openlog("virt-forward", syslog.LOG_PID, syslog.LOG_DAEMON)
            syslog.syslog(syslog.LOG_ERR, msg.encode("utf-8", "backslashreplace").decode())
        finally:
            sys.stderr.write(msg + "\\n")
    else:
        status = {entry}(sys.argv[1:], {dirs})
except BaseException:
    pass  # the entry logs its own failures; nothing else may take the guest down
finally:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # None when its fd was closed at start; a closed pipe raises
        except BaseException:
            pass
    # nothing left to finalize: skip the interpreter's teardown (libvirt is waiting), and exit 0
    # unless the entry refused a start on purpose (strict = true)
    os._exit(status if type(status) is int and 0 <= status < 256 else 0)
"""


def hook_script(kind: str, dirs: tuple[str, ...] = (), *, python: str | None = None, location: str | None = None,
                writer: str = "`virt-forward install`") -> str:
    """`dirs`: --config-dir/--state-dir given at install time, baked in (libvirt passes no env).
    `python`, `location`: the interpreter and the directory holding the package where the hook
    will run, when that is not here (a distribution package built elsewhere); default: ours.
    `writer`: the command that writes the hook again, named in its header."""
    from . import __version__
    from .hook import NETWORK_OPS, QEMU_OPS
    python = python or interpreter()
    if any(c.isspace() for c in python) or len(python) > 200:
        # the kernel splits a #! line at the first blank and cuts it at 255 bytes
        raise InstallError(f"{python}: an interpreter path with blanks or over 200 characters cannot "
                           "start a hook script; install virt-forward into a venv at a plainer path")
    given = dict(zip(dirs[::2], dirs[1::2]))
    kwargs = ", ".join(f"{name}={given[flag]!r}" for flag, name in (("--config-dir", "config_dir"),
                                                                    ("--state-dir", "state_dir"))
                       if flag in given)
    ops = tuple(sorted(QEMU_OPS if kind == "qemu" else NETWORK_OPS))
    return HOOK_TEMPLATE.format(python=python, kind=kind, version=__version__, writer=writer,
                                location=location or package_location(), ops=ops,
                                entry="qemu_main" if kind == "qemu" else "network_main", dirs=kwargs)


def probe_hook(path: Path, cdir: Path, timeout: float = 30.0) -> str | None:
    """Run the hook exactly as libvirt would (bare environment, PATH=/bin:/usr/bin, stdin
    closed) with `prepare begin -` for a domain that has no config.  It must exit 0 and say
    nothing; returns what went wrong, None when it did."""
    domain = "virt-forward-hook-check"
    while (cdir / "guests" / f"{domain}.toml").exists():
        domain += "-x"
    try:
        proc = subprocess.run([str(path), domain, "prepare", "begin", "-"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, env={"PATH": "/bin:/usr/bin"},
                              cwd="/")
    except subprocess.TimeoutExpired:
        return f"{path}: no answer after {timeout:g} s"
    except OSError as exc:
        return f"{path}: cannot run: {exc.strerror}"
    said = (proc.stderr + proc.stdout).strip()
    if proc.returncode != 0 or said:
        return f"{path}: exit {proc.returncode}" + (f": {said}" if said else "")
    return None


def installed_hook_problem(path: Path, cdir: Path) -> str | None:
    """Why an installed hook cannot work (its interpreter or package gone, or it fails when run
    as libvirt runs it), None when it works.  `doctor` asks this."""
    try:
        text = path.read_text()
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror}"
    first = text.split("\n", 1)[0]
    python = first[2:].split()[0] if first.startswith("#!") and first[2:].split() else ""
    if not os.access(python, os.X_OK):
        return (f"{path}: its interpreter {python or '(none)'} is gone or not executable "
                "(a Python upgrade or a removed venv?)")
    for line in text.splitlines():
        if line.startswith("sys.path.append(") and line.endswith(")"):
            location = line[len("sys.path.append("):-1].strip("'\"")
            if not os.path.isfile(os.path.join(location, "virt_forward", "hook.py")):
                return f"{path}: the virt_forward package it names is no longer in {location}"
    return probe_hook(path, cdir)


def unit_problems(root: Path) -> list[str]:
    """Units whose interpreter is gone (the watcher would fail to start, again and again)."""
    found = []
    for name in (WATCH_UNIT, BOOT_UNIT):
        try:
            text = (root / UNIT_DIR / name).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("ExecStart="):
                exe = line[len("ExecStart="):].split()[0] if line[len("ExecStart="):].split() else ""
                if not os.access(exe, os.X_OK):
                    found.append(f"{root / UNIT_DIR / name}: its interpreter {exe or '(none)'} is gone")
    return found


def units(*, python: str | None = None) -> dict[str, str]:
    """`python`: the interpreter the units run (default: ours), as for `hook_script`."""
    # -I, not -S: the watcher imports libvirt-python from the same site-packages
    exe = f"{python or interpreter()} -I -m virt_forward"
    after = "libvirtd.service virtqemud.service virtnetworkd.service firewalld.service nftables.service"
    return {
        WATCH_UNIT: f"""[Unit]
Description=virt-forward: keep libvirt guests' port forwards in place after firewall resets
After={after}
PartOf=libvirtd.service

[Service]
ExecStart={exe} watch
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
""",
        BOOT_UNIT: f"""[Unit]
Description=virt-forward: forwards for the guests libvirt starts at boot
After={after}

[Service]
Type=oneshot
ExecStart={exe} reconcile

[Install]
WantedBy=multi-user.target
""",
    }


def planned(root: Path, cdir: Path, dirs: tuple[str, ...] = ()) -> list[FileSpec]:
    files = [FileSpec(root / QEMU_HOOK, hook_script("qemu", dirs), 0o755),
             FileSpec(root / NETWORK_HOOK, hook_script("network", dirs), 0o755)]
    files += [FileSpec(root / UNIT_DIR / name, text, 0o644) for name, text in units().items()]
    if not (cdir / "config.toml").exists():
        files.append(FileSpec(cdir / "config.toml", CONFIG_EXAMPLE, 0o644))
    files.append(FileSpec(cdir / "guests" / "example.toml.sample", GUEST_EXAMPLE, 0o644))
    return files


def _systemd(root: Path) -> bool:
    return root == Path("/") and Path("/run/systemd/system").is_dir()


# The Debian package's hooks live here; /etc/libvirt/hooks holds symlinks that dpkg's scripts own.
PACKAGE_HOOKS = "/usr/lib/virt-forward/hooks/"


def packaged_hooks(root: Path) -> list[Path]:
    """The hook links the Debian package made (postinst makes them, prerm removes them)."""
    return [root / rel for rel in (QEMU_HOOK, NETWORK_HOOK)
            if (root / rel).is_symlink() and os.readlink(root / rel).startswith(PACKAGE_HOOKS)]


def install(root: Path, cdir: Path, dry_run: bool, dirs: tuple[str, ...] = ()) -> list[str]:
    """Write what `planned` says, after proving that the hooks run as libvirt will run them:
    a hook that cannot start would abort every guest start (and kill guests at `reconnect`)."""
    packaged = packaged_hooks(root)
    if packaged:
        # replacing them would leave files that `apt remove` does not take away
        raise InstallError(f"nothing installed: {packaged[0]} is the Debian package's hook; the package "
                           "manages hooks and units (apt install --reinstall virt-forward)")
    specs = planned(root, cdir, dirs)
    out: list[str] = []
    if not dry_run:
        _check_hooks(specs[:2], cdir)
        out.append(f"checked: the hooks run as libvirt runs them ({interpreter()} -IS, "
                   f"package from {package_location()})")
    for spec in specs:
        out.append(f"{'would write' if dry_run else 'wrote'} {spec.path} (mode {spec.mode:04o})")
        if not dry_run:
            _write(spec)
    if _systemd(root) and not dry_run:
        for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", BOOT_UNIT],
                    ["systemctl", "enable", "--now", WATCH_UNIT]):
            subprocess.run(cmd, check=False)
            out.append("ran " + " ".join(cmd))
    else:
        out.append(f"systemd units written; enable them with: systemctl daemon-reload && "
                   f"systemctl enable {BOOT_UNIT} && systemctl enable --now {WATCH_UNIT}")
    out.append("libvirt looks for hooks only when it starts: restart it once now "
               "(systemctl restart libvirtd, or virtqemud and virtnetworkd on modular daemons)")
    return out


def _write(spec: FileSpec) -> None:
    for parent in reversed(spec.path.parents):
        if not parent.exists():
            parent.mkdir(mode=0o755)
    fd, tmp = tempfile.mkstemp(dir=spec.path.parent, prefix=f".{spec.path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(spec.text)
        os.chmod(tmp, spec.mode)
        os.replace(tmp, spec.path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_hooks(hooks: list[FileSpec], cdir: Path) -> None:
    """Run the qemu hook from a private copy before anything is put in place; the network
    hook differs only in its entry (running it would rebuild the firewall), so it is compiled."""
    with tempfile.TemporaryDirectory(prefix="virt-forward-install-") as tmp:
        for spec in hooks:
            compile(spec.text, str(spec.path), "exec")
        qemu = Path(tmp) / "qemu-hook"
        qemu.write_text(hooks[0].text)
        qemu.chmod(0o700)
        failed = probe_hook(qemu, cdir)
    if failed is not None:
        raise InstallError(f"nothing installed: the hook written for {hooks[0].path} fails when libvirt "
                           f"runs it: {failed}")


def uninstall(ctx: engine.Context, root: Path, dry_run: bool) -> list[str]:
    out: list[str] = []
    packaged = packaged_hooks(root)
    if packaged:
        # dpkg owns those (and the units under /lib): `apt remove virt-forward` takes them
        raise InstallError(f"{packaged[0]} is the Debian package's hook: remove the package instead "
                           "(apt remove virt-forward; it removes every rule of ours too)")
    if _systemd(root) and not dry_run:
        subprocess.run(["systemctl", "disable", "--now", WATCH_UNIT, BOOT_UNIT], check=False)
    for rel in (QEMU_HOOK, NETWORK_HOOK, f"{UNIT_DIR}/{WATCH_UNIT}", f"{UNIT_DIR}/{BOOT_UNIT}"):
        path = root / rel
        if path.exists():
            out.append(f"{'would remove' if dry_run else 'removed'} {path}")
            if not dry_run:
                path.unlink()
    out += remove_rules(ctx, root, dry_run)
    out.append(f"kept your configuration in {ctx.config_dir}")
    return out


def remove_rules(ctx: engine.Context, root: Path, dry_run: bool, lock_timeout: float | None = None) -> list[str]:
    """Every rule, guard and record of ours, and the metrics textfile; running guests keep running.
    `uninstall` ends with this; the Debian package's prerm runs it through `remove_rules_main`."""
    out: list[str] = []
    # the metrics textfile, or node_exporter keeps serving its last values as if we still ran
    from .config import settings_or_default
    metrics_file = settings_or_default(ctx.config_dir).metrics_file
    if metrics_file is not None:
        from . import safefile
        from .errors import VirtForwardError
        path = root / Path(metrics_file).relative_to("/")
        try:
            if dry_run:
                if safefile.exists_strict(str(path)):
                    out.append(f"would remove {path}")
            elif safefile.unlink_strict(str(path)):
                out.append(f"removed {path}")
        except VirtForwardError as exc:  # the rules must go all the same
            out.append(f"left {path}: {exc}")
    if dry_run:
        out.append("would remove table inet virt_forward, every guard and every record")
    else:
        from .reconcile import reconcile
        reconcile(ctx, running=[], lock_timeout=lock_timeout)
        out.append("removed table inet virt_forward, every guard and every record")
    return out


def remove_rules_main() -> int:
    """`/usr/bin/python3 -I -B -c 'import sys, virt_forward.install as i; sys.exit(i.remove_rules_main())'`
    from the Debian package's prerm, after dpkg stopped the units (so `uninstall`, which runs
    systemctl on units it wrote itself, does not fit).  Never raises: a failed removal of the
    package would leave it half-installed; says what failed and returns 1 instead."""
    try:
        # bounded: a virt-forward process stuck with our lock must not hang dpkg for ever
        lines = remove_rules(engine.default_context(), Path("/"), dry_run=False, lock_timeout=60.0)
    except Exception as exc:
        print(f"virt-forward: could not remove its rules, guards and records: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    print("\n".join(f"virt-forward: {line}" for line in lines))
    return 0
