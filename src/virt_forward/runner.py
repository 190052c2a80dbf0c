"""The one module that executes commands.  Everything else is pure.

It starts them with posix_spawn rather than the subprocess module: the hook
runs at every guest start, and importing subprocess (threading, selectors,
signal) costs more than the nft call it would make.  Input goes through a
memfd and stderr into another, so one pipe is read and nothing can deadlock;
every call has a deadline.

An `nft -f` is done when the kernel commits its batch, not when the process
exits: after a transaction that deleted anything, closing nft's netlink socket
waits for an RCU grace period (the kernel's NETLINK_URELEASE handler flushes
nf_tables' destroy work), 10-20 ms measured here, which a guest's stop need not
wait for.  So the runner listens to nf_tables' notifications while nft runs and
takes the commit notification (NFT_MSG_NEWGEN) that names nft's pid as its
success; the process is reaped later.  Without that notification (another pid
namespace, a notification lost to an overflow, a batch with nothing to commit,
a batch too big to be worth it) it waits for the exit, as before.
"""

from __future__ import annotations

import os
import select

from .consts import SEARCH_PATH

# not typing.TYPE_CHECKING: importing typing (and re with it) costs the hook's fast path
TYPE_CHECKING = False
if TYPE_CHECKING:
    from _socket import socket as Socket
    from typing import Protocol

    class Executor(Protocol):
        """What runs commands: the real processes, or (tests) a fake that records them."""

        def which(self, name: str) -> str | None: ...

        def spawn_all(self, argvs: list[list[str]], stdins: list[bytes | None],
                      timeout: float) -> list[tuple[int, bytes, bytes] | None]: ...

        def spawn_detached(self, argv: list[str]) -> bool: ...


# None: real processes.  use() puts another executor in: the command sequences of the hook,
# apply, remove and reconcile are tested without root against a fake (tests/test_sequences.py).
_executor: Executor | None = None


def use(executor: Executor | None) -> None:
    global _executor
    _executor = executor

__all__ = ["SEARCH_PATH", "Result", "use", "which", "spawn", "spawn_all", "spawn_detached", "spawn_detached_twice", "run",
           "nft_apply",
           "first_error"]


class Result:
    """What a command did (a value: nothing here changes it)."""

    __slots__ = ("argv", "returncode", "stdout", "stderr")

    def __init__(self, argv: tuple[str, ...], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self) -> str:
        return f"Result(argv={self.argv!r}, returncode={self.returncode}, stderr={self.stderr[:200]!r})"


def which(name: str) -> str | None:
    if _executor is not None:
        return _executor.which(name)
    if "/" in name:
        return name if os.access(name, os.X_OK) else None
    for d in (SEARCH_PATH + ":" + os.environ.get("PATH", "")).split(":"):
        path = os.path.join(d, name)
        if d and os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def spawn(argv: list[str], stdin: bytes | None = None, timeout: float = 30) -> tuple[int, bytes, bytes] | None:
    """Run argv[0] (found in SEARCH_PATH) with a clean environment; (status, stdout, stderr),
    status -1 when it had no answer within `timeout` (it is killed), None when not installed."""
    return spawn_all([argv], stdin, timeout)[0]


def spawn_all(argvs: list[list[str]], stdin: bytes | None = None, timeout: float = 30,
              stdins: list[bytes | None] | None = None) -> list[tuple[int, bytes, bytes] | None]:
    """`spawn` for several commands at once (commands that do not depend on each other): they
    run side by side, so the wait is the longest one's, not the sum.  `stdins`: one input per
    command, instead of the same `stdin` for all."""
    inputs = [stdin] * len(argvs) if stdins is None else stdins
    if _executor is not None:
        return _executor.spawn_all(argvs, inputs, timeout)
    import time
    _reap()
    deadline = time.monotonic() + timeout
    started = [_start(argv, data) for argv, data in zip(argvs, inputs, strict=True)]
    return [None if s is None else _finish(*s, timeout=max(0.0, deadline - time.monotonic())) for s in started]


# Batches up to this size are taken at their commit (a guest's start or stop: a few KiB).  A
# listener makes the kernel write a notification for each element of a transaction: for a
# rebuild of 10,000 forwards that cost more than the wait it saves (measured: reconcile ~50-60 ms
# slower).
COMMIT_WATCH_LIMIT = 1 << 16

_pids_are_global: bool | None = None


def _own_pids() -> bool:
    """Whether our pids are the ones the kernel names in NEWGEN (the initial pid namespace's).
    In a container's pid namespace they are not, and a number we gave could name another
    process there: then every nft is waited for to its exit."""
    global _pids_are_global
    if _pids_are_global is None:
        try:  # the initial pid namespace's inode is fixed: PROC_PID_INIT_INO (include/linux/proc_ns.h)
            _pids_are_global = os.stat("/proc/self/ns/pid").st_ino == 0xEFFFFFFC
        except OSError:
            _pids_are_global = False
    return _pids_are_global


# children whose result was taken at their commit: reaped by a later call (a watcher lives long)
_unreaped: list[int] = []


def _reap() -> None:
    for pid in list(_unreaped):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _unreaped.remove(pid)


def _start(argv: list[str], stdin: bytes | None) -> tuple[int, int, int, Commits | None] | None:
    """(pid, stdout pipe, stderr memfd, commit listener) of the started command, None when not
    installed.  The listener, for `nft -f`, is subscribed before nft starts: its commit cannot
    come first."""
    exe = which(argv[0])
    if exe is None:
        return None
    watch = argv[0] == "nft" and "-f" in argv[1:] and len(stdin or b"") <= COMMIT_WATCH_LIMIT and _own_pids()
    commits = Commits.open() if watch else None
    fds: list[int] = []  # ours, closed whatever happens (the child has its copies)
    keep: list[int] = []
    try:
        if stdin is None:
            src = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            fds.append(src)
        else:
            src = os.memfd_create("virt-forward-in", os.MFD_CLOEXEC)
            fds.append(src)
            _write_all(src, stdin)
            os.lseek(src, 0, os.SEEK_SET)
        err = os.memfd_create("virt-forward-err", os.MFD_CLOEXEC)
        fds.append(err)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        fds += [out_r, out_w]
        env = {**os.environ, "PATH": SEARCH_PATH, "LC_ALL": "C"}
        actions = [(os.POSIX_SPAWN_DUP2, src, 0), (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err, 2)]
        if commits is not None:
            # nft holds a copy of the listener: the socket is released when nft exits (nft's
            # own close waits anyway), not when we close ours -- that release would wait too.
            actions.append((os.POSIX_SPAWN_DUP2, commits.fileno(), 3))
        pid = os.posix_spawn(exe, [exe, *argv[1:]], env, file_actions=actions)
        keep = [out_r, err]
        return pid, out_r, err, commits
    except BaseException:
        if commits is not None:
            commits.close()
        raise
    finally:
        for fd in fds:
            if fd not in keep:
                os.close(fd)


def _finish(pid: int, out_r: int, err: int, commits: Commits | None, timeout: float) -> tuple[int, bytes, bytes]:
    try:
        out, end = _read_until(out_r, timeout, commits, pid)
        if end == "deadline":
            os.kill(pid, 9)
        if end == "committed":
            status = 0
            _unreaped.append(pid)
        else:
            _, wait_status = os.waitpid(pid, 0)
            status = os.waitstatus_to_exitcode(wait_status) if end == "exited" else -1
        os.lseek(err, 0, os.SEEK_SET)
        errors = b"".join(iter(lambda: os.read(err, 1 << 16), b""))
        return status, out, errors
    finally:
        os.close(out_r)
        os.close(err)
        if commits is not None:
            commits.close()


class Commits:
    """A netlink socket subscribed to nf_tables' notifications: tells when a given process's
    batch was committed (NFT_MSG_NEWGEN carries the committing pid)."""

    # AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER; SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES
    _NEWGEN = (10 << 8) | 15  # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN
    _GEN_PROC_PID = 2  # NFTA_GEN_PROC_PID (big-endian u32)
    _GEN_PROC_NAME = 3  # NFTA_GEN_PROC_NAME (the process's comm, NUL-terminated)

    def __init__(self, sock: Socket) -> None:
        self.sock = sock

    @classmethod
    def open(cls) -> Commits | None:
        try:
            import _socket  # not `socket`: its enum classes cost the hook a millisecond
            sock = _socket.socket(16, 3, 12)
        except (ImportError, OSError):
            return None
        try:
            sock.bind((0, 0))  # unbound (port id 0), it would be skipped as the notifications' sender
            sock.setsockopt(270, 1, 7)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return None
        return cls(sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def committed(self, pid: int) -> bool | None:
        """Whether what is queued holds `pid`'s commit; None when notifications were lost
        (the socket overflowed: a commit of ours may be among them) -- stop listening."""
        while True:
            try:
                data = self.sock.recv(1 << 17)
            except BlockingIOError:
                return False
            except OSError:  # ENOBUFS
                return None
            if not data:
                return False
            if pid in newgen_pids(data, b"nft"):
                return True


def newgen_pids(data: bytes, name: bytes) -> list[int]:
    """The committing pids of the NEWGEN messages in one netlink datagram whose process is
    called `name` (pure)."""
    pids = []
    at = 0
    while at + 20 <= len(data):
        length = int.from_bytes(data[at:at + 4], "little")
        kind = int.from_bytes(data[at + 4:at + 6], "little")
        if length < 16 or at + length > len(data):
            break
        if kind == Commits._NEWGEN:
            attr = at + 20  # nlmsghdr (16) + nfgenmsg (4)
            pid, comm = None, None
            while attr + 4 <= at + length:
                size = int.from_bytes(data[attr:attr + 2], "little")
                if size < 4:
                    break
                kind_of = int.from_bytes(data[attr + 2:attr + 4], "little") & 0x3fff
                if kind_of == Commits._GEN_PROC_PID and size == 8:
                    pid = int.from_bytes(data[attr + 4:attr + 8], "big")
                elif kind_of == Commits._GEN_PROC_NAME:
                    comm = data[attr + 4:attr + size].rstrip(b"\0")
                attr += (size + 3) & ~3
            if pid is not None and comm == name:
                pids.append(pid)
        at += (length + 3) & ~3
    return pids


def spawn_detached(argv: list[str]) -> bool:
    """Start argv and do not wait for it (the hook's conntrack clean-up: a conntrack dump walks
    the host's whole flow table, ~25 ms, and libvirt must not wait for that).  It runs in a
    session of its own with nothing of ours open; False when not installed."""
    if _executor is not None:
        return _executor.spawn_detached(argv)
    exe = which(argv[0])
    if exe is None:
        return False
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.posix_spawn(exe, [exe, *argv[1:]], {**os.environ, "PATH": SEARCH_PATH, "LC_ALL": "C"},
                       file_actions=[(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1),
                                     (os.POSIX_SPAWN_DUP2, null, 2)], setsid=True)
    finally:
        os.close(null)
    return True


_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:./-_")


def spawn_detached_twice(argvs: list[list[str]], pause: float = 0.5) -> None:
    """Each argv now, and all of them again after `pause` seconds, in one detached shell: the
    conntrack clean-up of a stop.  A UDP stream that outlived the first pass was seen, rarely
    (tests/test_flows.py, in 2 of some 60 runs; the cause is not pinned down: a packet racing
    the rules' removal is the likely one); a second pass, after any such packet, ends it.
    Arguments are ours (addresses, numbers, flags); any other character: one pass, no shell."""
    if not argvs:
        return
    if not all(_SAFE.issuperset(arg) and arg for argv in argvs for arg in argv):
        for argv in argvs:
            spawn_detached(argv)
        return
    once = "; ".join(" ".join(argv) for argv in argvs)
    spawn_detached(["sh", "-c", f"{once}; sleep {pause:g}; {once}"])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_until(fd: int, timeout: float, commits: Commits | None = None,
                pid: int = 0) -> tuple[bytes, str]:
    """What the pipe gave until the end: "exited" (EOF), "committed" (`pid`'s commit was
    announced on `commits`), or "deadline"."""
    import time
    deadline = time.monotonic() + timeout
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    if commits is not None:
        poll.register(commits.fileno(), select.POLLIN)
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        ready = poll.poll(left * 1000) if left > 0 else []
        if not ready:
            return b"".join(chunks), "deadline"
        for ready_fd, _ in ready:
            if commits is not None and ready_fd == commits.fileno():
                seen = commits.committed(pid)
                if seen:
                    return b"".join(chunks), "committed"
                if seen is None:
                    poll.unregister(ready_fd)
                    commits = None
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks), "exited"
            chunks.append(chunk)


def run(argv: list[str], *, stdin: str | None = None, check: bool = True, timeout: float = 30) -> Result:
    from .errors import FirewallError
    got = spawn(argv, None if stdin is None else stdin.encode(), timeout)
    if got is None:
        raise FirewallError(f"{argv[0]}: not found in {SEARCH_PATH}")
    status, out, err = got
    if status == -1:
        raise FirewallError(f"{' '.join(argv)}: no answer after {timeout:g} s")
    result = Result(tuple(argv), status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
    if check and status != 0:
        raise FirewallError(f"{' '.join(argv)} failed: {first_error(result.stderr)}")
    return result


def first_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "Error" in ln or "error" in ln:
            return ln
    return lines[0] if lines else "(no message)"


def nft_apply(batch: str) -> None:
    """One transaction: all of the batch or none of it."""
    from .errors import FirewallError
    result = run(["nft", "-f", "-"], stdin=batch, check=False)
    if result.returncode != 0:
        raise FirewallError(f"nft rejected the change (nothing applied): {nft_reason(result.stderr)}")


def nft_reason(stderr: str) -> str:
    msg = first_error(stderr)
    if "Device or resource busy" in msg or "File exists" in msg:
        return msg + " (a public address:port/protocol is already forwarded to another guest?)"
    return msg
