"""Hairpin mode on a guest's bridge port: the guest reaches its own forwards.

A guest calling its own public address:port is DNAT-ed back to itself.  With
br_netfilter loaded (bridge-nf-call-iptables = 1; built into many kernels) that
packet is bridged, not routed, and a bridge never sends a frame back out of the
port it came in on unless the port is in hairpin mode: the guest's call times out
while the host and the other guests get through.  Incus and Docker set hairpin mode
for the same reason.  We set it only on the ports (libvirt's taps) of guests that
have forwards, only on the libvirt NAT bridges those forwards point into, and we
switch off again only what we switched on (the file hairpin/<stem> in the state dir
lists it, with each port's ifindex: a tap re-made under the same name is not ours).

The hook's fast path uses this module: os and our dependency-free modules only,
and the domain XML is scanned, not parsed (xml.etree costs 15-30 ms to import).
"""

from __future__ import annotations

import os

from . import files

SYS_NET = "/sys/class/net"
PROBLEM = "hairpin mode off on its port"


def ports(xml: str) -> list[tuple[str, str]]:
    """(bridge, tap) of each `<interface>` of a live domain XML: its `<source bridge>` (libvirt
    writes it for network and bridge NICs alike) and its `<target dev>`.  libvirt writes this
    XML itself, quoting attributes with ' or "; a name that is not a valid interface name, or
    holds an entity, is skipped."""
    found: list[tuple[str, str]] = []
    pos = 0
    while True:
        start = xml.find("<interface", pos)
        if start < 0:
            break
        end = xml.find("</interface>", start)
        if end < 0:
            break
        block, pos = xml[start:end], end
        bridge, dev = _attr(block, "<source", "bridge"), _attr(block, "<target", "dev")
        if bridge is not None and dev is not None and valid_name(dev) and (bridge, dev) not in found:
            found.append((bridge, dev))
    return found


def taps(xml: str, bridges: frozenset[str] | set[str] | tuple[str, ...]) -> list[str]:
    """The guest's taps plugged into one of `bridges`."""
    return [dev for bridge, dev in ports(xml) if bridge in bridges] if bridges else []


def _attr(block: str, tag: str, name: str) -> str | None:
    """The value of attribute `name` of the first element `tag` in `block`."""
    at = 0
    while True:
        at = block.find(tag, at)
        if at < 0:
            return None
        after = block[at + len(tag):at + len(tag) + 1]
        if after in (" ", "\t", "\n", "\r", "/"):
            break
        at += len(tag)
    close = block.find(">", at)
    element = block[at:close if close >= 0 else len(block)]
    for quote in ("'", '"'):
        key = f"{name}={quote}"
        i = element.find(" " + key)
        if i < 0:
            i = element.find("\n" + key)
        if i >= 0:
            value_at = i + 1 + len(key)
            j = element.find(quote, value_at)
            value = element[value_at:j] if j >= 0 else None
            return None if value is None or "&" in value else value
    return None


def valid_name(dev: str) -> bool:
    """The kernel's rule for interface names (dev_valid_name): safe as one sysfs path component."""
    return (0 < len(dev) < 16 and dev not in (".", "..")
            and not any(c in dev for c in "/:") and not any(c.isspace() for c in dev))


def _read(path: str) -> str | None:
    """A short sysfs or state file; never blocks on a FIFO and never follows a symlink planted
    as the file itself (the hook's fast path reads these)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("ascii").strip()
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def port_of(dev: str, bridges: frozenset[str] | set[str] | tuple[str, ...]) -> int | None:
    """The ifindex of `dev` when it is a port of one of `bridges` now, else None."""
    try:
        master = os.path.basename(os.readlink(os.path.join(SYS_NET, dev, "master")))
    except OSError:
        return None
    index = _read(os.path.join(SYS_NET, dev, "ifindex"))
    return int(index) if master in bridges and index is not None and index.isdigit() else None


def _mode_path(dev: str) -> str:
    return os.path.join(SYS_NET, dev, "brport", "hairpin_mode")


def _same_port(dev: str, index: int) -> bool:
    got = _read(os.path.join(SYS_NET, dev, "ifindex"))
    return got is not None and got.isdigit() and int(got) == index


def _ours_file(state_dir: str, stem: str) -> str:
    return os.path.join(state_dir, "hairpin", stem)


def held(state_dir: str, stem: str) -> list[tuple[str, int]]:
    """The ports we switched hairpin mode on for this guest: (dev, ifindex)."""
    text = _read(_ours_file(state_dir, stem))
    out: list[tuple[str, int]] = []
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and valid_name(parts[0]) and parts[1].isdigit():
            out.append((parts[0], int(parts[1])))
    return out


def set_for(state_dir: str, stem: str, devs: list[str],
            bridges: frozenset[str] | set[str] | tuple[str, ...]) -> list[str]:
    """Hairpin mode on each of `devs` that is a port of one of `bridges`; off again on the ports
    we switched on for this guest and that are no longer wanted.  Returns the ports in hairpin
    mode for it now.  Raises OSError (callers log it: a forward to oneself is not worth a guest)."""
    before = held(state_dir, stem)
    ours: list[tuple[str, int]] = []
    in_mode: list[str] = []
    for dev in devs:
        index = port_of(dev, bridges)
        if index is None:
            continue  # not plugged in yet (`start`), or not into a bridge of ours
        if _read(_mode_path(dev)) == "0":
            with open(_mode_path(dev), "w", encoding="ascii") as fh:
                fh.write("1")
            ours.append((dev, index))
        elif (dev, index) in before:
            ours.append((dev, index))
        in_mode.append(dev)
    for dev, index in before:
        if (dev, index) not in ours and _same_port(dev, index):
            _switch_off(dev)
    _save(state_dir, stem, ours)
    return in_mode


def release(state_dir: str, stem: str) -> None:
    """Hairpin mode off on every port we switched on for this guest (at its stop the taps are
    gone already; when its forwards go while it runs, they are not)."""
    for dev, index in held(state_dir, stem):
        if _same_port(dev, index):
            _switch_off(dev)
    _save(state_dir, stem, [])


def problems(state_dir: str) -> list[tuple[str, str]]:
    """(guest's stem, port) of the ports we put in hairpin mode that are not in it any more: a
    bridge port is made anew when libvirt re-attaches its taps (a network restart), and the
    mode goes with it."""
    found: list[tuple[str, str]] = []
    try:
        stems = sorted(os.listdir(os.path.join(state_dir, "hairpin")))
    except OSError:
        return found
    for stem in stems:
        for dev, index in held(state_dir, stem):
            if _same_port(dev, index) and _read(_mode_path(dev)) == "0":
                found.append((stem, dev))
    return found


def _switch_off(dev: str) -> None:
    try:
        with open(_mode_path(dev), "w", encoding="ascii") as fh:
            fh.write("0")
    except OSError:
        pass  # gone between the check and the write: nothing left to switch off


def _save(state_dir: str, stem: str, ours: list[tuple[str, int]]) -> None:
    path = _ours_file(state_dir, stem)
    if not ours:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    try:
        os.mkdir(os.path.dirname(path), 0o700)
    except FileExistsError:
        pass
    files.replace(path, "".join(f"{dev} {index}\n" for dev, index in ours).encode())
