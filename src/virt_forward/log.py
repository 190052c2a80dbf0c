"""Every action goes to the journal (or syslog) and to stderr.

On a systemd host each line goes straight to journald's native socket with fields of
its own, so that `journalctl -t virt-forward` tells the story of a host and
`journalctl VIRT_FORWARD_GUEST=web` that of one guest: VIRT_FORWARD_EVENT (apply,
remove, refused, repair, reconcile), VIRT_FORWARD_GUEST, and one VIRT_FORWARD_FORWARD
per forward.  Without journald it is plain syslog (identifier virt-forward).

The hook's fast path logs through here: `_socket` (C, no import of its own) rather
than `socket`, whose enum import costs more than the log line.
"""

from __future__ import annotations

import os
import sys

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# syslog's priorities and facility (RFC 5424), so that neither syslog nor _socket is imported
# when the other one serves: the hook's fast path logs a line at every guest start
INFO, WARNING, ERR, FACILITY_DAEMON = 6, 4, 3, 3
# The hook has only stderr (libvirt logs it); a CLI command that prints its own result line
# does not repeat it there (configure, once, at start).
to_stderr = True
_opened = False
_journal: object = None  # the socket, False when journald is not there


def configure(stderr: bool) -> None:
    global to_stderr
    to_stderr = stderr


def info(message: str, **event: object) -> None:
    _emit(INFO, message, event)


def warning(message: str, **event: object) -> None:
    _emit(WARNING, message, event)


def error(message: str, **event: object) -> None:
    _emit(ERR, message, event)


def fields(priority: int, message: str, event: dict[str, object]) -> list[tuple[str, str]]:
    """The journal fields of one line.  `event`: event=, guest=, forwards= (a list of texts)."""
    out = [("MESSAGE", message), ("PRIORITY", str(priority)), ("SYSLOG_IDENTIFIER", "virt-forward"),
           ("SYSLOG_FACILITY", str(FACILITY_DAEMON)), ("SYSLOG_PID", str(os.getpid()))]
    if event.get("event"):
        out.append(("VIRT_FORWARD_EVENT", str(event["event"])))
    if event.get("guest") is not None:
        out.append(("VIRT_FORWARD_GUEST", str(event["guest"])))
    forwards = event.get("forwards")
    if isinstance(forwards, (list, tuple)):
        out += [("VIRT_FORWARD_FORWARD", str(f)) for f in forwards]
    return out


def encode(pairs: list[tuple[str, str]]) -> bytes:
    """journald's native protocol: KEY=value lines; a value holding a newline is sent as KEY,
    newline, its length (64-bit little endian), the bytes, newline.  Bytes that are not UTF-8
    (a domain name from argv) go as they came, escaped by surrogateescape."""
    out = bytearray()
    for key, value in pairs:
        data = value.encode("utf-8", "surrogateescape")
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def _send_journal(pairs: list[tuple[str, str]]) -> bool:
    global _journal
    if _journal is None:
        path = os.environ.get("VIRT_FORWARD_JOURNAL_SOCKET") or JOURNAL_SOCKET  # tests move it
        _journal = False
        if os.path.exists(path):
            try:
                import _socket
                sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
                sock.connect(path)
                _journal = sock
            except (OSError, ImportError):
                pass
    if not _journal:
        return False
    try:
        _journal.send(encode(pairs))  # type: ignore[attr-defined]
        return True
    except OSError:  # too large for a datagram, or journald went away: syslog takes it
        return False


def _emit(priority: int, message: str, event: dict[str, object]) -> None:
    """Never raises: a log line that cannot be written must not turn into a failed hook (with
    stderr a closed pipe, libvirt killed the guest at `reconnect` over a log line)."""
    try:
        shown = printable(message)
    except Exception:  # a message whose str() or escape failed: say so rather than nothing
        shown = "(a log line that could not be rendered)"
    try:
        sent = _send_journal(fields(priority, shown, event))
    except Exception:
        sent = False
    if not sent:
        _syslog(priority, shown)
    if to_stderr:
        _stderr(f"virt-forward: {shown}\n")


def _syslog(priority: int, shown: str) -> None:
    global _opened
    try:
        import syslog
        if not _opened:
            syslog.openlog("virt-forward", syslog.LOG_PID, syslog.LOG_DAEMON)
            _opened = True
        syslog.syslog(priority, shown)
    except Exception:  # no syslog module, a NUL in the line, ...: the journal and stderr are all we have
        pass


def _stderr(line: str) -> None:
    """To stderr if there is one: fd 2 closed at start (sys.stderr None), a pipe whose reader went
    away (BrokenPipeError; Python ignores SIGPIPE), a full disk: the line is dropped, not raised.
    Never `print(file=None)`: that writes to stdout, which libvirt reads at migrate/restore."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(line)
        stream.flush()
    except Exception:
        _drop_pending(stream)


def _drop_pending(stream: object) -> None:
    """A failed write leaves its bytes in the stream's buffer, and every later flush (the
    interpreter's own at exit too) would fail on them again: point fd 2 at /dev/null instead."""
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
        null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
        stream.flush()  # type: ignore[attr-defined]  # the pending bytes go to /dev/null now
    except Exception:
        pass


def printable(text: str) -> str:
    """One line whatever a domain name holds: control characters and bytes that are not UTF-8
    (argv gives them as surrogates) are escaped, not written raw into the journal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else
                   (c.encode("utf-8", "backslashreplace").decode() if "\ud800" <= c <= "\udfff"
                    else repr(c)[1:-1]) for c in text)
