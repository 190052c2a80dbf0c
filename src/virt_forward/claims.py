"""Who holds which public port: the one ownership rule, for every path that applies forwards.

A public (family, address or every address, protocol, port) belongs to the guest that
applied it first.  A later claim that overlaps it -- the same address, or either side
on every address -- is refused for that guest, naming the holder; nothing ever moves a
port to another guest (the hook, apply, add, reconcile, the watcher and the network
hook all come through here).  nft's maps refuse only an identical key with other data;
an address-specific element beside an every-address one would silently win the lookup.

The index lives beside the records: in the state dir's claims/, one small file per
(family, protocol, block of 256 ports), one line "<port> <public address or *> <holder>"
per claim, so checking a guest costs a read per block its ports fall in, whatever the
other guests hold, and a rebuild writes a few hundred files, not one per forward.  It is
derived from the records (reconcile rebuilds it, writing only what differs) and kept
under the state lock.  It imports only os and files.py: the hook's fast path uses it too.
"""

from __future__ import annotations

import os

from . import files

Claim = tuple[str, str]  # (key "4-tcp-8080", public address or "*")
ANY = "*"


def key(family: int, proto: str, port: int) -> str:
    return f"{family}-{proto}-{port}"


def overlaps(a: str, b: str) -> bool:
    """Two publics of one (family, protocol, port) that one packet could match both."""
    return a == ANY or b == ANY or a == b


def _dir(state_dir: str) -> str:
    return os.path.join(state_dir, "claims")


BLOCK = 256


def _file(k: str) -> str:
    head, _, port = k.rpartition("-")  # "family-proto"; a rebuild calls this for 10,000 claims
    return f"{head}-{int(port) // BLOCK}"


def _blocks(folder: str) -> list[str]:
    """The block files ("4-tcp-31"): not the count, not a killed writer's "NAME.PID.tmp"."""
    return [n for n in os.listdir(folder) if "." not in n]


def _read_raw(state_dir: str, name: str) -> bytes | None:
    """One block file's bytes; None when there is none."""
    try:
        fd = os.open(os.path.join(_dir(state_dir), name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_block(state_dir: str, name: str) -> list[tuple[str, str, str]]:
    """(key, public, holder) of every claim in one block file."""
    raw = _read_raw(state_dir, name)
    if raw is None:
        return []
    text = raw.decode("utf-8", "replace")
    family, proto, _ = name.split("-")
    found = []
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) == 3 and parts[0].isdigit():
            found.append((f"{family}-{proto}-{parts[0]}", parts[1], parts[2]))
    return found


def _render(lines: list[tuple[str, str, str]]) -> bytes:
    return "".join(f"{k.rsplit('-', 1)[1]} {public} {holder}\n" for k, public, holder in sorted(lines)).encode()


def holders(state_dir: str, k: str) -> list[tuple[str, str]]:
    """(public, holder) of every claim on this key."""
    return [(public, holder) for key, public, holder in _read_block(state_dir, _file(k)) if key == k]


def conflicts(state_dir: str, holder: str, wanted: list[Claim]) -> list[tuple[Claim, str]]:
    """Each wanted claim that another holder's claim overlaps, with that holder."""
    found = []
    blocks: dict[str, list[Claim]] = {}
    for claim in wanted:
        blocks.setdefault(_file(claim[0]), []).append(claim)
    for name, claims in sorted(blocks.items()):
        others: dict[str, list[tuple[str, str]]] = {}
        for k, public, other in _read_block(state_dir, name):
            if other != holder:
                others.setdefault(k, []).append((public, other))
        for k, public in claims:
            for other_public, other in others.get(k, []):
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
        count = sum(len(_read_block(state_dir, n)) for n in _blocks(_dir(state_dir)))
        files.replace(path, str(count).encode())
        return count


def update(state_dir: str, holder: str, add: list[Claim], drop: list[Claim]) -> None:
    """Add and drop this holder's claims (idempotent); files left empty are removed."""
    plus, minus = set(add), set(drop) - set(add)
    blocks = {_file(k) for k, _ in plus | minus}
    count = total(state_dir)
    for name in sorted(blocks):
        current = _read_block(state_dir, name)
        lines = [(k, p, h) for k, p, h in current if not (h == holder and (k, p) in minus)]
        lines += [(k, p, holder) for k, p in sorted(plus) if _file(k) == name and (k, p, holder) not in lines]
        if sorted(lines) == sorted(current):
            continue
        count += len(lines) - len(current)
        _write_block(state_dir, name, lines)
    files.replace(os.path.join(_dir(state_dir), TOTAL), str(count).encode())


def all_holders(state_dir: str) -> dict[str, int]:
    """How many claims each holder has in the index (doctor: claims that outlived their guest)."""
    found: dict[str, int] = {}
    try:
        names = _blocks(_dir(state_dir))
    except FileNotFoundError:
        return found
    for name in names:
        for _, _, holder in _read_block(state_dir, name):
            found[holder] = found.get(holder, 0) + 1
    return found


def drop_holder(state_dir: str, holder: str) -> None:
    """Every claim of this holder, wherever it is (a scan of the index: only for a guest whose
    own list of claims is lost, which is rare)."""
    folder = _dir(state_dir)
    for name in sorted(_blocks(folder)):
        current = _read_block(state_dir, name)
        lines = [(k, p, h) for k, p, h in current if h != holder]
        if len(lines) != len(current):
            _write_block(state_dir, name, lines)
    count = sum(len(_read_block(state_dir, n)) for n in _blocks(folder))
    files.replace(os.path.join(folder, TOTAL), str(count).encode())


def rebuild(state_dir: str, claims: dict[str, list[Claim]]) -> None:
    """Exactly these holders' claims (reconcile: the records are the truth); a block file
    that already says so is left alone."""
    folder = _dir(state_dir)
    blocks: dict[str, list[tuple[str, str, str]]] = {}
    for holder, wanted in claims.items():
        for k, public in set(wanted):
            blocks.setdefault(_file(k), []).append((k, public, holder))
    for name in os.listdir(folder):  # also the temp files of a writer killed mid-way
        if name != TOTAL and name not in blocks:
            os.unlink(os.path.join(folder, name))
    for name, lines in blocks.items():
        # compared as the bytes _write_block would write: no parsing of 10,000 lines to find
        # that (nearly) every block is already right
        if _read_raw(state_dir, name) != _render(lines):
            _write_block(state_dir, name, lines)
    files.replace(os.path.join(folder, TOTAL), str(sum(len(v) for v in blocks.values())).encode())


def _write_block(state_dir: str, name: str, lines: list[tuple[str, str, str]]) -> None:
    path = os.path.join(_dir(state_dir), name)
    if lines:
        files.replace(path, _render(lines))
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class Ledger:
    """The same rule in memory, for reconcile deciding who keeps what among many guests."""

    def __init__(self) -> None:
        self.by_key: dict[str, list[tuple[str, str]]] = {}

    def clash(self, holder: str, wanted: list[Claim]) -> str | None:
        found = self.clash_at(holder, wanted)
        return None if found is None else found[1]

    def clash_at(self, holder: str, wanted: list[Claim]) -> tuple[Claim, str] | None:
        """The first wanted claim another holder's claim overlaps, with that holder."""
        for k, public in wanted:
            for other_public, other in self.by_key.get(k, []):
                if other != holder and overlaps(public, other_public):
                    return (k, public), other
        return None

    def take(self, holder: str, wanted: list[Claim]) -> None:
        for k, public in wanted:
            self.by_key.setdefault(k, []).append((public, holder))

    def release(self, holder: str, held: list[Claim]) -> None:
        for k, public in held:
            entries = self.by_key.get(k)
            if entries and (public, holder) in entries:
                entries.remove((public, holder))


# What settle() decided for a guest: keep what it wants, keep what it held, or hold nothing.
WANTED, HELD, NONE = "wanted", "held", "none"
CAP = ""  # the "holder" of a refusal by max_forwards

# (guest, claims it holds now or None, claims it wants now or None); a claim is one forward
Candidate = tuple[str, list[Claim] | None, list[Claim] | None]


def settle(candidates: list[Candidate], cap: int
           ) -> tuple[dict[str, str], dict[str, tuple[Claim | None, str]], list[tuple[str, Claim, str]]]:
    """Who holds what after a reconcile: the ledger of what guests hold now comes first, then
    what they want.  A guest whose wish overlaps a port another guest holds, or would take the
    host past `cap` forwards, keeps exactly what it held (or nothing, if it held nothing); no
    holder ever loses a port to a clash or to the cap, whatever the order of names.  A port
    given up by one guest may go to another in the same round (repeated until nothing moves).

    Returns (each guest's choice: WANTED/HELD/NONE, each refused guest's (claim, holder) --
    holder CAP for the cap, claim None then --, each holder whose record overlapped an earlier
    one's: (guest, claim, holder); it is treated as holding nothing)."""
    ledger = Ledger()
    current: dict[str, list[Claim]] = {}
    corrupt: list[tuple[str, Claim, str]] = []
    for name, held, _ in sorted(candidates, key=lambda c: c[0]):
        if held is None:
            continue
        hit = ledger.clash_at(name, held)
        if hit is not None:  # two records overlap: only a forged or very old state does that
            corrupt.append((name, hit[0], hit[1]))
            continue
        ledger.take(name, held)
        current[name] = held
    total = sum(len(c) for c in current.values())
    choice = {name: HELD if name in current else NONE for name, _, _ in candidates}
    refused: dict[str, tuple[Claim | None, str]] = {}
    # holders first, then by name: the order only matters between newcomers
    todo = sorted(((name, wanted) for name, _, wanted in candidates
                   if (wanted is not None if name not in current
                       else wanted is None or sorted(wanted) != sorted(current[name]))),
                  key=lambda c: (c[0] not in current, c[0]))
    moved = True
    while moved and todo:
        moved = False
        for item in list(todo):
            name, wanted = item
            own = current.get(name, [])
            if wanted is not None:
                hit = ledger.clash_at(name, wanted)
                if hit is not None:
                    refused[name] = hit
                    continue
                if len(wanted) > len(own) and total - len(own) + len(wanted) > cap:  # shrinking is always fine
                    refused[name] = (None, CAP)
                    continue
            ledger.release(name, own)
            total -= len(own)
            if wanted is None:
                current.pop(name, None)
                choice[name] = NONE
            else:
                ledger.take(name, wanted)
                total += len(wanted)
                current[name] = wanted
                choice[name] = WANTED
            refused.pop(name, None)
            todo.remove(item)
            moved = True
    return choice, refused, corrupt
