"""What was applied, per guest, under /run/virt-forward, and the lock that serialises changes.

A record is the plan that is live in the kernel for that guest: stopping a guest
removes what its record says, not what its (maybe edited) file says now.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import urllib.parse
from pathlib import Path
from typing import Iterator

from . import consts
from .errors import StateError
from .plan import GuestPlan

def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    return Path(explicit) if explicit is not None else Path(consts.state_dir())


def _flock_within(fd: int, timeout: float, path: Path) -> None:
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StateError(f"{path}: another virt-forward process has held the lock for more than "
                                 f"{timeout:g} s; gave up (nothing changed)") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


class StateStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.guests = root / "guests"

    def _ensure(self) -> None:
        try:
            self.guests.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(f"{self.guests}: cannot create state dir: {exc.strerror}") from None

    @contextlib.contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        """Exclusive for the whole read-plan-apply-record cycle (libvirt reconnects guests in parallel).

        `timeout`: give up after that many seconds with a StateError (the hook: a guest start
        must never hang on us); None waits as long as it takes (the CLI, the watcher)."""
        self._ensure()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if timeout is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                _flock_within(fd, timeout, self.root / "lock")
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _path(self, domain: str) -> Path:
        return self.guests / (urllib.parse.quote(domain, safe="") + ".json")

    def read(self, domain: str) -> GuestPlan | None:
        text = self.read_text(domain)
        return None if text is None else self.parse(domain, text)

    def read_text(self, domain: str) -> str | None:
        """The record as written (reconcile compares texts and parses only what it needs)."""
        path = self._path(domain)
        try:
            return path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"{path}: unreadable state record ({exc})") from None

    def parse(self, domain: str, text: str) -> GuestPlan:
        try:
            return GuestPlan.from_record(json.loads(text)["plan"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{self._path(domain)}: unreadable state record ({exc})") from None

    @staticmethod
    def record_text(plan: GuestPlan, backend: str) -> str:
        """Exactly what `write` puts in the file (the fast path compares and writes this text)."""
        return json.dumps({"backend": backend, "plan": plan.to_record()}, separators=(",", ":")) + "\n"

    def write(self, plan: GuestPlan, backend: str) -> None:
        self._ensure()
        self._write_file(self._path(plan.domain), self.record_text(plan, backend).encode())
        self._sync_dir()

    def _write_file(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def write_fast(self, domain: str, data: bytes) -> None:
        """The hook's fast file for this guest (fastpath.py), written after its record."""
        from .fastpath import fast_file
        path = Path(fast_file(str(self.root), urllib.parse.quote(domain, safe="")))
        path.parent.mkdir(mode=0o700, exist_ok=True)
        self._write_file(path, data)

    def delete(self, domain: str) -> None:
        """The record.  The fast file stays: it says how to apply the guest's unchanged files
        next time, and is checked against them (and against the record) before any use."""
        with contextlib.suppress(FileNotFoundError):
            self._path(domain).unlink()
            self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.guests, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # The domain XML the hook was given at start: lets reconcile/watch find an address
    # (a lease that came later) or read metadata without asking libvirt.
    def _xml_path(self, domain: str) -> Path:
        return self.root / "xml" / (urllib.parse.quote(domain, safe="") + ".xml")

    def write_xml(self, domain: str, xml: str) -> None:
        path = self._xml_path(domain)
        self._ensure()
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(xml)
        os.replace(tmp, path)

    def read_xml(self, domain: str) -> str | None:
        try:
            return self._xml_path(domain).read_text()
        except OSError:
            return None

    def delete_xml(self, domain: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._xml_path(domain).unlink()

    def xml_domains(self) -> list[str]:
        d = self.root / "xml"
        return sorted(urllib.parse.unquote(p.name[:-4]) for p in d.glob("*.xml")) if d.is_dir() else []

    def domains(self) -> list[str]:
        if not self.guests.is_dir():
            return []
        return sorted(urllib.parse.unquote(p.name[:-5]) for p in self.guests.iterdir()
                      if p.name.endswith(".json"))

    def any_other(self, domain: str) -> bool:
        """Is a guest other than `domain` recorded?  Cheap: stops at the first entry."""
        if not self.guests.is_dir():
            return False
        own = self._path(domain).name
        with os.scandir(self.guests) as it:
            return any(e.name.endswith(".json") and e.name != own for e in it)
