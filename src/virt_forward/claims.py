"""Who holds which public port: the one ownership rule, for every path that applies forwards.

A public (family, address or every address, protocol, port) belongs to the guest that
applied it first.  A later claim that overlaps it -- the same address, or either side
on every address -- is refused for that guest, naming the holder; nothing ever moves a
port to another guest (the hook, apply, add, reconcile, the watcher and the network
hook all come through here).  nft's maps refuse only an identical key with other data;
an address-specific element beside an every-address one would silently win the lookup.

The index lives beside the records: one small file per (family, protocol, port) in the
state dir's claims/, one line "<public address or *> <holder>" per claim, so checking a
guest costs one read per forward of that guest, whatever the other guests hold.  It is
derived from the records (reconcile rebuilds it) and kept under the state lock.  It
imports only os: the hook's fast path uses it too.
"""

from __future__ import annotations

import os

Claim = tuple[str, str]  # (key "4-tcp-8080", public address or "*")
ANY = "*"


def key(family: int, proto: str, port: int) -> str:
    return f"{family}-{proto}-{port}"


def overlaps(a: str, b: str) -> bool:
    """Two publics of one (family, protocol, port) that one packet could match both."""
    return a == ANY or b == ANY or a == b


def _dir(state_dir: str) -> str:
    return os.path.join(state_dir, "claims")


def holders(state_dir: str, k: str) -> list[tuple[str, str]]:
    """(public, holder) of every claim on this key."""
    try:
        fd = os.open(os.path.join(_dir(state_dir), k), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return []
    try:
        text = os.read(fd, 1 << 20).decode("utf-8", "replace")
    finally:
        os.close(fd)
    found = []
    for line in text.splitlines():
        public, _, holder = line.partition(" ")
        if public and holder:
            found.append((public, holder))
    return found


def conflicts(state_dir: str, holder: str, wanted: list[Claim]) -> list[tuple[Claim, str]]:
    """Each wanted claim that another holder's claim overlaps, with that holder."""
    found = []
    by_key: dict[str, list[str]] = {}
    for k, public in wanted:
        by_key.setdefault(k, []).append(public)
    for k, publics in sorted(by_key.items()):
        others = [(p, h) for p, h in holders(state_dir, k) if h != holder]
        for public in publics:
            for other_public, other in others:
                if overlaps(public, other_public):
                    found.append(((k, public), other))
                    break
    return found


TOTAL = ".total"  # how many claims (forwards) the index holds: the host-wide cap without a scan


def total(state_dir: str) -> int:
    """Claims held by all guests together (counted once if the counter is missing)."""
    path = os.path.join(_dir(state_dir), TOTAL)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            return int(os.read(fd, 32))
        finally:
            os.close(fd)
    except (OSError, ValueError):
        count = sum(len(holders(state_dir, k)) for k in os.listdir(_dir(state_dir)) if not k.startswith("."))
        _replace(path, str(count).encode())
        return count


def update(state_dir: str, holder: str, add: list[Claim], drop: list[Claim]) -> None:
    """Add and drop this holder's claims (idempotent); files left empty are removed."""
    changes: dict[str, tuple[set[str], set[str]]] = {}
    for k, public in add:
        changes.setdefault(k, (set(), set()))[0].add(public)
    for k, public in drop:
        changes.setdefault(k, (set(), set()))[1].add(public)
    folder = _dir(state_dir)
    count = total(state_dir)
    for k, (plus, minus) in sorted(changes.items()):
        current = holders(state_dir, k)
        lines = [(p, h) for p, h in current if not (h == holder and p in minus - plus)]
        lines += [(p, holder) for p in sorted(plus) if (p, holder) not in lines]
        if lines == current:
            continue
        count += len(lines) - len(current)
        path = os.path.join(folder, k)
        if lines:
            _replace(path, "".join(f"{p} {h}\n" for p, h in lines).encode())
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    _replace(os.path.join(folder, TOTAL), str(count).encode())


def rebuild(state_dir: str, claims: dict[str, list[Claim]]) -> None:
    """Exactly these holders' claims (reconcile: the records are the truth)."""
    folder = _dir(state_dir)
    lines: dict[str, list[str]] = {}
    for holder, wanted in sorted(claims.items()):
        for k, public in sorted(set(wanted)):
            lines.setdefault(k, []).append(f"{public} {holder}\n")
    for name in os.listdir(folder):
        if name not in lines:
            os.unlink(os.path.join(folder, name))
    for k, text in lines.items():
        _replace(os.path.join(folder, k), "".join(text).encode())
    _replace(os.path.join(folder, TOTAL), str(sum(len(t) for t in lines.values())).encode())


class Ledger:
    """The same rule in memory, for reconcile deciding who keeps what among many guests."""

    def __init__(self) -> None:
        self.by_key: dict[str, list[tuple[str, str]]] = {}

    def clash(self, holder: str, wanted: list[Claim]) -> str | None:
        for k, public in wanted:
            for other_public, other in self.by_key.get(k, []):
                if other != holder and overlaps(public, other_public):
                    return other
        return None

    def take(self, holder: str, wanted: list[Claim]) -> None:
        for k, public in wanted:
            self.by_key.setdefault(k, []).append((public, holder))


def _replace(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:  # left by a process killed mid-write that had our pid
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
