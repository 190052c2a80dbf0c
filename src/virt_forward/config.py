"""Read and validate /etc/virt-forward: config.toml and guests/<domain>.toml.

Files decide which ports of the host are open, so, like sshd's StrictModes, a
file that is not root's or that group/other may write is refused, and so is a
config dir, `guests` dir or any directory above them that is not root's or that
group/other may write (whoever may rename an entry may swap our files, or remove
config.toml and widen every forward to all local addresses).  Every error names
the file, the line (found in the text, since tomllib gives no positions for
values), the key and the bad value.

Limits (max_forwards_per_guest, max_forwards) are counted in plan.py from the
parsed specs, before a range is expanded into forwards.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Literal

from . import consts
from .errors import ConfigError, PortSpecError, UsageError
from .ports import IPAddress, PortRange, PortSpec, parse_port_spec, parse_range

# Owners whose files and directories we trust: root.  Tests add their own uid, so the planner
# and the command sequences run without root (tests/test_sequences.py).
TRUSTED_UIDS: frozenset[int] = frozenset({0})

Backend = Literal["auto", "nftables", "iptables"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

MAX_FILE_BYTES = 1 << 20
# Defaults of the limits.  A guest file of 163 bytes ("1-65535" and "1-65535/udp" on 8
# public addresses) asked for 1,048,560 forwards: 18 s and 500 MB to plan, and a map of a
# million elements at a guest start.  No host needs that many by accident.
MAX_FORWARDS_PER_GUEST = 1024
MAX_FORWARDS = 65536
# What config.toml may raise them to: beyond this the planner's memory and the time of a
# transaction at guest start (libvirt waits for it) are no longer reasonable.
HARD_MAX_FORWARDS = 1 << 20
# Public ports a domain's <metadata> may open: whoever may edit a domain is not root, so the
# privileged ports (the host's own ssh on 22 among them) stay out of their reach by default.
METADATA_PORTS = PortRange(1024, 65535)
# Forwards one domain's <metadata> may ask for by default: a handful of services, not 1,024
# ports on every local address (max_forwards_per_guest's default, issue 19).
METADATA_MAX_FORWARDS = 16
_SETTINGS_KEYS = {"backend", "public", "hairpin", "strict", "metadata", "max_forwards_per_guest",
                  "max_forwards", "metadata_ports", "metadata_public", "metadata_max_forwards", "metrics_file",
                  "metrics_interval"}
# How often the watcher rewrites metrics_file by default, and the bounds of metrics_interval:
# node_exporter is scraped every 15-60 s; more often than each second would only cost CPU.
METRICS_INTERVAL = 15.0
METRICS_INTERVAL_RANGE = (1.0, 3600.0)
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
    max_forwards_per_guest: int = MAX_FORWARDS_PER_GUEST
    max_forwards: int = MAX_FORWARDS  # all guest files together (plan.host_forward_count)
    metadata_ports: PortRange = METADATA_PORTS  # public ports that <metadata> forwards may use
    # public addresses <metadata> forwards may use (None: those of `public`; both empty: none)
    metadata_public: tuple[IPNetwork, ...] | None = None
    metadata_max_forwards: int = METADATA_MAX_FORWARDS  # forwards of one <metadata> guest
    # node_exporter textfile-collector file the watcher rewrites (None: no file) and how often
    metrics_file: str | None = None
    metrics_interval: float = METRICS_INTERVAL
    # line of each key in config.toml, so that a limit error can point at the limit
    lines: dict[str, int] = field(default_factory=dict, compare=False, hash=False)

    def line_of(self, key: str) -> int | None:
        return self.lines.get(key)

    def source_of(self, key: str) -> str:
        """Where the value of `key` came from, for error messages."""
        line = self.lines.get(key)
        if self.path is not None and line is not None:
            return f"{self.path}:{line}"
        return "the default; config.toml may change it"


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
    # from a domain's <metadata>, not from a file of root's: the planner holds its public
    # ports to config.toml's metadata_ports
    from_metadata: bool = False
    # the guest's addresses on the libvirt networks its forwards name ('@network'), found by
    # the caller (engine.desired: the `address` entries in the network's subnets, else by MAC)
    network_addresses: tuple[tuple[str, tuple[IPAddress, ...]], ...] = ()

    def network_targets(self) -> set[str]:
        return {e.spec.target for e in self.ports if isinstance(e.spec.target, str)}

    def found_at_start(self) -> bool:
        """Some target is known only from the domain XML at start: no `address` for a spec
        without '@', or an '@network' (engine.desired finds them; the planner alone cannot)."""
        return (not self.addresses and any(e.spec.target is None for e in self.ports)) or bool(
            self.network_targets())

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
    if st.st_uid not in TRUSTED_UIDS:
        raise ConfigError(f"refused: owned by uid {st.st_uid}, not root (chown root {path})", path=path)
    if st.st_mode & 0o022:
        raise ConfigError(
            f"refused: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}; chmod go-w {path})",
            path=path)


_MAX_SYMLINKS = 40  # the kernel's own limit (ELOOP)


def _quoted(path: str) -> str:
    import shlex  # only on the error path: the hook's imports stay lean
    return shlex.quote(path)


def _check_dir(path: str, st: os.stat_result, what: str, parent: bool, below: str = "the config") -> None:
    """A directory we read config from or through: root's, and only root may change its entries.

    `parent`: a directory above the config dir, where a root-owned sticky directory
    (/tmp, mode 1777) is fine: others may add entries there but not rename or remove ours.
    `below`: what its owner could swap (safefile.py checks the way to a file we write).
    """
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in TRUSTED_UIDS:
        raise ConfigError(
            f"refused: {what} is owned by uid {st.st_uid} (mode {mode:04o}), not root: its owner could "
            f"swap {below} below it (chown root {_quoted(path)})", path=path)
    if mode & 0o022 and not (parent and mode & stat.S_ISVTX):
        raise ConfigError(
            f"refused: {what} is writable by group or others (owner root, mode {mode:04o}): they could rename "
            f"or replace {below} below it (chmod go-w {_quoted(path)})", path=path)


def check_config_dir(cdir: Path) -> bool:
    """Like sshd's StrictModes: the config dir and every directory above it must be root's and
    not writable by group or others; a root-owned sticky directory above it (/tmp) is fine.

    True when it is trusted, False when it does not exist (nothing to read: the defaults),
    ConfigError naming the directory, its owner and mode, and the fix otherwise.  The path
    is followed as the kernel follows it (symlinks and '..' included), and each directory
    is checked before an entry is looked up in it: whoever may write a directory decides
    what that lookup finds, also when the entry is only a symlink on the way.
    """
    shown = str(cdir)
    text = os.fspath(cdir)
    try:
        if not text.startswith("/"):
            text = os.getcwd() + "/" + text
        return _walk(text, shown)
    except OSError as exc:  # the working directory removed, a symlink changed while we read it...
        raise ConfigError(f"cannot read: {exc.strerror}", path=exc.filename or shown) from None


def _walk(text: str, shown: str) -> bool:
    above = f"a directory above the config dir {shown}"
    stats = {"/": os.stat("/")}  # every directory entered: `current` and all its ancestors
    todo = text.split("/")[::-1]  # a stack: the next component last
    current, hops = "/", 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":  # `current` holds no symlink: its parent is the directory we came through
            current = os.path.dirname(current)
            continue
        _check_dir(current, stats[current], above, parent=True)
        step = os.path.join(current, part)
        try:
            st = os.lstat(step)
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise ConfigError(f"refused: more than {_MAX_SYMLINKS} symlinks on the way to {shown}", path=step)
            if st.st_uid not in TRUSTED_UIDS:  # in a sticky directory its owner may point it elsewhere at any time
                raise ConfigError(
                    f"refused: a symlink on the way to the config dir {shown} is owned by uid {st.st_uid}, not "
                    f"root: its owner could point it elsewhere (chown -h root {_quoted(step)})", path=step)
            target = os.readlink(step)
            if target.startswith("/"):
                current = "/"
            todo.extend(target.split("/")[::-1])
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"not a directory (on the way to the config dir {shown})", path=step)
        stats[step] = st
        current = step
    # the config dir itself: no sticky exception (others could add files of theirs to it)
    real = "" if os.path.normpath(text) == current else f" {shown} (really {current})"
    _check_dir(current, stats[current], f"the config dir{real}", parent=False)
    return True


def guests_dir(cdir: Path) -> Path | None:
    """cdir/guests after checking it and everything above it; None when it does not exist.

    Not a symlink (lstat): one would make a directory elsewhere, checked by nobody, the
    source of every guest's forwards.
    """
    if not check_config_dir(cdir):
        return None
    gdir = cdir / "guests"
    try:
        st = os.lstat(gdir)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=gdir) from None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(gdir)
        except OSError:
            target = "?"
        raise ConfigError(f"refused: a symlink (to {target!r}), not a directory: guest files must be in "
                          f"the config dir itself (replace it by the directory: rm {_quoted(str(gdir))} && "
                          f"mkdir -m 0755 {_quoted(str(gdir))})", path=gdir)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError("not a directory", path=gdir)
    _check_dir(str(gdir), st, "the guests dir", parent=False)
    return gdir


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
    lines = text.split("\n")
    deep = _deep_key_line(lines)
    if deep is not None:
        raise ConfigError(f"refused: a dotted key of more than {_MAX_KEY_PARTS} parts (none of ours has more than one, "
                          "and the TOML parser's time and memory grow with the square of it)", path=path, line=deep)
    try:
        data = tomllib.loads(text)
    except RecursionError:  # tomllib recurses per nesting level: "a = [[[[..." of a few hundred
        raise ConfigError("TOML syntax error: values nested too deeply", path=path) from None
    except ValueError as exc:
        if isinstance(exc, tomllib.TOMLDecodeError):
            raise _toml_error(exc, text, path) from None
        # int() refuses more than 4300 decimal digits (CVE-2020-10735) and tomllib lets that through
        m = re.search(r"[0-9][0-9_]{4299}", text)
        line = text.count("\n", 0, m.start()) + 1 if m else None
        raise ConfigError("TOML syntax error: a number of more than 4300 digits", path=path, line=line) from None
    # TOML counts lines by "\n" only; str.splitlines() would also split at
    # U+2028, \x0c, \x85 ... and shift every line number after one of them.
    return data, lines


def _deep_key_line(lines: list[str]) -> int | None:
    """The first line holding a dotted key (`a.b.c =`, `[a.b.c]`, `{a.b.c = 1}`) of more than
    _MAX_KEY_PARTS parts.

    tomllib's time and memory grow with the square of a dotted key's length: one line
    "a.a.a...= 1" of 1 MB took all memory (killed by the OOM killer), "[a.a...]" 40 s.  A key
    cannot span lines, and only lines with that many dots are searched, from the places
    where a key may start, so this costs nearly nothing.
    """
    for number, line in enumerate(lines, 1):
        if line.count(".") >= _MAX_KEY_PARTS and _DEEP_KEY.search(line):
            return number
    return None


def _toml_error(exc: tomllib.TOMLDecodeError, text: str, path: Path) -> ConfigError:
    """tomllib's message with its position turned into path:line."""
    msg = str(exc)
    m = re.search(r"\(at line (\d+), column \d+\)", msg)
    line = int(m.group(1)) if m else None
    if line is None and "(at end of document)" in msg:  # e.g. an unclosed array: the last line
        line = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
    reason = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", msg)
    return ConfigError(f"TOML syntax error: {reason}", path=path, line=line)


_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEY_LINE = re.compile(rf"\s*({_KEY})\s*(?:\.\s*{_KEY}\s*)*=")
_MAX_KEY_PARTS = 16
# where a key may start: a line, a table header ([ or [[), an inline table ({ or ,)
_DEEP_KEY = re.compile(rf"(?:^|[\[{{,])[ \t]*\[?[ \t]*{_KEY}(?:[ \t]*\.[ \t]*{_KEY}){{{_MAX_KEY_PARTS},}}")
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
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int of more than 4300 digits (TOML's 0x... may spell one)
        return f"a number of {value.bit_length()} bits" if isinstance(value, int) else "a value too large to show"
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


def _limit(data: dict[str, Any], key: str, default: int, where: _Where) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(key, f"must be a whole number of forwards, not {_short(value)}")
    if not 1 <= value <= HARD_MAX_FORWARDS:
        raise where.error(key, f"{_short(value)} is out of range 1-{HARD_MAX_FORWARDS}")
    return value


def _port_range(data: dict[str, Any], key: str, default: PortRange, where: _Where) -> PortRange:
    if key not in data:
        return default
    value = data[key]
    if not isinstance(value, str):
        raise where.error(key, f"must be a port range in a string, like \"1024-65535\", not {_short(value)}")
    try:
        return parse_range(value.strip(), "port")
    except PortSpecError as exc:
        raise where.error(key, f"{value!r}: {exc}") from None


def _networks(data: dict[str, Any], key: str, where: _Where) -> tuple[IPNetwork, ...] | None:
    """Addresses and CIDRs (an address is its /32 or /128); None when the key is absent."""
    texts = _string_list(data, key, where)
    if texts is None:
        return None
    nets: list[IPNetwork] = []
    for index, text in enumerate(texts):
        try:
            net = ipaddress.ip_network(text.strip(), strict=True)
        except ValueError as exc:
            raise where.error(key, f"{text!r} is not an address or a CIDR ({exc})", index) from None
        if "%" in text:
            raise where.error(key, f"{text!r} has a zone index, which nftables cannot match", index)
        nets.append(net)
    if not nets:
        raise where.error(key, "is empty (to take no forwards from <metadata>: metadata = false)")
    return tuple(nets)


def _metrics_file(data: dict[str, Any], where: _Where) -> str | None:
    key = "metrics_file"
    if key not in data:
        return None
    value = data[key]
    if not isinstance(value, str):
        raise where.error(key, f"must be a path in a string, not {_short(value)}")
    if not value.startswith("/") or "\0" in value:
        raise where.error(key, f"{_short(value)} is not an absolute path")
    # node_exporter's textfile collector reads only *.prom: any other name would never be read
    if not value.endswith(".prom"):
        raise where.error(key, f"{_short(value)} does not end in .prom (node_exporter's textfile collector "
                               "reads only those), e.g. \"/var/lib/prometheus/node-exporter/virt_forward.prom\"")
    return value


def _metrics_interval(data: dict[str, Any], where: _Where) -> float:
    key = "metrics_interval"
    value = data.get(key, METRICS_INTERVAL)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(key, f"must be a number of seconds, not {_short(value)}")
    low, high = METRICS_INTERVAL_RANGE
    if not low <= value <= high:  # NaN fails this too
        raise where.error(key, f"{_short(value)} is out of range {low:g}-{high:g} seconds")
    return float(value)


def load_settings(cdir: Path) -> Settings:
    # the directories first: whoever may rename config.toml away would otherwise decide
    # that the defaults apply (every local address instead of `public`)
    if not check_config_dir(cdir):
        return Settings()
    path = cdir / "config.toml"
    if not os.path.lexists(path):  # a symlink is refused by _read_toml, not taken for no file
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
                    strict=flags["strict"], metadata=flags["metadata"], path=str(path),
                    max_forwards_per_guest=_limit(data, "max_forwards_per_guest", MAX_FORWARDS_PER_GUEST, where),
                    max_forwards=_limit(data, "max_forwards", MAX_FORWARDS, where),
                    metadata_ports=_port_range(data, "metadata_ports", METADATA_PORTS, where),
                    metadata_public=_networks(data, "metadata_public", where),
                    metadata_max_forwards=_limit(data, "metadata_max_forwards", METADATA_MAX_FORWARDS, where),
                    metrics_file=_metrics_file(data, where), metrics_interval=_metrics_interval(data, where),
                    lines=dict(where.keys))


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
    # several of a family: one per NIC; a forward without '@' goes to the first of each family

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
    # the directories before "no file": whoever may remove a guest file from an untrusted
    # directory would otherwise decide that the domain's <metadata> applies instead
    if guests_dir(cdir) is None:
        return None
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None
    data, lines = _read_toml(path)
    return parse_guest(name, path, data, lines)


def guest_names(cdir: Path) -> list[str]:
    gdir = cdir / "guests"
    if not gdir.is_dir():
        return []
    return sorted(p.name[:-5] for p in gdir.iterdir() if p.name.endswith(".toml") and not p.name.startswith("."))


def guest_from_metadata(name: str, data: dict[str, Any], *,
                        subnets: Iterable[IPNetwork | IPInterface] = ()) -> GuestConfig:
    """A guest config from the domain XML's <metadata> (see domainxml.py).

    Whoever may edit the domain wrote it, not root, so every `address` (the target of
    the DNAT) must lie in `subnets`: those of the domain's own libvirt networks, which
    the caller reads (this stays pure).  An interface (ipaddress.ip_interface, the
    network's <ip address= prefix=>) also keeps the host's own address on that network
    out: a DNAT to it would open the host's own services (its ssh) to the outside.
    The default, none, refuses every address: without them the target cannot be
    checked (an address found from the guest's MAC is checked by discovery instead).
    Public ports are held to config.toml's metadata_ports by plan.plan_guest.
    """
    guest = parse_guest(name, Path(f"<metadata of domain {name}>"), data, [])
    nets = tuple(subnets)
    # an '@address' target as much as `address`: both become the DNAT's target
    checked = [(a, "address") for a in guest.addresses] + [
        (e.spec.target, "ports") for e in guest.ports
        if e.spec.target is not None and not isinstance(e.spec.target, str)]
    for addr, key in checked:
        assert not isinstance(addr, str)
        if not any(_guest_address_in(addr, net) for net in nets):
            known = ", ".join(f"{n.network}, host {n.ip}" if isinstance(n, IPInterface) else str(n)
                              for n in nets) if nets else "none known"
            raise ConfigError(
                f"{str(addr)!r} is not a guest address of the domain's own networks ({known}): forwards from "
                "<metadata> may only reach the domain's own network (leave <address> out to find it from "
                "the guest's MAC, or put the forward in a guest file)", path=guest.path, key=key)
    return replace(guest, from_metadata=True)


def _guest_address_in(addr: IPAddress, net: IPNetwork | IPInterface) -> bool:
    """`addr` can be a guest on `net`: inside it, and not its network, broadcast or host address."""
    network = net.network if isinstance(net, IPInterface) else net
    if addr.version != network.version or addr not in network:
        return False
    if isinstance(net, IPInterface) and addr == net.ip:
        return False
    # /31, /32 (and IPv6's /127, /128) have no network or broadcast address to keep out
    return network.num_addresses <= 2 or addr not in (network.network_address, network.broadcast_address)


def check_metadata_scope(guest: GuestConfig, settings: Settings, *,
                         host: Callable[[], Collection[IPAddress] | None],
                         networks: Collection[IPAddress]) -> None:
    """The public side of a guest from <metadata> (issue 19): whoever may edit a domain wrote
    it, not root, so every public address it names must be one of this host's (`host()`,
    called only when one is named, None when they could not be read), not the host's own
    address on a libvirt network (`networks`: a DNAT there takes the guests' own traffic to
    their gateway) and within config.toml's metadata_public (default: its `public`).  Without
    `<public>` its forwards take `public`, which must then be set and within metadata_public
    (else they would open every local address).  At most metadata_max_forwards forwards.
    Pure: the caller (engine.desired) reads the host's and the networks' addresses."""
    scope = settings.metadata_public
    derived = scope is None
    if scope is None:
        scope = tuple(ipaddress.ip_network(a) for a in settings.public)
    if not scope:
        raise ConfigError("refused: config.toml sets neither metadata_public nor public, so forwards from "
                          "<metadata> would open every local address (set metadata_public to the addresses "
                          "they may use)", path=guest.path)
    shown = "config.toml's public (metadata_public is not set)" if derived else \
        f"metadata_public ({settings.source_of('metadata_public')})"
    known: list[Collection[IPAddress] | None] = []  # host(), read once and only when needed

    def check(addr: IPAddress, key: str, what: str) -> None:
        if addr in networks:
            raise ConfigError(f"{what}: {addr} is the host's own address on a libvirt network (its bridge): a "
                              "forward there would take the guests' own traffic to their gateway", path=guest.path,
                              key=key)
        if not any(addr in net for net in scope):
            raise ConfigError(f"{what}: {addr} is outside {shown}: {', '.join(map(str, scope))}",
                              path=guest.path, key=key)
        if not known:
            known.append(host())
        if known[0] is None:
            raise ConfigError(f"{what}: {addr} cannot be checked: the host's addresses could not be read "
                              "(`ip -j addr`)", path=guest.path, key=key)
        if addr not in known[0]:
            raise ConfigError(f"{what}: {addr} is not an address of this host", path=guest.path, key=key)

    for addr in guest.public or ():
        check(addr, "public", "<public>")
    for entry in guest.ports:
        if entry.spec.public is not None:
            check(entry.spec.public, "ports", repr(entry.text))
    defaulted = guest.public is None and any(e.spec.public is None for e in guest.ports)
    if defaulted and not (settings.public and all(any(a in n for n in scope) for a in settings.public)):
        raise ConfigError(
            "refused: a forward without a public address would take config.toml's public "
            f"({', '.join(map(str, settings.public)) or 'none: every local address'}), which is not within "
            f"{shown}: name a <public> within it", path=guest.path, key="ports")
    _check_metadata_count(guest, settings)


def _check_metadata_count(guest: GuestConfig, settings: Settings) -> None:
    """At most metadata_max_forwards forwards, counted from the specs: each port of a range once
    per public address (one family each), an upper bound of what the planner makes."""
    limit, total = settings.metadata_max_forwards, 0
    default = guest.public if guest.public is not None else settings.public
    counts = [(len(e.spec.host) * (1 if e.spec.public is not None else len(default)), e) for e in guest.ports]
    whole = sum(n for n, _ in counts)
    for count, entry in counts:
        total += count
        if total > limit:  # the entry that crosses the limit is the one to name
            raise ConfigError(
                f"{entry.text!r} is {len(entry.spec.host)} port(s): up to {count} forward(s), {whole} for the guest "
                f"in all, more than metadata_max_forwards = {limit} ({settings.source_of('metadata_max_forwards')})",
                path=guest.path, key="ports")
