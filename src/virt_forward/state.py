"""What was applied, per guest, under /run/virt-forward, and the lock that serialises changes.

A record is the plan that is live in the kernel for that guest: stopping a guest
removes what its record says, not what its (maybe edited) file says now.

The state dir decides what goes into the firewall as much as the config does, so it
is trusted like it: ours (root's), not writable by group or others, not a symlink,
made 0700 whatever the umask; files are opened without following symlinks and
written through fresh temp files; every record is checked against its schema when
read, and a bad one is a StateError naming the file, never text in a batch.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import stat
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

from . import consts, files
from .errors import StateError
from .plan import GuestPlan, record_address

SUBDIRS = ("guests", "xml", "fast", "claims", "hairpin")
# A quoted name longer than this (or a hidden one) is stored under a hash of the name: file
# names stop at 255 bytes, and percent-encoding can triple a 200-byte domain name.
MAX_STEM = 200
HASHED = "%h-"  # quoting never makes "%h" (a quoted '%' is "%25"): no real name collides
MAX_RECORD = 1 << 24
PENDING = ".pending"


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    return Path(explicit) if explicit is not None else Path(consts.state_dir())


def stem(domain: str) -> str:
    """The file-name stem of a domain's record, XML and fast file."""
    from .fastpath import file_name
    simple = file_name(domain)  # the names the fast path handles: quoting leaves them as they are
    if simple is not None:
        return simple
    quoted = urllib.parse.quote(domain.encode("utf-8", "surrogateescape"), safe="")
    if len(quoted) <= MAX_STEM and not quoted.startswith("."):
        return quoted
    import hashlib
    return HASHED + hashlib.sha256(domain.encode("utf-8", "surrogateescape")).hexdigest()


def check_trusted_dir(path: Path) -> None:
    """Ours, a real directory, writable by nobody else: whoever could write here could open ports."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise StateError(f"{path}: cannot use the state dir: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{path}: refused as state dir: a symlink or not a directory")
    if st.st_uid != os.geteuid():
        raise StateError(f"{path}: refused as state dir: owned by uid {st.st_uid}, not {os.geteuid()} "
                         f"(chown root {path})")
    if st.st_mode & 0o022:
        raise StateError(f"{path}: refused as state dir: writable by group or others "
                         f"(mode {stat.S_IMODE(st.st_mode):04o}; chmod 700 {path})")


def _make_dir(path: Path) -> None:
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # the umask may have taken bits away, never added: set it exactly
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateError(f"{path}: cannot create state dir: {exc.strerror}") from None


def validate_record(data: object, domain: str, where: str) -> dict[str, Any]:
    """The record's plan, checked field by field (a forged or torn record must not reach nft)."""
    def bad(why: str) -> StateError:
        return StateError(f"{where}: invalid state record: {why}")
    if not isinstance(data, dict) or not isinstance(data.get("plan"), dict):
        raise bad("not an object with a plan")
    if data.get("backend") not in ("nftables", "iptables"):
        raise bad(f"backend {data.get('backend')!r}")
    plan = data["plan"]
    if plan.get("domain") != domain:
        raise bad(f"it names domain {plan.get('domain')!r}, not {domain!r}")
    forwards = plan.get("forwards")
    if not isinstance(forwards, list):
        raise bad("forwards is not a list")
    for fwd in forwards:
        if not (isinstance(fwd, list) and len(fwd) == 6):
            raise bad(f"forward {fwd!r}")
        family, proto, pport, public, guest, gport = fwd
        if family not in (4, 6) or proto not in ("tcp", "udp"):
            raise bad(f"forward {fwd!r}: family/protocol")
        if not all(type(p) is int and 1 <= p <= 65535 for p in (pport, gport)):
            raise bad(f"forward {fwd!r}: port")
        try:
            addrs = [record_address(a) for a in (guest, public) if a is not None]
        except (ValueError, TypeError):
            raise bad(f"forward {fwd!r}: address") from None
        if any(a.version != family for a in addrs) or not isinstance(guest, str) or (
                public is not None and not isinstance(public, str)):
            raise bad(f"forward {fwd!r}: address of another family")
    allow = plan.get("allow")
    if allow is not None:
        try:
            if not isinstance(allow, list) or not all(isinstance(n, str) for n in allow):
                raise ValueError
            [ipaddress.ip_network(n) for n in allow]
        except ValueError:
            raise bad(f"allow {allow!r}") from None
    assert isinstance(plan, dict)
    return dict(plan)


class StateStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.guests = root / "guests"
        self._ensured = False  # once per store object: reconcile writes 2,000 files through one

    def _ensure(self) -> None:
        """Make (0700) or check the state dir and its subdirs: used before every change."""
        if self._ensured:
            return
        if not self.root.exists():
            for parent in reversed(self.root.parents):
                if not parent.exists():
                    _make_dir(parent)
            _make_dir(self.root)
        check_trusted_dir(self.root)
        for sub in SUBDIRS:
            _make_dir(self.root / sub)
            check_trusted_dir(self.root / sub)
        self._ensured = True

    @contextlib.contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        """Exclusive for the whole read-plan-apply-record cycle (libvirt reconnects guests in parallel).

        `timeout`: give up after that many seconds with a StateError (the hook: a guest start
        must never hang on us); None waits as long as it takes (the CLI, the watcher)."""
        self._ensure()
        try:
            with files.lock(str(self.root / "lock"), timeout):
                yield
        except files.LockTimeout as exc:
            raise StateError(str(exc)) from None

    def _path(self, domain: str) -> Path:
        return self.guests / (stem(domain) + ".json")

    def read(self, domain: str) -> GuestPlan | None:
        text = self.read_text(domain)
        return None if text is None else self.parse(domain, text)

    def read_backend(self, domain: str) -> str | None:
        """The backend the record was applied with: removal must use it, whatever config says now."""
        text = self.read_text(domain)
        if text is None:
            return None
        data = self._load(domain, text)
        return str(data["backend"])

    def read_text(self, domain: str) -> str | None:
        """The record as written (reconcile compares texts and parses only what it needs)."""
        path = self._path(domain)
        try:
            return _read_file(path).decode("utf-8")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"{path}: unreadable state record ({exc})") from None

    def _load(self, domain: str, text: str) -> dict[str, Any]:
        path = self._path(domain)
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StateError(f"{path}: unreadable state record ({exc})") from None
        validate_record(data, domain, str(path))
        return dict(data)

    def parse(self, domain: str, text: str) -> GuestPlan:
        return GuestPlan.from_record(self._load(domain, text)["plan"])

    @staticmethod
    def record_text(plan: GuestPlan, backend: str) -> str:
        """Exactly what `write` puts in the file (the fast path compares and writes this text)."""
        return json.dumps({"backend": backend, "plan": plan.to_record()}, separators=(",", ":")) + "\n"

    def write(self, plan: GuestPlan, backend: str) -> None:
        self._ensure()
        _write_file(self._path(plan.domain), self.record_text(plan, backend).encode())

    def write_fast(self, domain: str, data: bytes) -> None:
        """The hook's fast file for this guest (fastpath.py), written after its record."""
        from .fastpath import fast_file
        self._ensure()
        _write_file(Path(fast_file(str(self.root), stem(domain))), data)

    def delete(self, domain: str) -> None:
        """The record.  The fast file stays: it says how to apply the guest's unchanged files
        next time, and is checked against them (and against the record) before any use."""
        with contextlib.suppress(FileNotFoundError):
            self._path(domain).unlink()

    # A start in progress: the record it is about to make, written before its claims and
    # its kernel change, removed once the record is written.  A hook killed in between leaves
    # it; the guest's `stopped` (or reconcile) then knows what to take back and which claims
    # to release (fastpath.py does the same for its starts).
    def _pending_path(self, domain: str) -> Path:
        return self.guests / (stem(domain) + PENDING)

    def write_pending(self, plan: GuestPlan, backend: str) -> None:
        self._ensure()
        _write_file(self._pending_path(plan.domain), self.record_text(plan, backend).encode())

    def read_pending(self, domain: str) -> tuple[GuestPlan, str] | None:
        """(plan, backend) of a start that did not finish; None when there is none.  Checked
        like a record: a forged one is a StateError, never text in a batch."""
        path = self._pending_path(domain)
        try:
            text = _read_file(path).decode("utf-8")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"{path}: unreadable pending record ({exc})") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StateError(f"{path}: unreadable pending record ({exc})") from None
        validate_record(data, domain, str(path))
        return GuestPlan.from_record(data["plan"]), str(data["backend"])

    def commit_pending(self, domain: str) -> None:
        """The pending record becomes the record: one rename, no second write of the same text."""
        os.rename(self._pending_path(domain), self._path(domain))

    def delete_pending(self, domain: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._pending_path(domain).unlink()

    def sweep_temp(self) -> None:
        """Temp files of a writer killed mid-write ("NAME.json.PID.tmp"): nothing reads them;
        only under the lock (a live writer holds it while its temp file exists)."""
        try:
            names = os.listdir(self.guests)
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.guests / name)

    def pending_domains(self) -> list[str]:
        return self._names(self.guests, PENDING, "plan")

    # The domain XML the hook was given at start: lets reconcile/watch find an address
    # (a lease that came later) or read metadata without asking libvirt.
    def _xml_path(self, domain: str) -> Path:
        return self.root / "xml" / (stem(domain) + ".xml")

    def write_xml(self, domain: str, xml: str) -> None:
        self._ensure()
        # the name is kept inside: a hashed file name cannot be turned back into it
        _write_file(self._xml_path(domain), json.dumps({"domain": domain, "xml": xml}).encode())

    def read_xml(self, domain: str) -> str | None:
        try:
            data = json.loads(_read_file(self._xml_path(domain)))
            return str(data["xml"]) if data.get("domain") == domain else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def delete_xml(self, domain: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._xml_path(domain).unlink()

    def xml_domains(self) -> list[str]:
        return self._names(self.root / "xml", ".xml", "domain")

    def domains(self) -> list[str]:
        return self._names(self.guests, ".json", "plan")

    def _names(self, folder: Path, suffix: str, holder: str) -> list[str]:
        """Domain names of the files in `folder`: unquoted, or read from inside a hashed one."""
        try:
            entries = [e for e in os.scandir(folder) if e.name.endswith(suffix) and e.is_file(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            file_stem = entry.name[:-len(suffix)]
            if not file_stem.startswith(HASHED):
                names.append(urllib.parse.unquote(file_stem, errors="surrogateescape"))
                continue
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
                data = json.loads(_read_file(Path(entry.path)))
                inner = data[holder]["domain"] if holder == "plan" else data["domain"]
                if isinstance(inner, str) and stem(inner) == file_stem:
                    names.append(inner)
        return sorted(names)

    def any_other(self, domain: str) -> bool:
        """Is a guest other than `domain` recorded?  Cheap: stops at the first entry."""
        own = self._path(domain).name
        try:
            with os.scandir(self.guests) as it:
                return any(e.name.endswith(".json") and e.name != own for e in it)
        except FileNotFoundError:
            return False


def _read_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RECORD:
            raise StateError(f"{path}: not a regular file of at most {MAX_RECORD} bytes")
        # os.read, not a file object: reconcile reads 1,000 records, and a buffered reader each
        # cost more than the read
        data = b""
        while len(data) <= MAX_RECORD:
            chunk = os.read(fd, MAX_RECORD + 1 - len(data))
            if not chunk:
                break
            data += chunk
        return data
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    files.replace(str(path), data)
