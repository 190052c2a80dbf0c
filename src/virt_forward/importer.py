"""`import PATH`: turn older forwarding setups into guest files.

Two sources are understood:

* the post's per-guest scripts (`/home/kvm/networks/<domain>`): shell scripts that set
  `PUBLIC_IP=`, `PRIVATE_IP=`, `PORTS=tcp:80,tcp:443` and call `modify_network` with
  them; a file or a directory of them.  The arguments of the `modify_network` call
  decide (literals or variables set above it), exactly as the script runs.
* the libvirt-hook-qemu project's `hooks.json` (also `qemu.json`): an object keyed by
  domain name with `private_ip`, `port_map` {"tcp": [[public, private], port, ...]},
  optional `public_ip`, `source_ip`, `port_range`, `interface`; `//` and `/* */`
  comments allowed, as that hook allows them.

Input that cannot be read or parsed raises ConfigError before anything is written.
A guest whose meaning cannot be kept exactly, or whose result virt-forward would
refuse, is reported and not written; the others are.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import check_domain_name, guest_path
from .edit import NEW_FILE_MODE, make_dirs, validate_text, write_atomic
from .errors import ConfigError, UsageError

MAX_SOURCE_BYTES = 1 << 20
_VAR = re.compile(r"\$(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z_][A-Za-z0-9_]*)\})")
_ASSIGN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)
_HOOK_KEYS = {"interface", "private_ip", "public_ip", "source_ip", "port_map", "port_range"}


class _Refused(Exception):
    """This guest cannot be converted exactly: reported, nothing written for it."""


@dataclass
class _Guest:
    name: str
    source: str  # what the returned lines and the file's header name
    address: str
    entries: list[tuple[str | None, str]] = field(default_factory=list)  # (public, port spec)
    allow: str | None = None
    notes: list[str] = field(default_factory=list)


def import_path(path: Path, config_dir: Path, *, dry_run: bool = False, force: bool = False) -> list[str]:
    """Convert the scripts or hooks.json at `path` into `<config_dir>/guests/<name>.toml` files."""
    out: list[str] = []
    found: list[_Guest | tuple[str, str]] = []  # a guest, or (its source, why it was refused)
    if path.is_dir():
        for entry in sorted(path.iterdir()):
            found += _read_source(entry, out, in_dir=True)
    else:
        found += _read_source(path, out, in_dir=False)

    seen: dict[str, str] = {}
    for item in found:
        if isinstance(item, tuple):
            out.append(f"refused {item[0]}: {item[1]}; nothing written for it")
            continue
        if item.name in seen:
            out.append(f"refused {item.source}: guest {item.name!r} was already imported from "
                       f"{seen[item.name]}; nothing written for it")
            continue
        seen[item.name] = item.source
        out += _write_guest(item, config_dir, dry_run=dry_run, force=force)
    if not found:
        out.append(f"nothing to import from {path}")
    return out


# ------------------------------------------------------------------ sources

def _read_text(path: Path) -> tuple[str | None, str]:
    """(the text, "") or (None, why it is no text file); ConfigError when it cannot be read at all."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=path) from None
    if len(raw) > MAX_SOURCE_BYTES:
        return None, f"larger than {MAX_SOURCE_BYTES} bytes, not a forwarding script"
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte {exc.start})"


def _read_source(path: Path, out: list[str], *, in_dir: bool) -> list[_Guest | tuple[str, str]]:
    if path.is_dir():
        out.append(f"skipped {path}: a directory (only its parent's files are read)")
        return []
    if path.name == "modify_network":
        out.append(f"skipped {path}: the post's shared iptables script, nothing to import from it")
        return []
    if in_dir and not path.is_file():
        out.append(f"skipped {path}: not a regular file")
        return []
    text, why = _read_text(path)
    if text is None:
        if not in_dir:
            raise ConfigError(why, path=path)
        out.append(f"skipped {path}: {why}")
        return []
    if path.suffix == ".json" or text.lstrip().startswith("{"):
        return _from_hooks_json(path, text)
    guest = _from_script(path, text)
    if guest is None:
        out.append(f"skipped {path}: not a per-guest script (no call to modify_network)")
        return []
    return [guest]


# ------------------------------------------------------------------ the post's scripts

def _from_script(path: Path, text: str) -> _Guest | tuple[str, str] | None:
    variables: dict[str, str | None] = {}  # None: set to something we cannot evaluate
    calls: list[tuple[int, list[str]]] = []
    for number, line in enumerate(text.split("\n"), 1):
        if "modify_network" not in line and "=" not in line:
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            if "modify_network" in line or _ASSIGN.match(line.strip()):
                raise ConfigError(f"cannot parse this shell line ({exc})", path=path, line=number) from None
            continue
        while words and words[0] in ("export", "readonly", "declare", "local", "exec", "sudo"):
            words = words[1:]
        if not words:
            continue
        if os.path.basename(words[0]) == "modify_network":  # a command, not `echo modify_network`
            calls.append((number, words[1:]))
        elif m := _ASSIGN.fullmatch(words[0]):
            # NAME=value alone sets NAME; `NAME=$(cmd args)` or a prefix `NAME=x cmd` is nothing we can evaluate
            value = m.group(2)
            variables[m.group(1)] = None if len(words) > 1 or any(c in value for c in "$`") else value

    if not calls:
        return None
    if "\r\n" in text:
        return (str(path), "Windows line ends (CRLF): as it is, it could not run (bad interpreter) and "
                           "forwarded nothing; convert it with dos2unix and import again")
    if len(calls) > 1:
        return (str(path), f"{len(calls)} calls to modify_network (lines {', '.join(str(n) for n, _ in calls)}); "
                           "convert it by hand")
    number, args = calls[0]
    if len(args) < 3:
        raise ConfigError(f"modify_network is called with {len(args)} argument(s), not PUBLIC PRIVATE PORTS "
                          "ACTION", path=path, line=number)
    public, private, ports = (_resolve(arg, variables, path, number) for arg in args[:3])
    name = path.name
    guest = _Guest(name=name, source=str(path), address=private)
    try:
        for spec in _post_ports(ports):
            guest.entries.append((public, spec))
    except _Refused as exc:
        return (str(path), str(exc))
    return guest


def _resolve(arg: str, variables: dict[str, str | None], path: Path, number: int) -> str:
    m = _VAR.fullmatch(arg)
    if m:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise ConfigError(f"${name} is not set above the modify_network call", path=path, line=number)
        value = variables[name]
        if value is None:
            raise ConfigError(f"${name} is set to an expression, not a value: cannot evaluate it",
                              path=path, line=number)
        return value
    if "$" in arg or "`" in arg:
        raise ConfigError(f"cannot evaluate the argument {arg!r} of modify_network", path=path, line=number)
    return arg


def _post_ports(value: str) -> list[str]:
    """PORTS as modify_network reads it: split at ',', tabs/CR/LF removed, `proto:port` each."""
    specs: list[str] = []
    for item in value.split(","):
        text = re.sub(r"[\t\r\n]", "", item)
        if text == "":
            continue  # modify_network's iptables call fails on it: it never forwarded anything
        parts = text.split(":")
        if len(parts) != 2 or not re.fullmatch(r"[A-Za-z]+", parts[0]) or not re.fullmatch(r"[0-9]+", parts[1],
                                                                                          re.ASCII):
            why = (" (modify_network uses only the first port of it)" if len(parts) > 2 else "")
            raise _Refused(f"PORTS entry {text!r} is not protocol:port{why}; fix it and import again")
        proto = parts[0].lower()
        if proto not in ("tcp", "udp"):
            raise _Refused(f"PORTS entry {text!r}: virt-forward forwards tcp and udp only")
        specs.append(f"{proto}:{parts[1]}")
    return specs


# ------------------------------------------------------------------ hooks.json

def _strip_json_comments(text: str) -> str:
    """Remove // and /* */ comments outside strings; keep newlines so JSON errors keep their line."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            end = n if j < 0 else j + 2
            out.append("\n" * text.count("\n", i, end))
            i = end
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _from_hooks_json(path: Path, text: str) -> list[_Guest | tuple[str, str]]:
    try:
        data = json.loads(_strip_json_comments(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"JSON syntax error: {exc.msg}", path=path, line=exc.lineno) from None
    if not isinstance(data, dict):
        raise ConfigError("not a hooks.json: the top level must be an object keyed by domain name", path=path)
    guests: list[_Guest | tuple[str, str]] = []
    for name, value in data.items():
        source = f"{path} ({name!r})"
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, dict) for v in items):
            raise ConfigError(f"domain {name!r}: must be an object or a list of objects", path=path)
        try:
            guests.append(_hooks_guest(name, source, items, path))
        except _Refused as exc:
            guests.append((source, str(exc)))
    return guests


def _hooks_guest(name: str, source: str, items: list[dict[str, Any]], path: Path) -> _Guest:
    def bad(message: str) -> ConfigError:
        return ConfigError(f"domain {name!r}: {message}", path=path)

    privates, sources = set(), set()
    entries: list[tuple[str | None, str]] = []
    has_range = False
    for item in items:
        unknown = sorted(set(item) - _HOOK_KEYS)
        if unknown:
            raise bad(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_HOOK_KEYS))})")
        for key in ("interface", "private_ip", "public_ip", "source_ip"):
            if key in item and not isinstance(item[key], str):
                raise bad(f"{key} must be a string, not {item[key]!r}")
        if "private_ip" not in item:
            raise bad("private_ip is missing")
        privates.add(item["private_ip"])
        sources.add(item.get("source_ip"))
        public: str | None = item.get("public_ip")
        entries += [(public, spec) for spec in _port_map(item.get("port_map", {}), bad)]
        ranges = _port_range(item.get("port_range", []), bad)
        has_range = has_range or bool(ranges)
        entries += [(public, spec) for spec in ranges]
        if "port_map" not in item and "port_range" not in item:
            raise bad("neither port_map nor port_range")

    if len(privates) > 1:
        raise _Refused(f"entries with different private_ip ({', '.join(sorted(privates))}); "
                       "a guest file has one address per IP version")
    if len(sources) > 1:
        raise _Refused("entries with different source_ip; allow is one list per guest")
    source_ip = sources.pop()
    if source_ip is not None and has_range:
        raise _Refused("source_ip did not restrict port_range in that hook, but allow restricts every forward")
    guest = _Guest(name=name, source=source, address=privates.pop(), entries=entries)
    if source_ip is not None:
        try:  # iptables -s masks host bits off: 10.0.0.1/8 is 10.0.0.0/8
            guest.allow = str(ipaddress.ip_network(source_ip.strip(), strict=False))
        except ValueError:
            raise _Refused(f"source_ip {source_ip!r} is not an address or CIDR") from None
    if any(public is None for public, _ in entries):
        guest.notes.append("no public_ip: that hook used the address of the default route's interface; "
                           "virt-forward uses config.toml's public, else every local address")
    return guest


def _port(value: Any, bad: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"port {value!r} is not a number")
    return value


def _port_map(port_map: Any, bad: Any) -> list[str]:
    if not isinstance(port_map, dict):
        raise bad(f"port_map must be an object, not {port_map!r}")
    specs: list[str] = []
    for proto, pairs in port_map.items():
        if not isinstance(pairs, list):
            raise bad(f"port_map {proto!r} must be a list")
        if proto not in ("tcp", "udp"):
            raise _Refused(f"port_map protocol {proto!r}: virt-forward forwards tcp and udp only")
        for pair in pairs:
            if isinstance(pair, list):
                if len(pair) != 2:
                    raise bad(f"port_map {proto!r}: {pair!r} is not [public, private]")
                public, private = (_port(p, bad) for p in pair)
                specs.append(f"{public}:{private}/{proto}" if public != private else f"{public}/{proto}")
            else:
                specs.append(f"{_port(pair, bad)}/{proto}")
    return specs


def _port_range(ranges: Any, bad: Any) -> list[str]:
    if not isinstance(ranges, list):
        raise bad("port_range must be a list")
    specs: list[str] = []
    for r in ranges:
        if not isinstance(r, dict) or {"init_port", "ports_num", "protocol"} - set(r):
            raise bad(f"port_range entry {r!r} needs init_port, ports_num and protocol")
        start, count, proto = _port(r["init_port"], bad), _port(r["ports_num"], bad), r["protocol"]
        if proto not in ("tcp", "udp"):
            raise _Refused(f"port_range protocol {proto!r}: virt-forward forwards tcp and udp only")
        if count < 1:
            raise bad(f"port_range ports_num {count} is not positive")
        specs.append(f"{start}/{proto}" if count == 1 else f"{start}-{start + count - 1}/{proto}")
    return specs


# ------------------------------------------------------------------ writing

def _toml_string(value: str) -> str:
    return json.dumps(value)  # ASCII-only output: a valid TOML basic string for the values we write


def render(guest: _Guest) -> str:
    """The guest file's text: one public for all entries when they share it, else per entry."""
    publics = {public for public, _ in guest.entries}
    lines = [f"# imported by virt-forward from {json.dumps(guest.source)[1:-1]}"]
    lines.append(f"address = {_toml_string(guest.address)}")
    if len(publics) == 1 and None not in publics:
        lines.append(f"public = {_toml_string(str(publics.pop()))}")
        specs = [spec for _, spec in guest.entries]
    else:
        specs = [spec if public is None else _with_public(public, spec) for public, spec in guest.entries]
    lines.append(f"ports = [{', '.join(_toml_string(s) for s in specs)}]")
    if guest.allow is not None:
        lines.append(f"allow = [{_toml_string(guest.allow)}]")
    return "\n".join(lines) + "\n"


def _with_public(public: str, spec: str) -> str:
    """`public:host:guest/proto` from our own `proto:port` or `host[:guest]/proto` texts."""
    if "/" in spec:
        ports, proto = spec.split("/")
    else:
        proto, ports = spec.split(":")
    if ":" not in ports:
        ports = f"{ports}:{ports}"
    pub = f"[{public}]" if ":" in public else public
    return f"{pub}:{ports}/{proto}"


def _write_guest(guest: _Guest, config_dir: Path, *, dry_run: bool, force: bool) -> list[str]:
    try:
        dest = guest_path(config_dir, guest.name)
    except UsageError as exc:
        return [f"refused {guest.source}: {exc}; nothing written for it"]
    text = render(guest)
    try:
        plan = validate_text(config_dir, guest.name, dest, text)
    except ConfigError as exc:
        if exc.path != str(dest):  # config.toml itself is wrong: every guest would fail
            raise
        what = f"{exc.key}: {exc.reason}" if exc.key else exc.reason
        return [f"refused {guest.source}: the result would be invalid: {what}; nothing written for it"]
    notes = [f"  note: {note}" for note in guest.notes]
    exists = os.path.lexists(dest)
    if exists and not force:
        return [f"kept {dest}: it exists (--force replaces it); not imported from {guest.source}"]
    verb = ("would replace" if exists else "would write") if dry_run else ("replaced" if exists else "wrote")
    if not dry_run:
        make_dirs(config_dir)
        write_atomic(dest, text, NEW_FILE_MODE)
    return [f"{verb} {dest}: {len(plan.forwards)} forward(s) from {guest.source}"] + notes
