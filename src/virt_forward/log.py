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
    shown = printable(message)
    if not _send_journal(fields(priority, shown, event)):
        import syslog
        global _opened
        if not _opened:
            syslog.openlog("virt-forward", syslog.LOG_PID, syslog.LOG_DAEMON)
            _opened = True
        syslog.syslog(priority, shown)
    if to_stderr:
        print(f"virt-forward: {shown}", file=sys.stderr)


def printable(text: str) -> str:
    """One line whatever a domain name holds: control characters and bytes that are not UTF-8
    (argv gives them as surrogates) are escaped, not written raw into the journal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else
                   (c.encode("utf-8", "backslashreplace").decode() if "\ud800" <= c <= "\udfff"
                    else repr(c)[1:-1]) for c in text)
