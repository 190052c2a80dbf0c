"""The one module that executes commands.  Everything else is pure."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from .errors import FirewallError

# libvirt runs hooks with PATH=/bin:/usr/bin, but nft and iptables live in sbin.
SEARCH_PATH = "/usr/sbin:/sbin:/usr/bin:/bin:/usr/local/sbin:/usr/local/bin"


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH + ":" + os.environ.get("PATH", ""))


def run(argv: list[str], *, stdin: str | None = None, check: bool = True, timeout: float = 30) -> Result:
    exe = which(argv[0])
    if exe is None:
        raise FirewallError(f"{argv[0]}: not found in {SEARCH_PATH}")
    try:
        proc = subprocess.run([exe, *argv[1:]], input=stdin, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PATH": SEARCH_PATH, "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        raise FirewallError(f"{' '.join(argv)}: no answer after {timeout:g} s") from None
    result = Result(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise FirewallError(f"{' '.join(argv)} failed: {first_error(proc.stderr)}")
    return result


def first_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "Error" in ln or "error" in ln:
            return ln
    return lines[0] if lines else "(no message)"


def nft_apply(batch: str) -> None:
    """One transaction: all of the batch or none of it."""
    result = run(["nft", "-f", "-"], stdin=batch, check=False)
    if result.returncode != 0:
        raise FirewallError(f"nft rejected the change (nothing applied): {_nft_reason(result.stderr)}")


def _nft_reason(stderr: str) -> str:
    msg = first_error(stderr)
    if "Device or resource busy" in msg or "File exists" in msg:
        return msg + " (a public address:port/protocol is already forwarded to another guest?)"
    return msg
