"""libvirt's qemu and network hooks: argv + XML on stdin -> the same engine the CLI calls.

The files `virt-forward install` writes call `qemu_main` / `network_main` after
deciding from argv alone that the operation concerns us (QEMU_OPS, NETWORK_OPS),
so this module is imported only for those, and it imports nothing heavy itself:
libvirt waits for us at every guest start.

A hook must never take a guest down: a failing `reconnect` makes libvirt kill the
guest, a failing `prepare`/`start` aborts the start.  So every error, whatever it
is, is logged and the exit status is 0, except `strict = true` with an invalid
guest config at prepare/start (the admin asked for that).  Never calls back into
libvirt (it holds the domain's lock while we run: a call back deadlocks), and the
wait for our own lock has a deadline.
"""

from __future__ import annotations

import os
import sys

from . import consts, log

# Not `from typing import TYPE_CHECKING`: typing (and the re it imports) costs as much as
# a whole fast-path hook call.  mypy treats any TYPE_CHECKING name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO, Callable

    from . import engine

APPLY = frozenset({"start", "started", "reconnect"})
REMOVE = frozenset({"stopped", "release"})
# Every qemu operation we act on; `migrate` and `restore` are not among them on purpose:
# libvirt reads our stdout as replacement XML for those, so nothing may be printed.
QEMU_OPS = APPLY | REMOVE | {"prepare"}
# After a network (re)start libvirt has re-made its firewall rules above our guards.
NETWORK_OPS = frozenset({"started", "updated"})
# libvirt's domain XML is kilobytes; more than this is not libvirt talking.
MAX_STDIN = 1 << 20
LOCK_DEADLINE = consts.HOOK_LOCK_DEADLINE


def qemu_main(argv: list[str], config_dir: str | None = None, state_dir: str | None = None,
              stdin: BinaryIO | None = None) -> int:
    """`DOMAIN OPERATION SUB-OPERATION [EXTRA]` as libvirt passes it; the exit status for libvirt."""
    domain = argv[0] if argv else ""
    op = argv[1] if len(argv) > 1 else ""
    try:
        if op not in QEMU_OPS or len(argv) < 3:
            return 0
        if op in REMOVE:
            _drain(stdin)  # removal needs no XML: whatever libvirt sends must not stop it
            xml = ""
        else:
            xml = _read_stdin(stdin)
        from . import fastpath
        done = fastpath.qemu(consts.config_dir(config_dir), consts.state_dir(state_dir), domain, op, argv[2], xml)
        if done is not None:
            return done
        return _qemu(_context(config_dir, state_dir), domain, op, argv[2], xml)
    except BaseException as exc:  # the hook must not take a guest down, whatever went wrong
        _last_word(lambda: f"{domain}: {op}: hook failed, guest left as it is: {_describe(exc)}", domain)
        return 0


def network_main(argv: list[str], config_dir: str | None = None, state_dir: str | None = None,
                 stdin: BinaryIO | None = None) -> int:
    """`NETWORK OPERATION SUB-OPERATION [EXTRA]`: put every forward and guard back; never fails."""
    name = argv[0] if argv else ""
    op = argv[1] if len(argv) > 1 else ""
    try:
        if op not in NETWORK_OPS:
            return 0
        _drain(stdin)  # libvirt writes the network XML; we do not need it
        ctx = _context(config_dir, state_dir)
        from .reconcile import reconcile
        # Not libvirt (it waits for this hook) but what we know runs: the recorded guests, and
        # those whose start kept their domain XML while they wait for a DHCP lease (no record
        # yet): left out, reconcile would delete their XML and they would never get forwards.
        domains = sorted(set(ctx.store.domains()) | set(ctx.store.xml_domains()))
        if domains:
            reconcile(ctx, running=domains, lock_timeout=LOCK_DEADLINE)
    except BaseException as exc:
        _last_word(lambda: f"network {name}: {op}: hook failed: {_describe(exc)}", None)
    return 0


def _last_word(message: Callable[[], str], guest: str | None) -> None:
    """The catch-all's log line, which must not raise either (building the message included):
    past this point nothing catches, and a non-zero exit at `reconnect` kills the guest."""
    try:
        log.error(message(), event="error", guest=guest)
    except BaseException:
        pass


def _context(config_dir: str | None, state_dir: str | None) -> engine.Context:
    from . import engine
    return engine.default_context(config_dir, state_dir)


def _qemu(ctx: engine.Context, domain: str, op: str, sub: str, xml: str) -> int:
    from . import engine
    from .config import load_settings
    from .errors import ConfigError, VirtForwardError

    strict = False
    try:
        if op in REMOVE:
            engine.remove(ctx, domain, why=f"{op} {sub}", lock_timeout=LOCK_DEADLINE, hook=True)
            return 0
        # The XML is parsed only if needed (no `address`, or metadata): argv names the domain.
        settings = load_settings(ctx.config_dir)  # broken: its error is logged, strict stays off
        strict = settings.strict
        want = engine.desired(ctx, domain, xml, settings)  # validates: raises ConfigError
        if op == "prepare":
            return 0
        engine.apply(ctx, domain, xml, want, lock_timeout=LOCK_DEADLINE, hook=True)
    except ConfigError as exc:
        log.error(f"{domain}: {op}: {exc}" + ("; keeping what was applied before" if op == "reconnect" else ""),
                  event="refused", guest=domain)
        if strict and op in ("prepare", "start"):
            return int(exc.exit_code)
    except VirtForwardError as exc:
        log.error(f"{domain}: {op}: {exc}", event="refused", guest=domain)
    return 0


def _stream(stdin: BinaryIO | None) -> BinaryIO | None:
    """The given stream, else our stdin's bytes; None when fd 0 is closed (libvirt may do that)."""
    if stdin is not None:
        return stdin
    return sys.stdin.buffer if sys.stdin is not None else None


def _read_stdin(stdin: BinaryIO | None) -> str:
    """The domain XML, at most MAX_STDIN bytes."""
    stream = _stream(stdin)
    data = stream.read(MAX_STDIN + 1) if stream is not None else b""
    if len(data) > MAX_STDIN:
        from .errors import UsageError
        raise UsageError(f"more than {MAX_STDIN} bytes of XML on stdin: not libvirt's domain XML")
    return data.decode("utf-8", "replace")


def _drain(stdin: BinaryIO | None) -> None:
    """Read what libvirt writes (so its write does not fail on a closed pipe), keep nothing."""
    try:
        stream = _stream(stdin)
        while stream is not None and stream.read(1 << 16):
            pass
    except (OSError, ValueError):
        pass


def _describe(exc: BaseException) -> str:
    from .errors import VirtForwardError
    if isinstance(exc, VirtForwardError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
    return f"unexpected {type(exc).__name__}{where}: {exc}"
