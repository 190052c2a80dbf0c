"""The state dir's two primitives, shared by the engine and the hook's fast path: the lock
that serialises every change, and the atomic replacement of a file.  Imports only os,
fcntl and time: the fast path runs at every guest start."""

from __future__ import annotations

import fcntl
import os
import time


class LockTimeout(Exception):
    """Another virt-forward process held the lock past the deadline; nothing was changed."""


class lock:
    """Exclusive for the whole read-plan-apply-record cycle (a with-block).  `timeout`: give up
    after that many seconds with LockTimeout (the hook: a guest start must never hang on us);
    None: wait as long as it takes.  A class, not contextlib: that module costs the hook ~2 ms."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        self.path, self.timeout, self.fd = path, timeout, -1

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        if self.timeout is None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            return
        deadline, pause = time.monotonic() + self.timeout, 0.002
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise LockTimeout(f"{self.path}: another virt-forward process has held the lock for more "
                                      f"than {self.timeout:g} s; gave up (nothing changed)") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the flock


def replace(path: str, data: bytes, mode: int = 0o600) -> None:
    """Atomically: a fresh temp file (O_EXCL: never an existing file or a symlink) renamed over;
    `mode` exactly, whatever the umask (0644 for a file another user's daemon must read).
    Not fsync-ed: what the state dir holds describes the running kernel's rules, which a power
    loss takes too (and /run is a tmpfs); the rename is what a killed process cannot tear.
    Two fsyncs per record cost reconcile ~1 ms a guest where the state dir sits on a disk."""
    tmp = f"{path}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:  # left by a process killed mid-write that had our pid
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o600)
    try:
        try:
            if mode != 0o600:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
