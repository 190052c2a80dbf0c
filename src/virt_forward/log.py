"""Every action goes to syslog (the journal on systemd hosts) and to stderr."""

from __future__ import annotations

import sys
import syslog

_opened = False
# The CLI prints its own result line; the hook has only stderr (libvirt logs it).
to_stderr = True


def _open() -> None:
    global _opened
    if not _opened:
        syslog.openlog("virt-forward", syslog.LOG_PID, syslog.LOG_DAEMON)
        _opened = True


def info(message: str) -> None:
    _emit(syslog.LOG_INFO, message)


def warning(message: str) -> None:
    _emit(syslog.LOG_WARNING, message)


def error(message: str) -> None:
    _emit(syslog.LOG_ERR, message)


def _emit(priority: int, message: str) -> None:
    message = printable(message)
    _open()
    syslog.syslog(priority, message)
    if to_stderr:
        print(f"virt-forward: {message}", file=sys.stderr)


def printable(text: str) -> str:
    """One line whatever a domain name holds: control characters and bytes that are not UTF-8
    (argv gives them as surrogates) are escaped, not written raw into the journal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else
                   (c.encode("utf-8", "backslashreplace").decode() if "\ud800" <= c <= "\udfff"
                    else repr(c)[1:-1]) for c in text)
