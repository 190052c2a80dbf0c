"""`add` / `rm`: change a guest's `ports` in place, keeping its comments and layout.

The new text is validated with the same code the hook uses (config.parse_guest,
plan.plan_guest) before the file is replaced atomically (temp file + rename,
same owner and mode), so a bad edit never reaches the hook.  Nothing here
touches the firewall: the caller applies the guest afterwards.  tomlkit is
imported inside the functions so that the hook's imports stay light.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import stat
import tempfile
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import guest_path, load_settings, parse_guest
from .errors import ConfigError, PortSpecError
from .plan import GuestPlan, plan_guest
from .ports import PortSpec, parse_port_spec

if TYPE_CHECKING:
    from tomlkit.items import Array

# Called with the edited file's plan before it is written; raises to refuse the edit.
Check = Callable[[GuestPlan], None]
NEW_FILE_MODE = 0o644
NEW_DIR_MODE = 0o755
STAND_IN_ADDRESSES = (ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("2001:db8::1"))


# ------------------------------------------------------------- shared with importer

def validate_text(config_dir: Path, name: str, path: Path, text: str) -> GuestPlan:
    """Check a guest file's would-be text exactly as the hook will read it; ConfigError names `path`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # our own writers only make valid TOML: a bug if seen
        raise ConfigError(f"would not be valid TOML ({exc})", path=path) from None
    guest = parse_guest(name, path, data, text.split("\n"))
    if not guest.addresses:
        # no `address`: found from the guest's MAC at start; check the ports against both families
        guest = dataclasses.replace(guest, addresses=STAND_IN_ADDRESSES)
    return plan_guest(guest, load_settings(config_dir))


def make_dirs(config_dir: Path) -> None:
    """config_dir and its guests/, mode 0755 when made here (the hook refuses g/o-writable dirs)."""
    for d in (config_dir, config_dir / "guests"):
        if not d.is_dir():
            d.mkdir(mode=NEW_DIR_MODE)
            os.chmod(d, NEW_DIR_MODE)


def write_atomic(path: Path, text: str, mode: int = NEW_FILE_MODE,
                 owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `text` in one rename; a reader sees the old or the new file, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            if owner is not None:
                os.fchown(fh.fileno(), *owner)
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ------------------------------------------------------------- add / rm

def _parse_spec(text: str, path: Path) -> PortSpec:
    try:
        return parse_port_spec(text)
    except PortSpecError as exc:
        raise ConfigError(str(exc), path=path, key="ports") from None


def _read(path: Path) -> tuple[str, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("not a regular file", path=path)
        raw = fh.read()
    try:
        return raw.decode("utf-8"), st
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", path=path) from None


def _load_doc(path: Path, text: str) -> Any:
    import tomlkit
    from tomlkit.exceptions import ParseError

    try:  # the hook's parser first: the same message and line as `check` gives
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\s*\(at line (\d+), column \d+\)", str(exc))
        line = int(m.group(1)) if m else None
        if line is None and "(at end of document)" in str(exc):
            line = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
        reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(exc))
        raise ConfigError(f"TOML syntax error: {reason}", path=path, line=line) from None
    try:
        return tomlkit.parse(text)
    except ParseError as exc:
        raise ConfigError(f"TOML syntax error: {exc}", path=path) from None


def _ports_array(doc: Any) -> Array:
    """doc["ports"] as an array item, made one if it is missing or a single string."""
    import tomlkit
    from tomlkit.items import Array

    current = doc.get("ports")
    if isinstance(current, Array):
        return current
    arr = tomlkit.array()
    if isinstance(current, str):
        arr.append(str(current))
    doc["ports"] = arr
    out = doc["ports"]
    assert isinstance(out, Array)
    return out


def _entries(arr: Array) -> list[tuple[str, PortSpec | None]]:
    """Each entry's text and meaning (None when it does not parse: it can still be removed by text)."""
    out: list[tuple[str, PortSpec | None]] = []
    for item in arr:
        text = str(item)
        try:
            out.append((text, parse_port_spec(text)))
        except PortSpecError:
            out.append((text, None))
    return out


def _commit(config_dir: Path, guest: str, path: Path, doc: Any,
            st: os.stat_result | None, check: Check | None = None) -> GuestPlan:
    import tomlkit

    text = tomlkit.dumps(doc)
    try:
        plan = validate_text(config_dir, guest, path, text)
    except ConfigError as exc:
        if exc.path != str(path):  # config.toml is wrong, not the edit
            raise
        # the line would point into a text that was not written: leave it out
        raise ConfigError(f"{exc.reason} (file left unchanged)", path=path, key=exc.key) from None
    if check is not None:
        check(plan)  # the ledger: refused before the file changes
    if st is None:
        make_dirs(config_dir)
        write_atomic(path, text)
    else:
        write_atomic(path, text, stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid))
    return plan


def _summary(path: Path, plan: GuestPlan, arr: Array) -> str:
    if any(f.guest in STAND_IN_ADDRESSES for f in plan.forwards):
        return f"{path}: {len(arr)} port spec(s) now; the address is found from the guest's MAC at start"
    return f"{path}: {len(plan.forwards)} forward(s) now"


def add_ports(config_dir: Path, guest: str, specs: list[str], address: str | None = None,
              check: Check | None = None) -> list[str]:
    """Append `specs` to the guest's `ports`; create the file when it is missing and `address` is given."""
    import tomlkit

    path = guest_path(config_dir, guest)
    if not specs:
        raise ConfigError("give at least one port spec to add", path=path, key="ports")
    lines: list[str] = []
    st: os.stat_result | None = None
    if os.path.lexists(path):
        text, st = _read(path)
        doc = _load_doc(path, text)
        if address is not None:
            have = doc.get("address")
            plain = have.unwrap() if hasattr(have, "unwrap") else have
            if plain is None:
                doc["address"] = address
            elif plain not in (address, [address]):
                raise ConfigError(f"is {plain!r}, not {address!r}: edit the file to change it "
                                  f"(without --address, add keeps it)", path=path, key="address")
    elif address is None:
        raise ConfigError("no such guest file: give the guest's address (--address) to create it", path=path)
    else:
        doc = tomlkit.document()
        doc["address"] = address
        doc["ports"] = tomlkit.array()
        lines.append(f"created {path} with address {address}")

    arr = _ports_array(doc)
    have_entries = _entries(arr)
    added: list[tuple[str, PortSpec]] = []
    for raw in specs:
        text = raw.strip()
        spec = _parse_spec(text, path)
        for other, other_spec in have_entries + [(t, s) for t, s in added]:
            if other_spec == spec or other == text:
                where = "is already in ports" if (other, other_spec) in have_entries else "is given twice"
                same = "" if other == text else f" as {other!r}"
                raise ConfigError(f"{text!r} {where}{same}", path=path, key="ports")
        added.append((text, spec))
    for text, _spec in added:
        arr.append(text)
        lines.append(f"added {text!r} to {path}")
    plan = _commit(config_dir, guest, path, doc, st, check)
    return lines + [_summary(path, plan, arr)]


def remove_ports(config_dir: Path, guest: str, specs: list[str], check: Check | None = None) -> list[str]:
    """Remove the entries of the guest's `ports` that mean the same as `specs` ("80" removes "80/tcp")."""
    path = guest_path(config_dir, guest)
    if not specs:
        raise ConfigError("give at least one port spec to remove", path=path, key="ports")
    if not os.path.lexists(path):
        raise ConfigError("no such guest file", path=path)
    text, st = _read(path)
    doc = _load_doc(path, text)
    if "ports" not in doc:
        raise ConfigError("has no ports to remove", path=path, key="ports")
    arr = _ports_array(doc)
    entries = _entries(arr)
    doomed: set[int] = set()
    for raw in specs:
        wanted = raw.strip()
        try:
            spec: PortSpec | None = parse_port_spec(wanted)
        except PortSpecError:
            spec = None  # may still name a broken entry by its text
        hits = [i for i, (t, s) in enumerate(entries) if t.strip() == wanted or (spec is not None and s == spec)]
        if not hits:
            listed = ", ".join(repr(t) for t, _ in entries) or "none"
            part = _part_of(spec, entries)
            hint = f" (it is part of {part!r}: remove that whole entry)" if part else ""
            raise ConfigError(f"{wanted!r} is not in ports{hint}; ports: {listed}", path=path, key="ports")
        if doomed.intersection(hits):
            raise ConfigError(f"{wanted!r} is given twice", path=path, key="ports")
        doomed.update(hits)
    for index in sorted(doomed, reverse=True):
        del arr[index]
    plan = _commit(config_dir, guest, path, doc, st, check)
    return [f"removed {entries[i][0]!r} from {path}" for i in sorted(doomed)] + [_summary(path, plan, arr)]


def _part_of(spec: PortSpec | None, entries: list[tuple[str, PortSpec | None]]) -> str | None:
    """The entry whose range holds `spec`'s ports, when `spec` is only part of one."""
    if spec is None:
        return None
    for text, other in entries:
        if (other is not None and other.proto == spec.proto and other.public == spec.public
                and other.host.start <= spec.host.start and spec.host.end <= other.host.end):
            return text
    return None
