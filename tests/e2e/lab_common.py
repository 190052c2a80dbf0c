"""What every lab module shares: the errors, the namespace prefix, and the PATH and
environment the lab's commands run with."""

from __future__ import annotations

import os
import shutil
import sys
import time

NS_PREFIX = "vfe2e-"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LabError(RuntimeError):
    """Something in the lab failed (a bug, or a broken setup)."""


class LabUnavailable(LabError):
    """This machine cannot run the lab at all (not root, no namespaces, no qemu...)."""


def log_default(msg: str) -> None:
    print(f"[libvirt_lab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def lab_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIBVIRT_", "VIRSH_"))}
    env["PATH"] = SBIN_PATH
    env.setdefault("HOME", "/root")
    env["LC_ALL"] = "C"
    return env


def which(name: str) -> str | None:
    if os.path.isabs(name):
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name, path=SBIN_PATH)
