"""install / uninstall: the libvirt hooks, the config dir and the systemd units.

libvirt runs hooks with PATH=/bin:/usr/bin and only finds new hooks when the
daemon starts, so the hook names our interpreter by absolute path and we tell
the admin to restart libvirtd (or virtqemud/virtnetworkd) once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import engine

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


def _python() -> str:
    return os.path.realpath(sys.executable)


def hook_script(kind: str, dirs: tuple[str, ...] = ()) -> str:
    """`dirs`: --config-dir/--state-dir given at install time, baked in (libvirt passes no env)."""
    args = [*dirs, "hook" if kind == "qemu" else "network-hook"]
    # -I: the hook must not pick up PYTHONPATH or a stray module from the cwd.
    return (f"#!{_python()} -I\n"
            f"# virt-forward's libvirt {kind} hook, written by `virt-forward install`.\n"
            "import sys\n"
            "from virt_forward.cli import main\n"
            f"sys.exit(main([{', '.join(map(repr, args))}, *sys.argv[1:]]))\n")


def units() -> dict[str, str]:
    exe = f"{_python()} -I -m virt_forward"
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


def install(root: Path, cdir: Path, dry_run: bool, dirs: tuple[str, ...] = ()) -> list[str]:
    out: list[str] = []
    for spec in planned(root, cdir, dirs):
        out.append(f"{'would write' if dry_run else 'wrote'} {spec.path} (mode {spec.mode:04o})")
        if dry_run:
            continue
        for parent in reversed(spec.path.parents):
            if not parent.exists():
                parent.mkdir(mode=0o755)
        tmp = spec.path.with_name(spec.path.name + ".tmp")
        tmp.write_text(spec.text)
        tmp.chmod(spec.mode)
        os.replace(tmp, spec.path)
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


def uninstall(ctx: engine.Context, root: Path, dry_run: bool) -> list[str]:
    out: list[str] = []
    if _systemd(root) and not dry_run:
        subprocess.run(["systemctl", "disable", "--now", WATCH_UNIT, BOOT_UNIT], check=False)
    for rel in (QEMU_HOOK, NETWORK_HOOK, f"{UNIT_DIR}/{WATCH_UNIT}", f"{UNIT_DIR}/{BOOT_UNIT}"):
        path = root / rel
        if path.exists():
            out.append(f"{'would remove' if dry_run else 'removed'} {path}")
            if not dry_run:
                path.unlink()
    if dry_run:
        out.append("would remove table inet virt_forward, every guard and every record")
    else:
        from .reconcile import reconcile
        reconcile(ctx, running=[])
        out.append("removed table inet virt_forward, every guard and every record")
    out.append(f"kept your configuration in {ctx.config_dir}")
    return out
