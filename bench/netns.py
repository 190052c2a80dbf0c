"""Run parts of the benchmark inside a network namespace without `ip netns exec`.

`ip netns exec` costs several milliseconds per call (it unshares a mount
namespace and remounts /sys), which would be added to every hook timing.  Instead
the benchmark process itself switches its network namespace with setns(2);
children it starts inherit it, so a timed `subprocess.run` measures only the
command, exactly as libvirtd (already in the right namespace) would run it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """The calling thread is in namespace `name` (from `ip netns add`) inside the block."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
    finally:
        os.close(home)
