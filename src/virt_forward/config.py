"""Read and validate /etc/virt-forward: config.toml and guests/<domain>.toml.

Files decide which ports of the host are open, so, like sshd's StrictModes, a
file that is not root's or that group/other may write is refused.  Every error
names the file, the line (found in the text, since tomllib gives no positions
for values), the key and the bad value.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import consts
from .errors import ConfigError, PortSpecError, UsageError
from .ports import IPAddress, PortSpec, parse_port_spec

Backend = Literal["auto", "nftables", "iptables"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_FILE_BYTES = 1 << 20
_SETTINGS_KEYS = {"backend", "public", "hairpin", "strict", "metadata"}
_GUEST_KEYS = {"address", "public", "ports", "allow"}


@dataclass(frozen=True)
class Settings:
    backend: Backend = "auto"
    public: tuple[IPAddress, ...] = ()
    hairpin: bool = True
    strict: bool = False
    # trust forwards in the domain XML's <metadata> (whoever may edit domains decides host ports)
    metadata: bool = False
    path: str | None = None


@dataclass(frozen=True)
class PortEntry:
    spec: PortSpec
    text: str
    line: int | None


@dataclass(frozen=True)
class GuestConfig:
    name: str
    path: str
    addresses: tuple[IPAddress, ...]
    ports: tuple[PortEntry, ...]
    public: tuple[IPAddress, ...] | None = None  # None: config.toml's default
    allow: tuple[IPNetwork, ...] | None = None  # None: every source
    lines: dict[str, int] = field(default_factory=dict, compare=False, hash=False)

    def line_of(self, key: str) -> int | None:
        return self.lines.get(key)


def config_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    return Path(explicit) if explicit is not None else Path(consts.config_dir())


def check_domain_name(name: str) -> str:
    """libvirt names may hold almost anything; ours become file names.

    Refused: what cannot be a file name here (empty, '.', '..', '/', NUL, too
    long, not UTF-8), names starting with '.' (guest_names() skips hidden files,
    so `check` would never see them) and control characters (they would break
    the one-line error and log messages).  Spaces, quotes, `$(x)` and other
    unicode are fine: the name is never given to a shell.
    """
    try:
        encoded = name.encode()
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as surrogates
        encoded = b""
    if (not encoded or name.startswith(".") or "/" in name or len(encoded) > 200
            or any(unicodedata.category(c) == "Cc" for c in name)):
        raise UsageError(f"domain name {name!r} cannot name a guest file")
    return name


def guest_path(cdir: Path, name: str) -> Path:
    return cdir / "guests" / f"{check_domain_name(name)}.toml"


# ---------------------------------------------------------------- reading files

def _check_trusted(path: Path, st: os.stat_result) -> None:
    if st.st_uid != 0:
        raise ConfigError(f"refused: owned by uid {st.st_uid}, not root (chown root {path})", path=path)
    if st.st_mode & 0o022:
        raise ConfigError(
            f"refused: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}; chmod go-w {path})",
            path=path)


def _read_toml(path: Path) -> tuple[dict[str, Any], list[str]]:
    try:
        # O_NONBLOCK: opening a FIFO left in guests/ must not hang the hook (and the guest start)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("not a regular file", path=path)
        _check_trusted(path, st)
        if st.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"refused: {st.st_size} bytes, larger than {MAX_FILE_BYTES}", path=path)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", path=path,
                          line=raw.count(b"\n", 0, exc.start) + 1) from None
    if text.startswith("\ufeff"):
        raise ConfigError("starts with a byte order mark (U+FEFF), which TOML does not allow: save as UTF-8 "
                          "without BOM", path=path, line=1)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = int(m.group(1)) if m else None
        if line is None and "(at end of document)" in msg:  # e.g. an unclosed array: the last line
            line = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
        reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", msg)
        raise ConfigError(f"TOML syntax error: {reason}", path=path, line=line) from None
    # TOML counts lines by "\n" only; str.splitlines() would also split at
    # U+2028, \x0c, \x85 ... and shift every line number after one of them.
    return data, text.split("\n")


_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEY_LINE = re.compile(rf"\s*({_KEY})\s*(?:\.\s*{_KEY}\s*)*=")
_TABLE_LINE = re.compile(rf"\s*\[\[?\s*({_KEY})")


def _unquote(key: str) -> str:
    if key.startswith("'"):
        return key[1:-1]
    if key.startswith('"'):
        try:
            value = tomllib.loads(f"k = {key}")["k"]
            return value if isinstance(value, str) else key
        except tomllib.TOMLDecodeError:
            return key[1:-1]
    return key


def _key_lines(lines: list[str]) -> dict[str, int]:
    """The line of each top-level key: `key =`, `a.b =` (dotted) and `[table]` headers.

    Keys after the first table header belong to that table, so only headers count there.
    """
    found: dict[str, int] = {}
    in_table = False
    for number, line in enumerate(lines, 1):
        m = _TABLE_LINE.match(line)
        if m:
            in_table = True
            found.setdefault(_unquote(m.group(1)), number)
            continue
        m = _KEY_LINE.match(line)
        if m and not in_table:
            found.setdefault(_unquote(m.group(1)), number)
    return found


def _value_lines(lines: list[str], start: int | None, count: int) -> list[int | None]:
    """The line of each of the `count` strings of a key's value (a string or an array of them).

    The n-th string token after the key's '=' is the n-th element, so one scan
    that skips comments and string bodies finds them all exactly, repeated and
    escaped values included, in one pass (searching for each value from the
    key's line took minutes on a large file).
    """
    if start is None:
        return [None] * count
    out: list[int | None] = []
    n, i = start, lines[start - 1].find("=") + 1
    while len(out) < count and n <= len(lines):
        text = lines[n - 1]
        if i >= len(text) or text[i] == "#":
            n, i = n + 1, 0
            continue
        quote = text[i]
        if quote not in "\"'":
            i += 1
            continue
        out.append(n)
        if text.startswith(quote * 3, i):  # multi-line string: find its end, maybe lines below
            i += 3
            while n <= len(lines):
                end = lines[n - 1].find(quote * 3, i)
                if end >= 0:
                    i = end + 3
                    break
                n, i = n + 1, 0
            continue
        i += 1
        while i < len(text) and text[i] != quote:
            i += 2 if quote == '"' and text[i] == "\\" else 1
        i += 1
    return out + [start] * (count - len(out))


class _Where:
    """Builds ConfigErrors that point into one file."""

    def __init__(self, path: Path, lines: list[str]) -> None:
        self.path = path
        self.lines = lines
        self.keys = _key_lines(lines)
        self._values: dict[str, list[int | None]] = {}

    def value_lines(self, key: str, values: list[str]) -> list[int | None]:
        if key not in self._values:
            self._values[key] = _value_lines(self.lines, self.keys.get(key), len(values))
        return self._values[key]

    def error(self, key: str, message: str, index: int | None = None) -> ConfigError:
        """An error about `key`, or about its `index`-th string (see _string_list)."""
        line = self.keys.get(key)
        if index is not None and key in self._values:
            line = self._values[key][index]
        # a quoted key may hold anything, newlines included: the message stays one line
        shown = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else repr(key)
        return ConfigError(message, path=self.path, line=line, key=shown)


def _short(value: Any, limit: int = 60) -> str:
    """repr() of a bad value, cut so that the error stays a readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _string_list(data: dict[str, Any], key: str, where: _Where) -> list[str] | None:
    if key not in data:
        return None
    value = data[key]
    if isinstance(value, str):
        where.value_lines(key, [value])
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        where.value_lines(key, value)
        return list(value)
    raise where.error(key, f"must be a string or a list of strings, not {_short(value)}")


def _addresses(values: list[str], key: str, where: _Where) -> tuple[IPAddress, ...]:
    out: list[IPAddress] = []
    for index, text in enumerate(values):
        try:
            addr = ipaddress.ip_address(text.strip())
        except ValueError:
            raise where.error(key, f"{text!r} is not an IP address", index) from None
        if addr.is_multicast or addr.is_unspecified:
            raise where.error(key, f"{text!r} cannot be used here", index)
        if addr.version == 6 and addr.scope_id:
            raise where.error(key, f"{text!r} has a zone index, which nftables cannot match", index)
        if addr in out:
            raise where.error(key, f"{text!r} is listed twice", index)
        out.append(addr)
    return tuple(out)


def _unknown_keys(data: dict[str, Any], allowed: set[str], where: _Where) -> None:
    for key in data:
        if key not in allowed:
            raise where.error(key, f"unknown key (known: {', '.join(sorted(allowed))})")


def load_settings(cdir: Path) -> Settings:
    path = cdir / "config.toml"
    if not path.exists():
        return Settings()
    data, lines = _read_toml(path)
    where = _Where(path, lines)
    _unknown_keys(data, _SETTINGS_KEYS, where)
    backend = data.get("backend", "auto")
    if backend not in ("auto", "nftables", "iptables"):
        raise where.error("backend", f"{_short(backend)} is not one of auto, nftables, iptables")
    public = _addresses(_string_list(data, "public", where) or [], "public", where)
    flags: dict[str, bool] = {}
    for key, default in (("hairpin", True), ("strict", False), ("metadata", False)):
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise where.error(key, f"must be true or false, not {_short(value)}")
        flags[key] = value
    return Settings(backend=backend, public=public, hairpin=flags["hairpin"],
                    strict=flags["strict"], metadata=flags["metadata"], path=str(path))


def settings_or_default(cdir: Path) -> Settings:
    """For paths that must go on with a broken config.toml (removing forwards, repairing,
    deciding strictness): its defaults.  The error itself is reported where it is read."""
    try:
        return load_settings(cdir)
    except ConfigError:
        return Settings()


def parse_guest(name: str, path: Path, data: dict[str, Any], lines: list[str]) -> GuestConfig:
    where = _Where(path, lines)
    _unknown_keys(data, _GUEST_KEYS, where)

    # no `address`: found from the guest's MAC at start (static DHCP host or lease)
    addr_list = _string_list(data, "address", where)
    addresses = _addresses(addr_list or [], "address", where)
    if addr_list is not None and not addresses:
        raise where.error("address", "is empty (leave the key out to find it from the guest's MAC)")
    for version in (4, 6):
        if sum(1 for a in addresses if a.version == version) > 1:
            raise where.error("address", f"gives more than one IPv{version} address; forwards need one target")

    public_list = _string_list(data, "public", where)
    public = None if public_list is None else _addresses(public_list, "public", where)

    if "ports" not in data:
        raise where.error("ports", "missing: the list of forwards, e.g. [\"80\", \"2222:22\"]")
    port_texts = _string_list(data, "ports", where) or []
    entries: list[PortEntry] = []
    port_lines = where.value_lines("ports", port_texts)
    for index, text in enumerate(port_texts):
        try:
            spec = parse_port_spec(text)
        except PortSpecError as exc:
            raise where.error("ports", str(exc), index) from None
        entries.append(PortEntry(spec, text, port_lines[index]))

    allow: tuple[IPNetwork, ...] | None = None
    allow_list = _string_list(data, "allow", where)
    if allow_list is not None:
        nets: list[IPNetwork] = []
        for index, text in enumerate(allow_list):
            try:
                net = ipaddress.ip_network(text.strip(), strict=True)
            except ValueError as exc:
                raise where.error("allow", f"{text!r} is not a CIDR ({exc})", index) from None
            if "%" in text:
                raise where.error("allow", f"{text!r} has a zone index, which nftables cannot match", index)
            nets.append(net)
        if not nets:
            raise where.error("allow", "is empty: that would forward nothing (remove the key to allow all)")
        allow = tuple(nets)

    return GuestConfig(name=name, path=str(path), addresses=addresses, ports=tuple(entries),
                       public=public, allow=allow, lines=dict(where.keys))


def load_guest(cdir: Path, name: str) -> GuestConfig | None:
    """The guest's config, or None when it has no file (it is not ours)."""
    path = guest_path(cdir, name)
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None
    _check_dir(path.parent)
    data, lines = _read_toml(path)
    return parse_guest(name, path, data, lines)


def _check_dir(path: Path) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None
    _check_trusted(path, st)


def guest_names(cdir: Path) -> list[str]:
    gdir = cdir / "guests"
    if not gdir.is_dir():
        return []
    return sorted(p.name[:-5] for p in gdir.iterdir() if p.name.endswith(".toml") and not p.name.startswith("."))


def guest_from_metadata(name: str, data: dict[str, Any]) -> GuestConfig:
    """A guest config from the domain XML's <metadata> (see domainxml.py)."""
    return parse_guest(name, Path(f"<metadata of domain {name}>"), data, [])
