"""What the lab needs on the host: the packages, the guest build, the trixie chroot, and
which libvirt there is."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from lab_common import LabError, LabUnavailable, lab_env, log_default, which
from lab_guests import QEMU_BIN
from lab_procs import host_netns_pids, kill_pid

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build_guest.sh"
CHROOT_SCRIPT = HERE / "build_trixie_chroot.sh"
DEFAULT_CACHE_DIR = Path("/var/cache/virt-forward-e2e")
HOST_PACKAGES = (
    "libvirt-daemon-system",
    "libvirt-clients",
    "qemu-system-x86",
    "dnsmasq-base",
    "iptables",
    "util-linux",
    "iproute2",
)
NEEDED_BINARIES = ("libvirtd", "virtlogd", "virsh", QEMU_BIN, "dnsmasq", "iptables", "nsenter", "unshare", "ip")


def ensure_host_packages(log: Callable[[str], None] = log_default) -> None:
    """apt-get install what the lab needs, if something is missing.

    The packages' postinst scripts may start libvirtd/virtlogd in the host
    namespace (only where systemd or sysvinit scripts run); any such daemon
    that appeared during the install is killed by PID afterwards.
    """
    if all(which(b) for b in NEEDED_BINARIES):
        return
    if os.geteuid() != 0:
        raise LabUnavailable("libvirt/qemu are not installed and we are not root")
    daemons = ("libvirtd", "virtlogd", "virtlockd", "dnsmasq")
    before = host_netns_pids(daemons)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing {' '.join(HOST_PACKAGES)}")
    subprocess.run(["apt-get", "update", "-q"], env=env, check=False, stdout=subprocess.DEVNULL)
    r = subprocess.run(["apt-get", "install", "-y", "-q", *HOST_PACKAGES], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Service starts fail without systemd; make sure dpkg ends configured anyway.
    subprocess.run(["dpkg", "--configure", "-a"], env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for pid in host_netns_pids(daemons) - before:
        log(f"killing host-namespace daemon started by the package install: pid {pid}")
        kill_pid(pid, signal.SIGTERM)
    missing = [b for b in NEEDED_BINARIES if not which(b)]
    if missing:
        raise LabUnavailable(f"still missing after apt-get install: {missing}; apt said: {r.stderr[-2000:]}")


def build_guest(cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR) -> tuple[Path, Path]:
    """Run build_guest.sh (idempotent) and return (kernel, initrd)."""
    cache = Path(cache_dir)
    r = subprocess.run(["bash", str(BUILD_SCRIPT), str(cache)], check=False,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=lab_env())
    if r.returncode != 0:
        raise LabError(f"build_guest.sh failed ({r.returncode}):\n{r.stdout[-4000:]}")
    kernel, initrd = cache / "vmlinuz", cache / "initramfs.cpio.gz"
    if not (kernel.is_file() and initrd.is_file()):
        raise LabError(f"build_guest.sh did not produce {kernel} and {initrd}")
    return kernel, initrd


def build_trixie_chroot(chroot_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR / "trixie",
                        log: Callable[[str], None] = log_default) -> Path:
    """Run build_trixie_chroot.sh (idempotent; a cold build is ~1 min) and return the chroot.

    A failure is a LabError, not LabUnavailable: a machine with apt access must manage it.
    """
    root = Path(chroot_dir)
    t = time.monotonic()
    r = subprocess.run(["bash", str(CHROOT_SCRIPT), str(root)], check=False,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=lab_env())
    if r.returncode != 0:
        raise LabError(f"build_trixie_chroot.sh failed ({r.returncode}):\n{r.stdout[-4000:]}")
    if time.monotonic() - t > 5:
        log(f"built the trixie chroot {root} in {time.monotonic() - t:.1f}s")
    return root


def _parse_version(text: str) -> tuple[int, int, int] | None:
    for word in text.replace(":", " ").split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts[:3]):
            nums = [int(p) for p in parts[:3]] + [0] * (3 - len(parts[:3]))
            return nums[0], nums[1], nums[2]
    return None


def host_libvirt_version(root: str | os.PathLike[str] | None = None) -> tuple[int, int, int] | None:
    """libvirtd's version on the host (or in the chroot ``root``); None when not installed."""
    if root is None:
        exe = which("libvirtd")
        if exe is None:
            return None
        argv = [exe, "--version"]
    else:
        argv = ["chroot", str(root), "/usr/sbin/libvirtd", "--version"]
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=False,
                       env=lab_env())
    return _parse_version(r.stdout) if r.returncode == 0 else None


def libvirt_chroot_from_env(default: str | None = "auto") -> str | None:
    """LibvirtLab's libvirt_chroot from $VF_E2E_LIBVIRT_CHROOT: "auto" (default), "none", or a
    chroot directory ("trixie" means CACHE_DIR/trixie).  A chroot for every lab emulates a
    Debian 13 host (libvirt 11 for both firewall backends) on Debian 12."""
    value = os.environ.get("VF_E2E_LIBVIRT_CHROOT", "").strip()
    if not value:
        return default
    if value == "none":
        return None
    if value == "trixie":
        return str(Path(os.environ.get("VF_E2E_CACHE", str(DEFAULT_CACHE_DIR))) / "trixie")
    return value
