"""The hook's fast path: replay what the full path computed, when nothing it used has changed.

libvirt waits for the hook at every guest start.  The full path (engine) reads
TOML, validates, plans and renders, and importing what it needs (tomllib,
dataclasses, ipaddress, json, pathlib) costs about four times the interpreter's
own start.  So each time it applies a guest it also leaves, beside the guest's
record, a *fast file*: the fingerprints of every file its plan came from (and of
our own code), the record text, and the rendered nft batches that add and remove
this guest's elements (in the state dir's fast/); it outlives the guest's stop.  The next start or stop
of that guest replays them when every fingerprint still matches; anything else -- a changed or racily fresh file,
a table of another version, a guard not on top, nft refusing -- returns None and the hook
takes the full path, which stays the reference.  Imports: os, sys, marshal,
fcntl, select, _blake2 and our dependency-free modules only.

A fast file is derived, never trusted: owner and mode prove nothing about its content (a
root process tricked into writing one through a path it was given would pass them).  So
each carries a keyed MAC (BLAKE2b, the key in fast/.key, 0600, made by the full path) over
the guest's name and the marshal payload, checked before marshal ever reads the payload;
the fingerprints (code included, at a stop too) are compared under the lock, so a change
made by another process that held it is seen.  Every file is opened without following a
symlink and without blocking (a FIFO), and must be a regular file only we may write.

What it does not cover (full path every time): plans taken from the domain XML
(metadata, address by MAC), the iptables backend, a guard of another version or
below someone's rules (it is replaced by handle), names that need quoting in
file names.  It does create our table and place a missing guard (the first guest
of an idle host), and tear both down at the last guest's stop.
"""

from __future__ import annotations

import marshal
import os
import stat
import time

from . import claims, files
from .consts import (GUARD_COMMENT, GUARD_SPEC, HOOK_LOCK_DEADLINE, NFT_GUARD_COMMENT, NFT_GUARD_RULE, NFT_GUARD_TARGETS,
                     TABLE)

FORMAT = 7
SUFFIX = ".fast"
KEY = ".key"  # in fast/; no guest's fast file is named so (file_name refuses a leading dot)
KEY_SIZE = 32
MAC_SIZE = 32
MAX_FAST = 1 << 22
PENDING = ".pending"  # a start in progress (state.PENDING): written before its claims, gone after its record
# A file modified this recently may change again within the same timestamp tick without
# its fingerprint changing ("racily clean", as git says): no fast file is written for it.
RACY_SECONDS = 2.0
START_OPS = frozenset({"start", "started", "reconnect"})
STOP_OPS = frozenset({"stopped", "release"})
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")

Fingerprint = tuple[int, int, int, int, int, int, int] | None


class Miss(Exception):
    """The fast path does not apply; the full path will."""


def fingerprint(path: str) -> Fingerprint:
    """What identifies a file's content and trust (owner, mode); of a directory only the trust
    (its times change whenever another guest's file is edited, which changes nothing here)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return (st.st_dev, st.st_ino, 0, 0, 0, st.st_mode, st.st_uid)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid)


def inputs(config_dir: str, domain: str, shared: dict[str, Fingerprint] | None = None) -> dict[str, Fingerprint]:
    """Every file a guest's plan may come from; taken *before* the full path reads them.
    `shared`: shared_inputs(config_dir), when the caller took them already (for many guests)."""
    own = os.path.join(config_dir, "guests", f"{domain}.toml")
    return {**(shared_inputs(config_dir) if shared is None else shared), own: fingerprint(own)}


def shared_inputs(config_dir: str) -> dict[str, Fingerprint]:
    """The inputs every guest has in common: the config dir, guests/ and config.toml."""
    paths = (config_dir, os.path.join(config_dir, "guests"), os.path.join(config_dir, "config.toml"))
    return {p: fingerprint(p) for p in paths}


_code: dict[str, Fingerprint] = {}


def code() -> dict[str, Fingerprint]:
    """The fingerprints of our modules, taken once per process: they describe the code this
    process runs (a long-lived watcher keeps describing its own, not an upgrade's)."""
    if not _code:
        _code.update(code_now())
    return _code


def code_now() -> dict[str, Fingerprint]:
    """The fingerprints of every .py file of the package and of its subpackages (backends/),
    as they are on disk now: found by listing, not by a hand-kept list that a new module
    misses.  An upgrade changes them, and with them every fast file's match."""
    here = os.path.dirname(os.path.abspath(__file__))
    found: dict[str, Fingerprint] = {}
    with os.scandir(here) as top:
        subs = []
        for entry in top:
            if entry.name.endswith(".py"):
                found[entry.name] = fingerprint(entry.path)
            elif entry.name != "__pycache__" and not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                subs.append(entry)
    for sub in subs:
        with os.scandir(sub.path) as it:
            found.update({f"{sub.name}/{e.name}": fingerprint(e.path) for e in it if e.name.endswith(".py")})
    return found


def racy(taken: dict[str, Fingerprint], now: float | None = None) -> bool:
    limit = (time.time() if now is None else now) - RACY_SECONDS
    return any(fp is not None and max(fp[3], fp[4]) / 1e9 > limit for fp in taken.values())


def fast_file(state_dir: str, stem: str) -> str:
    """Beside guests/ (the records of what is applied), not in it: a cache outlives a stop."""
    return os.path.join(state_dir, "fast", stem + SUFFIX)


def file_name(domain: str) -> str | None:
    """The record's file stem when quoting leaves the name as it is (StateStore quotes others)."""
    if domain and not domain.startswith(".") and len(domain) <= 200 and _SAFE.issuperset(domain):
        return domain
    return None


def compile_fast(*, state_dir: str, domain: str, taken: dict[str, Fingerprint], record: str, add: str, remove: str,
                 mark: str, skeleton: str, families: list[int], forwards: int, message: str,
                 claims: list[tuple[str, str]], flows: list[list[str]], max_forwards: int, bridges: list[str] | None,
                 described: list[str]) -> bytes:
    """The fast file's content (written by the full path after it applied the guest, under
    the lock): sealed with the state dir's key (made when missing), bound to `domain`."""
    payload = marshal.dumps({"format": FORMAT, "code": code(), "inputs": taken, "record": record, "add": add,
                             "remove": remove, "mark": mark, "skeleton": skeleton, "families": sorted(families),
                             "forwards": forwards,
                             "message": message, "claims": [list(c) for c in claims],
                             "flows": flows, "max_forwards": max_forwards, "bridges": bridges,
                             "described": described})
    return seal(make_key(state_dir), domain, payload)


def key_file(state_dir: str) -> str:
    return os.path.join(state_dir, "fast", KEY)


def read_key(state_dir: str) -> bytes:
    """The key that seals fast files; Miss (or OSError) unless it is a regular file of
    KEY_SIZE bytes only we may read and write."""
    key = _read_trusted(key_file(state_dir), KEY_SIZE, private=True)
    if len(key) != KEY_SIZE:
        raise Miss(f"{key_file(state_dir)}: not a key of {KEY_SIZE} bytes")
    return key


def make_key(state_dir: str) -> bytes:
    """The key, made (random, 0600, through a fresh O_EXCL|O_NOFOLLOW temp file renamed over:
    never torn, never written through a symlink) when missing or in any doubt.  A new key
    makes every fast file sealed with the old one a miss: each is written again by the
    guest's next full path."""
    try:
        return read_key(state_dir)
    except (Miss, OSError):
        key = os.urandom(KEY_SIZE)
        files.replace(key_file(state_dir), key, 0o600)
        return key


def _mac(key: bytes, domain: str, payload: bytes) -> bytes:
    # _blake2, not hashlib (which loads OpenSSL: ~3 ms) nor hmac: ~0.3 ms on the hook's path
    try:
        from _blake2 import blake2b
    except ImportError:  # an interpreter built without it
        from hashlib import blake2b
    # the name is inside the MAC: a guest's genuine fast file copied to another's name is refused
    h = blake2b(key=key, digest_size=MAC_SIZE, person=b"virt-forward.fst")
    h.update(domain.encode("utf-8", "surrogateescape") + b"\0")
    h.update(payload)
    return h.digest()


def _same(a: bytes, b: bytes) -> bool:
    """a == b in a time that does not say where they differ (hmac.compare_digest, without
    the 0.1-0.2 ms that importing _operator costs the hook; 32 bytes: a few microseconds)."""
    diff = len(a) ^ len(b)
    for x, y in zip(a, b):
        diff |= x ^ y
    return diff == 0


def seal(key: bytes, domain: str, payload: bytes) -> bytes:
    """A fast file's bytes: the MAC, then the payload."""
    return _mac(key, domain, payload) + payload


def unseal(key: bytes, domain: str, data: bytes) -> object:
    """The payload of a fast file sealed with `key` for `domain`, unmarshalled only once its
    MAC is right (marshal is not safe on bytes someone else chose); Miss otherwise."""
    tag, payload = data[:MAC_SIZE], data[MAC_SIZE:]
    if len(tag) != MAC_SIZE or not payload or not _same(tag, _mac(key, domain, payload)):
        raise Miss(f"{domain}: the fast file's MAC does not match (not written by us with this state dir's key)")
    return marshal.loads(payload)


class Unchanged:
    """The record texts in guests' fast files when nothing their plans came from has changed
    since: reconcile then takes a guest's plan from there instead of reading and validating its
    TOML again (a third of the time for 1,000 guests).  What all guests share (our code, the
    config dir, guests/, config.toml, the fast dir's trust) is looked at once, here."""

    def __init__(self, config_dir: str, state_dir: str) -> None:
        self.config_dir = config_dir
        self.state_dir = state_dir
        self.code = code()
        self.shared = shared_inputs(config_dir)
        self.key = b""
        try:
            _trusted_dir(os.path.join(state_dir, "fast"))
            self.key = read_key(state_dir)
            self.trusted = True
        except (Miss, OSError):
            self.trusted = False

    def record(self, domain: str) -> tuple[str, list[tuple[str, str]]] | None:
        """The record text of the guest's fast file and the claims of its plan (what
        plan.claims_of computed from it), None when there is no such file or anything it came
        from changed."""
        name = file_name(domain)
        if name is None or not self.trusted:
            return None
        try:
            # only the three fields this needs are checked (Fast checks all of them for the hook)
            data = _load_data(self.state_dir, name, self.key)
        except (Miss, OSError, ValueError, KeyError, TypeError, EOFError):
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("record"), str):
            return None
        if data.get("code") != self.code or data.get("inputs") != inputs(self.config_dir, domain, self.shared):
            return None
        held = claim_pairs(data.get("claims"))
        return None if held is None else (str(data["record"]), held)


def claim_pairs(value: object) -> list[tuple[str, str]] | None:
    """A fast file's claims ([key, public] lists, as plan.claims_of made them) as pairs; None
    when they are not that.  One pass, no nested all(): reconcile checks 10,000 of them."""
    if not isinstance(value, list):
        return None
    pairs = [(c[0], c[1]) for c in value if type(c) is list and len(c) == 2 and type(c[0]) is str
             and type(c[1]) is str]
    return pairs if len(pairs) == len(value) else None


# ---------------------------------------------------------------- the hook's side

def qemu(config_dir: str, state_dir: str, domain: str, op: str, sub: str, xml: str = "") -> int | None:
    """The hook's exit status when the fast path did the whole job, else None.  `xml`: the
    domain XML from stdin (its taps get hairpin mode)."""
    try:
        name = file_name(domain)
        if name is None:
            raise Miss("a name that needs quoting")
        if op not in START_OPS | STOP_OPS | {"prepare"}:
            raise Miss(f"operation {op}")
        guests = os.path.join(state_dir, "guests")
        if not _applied(state_dir, guests, name) and (op in STOP_OPS or _nothing_configured(config_dir, name)):
            done = 0  # nothing of ours, before or after: what the full path would conclude
        else:
            for d in (state_dir, guests, os.path.join(state_dir, "fast"), os.path.join(state_dir, "claims")):
                _trusted_dir(d)
            if op in STOP_OPS:
                done = _stop(guests, state_dir, name, domain, f"{op} {sub}")
            else:
                done = _start(config_dir, guests, state_dir, name, domain, op, xml)
        _trace("fast path")
        return done
    except files.LockTimeout as exc:  # the full path would wait as long again: give up, logged
        from . import log
        log.error(f"{domain}: {op}: {exc}", event="error", guest=domain)
        return 0
    except (Miss, OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        _trace(f"full path ({type(exc).__name__}: {exc})")
        return None


def _trace(what: str) -> None:
    """VIRT_FORWARD_TRACE=1: say which path a hook call took (tests, and an admin wondering)."""
    if os.environ.get("VIRT_FORWARD_TRACE"):
        import sys
        sys.stderr.write(f"virt-forward: trace: {what}\n")


def _current(state_dir: str, config_dir: str, name: str, domain: str) -> Fast:
    """The guest's fast file, when nothing it came from (its files, our code) changed since."""
    fast = _load(state_dir, name)
    if fast.code != code_now() or fast.inputs != inputs(config_dir, domain):
        raise Miss("changed since the fast file was written")
    return fast


def _start(config_dir: str, guests: str, state_dir: str, name: str, domain: str, op: str, xml: str) -> int:
    record_path = os.path.join(guests, name + ".json")
    pending = os.path.join(guests, name + PENDING)
    if op == "prepare":
        # the files validated when the fast file was written and have not changed since;
        # nothing changes here, so no lock
        _current(state_dir, config_dir, name, domain)
        return 0
    with files.lock(os.path.join(state_dir, "lock"), HOOK_LOCK_DEADLINE):
        # under the lock: an edit (`rm`) applied by a process that held it is seen here
        fast = _current(state_dir, config_dir, name, domain)
        bridges = fast.bridges
        if bridges is None:
            raise Miss("written by reconcile without the domain XML: where hairpin mode goes is not known")
        if os.path.lexists(pending):
            raise Miss("a start of it did not finish: the full path takes back what it may have applied")
        record = _read(record_path)
        if record is not None and record != fast.record:
            raise Miss("the record differs")
        if op == "started" and record is not None:
            # `start` applied exactly this a moment ago (libvirt calls both, in a row); the
            # taps are plugged in now
            _hairpin(state_dir, name, domain, xml, bridges)
            return 0
        if claims.conflicts(state_dir, name, fast.claims):
            raise Miss("a port is held by another guest: the full path refuses and says by whom")
        if record is None and claims.total(state_dir) + len(fast.claims) > fast.max_forwards:
            raise Miss("over the host's max_forwards: the full path refuses and says so")
        if record is None:
            # before the claims and the kernel: a start killed from here on leaves it, and the
            # guest's `stopped` (the full path) takes back what it may have applied and its claims.
            # With a record (a reconnect) the claims and the kernel already hold exactly this.
            files.replace(pending, fast.record.encode())
        claims.update(state_dir, name, add=fast.claims, drop=[])
        try:
            problem = _apply_start(fast, first=not _another_guest(guests, name))
        except BaseException:  # nothing of this guest applied
            if record is None:
                claims.update(state_dir, name, add=[], drop=fast.claims)
                os.unlink(pending)  # only once the claims are back: else `stopped` still finds it
            raise
        if record is None:
            # the pending record holds the record's very text: renamed, it is the record, and
            # no moment has neither (nor a file written twice on a guest's start)
            os.rename(pending, record_path)
        if problem is not None:  # after the record: the full path finds the guard wrong and repairs it
            raise Miss(problem)
        _hairpin(state_dir, name, domain, xml, bridges)
    from . import log
    log.info(fast.message, event="apply", guest=domain, forwards=fast.described)
    return 0


def _stop(guests: str, state_dir: str, name: str, domain: str, why: str) -> int:
    record_path = os.path.join(guests, name + ".json")
    with files.lock(os.path.join(state_dir, "lock"), HOOK_LOCK_DEADLINE):
        if os.path.lexists(os.path.join(guests, name + PENDING)):
            raise Miss("a start of it did not finish: the full path takes back what it may have applied")
        record = _read(record_path)
        if record is None:
            raise Miss("no record (a domain XML to clean up)")
        fast = _load(state_dir, name)
        if fast.code != code_now():  # an upgrade since: its removal batch may not be the old one's
            raise Miss("our code changed since the fast file was written")
        if record != fast.record:
            raise Miss("the record differs")
        last = not _another_guest(guests, name)
        batch, restores = _teardown_batch() if last else (fast.remove, [])
        status, restored = _write(batch, restores)
        if status != 0:
            raise Miss("nft refused")
        os.unlink(record_path)  # the fast file stays, for the next start
        if not restored:  # the forwards are gone; a guard left in iptables' FORWARD accepts nothing of ours
            from . import log
            log.error(f"{domain}: could not take our guard out of iptables' FORWARD (reconcile or uninstall will)")
        claims.update(state_dir, name, add=[], drop=fast.claims)
        _hairpin(state_dir, name, domain, "", (), release=True)  # the taps are mostly gone already
        from .runner import spawn_detached_twice
        # engine.forget_flows, not waited for (see there)
        spawn_detached_twice([["conntrack", "-D", *flt] for flt in fast.flows])
    from . import log
    log.info(f"{domain}: removed {fast.forwards} forward(s) ({why})", event="remove", guest=domain,
             forwards=fast.described)
    return 0


def _hairpin(state_dir: str, name: str, domain: str, xml: str, bridges: tuple[str, ...],
             release: bool = False) -> None:
    """engine.set_hairpin (when the domain XML is known) / release_hairpin, as the full path."""
    held = os.path.lexists(os.path.join(state_dir, "hairpin", name))
    if not held and (release or not (xml and bridges)):
        return  # nothing to switch on, nothing of ours to switch off: no import
    from . import hairpin
    try:
        if release:
            hairpin.release(state_dir, name)
        elif xml:
            hairpin.set_for(state_dir, name, hairpin.taps(xml, bridges), bridges)
    except OSError as exc:
        from . import log
        log.warning(f"{domain}: hairpin mode on its bridge port: {exc}")


def _applied(state_dir: str, guests: str, name: str) -> bool:
    """A record, a start that did not finish (its pending record), or a domain XML kept for a
    guest waiting for its address."""
    return (os.path.lexists(os.path.join(guests, name + ".json"))
            or os.path.lexists(os.path.join(guests, name + PENDING))
            or os.path.lexists(os.path.join(state_dir, "xml", name + ".xml")))


def _nothing_configured(config_dir: str, name: str) -> bool:
    """No guest file and metadata forwards not enabled: not a guest of ours.  config.toml is
    not parsed: a file that does not even contain the word `metadata` (nor a backslash,
    which could spell it in a quoted key) cannot enable them."""
    if fingerprint(os.path.join(config_dir, "guests", name + ".toml")) is not None:
        return False
    try:
        # a FIFO there must not hang the start, a symlink not lead elsewhere: Miss, and the
        # full path refuses the file with its own error
        text = _read_trusted(os.path.join(config_dir, "config.toml"), 1 << 20)
    except FileNotFoundError:
        return True
    return b"metadata" not in text and b"\\" not in text


def _saves(families: list[int]) -> list[list[str]]:
    return [["iptables-save" if family == 4 else "ip6tables-save", "-t", "filter"] for family in families]


def _save_texts(families: list[int], saved: list[tuple[int, bytes, bytes] | None]) -> list[tuple[int, str]]:
    # None: not installed; non-zero: no filter table: nothing there to guard (as the full path)
    return [(family, save[1].decode("utf-8", "replace")) for family, save in zip(families, saved)
            if save is not None and save[0] == 0]


def _list_targets(chains: set[tuple[str, str, str]]) -> list[tuple[tuple[str, str, str], str]]:
    """The `nft -a` listing of each guard target that exists, side by side: on a host where
    libvirt uses iptables and firewalld is absent there is none, and listing targets that
    do not exist cost three processes at every guest start."""
    from .runner import spawn_all
    present = [t for t in NFT_GUARD_TARGETS if t in chains]
    guarded = spawn_all([["nft", "-a", "list", "chain", *t] for t in present], timeout=10.0) if present else []
    targets = []
    for target, chain in zip(present, guarded):
        if chain is None or chain[0] != 0:
            raise Miss(f"cannot list {' '.join(target)}")
        targets.append((target, chain[1].decode("utf-8", "replace")))
    return targets


def _read_live(families: list[int]) -> tuple[list[tuple[tuple[str, str, str], str]], list[tuple[int, str]]]:
    """(the guard targets present with their `nft -a` listing, each family's iptables-save -t
    filter text).  `nft list chains` and the iptables-saves run side by side."""
    from .runner import spawn_all
    got = spawn_all([["nft", "list", "chains"]] + _saves(families), timeout=10.0)
    listed = got[0]
    if listed is None or listed[0] != 0:
        raise Miss("nft list chains failed")
    return _list_targets(_chains(listed[1].decode("utf-8", "replace"))), _save_texts(families, got[1:])


def _apply_start(fast: Fast, first: bool) -> str | None:
    """Put the guest's elements in, and every guard that is missing; None when all is in place,
    else what the full path must repair (the elements are in).  Miss when the elements are not.

    One round of processes side by side: the elements, with the skeleton when no other guest
    of ours has any (the last one's stop took our table away; into an empty table it costs
    ~2 ms, unlike over a live one), else behind `flush chain` of this skeleton's mark (empty:
    it deletes nothing, and fails the batch when the table lacks the mark); and the reads of
    where guards go.  A second round only when something is missing: the skeleton after all
    (a table flushed away), a guard.  The guard accepts only what our DNAT marked: placed
    before our table exists, or beside an nft batch that fails, it lets nothing else through,
    so both go side by side.  A guard of another version or not on top, a table without this
    skeleton's mark: the full path (it deletes by handle what it replaces)."""
    from .runner import spawn_all
    head = fast.skeleton if first else f"flush chain inet {TABLE} {fast.mark}\n"
    saves = _saves(fast.families)
    stdins: list[bytes | None] = [(head + fast.add).encode(), None] + [None] * len(saves)
    got = spawn_all([["nft", "-f", "-"], ["nft", "list", "chains"]] + saves, stdins=stdins, timeout=10.0)
    wrote, listed = got[0], got[1]
    if wrote is None:
        raise Miss("nft is not installed")
    applied = wrote[0] == 0
    if listed is None or listed[0] != 0:
        if not applied:
            raise Miss("nft refused, and nft list chains failed")
        return "nft list chains failed: where guards go is not known"
    chains = _chains(listed[1].decode("utf-8", "replace"))
    batch = ""
    if not applied:
        ours = {c for f, t, c in chains if (f, t) == ("inet", TABLE)}
        if ours and fast.mark not in ours:
            raise Miss("our table lacks this skeleton's mark")
        if first or ours:
            raise Miss("nft refused: the full path will say why")
        batch = fast.skeleton + fast.add  # our table went away (a flush): made again
    problem = None
    try:
        targets = _list_targets(chains)
    except Miss as exc:
        if not applied:
            raise
        return str(exc)
    for target, listing in targets:
        state = nft_guard_state(listing)
        if state == "absent":
            batch += f"insert rule {' '.join(target)} {NFT_GUARD_RULE}\n"
        elif state != "ok":
            problem = f"guard not on top of {' '.join(target)}"
    restores = []
    for family, save in _save_texts(fast.families, got[2:]):
        state = iptables_guard_state(save)
        if state == "absent":
            restores.append((family, f"*filter\n-I FORWARD 1 {GUARD_SPEC}\nCOMMIT\n"))
        elif state != "ok":
            problem = "guard not on top of iptables FORWARD"
    if batch or restores:
        status, restored = _write(batch, restores)
        if status != 0:
            if not applied:
                raise Miss("nft refused: the full path will say why")
            problem = "nft refused a guard: the full path repairs it"
        if not restored:
            problem = "iptables-restore refused the guard: the full path repairs it"
    return problem


def _teardown_batch() -> tuple[str, list[tuple[int, str]]]:
    """The last guest's stop: our table and every guard go (what engine.remove does then)."""
    targets, saves = _read_live([4, 6])
    batch = "add table inet virt_forward\ndelete table inet virt_forward\n"
    for target, listing in targets:
        batch += "".join(f"delete rule {' '.join(target)} handle {h}\n" for h in nft_guard_handles(listing))
    restores = []
    for family, save in saves:
        _, rules = forward_chain(save)
        mine = [r for r in rules if GUARD_COMMENT in r]
        if mine:
            restores.append((family, "*filter\n" + "".join(f"-D FORWARD {r}\n" for r in mine) + "COMMIT\n"))
    return batch, restores


def _write(batch: str, restores: list[tuple[int, str]]) -> tuple[int, bool]:
    """Run the nft batch (when there is one) and the iptables-restore inputs side by side (they
    touch different tables); (nft's status, whether every restore succeeded).  Miss when nft
    is missing."""
    from .runner import spawn_all
    argvs = [["nft", "-f", "-"]] if batch else []
    argvs += [["iptables-restore" if family == 4 else "ip6tables-restore", "-w", "5", "--noflush"]
              for family, _ in restores]
    stdins: list[bytes | None] = [batch.encode()] if batch else []
    stdins += [text.encode() for _, text in restores]
    got = spawn_all(argvs, stdins=stdins, timeout=10.0)
    if not batch:
        return 0, all(r is not None and r[0] == 0 for r in got)
    if got[0] is None:
        raise Miss("nft is not installed")
    return got[0][0], all(r is not None and r[0] == 0 for r in got[1:])


def _chains(listing: str) -> set[tuple[str, str, str]]:
    """(family, table, chain) from `nft list chains` text."""
    found = set()
    family = table = ""
    for line in listing.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "table":
            family, table = words[1], words[2]
        elif len(words) >= 2 and words[0] == "chain" and table:
            found.add((family, table, words[1]))
    return found


def _nft_rules(listing: str) -> list[str]:
    return [ln.strip() for ln in listing.splitlines()
            if ln.startswith("\t\t") and not ln.strip().startswith(("type ", "policy ", "}"))]


def accepts_dnat_first(rules: list[str]) -> bool:
    """Whether the chain accepts every DNAT-ed connection (`ct status dnat accept`) before any
    rule that could reject one: firewalld's filter_FORWARD does (unless StrictForwardPorts),
    and firewalld >= 2 owns its table (`flags owner`): a guard there is refused with EPERM,
    and it would take the whole transaction down with it.  Such a chain needs no guard."""
    for rule in rules:  # no `re` here: its import alone costs the hook milliseconds
        words = rule.split(" # handle ")[0].split(' comment "')[0].split()
        if "counter" in words:  # "counter packets N bytes M"
            at = words.index("counter")
            del words[at:at + 5]
        if words == ["ct", "status", "dnat", "accept"]:
            return True
        if words[-1:] != ["accept"]:
            return False
    return False


def nft_guard_state(listing: str) -> str:
    """`nft -a list chain` text: "ok" (exactly one guard of ours, the current one, first; or
    none in a chain that needs none), "absent" (none of ours), or "wrong" (misplaced, several,
    or of another version)."""
    rules = _nft_rules(listing)
    ours = [i for i, r in enumerate(rules) if f'comment "{GUARD_COMMENT}' in r]
    if not ours:
        return "ok" if accepts_dnat_first(rules) else "absent"
    return "ok" if ours == [0] and f'comment "{NFT_GUARD_COMMENT}"' in rules[0] else "wrong"


def nft_guard_handles(listing: str) -> list[int]:
    """Handles of every guard of ours (any version) in `nft -a list chain` text."""
    found = []
    for rule in _nft_rules(listing):
        if f'comment "{GUARD_COMMENT}' in rule and "# handle " in rule:
            found.append(int(rule.rsplit("# handle ", 1)[1].split()[0]))
    return found


def forward_chain(save: str) -> tuple[str | None, list[str]]:
    """(policy, rules after "-A FORWARD ") of the filter table's FORWARD chain in iptables-save
    text; policy None when there is no such chain (guards.parse_filter builds on this)."""
    in_filter, policy, rules = False, None, []
    for line in save.splitlines():
        if line.startswith("*"):
            in_filter = line == "*filter"
        elif in_filter and line.startswith(":FORWARD "):
            policy = line.split()[1]
        elif in_filter and line.startswith("-A FORWARD "):
            rules.append(line[len("-A FORWARD "):])
    return policy, rules


def iptables_guard_state(save: str) -> str:
    """`iptables-save -t filter` text: "ok" (no guard needed -- no FORWARD chain, or nothing
    there can reject -- or exactly one guard, the current one, first), "absent" (needed and
    none of ours there), or "wrong"."""
    policy, rules = forward_chain(save)
    ours = [i for i, r in enumerate(rules) if GUARD_COMMENT in r]
    needed = policy is not None and (policy != "ACCEPT" or len(ours) < len(rules))
    if not needed:
        return "ok"
    if not ours:
        return "absent"
    return "ok" if ours == [0] and rules[0].replace('"', "") == GUARD_SPEC else "wrong"


# ---------------------------------------------------------------- plumbing

def _trusted_dir(path: str) -> None:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise Miss(f"{path}: not a directory only we may write")


class Fast:
    """A fast file, checked: each field of the type the full path wrote."""

    __slots__ = ("code", "inputs", "record", "add", "remove", "mark", "skeleton", "families", "forwards", "message",
                 "claims", "flows", "max_forwards", "bridges", "described")

    def __init__(self, data: object) -> None:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise Miss("another format")
        for key, kind in (("record", str), ("add", str), ("remove", str), ("mark", str), ("skeleton", str),
                          ("message", str),
                          ("families", list), ("forwards", int), ("code", dict), ("inputs", dict),
                          ("claims", list), ("flows", list), ("max_forwards", int), ("described", list)):
            if not isinstance(data.get(key), kind):
                raise Miss(f"bad {key}")
        claims = claim_pairs(data["claims"])
        if claims is None:
            raise Miss("bad claims")
        if not all(isinstance(f, list) and all(isinstance(x, str) for x in f) for f in data["flows"]):
            raise Miss("bad flows")
        self.code: object = data["code"]
        self.inputs: object = data["inputs"]
        self.record: str = data["record"]
        self.add: str = data["add"]
        self.remove: str = data["remove"]
        self.mark: str = data["mark"]
        self.skeleton: str = data["skeleton"]  # nft.skeleton with its mark, for a start that finds no table
        self.families: list[int] = [f for f in data["families"] if f in (4, 6)]
        self.forwards: int = data["forwards"]
        self.message: str = data["message"]
        self.claims: list[tuple[str, str]] = claims
        self.flows: list[list[str]] = data["flows"]
        self.max_forwards: int = data["max_forwards"]  # config.toml's, as it was (its fingerprint is checked)
        # where its ports need hairpin mode (engine.hairpin_bridges); None: not known (no XML)
        bridges = data.get("bridges")
        if bridges is not None and not (isinstance(bridges, list) and all(isinstance(b, str) for b in bridges)):
            raise Miss("bad bridges")
        self.bridges: tuple[str, ...] | None = None if bridges is None else tuple(bridges)
        self.described: list[str] = [str(d) for d in data["described"]]  # Forward.describe(), for the journal


def _load(state_dir: str, name: str) -> Fast:
    return Fast(_load_data(state_dir, name, read_key(state_dir)))


def _load_data(state_dir: str, name: str, key: bytes) -> object:
    """The payload of the guest's fast file, its MAC checked with `key` first."""
    return unseal(key, name, _read_trusted(fast_file(state_dir, name), MAX_FAST))


def _read(path: str) -> str | None:
    """A record's text; None when there is none."""
    try:
        return _read_trusted(path, MAX_FAST).decode("utf-8")
    except FileNotFoundError:
        return None


def _read_trusted(path: str, limit: int, private: bool = False) -> bytes:
    """The bytes of a regular file of at most `limit` bytes that only we may write (and,
    `private`, read); Miss otherwise.  Opened without following a symlink (ELOOP) and
    without blocking: a FIFO or a device there must not hang or flood a guest's start."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & (0o077 if private else 0o022)
                or st.st_size > limit):
            raise Miss(f"{path}: not a regular file only we may {'read and ' if private else ''}write")
        # sized by fstat (a buffer of `limit` bytes per read costs an mmap), one more to see the end
        chunks, size, want = [], 0, min(st.st_size, limit) + 1
        while size <= limit and (chunk := os.read(fd, min(want, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise Miss(f"{path}: more than {limit} bytes")
    return b"".join(chunks)


def _another_guest(guests: str, name: str) -> bool:
    """Another guest is recorded, or was being started when it was killed (what it may have
    applied is in our table: the table stays until its `stopped` takes that out)."""
    own = (name + ".json", name + PENDING)
    with os.scandir(guests) as it:
        return any(e.name.endswith((".json", PENDING)) and e.name not in own for e in it)

