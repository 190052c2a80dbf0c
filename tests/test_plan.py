"""The planner, the invalid-config corpus and cross-guest conflicts."""

from __future__ import annotations

import ipaddress
import os
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import WriteFile, write_trusted
from virt_forward.config import GuestConfig, Settings, load_guest, load_settings
from virt_forward.errors import ConfigError, ExitCode
from virt_forward.plan import (
    Forward, GuestPlan, find_conflicts, guest_forward_count, host_forward_count, host_limit_error, plan_guest,
    within_host_limit,
)

DATA = Path(__file__).parent / "data"
INVALID = sorted((DATA / "invalid").glob("*.toml"))
CONFLICTS = sorted(p for p in (DATA / "conflicts").iterdir() if p.is_dir())

ip = ipaddress.ip_address


def plan_of(cdir: Path, write_guest: WriteFile, text: str, name: str = "g") -> GuestPlan:
    write_guest(name, text)
    guest = load_guest(cdir, name)
    assert guest is not None
    return plan_guest(guest, load_settings(cdir))


def described(plan: GuestPlan) -> list[str]:
    return [f.describe() for f in plan.forwards]


# ---------------------------------------------------------------- the planner

def test_bare_port_is_both_families_of_a_dual_stack_guest(cdir: Path, write_guest: WriteFile) -> None:
    plan = plan_of(cdir, write_guest, 'address = ["10.1.1.2", "fd00::2"]\nports = ["80"]\n')
    assert described(plan) == ["*:80/tcp -> 10.1.1.2:80", "*:80/tcp -> [fd00::2]:80"]
    assert plan.families() == {4, 6}


def test_wildcard_skips_the_family_the_guest_lacks(cdir: Path, write_guest: WriteFile) -> None:
    assert described(plan_of(cdir, write_guest, 'address = "10.1.1.2"\nports = ["80"]\n')) == \
        ["*:80/tcp -> 10.1.1.2:80"]
    assert described(plan_of(cdir, write_guest, 'address = "fd00::2"\nports = ["53/udp"]\n', "v6")) == \
        ["*:53/udp -> [fd00::2]:53"]


def test_range_with_offset_maps_each_port(cdir: Path, write_guest: WriteFile) -> None:
    plan = plan_of(cdir, write_guest, 'address = "10.1.1.2"\nports = ["8000-8002:9000-9002/udp"]\n')
    assert [(f.public_port, f.guest_port, f.proto) for f in plan.forwards] == \
        [(8000, 9000, "udp"), (8001, 9001, "udp"), (8002, 9002, "udp")]


def test_public_precedence(cdir: Path, write_guest: WriteFile, write_config: WriteFile) -> None:
    write_config('public = ["192.0.2.1", "2001:db8::1"]\n')
    # config.toml's default, silently limited to the guest's family (not explicit)
    assert described(plan_of(cdir, write_guest, 'address = "10.1.1.2"\nports = ["80"]\n')) == \
        ["192.0.2.1:80/tcp -> 10.1.1.2:80"]
    # the guest's own public replaces the default
    assert described(plan_of(cdir, write_guest, 'address = "10.1.1.2"\npublic = "192.0.2.9"\nports = ["80"]\n')) == \
        ["192.0.2.9:80/tcp -> 10.1.1.2:80"]
    # an address in the spec wins over both
    assert described(plan_of(cdir, write_guest,
                             'address = "10.1.1.2"\npublic = "192.0.2.9"\nports = ["198.51.100.1:80:8080"]\n')) == \
        ["198.51.100.1:80/tcp -> 10.1.1.2:8080"]


def test_settings_public_of_no_matching_family_forwards_nothing(cdir: Path, write_guest: WriteFile,
                                                                 write_config: WriteFile) -> None:
    write_config('public = ["2001:db8::1"]\n')
    write_guest("g", 'address = "10.1.1.2"\nports = ["80"]\n')
    guest = load_guest(cdir, "g")
    assert guest is not None
    with pytest.raises(ConfigError, match=r"'80' forwards nothing: no public address of the guest's") as info:
        plan_guest(guest, load_settings(cdir))
    assert (info.value.line, info.value.key) == (2, "ports")


def test_allow_is_kept_and_split_by_family(cdir: Path, write_guest: WriteFile) -> None:
    plan = plan_of(cdir, write_guest, 'address = ["10.1.1.2", "fd00::2"]\nports = ["22"]\n'
                                      'allow = ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"]\n')
    assert plan.allow_of(4) == (ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("198.51.100.7/32"))
    assert plan.allow_of(6) == (ipaddress.ip_network("2001:db8::/32"),)


def test_allow_only_needs_the_families_forwarded(cdir: Path, write_guest: WriteFile) -> None:
    plan = plan_of(cdir, write_guest, 'address = ["10.1.1.2", "fd00::2"]\n'
                                      'ports = ["192.0.2.1:22:22"]\nallow = ["203.0.113.0/24"]\n')
    assert plan.families() == {4}


def test_forwards_are_sorted_and_stable(cdir: Path, write_guest: WriteFile) -> None:
    text = 'address = "10.1.1.2"\nports = ["443", "53/udp", "192.0.2.1:80:80", "22"]\n'
    plan = plan_of(cdir, write_guest, text)
    assert list(plan.forwards) == sorted(plan.forwards)
    assert plan == plan_of(cdir, write_guest, text)


def test_tag_is_stable_and_distinct() -> None:
    a, b = GuestPlan("web", ()), GuestPlan("web2", ())
    assert a.tag == GuestPlan("web", ()).tag and a.tag != b.tag
    assert re.fullmatch(r"g[0-9a-f]{12}", GuestPlan("$(rm -rf /) ünï", ()).tag)


def test_plan_of_config_built_in_memory() -> None:
    """plan_guest needs no file: a GuestConfig made by hand plans the same way."""
    from virt_forward.config import PortEntry
    from virt_forward.ports import parse_port_spec
    guest = GuestConfig(name="mem", path="/nowhere/mem.toml", addresses=(ip("10.0.0.5"),),
                        ports=(PortEntry(parse_port_spec("2222:22"), "2222:22", 7),))
    assert plan_guest(guest, Settings()).forwards == (Forward(4, "tcp", 2222, None, ip("10.0.0.5"), 22),)


# ---------------------------------------------------------------- the invalid corpus

_HEADER = re.compile(r"# expect: line=(?P<line>\S+) key=(?P<key>.*?)(?: mode=(?P<mode>[0-7]{4}))?"
                     r"(?: uid=(?P<uid>\d+))? msg=(?P<msg>.*)$")


def _expectation(path: Path) -> re.Match[str]:
    first = path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n", 1)[0].decode()
    m = _HEADER.match(first)
    assert m, f"{path.name}: first line must be '# expect: line=N key=K [mode=0NNN] [uid=N] msg=...'"
    return m


def test_corpus_is_big_enough() -> None:
    assert len(INVALID) >= 100


def assert_config_error(err: ConfigError, path: Path, line: int | None, key: str | None, msg: str) -> None:
    text = str(err)
    assert "\n" not in text and "\r" not in text, "errors are one line"
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert text.startswith(where + (f"{key}: " if key else "")), text
    assert msg in text, text
    assert (err.path, err.line) == (str(path), line)


def _corpus_params() -> list[object]:
    """A case whose file belongs to another uid needs root to make it: the `root` tier."""
    return [pytest.param(p, id=p.stem, marks=[pytest.mark.root] if _expectation(p)["uid"] else [])
            for p in INVALID]


@pytest.mark.parametrize("source", _corpus_params())
def test_invalid_corpus(cdir: Path, source: Path) -> None:
    exp = _expectation(source)
    line = None if exp["line"] == "none" else int(exp["line"])
    key = None if exp["key"] == "none" else exp["key"]
    mode = int(exp["mode"], 8) if exp["mode"] else 0o644
    uid = int(exp["uid"]) if exp["uid"] else 0
    name = source.stem
    path = write_trusted(cdir / "guests" / f"{name}.toml", source.read_bytes(), mode=mode, uid=uid)
    # a good neighbour: one broken file must not take other guests down
    write_trusted(cdir / "guests" / "neighbour.toml", 'address = "10.1.1.99"\nports = ["9999"]\n')

    with pytest.raises(ConfigError) as info:
        guest = load_guest(cdir, name)
        assert guest is not None
        plan_guest(guest, load_settings(cdir))
    assert_config_error(info.value, path, line, key, exp["msg"])

    neighbour = load_guest(cdir, "neighbour")
    assert neighbour is not None
    assert len(plan_guest(neighbour, load_settings(cdir)).forwards) == 1


def test_huge_file_generated(cdir: Path) -> None:
    """Megabytes are generated here rather than committed."""
    body = 'address = "10.1.1.2"\nports = ["80"]\n' + "# padding padding padding\n" * 50_000
    path = write_trusted(cdir / "guests" / "huge.toml", body)
    with pytest.raises(ConfigError) as info:
        load_guest(cdir, "huge")
    assert_config_error(info.value, path, None, None, "refused: ")
    assert "larger than 1048576" in str(info.value)


def test_long_file_under_the_limit_gives_the_right_line(cdir: Path) -> None:
    body = 'address = "10.1.1.2"\nports = [\n' + '  "1",\n' * 1 + "".join(
        f'  "{p}",\n' for p in range(2, 30_000)) + '  "70000",\n]\n'
    path = write_trusted(cdir / "guests" / "long.toml", body)
    with pytest.raises(ConfigError) as info:
        load_guest(cdir, "long")
    assert_config_error(info.value, path, 30_002, "ports", "'70000': port 70000 is out of range")


def test_huge_single_line(cdir: Path) -> None:
    path = write_trusted(cdir / "guests" / "wide.toml",
                         'address = "10.1.1.2"\nports = ["' + "9" * 500_000 + '"]\n')
    with pytest.raises(ConfigError) as info:
        load_guest(cdir, "wide")
    assert_config_error(info.value, path, 2, "ports", "too long for a port spec")
    assert len(str(info.value)) < 400


# ---------------------------------------------------------------- cross-guest conflicts

def _load_case(case: Path, cdir: Path) -> tuple[list[tuple[GuestPlan, str]], dict[str, GuestConfig]]:
    if (case / "config.toml").exists():
        write_trusted(cdir / "config.toml", (case / "config.toml").read_bytes())
    settings = load_settings(cdir)
    plans: list[tuple[GuestPlan, str]] = []
    guests: dict[str, GuestConfig] = {}
    for src in sorted(case.glob("*.toml")):
        if src.name == "config.toml":
            continue
        write_trusted(cdir / "guests" / src.name, src.read_bytes())
        guest = load_guest(cdir, src.stem)
        assert guest is not None
        guests[guest.name] = guest
        plans.append((plan_guest(guest, settings), guest.path))  # each guest alone is valid
    return plans, guests


@pytest.mark.parametrize("case", CONFLICTS, ids=[p.name for p in CONFLICTS])
def test_conflicts_between_guests(cdir: Path, case: Path) -> None:
    plans, guests = _load_case(case, cdir)
    expected = [dict(re.findall(r"(\w+)=(.*?)(?= \w+=|$)", line)) for line in (case / "expect").read_text().splitlines()]
    errors = find_conflicts(plans, guests)
    assert len(errors) == len(expected), [str(e) for e in errors]
    for err, exp in zip(errors, expected):
        path = cdir / "guests" / f"{exp['guest']}.toml"
        assert_config_error(err, path, int(exp["line"]), "ports", exp["msg"])
    # without the configs (as before), the same errors, just without a line
    assert [e.reason for e in find_conflicts(plans)] == [e.reason for e in errors]


def test_conflict_cases_cover_both_outcomes() -> None:
    outcomes = {bool((c / "expect").read_text().strip()) for c in CONFLICTS}
    assert outcomes == {True, False}


# ---------------------------------------------------------------- limits, counted before expanding

# The reproduced case of issue 11: 163 bytes, 1,048,560 forwards (18.5 s and 500 MB to check).
FILE_163 = ('address = "192.168.122.100"\n'
            'public = ["10.0.0.1","10.0.0.2","10.0.0.3","10.0.0.4","10.0.0.5","10.0.0.6","10.0.0.7","10.0.0.8"]\n'
            'ports = [ "1-65535", "1-65535/udp"]\n')


def _check(cdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], float]:
    from virt_forward import commands, engine
    ctx = engine.Context(config_dir=cdir, state_dir=tmp_path / "state")
    t0 = time.perf_counter()
    code = commands.check(ctx)
    took = time.perf_counter() - t0
    return code, capsys.readouterr().out.splitlines(), took


def test_the_163_byte_file_is_refused_at_once(cdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert len(FILE_163.encode()) == 163
    path = write_trusted(cdir / "guests" / "big.toml", FILE_163)
    code, out, took = _check(cdir, tmp_path, capsys)
    print(f"check of the 163-byte file: {took * 1000:.1f} ms")
    assert took < 0.1, f"check took {took:.3f} s"
    assert code == ExitCode.CONFIG
    assert out == [
        f"error: {path}:3: ports: '1-65535' is 65535 port(s) on 8 public address(es): 524280 forward(s), 1048560 "
        "for the guest in all, more than max_forwards_per_guest = 1024 (the default; config.toml may change it)",
        f"FAILED: 1 guest file(s), 0 forward(s), 1 error(s) in {cdir}"]


def test_the_limit_is_checked_before_any_range_is_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    from virt_forward.config import PortEntry
    from virt_forward.ports import PortSpec, parse_port_spec

    def never(self: PortSpec) -> None:
        raise AssertionError("a range was expanded")

    monkeypatch.setattr(PortSpec, "pairs", never)
    guest = GuestConfig(name="m", path="/x/m.toml", addresses=(ip("10.0.0.5"),),
                        ports=(PortEntry(parse_port_spec("1-65535"), "1-65535", 4),))
    with pytest.raises(ConfigError, match=r"^/x/m.toml:4: ports: '1-65535' is 65535 port\(s\)"):
        plan_guest(guest, Settings())


def test_max_forwards_per_guest_from_config_toml(cdir: Path, write_guest: WriteFile, write_config: WriteFile) -> None:
    conf = write_config('hairpin = true\nmax_forwards_per_guest = 4\n')
    path = write_guest("g", 'address = ["10.1.1.2", "fd00::2"]\nports = [\n  "80",\n  "443",\n  "53/udp",\n]\n')
    guest = load_guest(cdir, "g")
    assert guest is not None
    with pytest.raises(ConfigError) as info:
        plan_guest(guest, load_settings(cdir))
    assert str(info.value) == (f"{path}:5: ports: '53/udp' is 1 port(s) on every local address of both families: "
                               f"2 forward(s), 6 for the guest in all, more than max_forwards_per_guest = 4 ({conf}:2)")
    write_config('max_forwards_per_guest = 6\n')
    assert len(plan_guest(guest, load_settings(cdir)).forwards) == 6


def test_a_guest_exactly_at_the_limit_is_fine(cdir: Path, write_guest: WriteFile) -> None:
    plan = plan_of(cdir, write_guest, 'address = "10.1.1.2"\nports = ["1-1000", "2000-2023/udp"]\n')
    assert len(plan.forwards) == 1024


@st.composite
def guests_and_settings(draw: st.DrawFn) -> tuple[GuestConfig, Settings]:
    from virt_forward.config import PortEntry
    from virt_forward.ports import PortRange, PortSpec
    v4 = [ip("10.0.0.5"), ip("192.0.2.1"), ip("192.0.2.2")]
    v6 = [ip("fd00::5"), ip("2001:db8::1")]
    addresses = draw(st.sampled_from([(v4[0],), (v6[0],), (v4[0], v6[0])]))
    publics = st.lists(st.sampled_from(v4[1:] + v6[1:]), min_size=1, max_size=4, unique=True).map(tuple)
    entries = []
    for _ in range(draw(st.integers(0, 4))):
        start, length = draw(st.integers(1, 60000)), draw(st.integers(1, 40))
        spec = PortSpec(draw(st.sampled_from([None, *v4[1:], *v6[1:]])), draw(st.sampled_from(["tcp", "udp"])),
                        PortRange(start, start + length - 1), PortRange(start, start + length - 1))
        entries.append(PortEntry(spec, str(spec), None))
    guest = GuestConfig(name="h", path="/x/h.toml", addresses=addresses, ports=tuple(entries),
                        public=draw(st.none() | publics))
    return guest, Settings(public=draw(st.just(()) | publics), max_forwards_per_guest=draw(st.integers(1, 300)))


@settings(max_examples=300, deadline=1000)
@given(guests_and_settings())
def test_the_count_is_what_the_planner_makes(case: tuple[GuestConfig, Settings]) -> None:
    """guest_forward_count counts from the specs exactly what plan_guest makes, so the limit is exact."""
    guest, conf = case
    count = guest_forward_count(guest, conf)
    try:
        plan = plan_guest(guest, conf)
    except ConfigError as exc:
        # the limit comes first, so any other refusal (a clash, a family mismatch) is within it
        assert ("more than max_forwards_per_guest" in str(exc)) == (count > conf.max_forwards_per_guest), str(exc)
        return
    assert len(plan.forwards) == count <= conf.max_forwards_per_guest


def test_a_guest_without_address_is_counted_as_dual_stack() -> None:
    from virt_forward.config import PortEntry
    from virt_forward.ports import parse_port_spec
    guest = GuestConfig(name="m", path="/x/m.toml", addresses=(),
                        ports=(PortEntry(parse_port_spec("80-89"), "80-89", 2),))
    assert guest_forward_count(guest, Settings()) == 20
    assert guest_forward_count(guest, Settings(public=(ip("192.0.2.1"),))) == 10


# ---------------------------------------------------------------- the host-wide cap

def test_host_cap_in_check(cdir: Path, tmp_path: Path, write_guest: WriteFile, write_config: WriteFile,
                           capsys: pytest.CaptureFixture[str]) -> None:
    conf = write_config('backend = "auto"\nmax_forwards = 5\n')
    write_guest("a", 'address = "10.1.1.2"\nports = ["80-82"]\n')
    write_guest("b", 'address = "10.1.1.3"\nports = ["90-91", "53/udp"]\n')
    code, out, _ = _check(cdir, tmp_path, capsys)
    assert code == ExitCode.CONFIG
    assert out == [f"error: {conf}:2: max_forwards: the guests ask for 6 forwards in all ('a' 3, 'b' 3), more "
                   "than max_forwards = 5",
                   f"FAILED: 2 guest file(s), 6 forward(s), 1 error(s) in {cdir}"]
    write_config('max_forwards = 6\n')
    assert _check(cdir, tmp_path, capsys)[:2] == (
        ExitCode.OK, [f"ok: 2 guest file(s), 6 forward(s), 0 error(s) in {cdir}"])


def test_host_cap_functions(cdir: Path, write_guest: WriteFile) -> None:
    from virt_forward.ports import PortRange
    conf = Settings(max_forwards=10)
    a = GuestPlan("a", tuple(Forward(4, "tcp", p, None, ip("10.0.0.2"), p) for p in range(1, 7)))
    write_guest("b", 'address = "10.1.1.3"\nports = ["90-94"]\n')
    b = load_guest(cdir, "b")
    assert b is not None
    assert host_forward_count([a, b], conf) == 11
    assert host_limit_error([a], conf) is None
    err = host_limit_error([a, b], conf, config_path="/etc/virt-forward/config.toml")
    assert err is not None and str(err) == (
        "/etc/virt-forward/config.toml: max_forwards: the guests ask for 11 forwards in all ('a' 6, 'b' 5), more "
        "than max_forwards = 10 (the default; config.toml may raise it)")
    assert host_forward_count([("the other guests", 7), b], conf) == 12
    err = host_limit_error([("the other guests", 7), b], conf)
    assert err is not None and str(err).startswith("max_forwards: the guests ask for 12 forwards in all "
                                                   "(the other guests 7, 'b' 5)")
    many = [GuestPlan(f"g{i}", a.forwards[:1]) for i in range(12)]
    err = host_limit_error(many, conf)
    assert err is not None and "('g0' 1, 'g1' 1, 'g10' 1 and 9 more)" in str(err)
    kept, dropped = within_host_limit([a, GuestPlan("c", a.forwards[:5]), GuestPlan("d", a.forwards[:4])], conf)
    assert [p.domain for p in kept] == ["a", "d"]
    assert [str(e) for e in dropped] == ["max_forwards: guest 'c': not applied: its 5 forward(s) would bring the host "
                                         "to 11, more than max_forwards = 10"]
    assert Settings().metadata_ports == PortRange(1024, 65535)


def test_untrusted_config_dir_fails_check_once(cdir: Path, tmp_path: Path, write_guest: WriteFile,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("a", "b", "c"):
        write_guest(name, 'address = "10.1.1.2"\nports = ["80"]\n')
    os.chmod(cdir / "guests", 0o777)
    code, out, _ = _check(cdir, tmp_path, capsys)
    assert code == ExitCode.CONFIG
    assert out == [f"error: {cdir / 'guests'}: refused: the guests dir is writable by group or others (owner root, "
                   f"mode 0777): they could rename or replace the config below it (chmod go-w {cdir / 'guests'})",
                   f"FAILED: the config in {cdir} is not trusted"]
