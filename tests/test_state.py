"""The state dir is trusted like the config dir: a forged or misplaced file never reaches nft."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from netns_util import World, lab_world
from vflab.lab import PUBLIC4
from virt_forward.errors import StateError
from virt_forward.plan import GuestPlan
from virt_forward.state import StateStore, stem, validate_record

DNAT = "--to-destination 192.168.122.10:80"  # our iptables backend's rule for guest1's 80
GOOD = {"backend": "nftables", "plan": {"domain": "web", "allow": None,
                                        "forwards": [[4, "tcp", 8080, "198.51.100.1", "192.168.122.10", 80]]}}


def write_record(store: StateStore, domain: str, data: object) -> None:
    with store.lock():  # makes the dirs
        (store.guests / f"{stem(domain)}.json").write_text(json.dumps(data))


def test_the_state_dir_is_made_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = StateStore(tmp_path / "run" / "virt-forward")
        with store.lock():
            pass
    finally:
        os.umask(old)
    for d in (store.root, store.guests, store.root / "fast", store.root / "claims", store.root / "xml"):
        assert os.stat(d).st_mode & 0o777 == 0o700, d


@pytest.mark.parametrize("spoil", ["symlink", "group-writable",
                                   pytest.param("other owner", marks=pytest.mark.root)])  # chown: root only
def test_a_state_dir_others_could_write_is_refused(tmp_path: Path, spoil: str) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    root = tmp_path / "state"
    if spoil == "symlink":
        root.symlink_to(real)
    else:
        root.mkdir(mode=0o700)
        if spoil == "group-writable":
            root.chmod(0o770)
        else:
            os.chown(root, 4242, 0)
    with pytest.raises(StateError, match="refused as state dir"):
        with StateStore(root).lock():
            pass


def test_a_planted_symlink_is_never_written_through(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    with store.lock():
        pass
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for name in ("web.json.tmp", ".web.json.tmp", "web.json"):
        (store.guests / name).symlink_to(victim)
    plan = GuestPlan.from_record(GOOD["plan"])  # type: ignore[arg-type]
    with pytest.raises(StateError):  # the record itself is a symlink: not read, not followed
        store.read("web")
    store.write(plan, "nftables")  # replaces the symlink named web.json with a file
    assert victim.read_text() == "precious\n"
    assert not (store.guests / "web.json").is_symlink() and store.read("web") == plan


@pytest.mark.parametrize("change, why", [
    (lambda d: d["plan"]["forwards"][0].__setitem__(1, "tcp; table ip pwned { }"), "family/protocol"),
    (lambda d: d["plan"]["forwards"][0].__setitem__(2, 70000), "port"),
    (lambda d: d["plan"]["forwards"][0].__setitem__(2, "8080"), "port"),
    (lambda d: d["plan"]["forwards"][0].__setitem__(4, "192.168.122.10 } ; flush ruleset"), "address"),
    (lambda d: d["plan"]["forwards"][0].__setitem__(4, "fd00::1"), "another family"),
    (lambda d: d["plan"].__setitem__("domain", "other"), "names domain 'other'"),
    (lambda d: d.__setitem__("backend", "pf"), "backend"),
    (lambda d: d["plan"].__setitem__("allow", ["10.0.0.0/8; drop"]), "allow"),
])
def test_a_forged_record_is_a_state_error_naming_the_file(tmp_path: Path, change: object, why: str) -> None:
    store = StateStore(tmp_path / "state")
    data = json.loads(json.dumps(GOOD))
    change(data)  # type: ignore[operator]
    write_record(store, "web", data)
    with pytest.raises(StateError, match=why) as err:
        store.read("web")
    assert str(store.guests / "web.json") in str(err.value)


def test_every_name_gets_a_record(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    names = ["é" * 100, ".hidden", "a b/c"[:3], "x" * 200, "%h-looks-hashed", "web"]
    for name in names:
        plan = GuestPlan.from_record({**GOOD["plan"], "domain": name})  # type: ignore[dict-item]
        store.write(plan, "nftables")
        assert store.read(name) == plan
        store.write_xml(name, "<domain/>")
        assert store.read_xml(name) == "<domain/>"
    assert sorted(store.domains()) == sorted(names) == sorted(store.xml_domains())
    assert all(len(p.name.encode()) <= 255 for p in store.guests.iterdir())
    for name in names:
        store.delete(name)
    assert store.domains() == []


records = st.recursive(st.none() | st.booleans() | st.integers(-2, 70000) | st.text(max_size=40)
                       | st.floats(allow_nan=True), lambda inner: st.lists(inner, max_size=6)
                       | st.dictionaries(st.sampled_from(["backend", "plan", "domain", "forwards", "allow", "x"]),
                                         inner, max_size=5), max_leaves=30)
GOOD_BYTES = json.dumps(GOOD).encode()


_PORTS = st.integers(-1, 70000) | st.sampled_from([0, 1, 65535, 65536, True, "80", 80.0])
# for each field of GOOD: values right there, wrong there, and the edges between
FIELDS: dict[tuple[object, ...], st.SearchStrategy[object]] = {
    ("backend",): st.sampled_from(["nftables", "iptables", "pf", "", None]),
    ("plan", "domain"): st.sampled_from(["web", "other", "", None]),
    ("plan", "allow"): st.none() | st.lists(st.sampled_from(["10.0.0.0/8", "10.0.0.1/8", "2001:db8::/32", "x", 5]),
                                            max_size=3),
    ("plan", "forwards", 0, 0): st.sampled_from([4, 6, 0, "4", True]),
    ("plan", "forwards", 0, 1): st.sampled_from(["tcp", "udp", "sctp", "TCP", None]),
    ("plan", "forwards", 0, 2): _PORTS,
    ("plan", "forwards", 0, 3): st.sampled_from([None, "198.51.100.1", "fd00::1", "192.0.2.7 ", "x", 7]),
    ("plan", "forwards", 0, 4): st.sampled_from(["192.168.122.10", "fd00::2", "10.1.1.2; drop", None, ""]),
    ("plan", "forwards", 0, 5): _PORTS,
}


@st.composite
def near_good_records(draw: st.DrawFn) -> object:
    """GOOD with one field replaced: random structures are almost never valid, these often
    are, so both outcomes get tried."""
    data = json.loads(GOOD_BYTES)
    where = draw(st.sampled_from(sorted(FIELDS, key=str)))
    value = draw(FIELDS[where] | records)
    target = data
    for step in where[:-1]:
        target = target[step]
    target[where[-1]] = value
    return data


@st.composite
def near_good_bytes(draw: st.DrawFn) -> bytes:
    """GOOD's bytes with one byte replaced, or cut short (a torn write)."""
    raw = bytearray(GOOD_BYTES)
    i = draw(st.integers(0, len(raw) - 1))
    if draw(st.booleans()):
        return bytes(raw[:i])
    raw[i] = draw(st.integers(ord("0"), ord("9")) | st.integers(0, 255))  # digits: often still a record
    return bytes(raw)


def assert_fit_for_nft(plan: GuestPlan) -> None:
    """What a record must hold before its plan may reach nft (checked here with ipaddress, not
    with the validator under test): this domain, whole ports, addresses of the forward's family."""
    assert plan.domain == "web"
    for fwd in plan.forwards:
        assert fwd.family in (4, 6) and fwd.proto in ("tcp", "udp"), fwd
        assert all(type(p) is int and 1 <= p <= 65535 for p in (fwd.public_port, fwd.guest_port)), fwd
        for addr in (fwd.guest, fwd.public):
            assert addr is None or ipaddress.ip_address(str(addr)).version == fwd.family, fwd
    for net in plan.allow or ():
        assert isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)), plan.allow


@settings(max_examples=300, deadline=None)
@given(records | near_good_records())
def test_any_record_is_valid_or_a_state_error(data: object) -> None:
    """A record is refused with an error naming the file, or it is one nft may be given."""
    try:
        plan = validate_record(data, "web", "guests/web.json")
    except StateError as exc:
        assert str(exc).startswith("guests/web.json: invalid state record: "), exc
        event("refused")
        return
    event("valid")
    assert isinstance(data, dict) and data["backend"] in ("nftables", "iptables")
    assert_fit_for_nft(GuestPlan.from_record(plan))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | near_good_bytes())
def test_any_bytes_as_a_record_are_a_state_error_or_a_plan(tmp_path_factory: pytest.TempPathFactory,
                                                           raw: bytes) -> None:
    """Whatever bytes a record file holds, read() gives a StateError naming the file, or a plan
    nft may be given that is exactly what the file says (written back, it reads the same)."""
    store = StateStore(tmp_path_factory.mktemp("state") / "s")
    with store.lock():
        pass
    path = store.guests / "web.json"
    path.write_bytes(raw)
    try:
        plan = store.read("web")
    except StateError as exc:
        assert str(exc).startswith(f"{path}: "), exc
        event("refused")
        return
    event("valid")
    assert plan is not None
    assert_fit_for_nft(plan)
    backend = json.loads(raw)["backend"]
    store.write(plan, backend)
    assert store.read("web") == plan and store.read_backend("web") == backend


def test_the_near_good_strategies_reach_both_outcomes() -> None:
    """The properties above prove something only if valid records come up too: a byte of
    GOOD changed in its port, and a forward's protocol replaced, are still good records."""
    port = GOOD_BYTES.index(b"8080")
    assert validate_record(json.loads(GOOD_BYTES[:port] + b"9" + GOOD_BYTES[port + 1:]), "web", "w")
    data = json.loads(GOOD_BYTES)
    data["plan"]["forwards"][0][1] = "udp"
    assert validate_record(data, "web", "w")["forwards"][0][1] == "udp"


# ---------------------------------------------------------------- the recorded backend

@pytest.fixture
def world() -> Iterator[World]:
    with lab_world() as w:
        yield w


def applied_with_iptables(w: World) -> None:
    w.write("config.toml", f'public = ["{PUBLIC4}"]\nbackend = "iptables"\n')
    w.guest_file("guest1", 'address = "192.168.122.10"\nports = ["80"]\n')
    assert w.hook("guest1", "start").returncode == 0
    assert DNAT in w.lab.sh(w.lab.host, "iptables-save", "-t", "nat").stdout


@pytest.mark.netns
def test_removal_uses_the_backend_it_was_applied_with(world: World) -> None:
    w = world
    applied_with_iptables(w)
    w.write("config.toml", f'public = ["{PUBLIC4}"]\nbackend = "nftables"\n')  # switched while it runs
    r = w.hook("guest1", "stopped", "end")
    assert r.returncode == 0 and "removed 1 forward(s)" in r.stderr, r.stderr
    nat = w.lab.sh(w.lab.host, "iptables-save", "-t", "nat").stdout
    assert DNAT not in nat, nat
    assert w.probe("tcp", PUBLIC4, 80).startswith("ERR")


@pytest.mark.netns
def test_a_backend_switch_moves_a_running_guest_cleanly(world: World) -> None:
    w = world
    applied_with_iptables(w)
    w.write("config.toml", f'public = ["{PUBLIC4}"]\nbackend = "nftables"\n')
    assert w.hook("guest1", "reconnect").returncode == 0
    nat = w.lab.sh(w.lab.host, "iptables-save", "-t", "nat").stdout
    assert DNAT not in nat, nat
    assert w.elements().get("dnat4"), w.elements()
    assert w.probe("tcp", PUBLIC4, 80).startswith("guest1:80")


def test_temp_files_of_a_killed_writer_are_swept(tmp_path: Path) -> None:
    """A kill inside files.replace leaves NAME.json.PID.tmp or NAME.pending.PID.tmp: nothing
    reads them; reconcile sweeps them (under the lock)."""
    store = StateStore(tmp_path)
    store.guests.mkdir()
    for name in ("web.json.12.tmp", "web.pending.34.tmp", "db.json.56.tmp", "web.json", "db.pending"):
        (store.guests / name).write_text("{}")
    store.sweep_temp()
    assert sorted(p.name for p in store.guests.iterdir()) == ["db.pending", "web.json"]
