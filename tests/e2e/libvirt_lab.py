"""A real libvirtd with real tiny guests, all inside network namespaces.

``LibvirtLab`` makes a network namespace ``vfe2e-<token>-lab`` and, inside it
and inside a private mount namespace, runs ``virtlogd`` and ``libvirtd`` with
private state: a tmpfs over ``/run`` and bind mounts of per-lab directories
over ``/etc/libvirt`` (a copy of the host's, without its networks or domains),
``/var/lib/libvirt``, ``/var/log/libvirt`` and ``/var/cache/libvirt``.  The
host's own network namespace, firewall, sysctls and ``/etc/libvirt`` are never
touched.  It defines and starts the NAT network ``default`` (virbr0,
192.168.122.0/24 and optionally fd00:122::/64) and boots guests made by
``build_guest.sh`` (direct kernel boot, TCG).  An "outside client" namespace
linked to the lab by a veth pair plays the Internet.  The parts it is made of
live in lab_provision, lab_guests, lab_probes, lab_procs and lab_common.

Stdlib only; run as root.  Example::

    with LibvirtLab("/var/cache/virt-forward-e2e", guests=1) as lab:
        print(lab.http_get("192.168.122.10"))
        client = lab.add_client()
        print(client.probe_tcp("192.168.122.10", 80))
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lab_common import NS_PREFIX, SBIN_PATH, LabError, LabUnavailable, lab_env, log_default, which
from lab_guests import BRIDGE, NET_V4, NET_V6, GuestSpec, default_guests, domain_xml, nat_network_xml, network_xml
from lab_probes import NsRunner, OutsideClient, ProbeResult
from lab_procs import cleanup_stale, delete_netns, kill_pid, list_netns, pid_alive, terminate
from lab_provision import (
    DEFAULT_CACHE_DIR,
    NEEDED_BINARIES,
    build_guest,
    build_trixie_chroot,
    ensure_host_packages,
    host_libvirt_version,
)

__all__ = ["LibvirtLab"]

# libvirt's nftables firewall backend exists from this version on.
NFTABLES_BACKEND_SINCE = (10, 4, 0)
# Inside the lab's /run tmpfs (seen by the host-side view and by a chroot alike).
LAB_BIN = "/run/vfe2e-bin"  # the tc wrapper (first in libvirtd's PATH on libvirt >= 10.4)
LAB_BOOT = "/run/vfe2e-boot"  # guest kernel/initrd, bound here in chroot mode
LAB_XML = "/run/vfe2e-xml"  # the lab's XML files, bound here in chroot mode
HOLDER_PIDFILE = "/run/vfe2e-holder.pid"


_QEMU_CONF_EXTRA = """
# --- virt-forward e2e lab ---
user = "root"
group = "root"
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
remember_owner = 0
"""

# libvirt >= 10.4 adds `tc filter ... action csum` on its bridges; this kernel has no act_csum
# (and no module loading).  In the lab only, this wrapper comes first in libvirtd's PATH:
# it pretends success for that one filter and runs the real tc for everything else.
_TC_WRAPPER = """#!/bin/sh
case " $* " in
  *" action csum "*) exit 0 ;;
esac
for tc in /usr/sbin/tc /sbin/tc /usr/bin/tc; do
  [ -x "$tc" ] && exec "$tc" "$@"
done
echo "tc wrapper: no real tc" >&2
exit 127
"""

_LIBVIRTD_CONF_EXTRA = """
# --- virt-forward e2e lab ---
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

_VIRTLOGD_CONF_EXTRA = """
# --- virt-forward e2e lab ---
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
"""


@dataclass
class _Timings:
    values: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, seconds: float) -> None:
        self.values[key] = round(seconds, 3)


class LibvirtLab(NsRunner):
    """Context manager: libvirtd + NAT network ``default`` + guests, all in namespaces.

    Parameters:
        cache_dir: where build_guest.sh puts (or has put) the guest kernel/initramfs.
        guests: a number of default guests (see ``default_guests``) or explicit GuestSpecs.
        ipv6: give the network fd00:122::1/64 and the default guests fd00:122::10+i.
        hooks: {file name: script text, bytes or Path} put into the lab's
            /etc/libvirt/hooks/qemu.d/ (mode 0755) before libvirtd starts.
        hook_env_path: if set (e.g. "/bin:/usr/bin"), those hooks run with that PATH
            (through a wrapper, see install_hook).
        domain_type: "qemu" (TCG, default) or "kvm".
        boot_timeout: seconds to wait for each guest's first HTTP answer on port 80.
        build: run build_guest.sh first (idempotent); if False, the cache must hold the files.
        keep_workdir: leave the lab's directory (logs, consoles) behind after exit.
        share_qemu_caps_cache: use CACHE_DIR/libvirt-cache as the lab's /var/cache/libvirt,
            so libvirtd's qemu capability probe (~7 s) is paid once per machine, not per lab.
        daemon_path: PATH of virtlogd/libvirtd.  libvirtd 9.0 hands its PATH on to hooks;
            it needs dnsmasq on it, so it cannot be "/bin:/usr/bin" (see install_hook's
            env_path to run a hook with that PATH).
        workdir_parent: where the lab's directory is made (default: the system temp dir).
        log: a callable for progress lines (default: stderr).
        firewall_backend: None (libvirt's default), "iptables" or "nftables": written as
            ``firewall_backend`` into the lab's copy of network.conf (libvirt >= 10.4).
            "nftables" on a host whose libvirt is older (Debian 12's 9.0) runs libvirt 11
            from a Debian 13 chroot (see libvirt_chroot).
        libvirt_chroot: "auto" (a chroot only when firewall_backend="nftables" needs a newer
            libvirt than the host's: CACHE_DIR/trixie, built by build_trixie_chroot.sh),
            None (never), or the directory of a chroot to run libvirt from.  In a chroot,
            libvirtd, virtlogd, virsh, qemu and dnsmasq are the chroot's; the hooks run
            on the host's side of the lab (see install_hook), as do run(), probes and nft.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR,
        guests: int | Sequence[GuestSpec] = 1,
        *,
        ipv6: bool = True,
        hooks: Mapping[str, str | bytes | Path] | None = None,
        hook_env_path: str | None = None,
        domain_type: str = "qemu",
        boot_timeout: float = 90.0,
        build: bool = True,
        keep_workdir: bool = False,
        share_qemu_caps_cache: bool = True,
        daemon_path: str = SBIN_PATH,
        workdir_parent: str | os.PathLike[str] | None = None,
        log: Callable[[str], None] | None = None,
        firewall_backend: str | None = None,
        libvirt_chroot: str | os.PathLike[str] | None = "auto",
    ) -> None:
        if firewall_backend not in (None, "iptables", "nftables"):
            raise ValueError(f"firewall_backend must be None, 'iptables' or 'nftables', not {firewall_backend!r}")
        self.cache_dir = Path(cache_dir)
        self.firewall_backend = firewall_backend
        self._chroot_request = libvirt_chroot
        # Set by start(): the chroot libvirt runs from (None: the host's libvirt) and its version.
        self.chroot: Path | None = None
        self.libvirt_version: tuple[int, int, int] | None = None
        self.ipv6 = ipv6
        self.guest_specs: list[GuestSpec] = (
            default_guests(guests, ipv6=ipv6) if isinstance(guests, int) else list(guests)
        )
        self._initial_hooks = dict(hooks or {})
        self.hook_env_path = hook_env_path
        self.domain_type = domain_type
        self.boot_timeout = boot_timeout
        self._build = build
        self.keep_workdir = keep_workdir
        self.share_qemu_caps_cache = share_qemu_caps_cache
        self.daemon_path = daemon_path
        self._workdir_parent = workdir_parent
        self.log: Callable[[str], None] = log or log_default
        self.token = secrets.token_hex(3)
        self.ns = f"{NS_PREFIX}{self.token}-lab"
        self.kernel: Path = self.cache_dir / "vmlinuz"
        self.initrd: Path = self.cache_dir / "initramfs.cpio.gz"
        self.workdir: Path = Path()
        self.guests: dict[str, GuestSpec] = {}
        self.clients: list[OutsideClient] = []
        self.timings = _Timings()
        self._namespaces: list[str] = []
        self._holder: subprocess.Popen[bytes] | None = None
        self._started = False
        self._closed = False
        self._prev_sigterm: Any = None
        self._sigterm_installed = False
        self._boot_started: dict[str, float] = {}
        self._cache_libvirt_dir = Path()

    # ---------------------------------------------------------------- paths (host side)

    @property
    def etc_dir(self) -> Path:
        """Host path of the lab's /etc/libvirt."""
        return self.workdir / "etc-libvirt"

    @property
    def hooks_dir(self) -> Path:
        """Host path of the lab's /etc/libvirt/hooks/qemu.d."""
        return self.etc_dir / "hooks" / "qemu.d"

    @property
    def log_dir(self) -> Path:
        """Host path of the lab's /var/log/libvirt (libvirtd.log, qemu/<name>.log, consoles)."""
        return self.workdir / "log-libvirt"

    @property
    def run_dir(self) -> Path:
        """Host path of the lab's /run/libvirt."""
        return self.workdir / "run-libvirt"

    def console_path(self, name: str) -> Path:
        return self.log_dir / "qemu" / f"{name}.console"

    def console_log(self, name: str) -> str:
        try:
            return self.console_path(name).read_text(errors="replace")
        except OSError:
            return ""

    @property
    def libvirtd_pid(self) -> int | None:
        return self._read_pid(self.run_dir / "lab-libvirtd.pid")

    @property
    def virtlogd_pid(self) -> int | None:
        return self._read_pid(self.run_dir / "lab-virtlogd.pid")

    @staticmethod
    def _read_pid(p: Path) -> int | None:
        try:
            return int(p.read_text().strip())
        except (OSError, ValueError):
            return None

    def _prefix(self) -> list[str]:
        if self._holder is None:
            raise LabError("lab namespace is not up")
        return ["nsenter", "-t", str(self._holder.pid), "-m", "-n", "--"]

    def _libvirt_prefix(self) -> list[str]:
        if self.chroot is None:
            return self._prefix()
        return [*self._prefix(), "chroot", str(self.chroot)]

    def libvirt_run(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = 120,
                    input: str | None = None, env: Mapping[str, str] | None = None
                    ) -> subprocess.CompletedProcess[str]:
        """Like run(), but in libvirt's root: the chroot's programs when libvirt runs in one."""
        r = subprocess.run([*self._libvirt_prefix(), *argv], input=input, text=True, timeout=timeout,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=dict(env) if env is not None else lab_env(), check=False)
        if check and r.returncode != 0:
            raise LabError(f"{' '.join(argv)} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def nft(self, *args: str, check: bool = True) -> str:
        """``nft ARGS`` in the lab's network namespace (the host's nft); returns stdout."""
        return self.run(["nft", *args], check=check).stdout

    @property
    def uses_nftables_backend(self) -> bool:
        """Does libvirt in this lab use its nftables firewall backend?"""
        return self.firewall_backend == "nftables"

    def _kernel_paths(self) -> tuple[str, str]:
        """Kernel and initrd as libvirt sees them."""
        if self.chroot is None:
            return str(self.kernel), str(self.initrd)
        return f"{LAB_BOOT}/vmlinuz", f"{LAB_BOOT}/initrd"

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> LibvirtLab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Bring the lab up (what ``with`` does).  If it raises, call close() yourself."""
        if self._started:
            raise LabError("lab already started")
        self._started = True
        self._install_sigterm()
        atexit.register(self.close)
        self._resolve_libvirt()
        self._check_prerequisites()
        if self._build:
            t = time.monotonic()
            self.kernel, self.initrd = build_guest(self.cache_dir)
            self.timings.add("build_guest", time.monotonic() - t)
        elif not (self.kernel.is_file() and self.initrd.is_file()):
            raise LabError(f"no guest in {self.cache_dir}; run build_guest.sh")
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{NS_PREFIX}{self.token}-", dir=self._workdir_parent))
        os.chmod(self.workdir, 0o755)
        self._prepare_dirs()
        for name, content in self._initial_hooks.items():
            self.install_hook(name, content, env_path=self.hook_env_path)
        t = time.monotonic()
        self._make_lab_namespace()
        self.timings.add("namespace", time.monotonic() - t)
        t = time.monotonic()
        self._start_daemons()
        self.timings.add("libvirtd_start", time.monotonic() - t)
        t = time.monotonic()
        self._start_network()
        self.timings.add("network_start", time.monotonic() - t)
        t = time.monotonic()
        for spec in self.guest_specs:
            self.start_guest(spec, wait=False)
        for spec in self.guest_specs:
            self.wait_guest(spec.name)
        self.timings.add("guests_boot_to_http", time.monotonic() - t)
        where = f"chroot {self.chroot}" if self.chroot is not None else "host"
        self.log(f"lab {self.ns} up (libvirt {self.libvirt_version} from {where}, firewall backend "
                 f"{self.firewall_backend or 'default'}): {self.timings.values}")

    # ---------------------------------------------------------------- setup steps

    def _resolve_libvirt(self) -> None:
        """Pick the libvirt to run (host or chroot), building the chroot if needed."""
        if os.geteuid() != 0:
            raise LabUnavailable("the libvirt lab needs root")
        host_version = host_libvirt_version()
        req = self._chroot_request
        if req == "auto":
            if self.firewall_backend == "nftables" and (host_version is None or host_version < NFTABLES_BACKEND_SINCE):
                req = self.cache_dir / "trixie"
            else:
                req = None
        if req is None:
            self.chroot = None
            self.libvirt_version = host_version
        else:
            t = time.monotonic()
            root = Path(req)
            if self._build:
                build_trixie_chroot(root, log=self.log)
            self.timings.add("chroot_build", time.monotonic() - t)
            if not (root / "usr/sbin/libvirtd").exists():
                raise LabError(f"no libvirtd in the chroot {root}")
            self.chroot = root.resolve()
            self.libvirt_version = host_libvirt_version(self.chroot)
        if self.firewall_backend == "nftables" and (
                self.libvirt_version is None or self.libvirt_version < NFTABLES_BACKEND_SINCE):
            raise LabError(f"libvirt {self.libvirt_version} has no nftables firewall backend "
                           "(>= 10.4 needed; use libvirt_chroot='auto')")

    def _check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise LabUnavailable("the libvirt lab needs root")
        needed = NEEDED_BINARIES if self.chroot is None else ("nsenter", "unshare", "ip", "chroot")
        if self.uses_nftables_backend:
            needed = (*needed, "nft")
        missing = [b for b in needed if not which(b)]
        if missing:
            raise LabUnavailable(f"missing binaries: {missing} (see ensure_host_packages())")
        probe = f"{NS_PREFIX}{self.token}-probe"
        r = subprocess.run(["ip", "netns", "add", probe], stderr=subprocess.PIPE, text=True, check=False)
        if r.returncode != 0:
            raise LabUnavailable(f"cannot create network namespaces: {r.stderr.strip()}")
        subprocess.run(["ip", "netns", "del", probe], check=False)
        if self.domain_type == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise LabUnavailable("domain_type='kvm' but /dev/kvm is not usable")

    def _prepare_dirs(self) -> None:
        etc = self.etc_dir
        src = Path("/etc/libvirt") if self.chroot is None else self.chroot / "etc/libvirt"
        if src.is_dir():
            shutil.copytree(src, etc, symlinks=True)
        etc.mkdir(exist_ok=True)
        # Nothing of the host's definitions: no networks, domains, pools, autostart links.
        for sub in ("qemu/networks", "qemu/autostart", "storage", "secrets", "nodedev"):
            shutil.rmtree(etc / sub, ignore_errors=True)
        for p in (etc / "qemu").glob("*.xml") if (etc / "qemu").is_dir() else []:
            p.unlink()
        shutil.rmtree(etc / "hooks", ignore_errors=True)
        (etc / "qemu" / "networks" / "autostart").mkdir(parents=True, exist_ok=True)
        self.hooks_dir.mkdir(parents=True, exist_ok=True)
        for conf, extra in (("qemu.conf", _QEMU_CONF_EXTRA), ("libvirtd.conf", _LIBVIRTD_CONF_EXTRA),
                            ("virtlogd.conf", _VIRTLOGD_CONF_EXTRA)):
            with open(etc / conf, "a") as f:
                f.write(extra)
        if self.firewall_backend is not None and self.libvirt_version is not None \
                and self.libvirt_version >= NFTABLES_BACKEND_SINCE:
            with open(etc / "network.conf", "a") as f:
                f.write(f'\n# --- virt-forward e2e lab ---\nfirewall_backend = "{self.firewall_backend}"\n')
        for sub in ("lib-libvirt/qemu", "lib-libvirt/dnsmasq", "lib-libvirt/network", "lib-libvirt/images",
                    "lib-libvirt/boot", "log-libvirt/qemu", "cache-libvirt/qemu", "run-libvirt"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        (self.workdir / "xml").mkdir()
        (self.workdir / "tc-wrapper").write_text(_TC_WRAPPER)

    def _make_lab_namespace(self) -> None:
        r = subprocess.run(["ip", "netns", "add", self.ns], stderr=subprocess.PIPE, text=True, check=False)
        if r.returncode != 0:
            raise LabUnavailable(f"ip netns add {self.ns}: {r.stderr.strip()}")
        self._namespaces.append(self.ns)
        w = self.workdir
        ready = w / "holder.ready"
        if self.share_qemu_caps_cache:
            # libvirt 11's capability cache is kept apart from the host libvirt's.
            self._cache_libvirt_dir = self.cache_dir / ("libvirt-cache" if self.chroot is None
                                                        else "libvirt-cache-chroot")
            (self._cache_libvirt_dir / "qemu").mkdir(parents=True, exist_ok=True)
        else:
            self._cache_libvirt_dir = w / "cache-libvirt"
        # A private mount namespace: tmpfs over /run (hides the host's /run/systemd,
        # /run/dbus, xtables lock...), the lab's own libvirt dirs bound over the real ones.
        script = f"""set -e
mount --make-rprivate /
mount -t tmpfs -o mode=755 lab-run /run
mkdir -p /run/libvirt /run/lock /run/user
mount --bind {shlex.quote(str(w / "run-libvirt"))} /run/libvirt
mount --bind {shlex.quote(str(w / "etc-libvirt"))} /etc/libvirt
mount --bind {shlex.quote(str(w / "lib-libvirt"))} /var/lib/libvirt
mount --bind {shlex.quote(str(w / "log-libvirt"))} /var/log/libvirt
mount --bind {shlex.quote(str(self._cache_libvirt_dir))} /var/cache/libvirt
echo $$ > {HOLDER_PIDFILE}
mkdir -p {LAB_BIN}
cp {shlex.quote(str(w / "tc-wrapper"))} {LAB_BIN}/tc
chmod 0755 {LAB_BIN}/tc
{self._chroot_mounts_script()}
ip link set lo up
touch {shlex.quote(str(ready))}
exec sleep infinity
"""
        self._holder = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(w / "holder.err", "wb"),
            env=lab_env(), start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while not ready.exists():
            if self._holder.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"namespace holder failed: {(w / 'holder.err').read_text(errors='replace')}")
            time.sleep(0.02)

    def _chroot_mounts_script(self) -> str:
        """Shell lines (run by the holder) giving the chroot proc, sys, dev, /run and the lab's dirs.

        All in the lab's private mount namespace: they vanish with it.  The chroot's /run is
        the lab's /run tmpfs itself (so pidfiles, sockets and LAB_BIN are the same on both
        sides); the guest kernel and the XML files are bound below it first.
        """
        if self.chroot is None:
            return ""
        r = shlex.quote(str(self.chroot))
        w = self.workdir
        q = shlex.quote
        return f"""mkdir -p {LAB_BOOT} {LAB_XML}
touch {LAB_BOOT}/vmlinuz {LAB_BOOT}/initrd
mount --bind {q(str(self.kernel))} {LAB_BOOT}/vmlinuz
mount --bind {q(str(self.initrd))} {LAB_BOOT}/initrd
mount --bind {q(str(w / "xml"))} {LAB_XML}
mount -t proc proc {r}/proc
mount -t sysfs sysfs {r}/sys
mount --rbind /dev {r}/dev
mount --bind {q(str(w / "etc-libvirt"))} {r}/etc/libvirt
mount --bind {q(str(w / "lib-libvirt"))} {r}/var/lib/libvirt
mount --bind {q(str(w / "log-libvirt"))} {r}/var/log/libvirt
mount --bind {q(str(self._cache_libvirt_dir))} {r}/var/cache/libvirt
mount --rbind /run {r}/run
"""

    def _start_daemons(self) -> None:
        exe = "/usr/sbin/virtlogd" if self.chroot is not None else (which("virtlogd") or "virtlogd")
        self.libvirt_run([exe, "-d", "-p", "/run/libvirt/lab-virtlogd.pid"], env=self._daemon_env())
        self._start_libvirtd()

    def _daemon_env(self) -> dict[str, str]:
        # A clean environment, as an init system would give.  libvirtd passes its PATH on
        # to hook scripts, so this is the PATH hooks see.  libvirt >= 10.4 gets the tc
        # wrapper first (this kernel has no act_csum, see _TC_WRAPPER).
        path = self.daemon_path
        if self.libvirt_version is not None and self.libvirt_version >= NFTABLES_BACKEND_SINCE:
            path = f"{LAB_BIN}:{path}"
        return {"PATH": path, "LC_ALL": "C", "HOME": "/root"}

    def _start_libvirtd(self) -> None:
        exe = "/usr/sbin/libvirtd" if self.chroot is not None else (which("libvirtd") or "libvirtd")
        self.libvirt_run([exe, "-d", "-p", "/run/libvirt/lab-libvirtd.pid"], env=self._daemon_env())
        self._wait_libvirtd()

    def _wait_libvirtd(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            r = self.libvirt_run(["virsh", "-c", "qemu:///system", "version"], check=False, timeout=30)
            if r.returncode == 0:
                return
            last = r.stderr.strip()
            time.sleep(0.2)
        raise LabError(f"libvirtd did not answer within {timeout}s: {last}\n{self.libvirtd_log()[-3000:]}")

    def libvirtd_log(self) -> str:
        try:
            return (self.log_dir / "libvirtd.log").read_text(errors="replace")
        except OSError:
            return ""

    def add_network(self, name: str, bridge: str, gateway: str, hosts: Sequence[tuple[str, str]] = ()) -> None:
        """Define and start another NAT network (/24 around `gateway`), with static DHCP hosts
        (mac, ip): what discovery reads for a NIC's address on it."""
        xml = self.workdir / "xml" / f"network-{name}.xml"
        xml.write_text(nat_network_xml(name, bridge, gateway, hosts))
        self.virsh("net-define", self._xml_path(xml))
        self.virsh("net-start", name)

    def remove_network(self, name: str) -> None:
        self.virsh("net-destroy", name, check=False)
        self.virsh("net-undefine", name, check=False)

    def _start_network(self) -> None:
        xml = self.workdir / "xml" / "network-default.xml"
        xml.write_text(network_xml(self.ipv6))
        self.virsh("net-define", self._xml_path(xml))
        self.virsh("net-start", "default")
        self.virsh("net-autostart", "default")

    # ---------------------------------------------------------------- public API

    def _xml_path(self, host_path: Path) -> str:
        """A file of workdir/xml as virsh sees it (bound at LAB_XML in chroot mode)."""
        return str(host_path) if self.chroot is None else f"{LAB_XML}/{host_path.name}"

    def virsh(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        """Run ``virsh -c qemu:///system ARGS`` in the lab (libvirt's virsh); returns stdout."""
        return self.libvirt_run(["virsh", "-c", "qemu:///system", *args], check=check, timeout=timeout).stdout

    def iptables_save(self, ipv6: bool = False) -> str:
        """``iptables -S`` of every table in the lab namespace (filter, nat, mangle)."""
        cmd = "ip6tables" if ipv6 else "iptables"
        return "".join(self.run([cmd, "-t", t, "-S"]).stdout for t in ("filter", "nat", "mangle"))

    def start_guest(self, spec: GuestSpec, *, wait: bool = True) -> None:
        """Define (persistent) and start a guest; wait for its HTTP answer unless wait=False."""
        xml = self.workdir / "xml" / f"{spec.name}.xml"
        console = f"/var/log/libvirt/qemu/{spec.name}.console"
        kernel, initrd = self._kernel_paths()
        xml.write_text(domain_xml(spec, Path(kernel), Path(initrd), console, self.domain_type))
        self.guests[spec.name] = spec
        self.virsh("define", self._xml_path(xml))
        t = time.monotonic()
        self.virsh("start", spec.name)
        self.timings.add(f"virsh_start:{spec.name}", time.monotonic() - t)
        self._boot_started[spec.name] = time.monotonic()
        if wait:
            self.wait_guest(spec.name)

    def wait_guest(self, name: str, timeout: float | None = None) -> float:
        """Poll the guest's port 80 from the lab (IPv4, then IPv6 if it has one) until it
        answers with its name; returns seconds since its start."""
        spec = self.guests[name]
        timeout = self.boot_timeout if timeout is None else timeout
        t0 = self._boot_started.get(name, time.monotonic())
        deadline = time.monotonic() + timeout
        for family, addr in (("v4", spec.ip), ("v6", spec.ip6)):
            if addr is None:
                continue
            last = ProbeResult("error")
            while True:
                last = self.probe_tcp(addr, 80, b"GET / HTTP/1.0\r\n\r\n", timeout=1.0, read_idle=1.0)
                if last.ok and f"guest={name} " in last.text:
                    took = time.monotonic() - t0
                    self.timings.add(f"boot_to_http_{family}:{name}", took)
                    break
                if time.monotonic() > deadline:
                    raise LabError(
                        f"guest {name} ({addr}) did not answer HTTP within {timeout}s: last probe {last}\n"
                        f"--- console tail ---\n{self.console_log(name)[-3000:]}\n"
                        f"--- qemu log ---\n{self._qemu_log(name)[-2000:]}"
                    )
                time.sleep(0.3)
        took = time.monotonic() - t0
        ready_line = [ln for ln in self.console_log(name).splitlines() if "VF-E2E-READY" in ln]
        self.log(f"guest {name} answers HTTP after {took:.1f}s ({ready_line[-1] if ready_line else 'no marker'})")
        return took

    def _qemu_log(self, name: str) -> str:
        try:
            return (self.log_dir / "qemu" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def destroy_guest(self, name: str, *, undefine: bool = True) -> None:
        """virsh destroy (and undefine) a guest; ignores a guest that is not running."""
        self.virsh("destroy", name, check=False, timeout=60)
        if undefine:
            self.virsh("undefine", name, check=False, timeout=60)
            self.guests.pop(name, None)

    def _hook_paths(self, name: str, kind: str) -> tuple[Path, Path, str]:
        """(host path of hooks/KIND.d/NAME, host path of its body, the body's path in the lab)."""
        if kind not in ("qemu", "network"):
            raise ValueError(f"hook kind must be 'qemu' or 'network', not {kind!r}")
        if "/" in name or name in ("", ".", "..") or name.startswith("."):
            raise ValueError(f"bad hook name {name!r}")
        bodies = "hook-bodies" if kind == "qemu" else "hook-bodies-network"
        return (self.etc_dir / "hooks" / f"{kind}.d" / name, self.etc_dir / bodies / name,
                f"/etc/libvirt/{bodies}/{name}")

    def install_hook(self, name: str, content: str | bytes | Path, *, restart: bool = False,
                     env_path: str | None = None, kind: str = "qemu") -> Path:
        """Write an executable hook to the lab's /etc/libvirt/hooks/KIND.d/NAME; returns its host path.

        kind is "qemu" (default) or "network".  libvirtd only notices hooks when it
        starts: pass restart=True (or call restart_libvirtd()) if the lab is already
        running.  With env_path (e.g. "/bin:/usr/bin"), KIND.d/NAME is a small wrapper
        that sets PATH=env_path and execs the real script, kept in the lab's
        /etc/libvirt/hook-bodies/NAME (hook-bodies-network/ for network hooks).

        When libvirt runs in a chroot, KIND.d/NAME is always such a wrapper, and it
        leaves the chroot first: ``nsenter -t HOLDER -m`` (the holder's pid is in
        /run/vfe2e-holder.pid) enters the lab's mount namespace, whose root is the
        host's, so the body runs with the host's interpreters and files (e.g. the
        installed virt-forward), still in the lab's network namespace.
        """
        dest, body, body_in_lab = self._hook_paths(name, kind)
        dest.parent.mkdir(parents=True, exist_ok=True)
        wrapped = env_path is not None or self.chroot is not None
        if not wrapped:
            body = dest
        body.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, body)
        elif isinstance(content, bytes):
            body.write_bytes(content)
        else:
            body.write_text(content)
        body.chmod(0o755)
        if wrapped:
            text = "#!/bin/sh\n"
            if env_path is not None:
                text += f"PATH={shlex.quote(env_path)}\nexport PATH\n"
            if self.chroot is not None:
                text += (f'exec /usr/bin/nsenter -t "$(cat {HOLDER_PIDFILE})" -m -- '
                         f'{shlex.quote(body_in_lab)} "$@"\n')
            else:
                text += f'exec {shlex.quote(body_in_lab)} "$@"\n'
            dest.write_text(text)
            dest.chmod(0o755)
        if restart:
            self.restart_libvirtd()
        return dest

    def remove_hook(self, name: str, *, restart: bool = False, kind: str = "qemu") -> None:
        dest, body, _ = self._hook_paths(name, kind)
        dest.unlink(missing_ok=True)
        body.unlink(missing_ok=True)
        if restart:
            self.restart_libvirtd()

    def restart_libvirtd(self) -> float:
        """Stop libvirtd (SIGTERM, guests keep running) and start it again; returns seconds taken."""
        t = time.monotonic()
        pid = self.libvirtd_pid
        if pid is not None:
            terminate([pid], grace=15.0)
        self._start_libvirtd()
        took = time.monotonic() - t
        self.timings.add("libvirtd_restart", took)
        return took

    def reattach_taps(self) -> list[str]:
        """Put every guest tap (vnet*) that has no bridge back on virbr0; returns their names.

        libvirt (9.0 and 11.3 alike) does not re-plug running guests after
        ``net-destroy`` + ``net-start``, nor on a later daemon restart: an admin does this.
        """
        links = json.loads(self.run(["ip", "-j", "link", "show"]).stdout)
        taps = [str(ln["ifname"]) for ln in links
                if str(ln.get("ifname", "")).startswith("vnet") and not ln.get("master")]
        for tap in taps:
            self.run(["ip", "link", "set", tap, "master", BRIDGE])
        return taps

    def sighup_libvirtd(self) -> None:
        """Send SIGHUP to libvirtd (it reloads and re-applies network firewall rules)."""
        pid = self.libvirtd_pid
        if pid is None or not kill_pid(pid, signal.SIGHUP):
            raise LabError("libvirtd is not running")

    def add_client(
        self,
        *,
        lab_addr: str = "198.51.100.1/24",
        client_addr: str = "198.51.100.2/24",
        lab_addr6: str | None = "2001:db8:5100::1/64",
        client_addr6: str | None = "2001:db8:5100::2/64",
        route_to_guests: bool = True,
    ) -> OutsideClient:
        """A new namespace linked to the lab by a veth pair; the lab side gets the 'public' address.

        route_to_guests adds routes to 192.168.122.0/24 (and fd00:122::/64) via the lab,
        like a neighbour on the same wire that knows the private network.
        """
        idx = len(self.clients)
        ns = f"{NS_PREFIX}{self.token}-c{idx}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self._namespaces.append(ns)
        lab_if, client_if = f"vfpub{idx}", "eth0"
        # `ip -n` enters the lab/client namespaces from the host's mount namespace
        # (where /run/netns is visible); nothing is created in the host's netns.
        steps: list[list[str]] = [
            ["ip", "-n", self.ns, "link", "add", lab_if, "type", "veth", "peer", "name", client_if, "netns", ns],
            ["ip", "-n", self.ns, "addr", "add", lab_addr, "dev", lab_if],
            ["ip", "-n", self.ns, "link", "set", lab_if, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "addr", "add", client_addr, "dev", client_if],
            ["ip", "-n", ns, "link", "set", client_if, "up"],
        ]
        if lab_addr6 and client_addr6:
            steps += [
                ["ip", "-n", self.ns, "-6", "addr", "add", lab_addr6, "dev", lab_if, "nodad"],
                ["ip", "-n", ns, "-6", "addr", "add", client_addr6, "dev", client_if, "nodad"],
            ]
        if route_to_guests:
            steps.append(["ip", "-n", ns, "route", "add", f"{NET_V4}.0/24", "via", lab_addr.split("/")[0]])
            if self.ipv6 and lab_addr6 and client_addr6:
                steps.append(["ip", "-n", ns, "-6", "route", "add", f"{NET_V6}:/64", "via", lab_addr6.split("/")[0]])
        for argv in steps:
            r = subprocess.run(argv, stderr=subprocess.PIPE, text=True, check=False)
            if r.returncode != 0:
                raise LabError(f"{' '.join(argv)}: {r.stderr.strip()}")
        client = OutsideClient(ns=ns, lab_if=lab_if, client_if=client_if, lab_addr=lab_addr,
                               client_addr=client_addr,
                               lab_addr6=lab_addr6 if client_addr6 else None,
                               client_addr6=client_addr6 if lab_addr6 else None)
        self.clients.append(client)
        return client

    # ---------------------------------------------------------------- teardown

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum: int, frame: types.FrameType | None) -> None:
            raise SystemExit(128 + signum)

        self._prev_sigterm = signal.signal(signal.SIGTERM, on_term)
        self._sigterm_installed = True

    def close(self) -> None:
        """Destroy guests, kill every process of the lab, delete its namespaces.  Idempotent."""
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        # Ctrl-C during teardown would leave things behind: hold it off until the end.
        old_int: Any = None
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._teardown()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, old_int)
                if self._sigterm_installed:
                    signal.signal(signal.SIGTERM, self._prev_sigterm)
            atexit.unregister(self.close)

    def _teardown(self) -> None:
        t = time.monotonic()
        holder_alive = self._holder is not None and self._holder.poll() is None
        lv_pid = self.libvirtd_pid if self.workdir != Path() else None
        if holder_alive and lv_pid is not None and pid_alive(lv_pid):
            for name in list(self.guests):
                try:
                    self.destroy_guest(name)
                except Exception as e:  # noqa: BLE001 - teardown goes on
                    self.log(f"teardown: destroy {name}: {e}")
            try:
                self.virsh("net-destroy", "default", check=False, timeout=60)
            except Exception as e:  # noqa: BLE001
                self.log(f"teardown: net-destroy: {e}")
        daemons = [p for p in (lv_pid, self.virtlogd_pid if self.workdir != Path() else None) if p]
        terminate([p for p in daemons if pid_alive(p)], grace=10.0)
        # Everything else that runs in our namespaces (dnsmasq, qemu, the holder, probes).
        for ns in reversed(self._namespaces):
            try:
                delete_netns(ns)
            except Exception as e:  # noqa: BLE001
                self.log(f"teardown: delete {ns}: {e}")
        if self._holder is not None:
            if self._holder.poll() is None:
                kill_pid(self._holder.pid, signal.SIGKILL)
            try:
                self._holder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.log(f"teardown: holder {self._holder.pid} did not exit")
        left = [ns for ns in self._namespaces if ns in list_netns()]
        if left:
            self.log(f"teardown: namespaces still there: {left}")
        if self.workdir != Path() and self.workdir.exists():
            if self.keep_workdir:
                self.log(f"teardown: kept {self.workdir}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings.add("teardown", time.monotonic() - t)


def _main(argv: Sequence[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Start the virt-forward e2e libvirt lab, report timings, tear it down.")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    ap.add_argument("--guests", type=int, default=1)
    ap.add_argument("--no-ipv6", action="store_true")
    ap.add_argument("--domain-type", default="qemu")
    ap.add_argument("--hold", type=float, default=0.0, help="seconds to keep the lab up (Ctrl-C ends it)")
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--firewall-backend", choices=("iptables", "nftables"), default=None,
                    help="libvirt's firewall backend (nftables: libvirt 11 from a trixie chroot if the host's is older)")
    ap.add_argument("--libvirt-chroot", default="auto", help="'auto', 'none' or a chroot directory")
    ap.add_argument("--cleanup-stale", action="store_true", help="only remove leftover vfe2e-* namespaces")
    a = ap.parse_args(argv)
    if a.cleanup_stale:
        print(cleanup_stale())
        return 0
    ensure_host_packages()
    with LibvirtLab(a.cache_dir, a.guests, ipv6=not a.no_ipv6, domain_type=a.domain_type,
                    keep_workdir=a.keep_workdir, firewall_backend=a.firewall_backend,
                    libvirt_chroot=None if a.libvirt_chroot == "none" else a.libvirt_chroot) as lab:
        print(f"libvirt {lab.libvirt_version} ({'chroot ' + str(lab.chroot) if lab.chroot else 'host'})")
        for spec in lab.guest_specs:
            print(spec.name, lab.http_get(spec.ip).strip())
        if a.hold:
            print(f"lab namespace: {lab.ns}; nsenter -t {lab._holder.pid if lab._holder else '?'} -m -n", flush=True)
            time.sleep(a.hold)
    print(json.dumps(lab.timings.values, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
