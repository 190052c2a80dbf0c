"""The planner, the invalid-config corpus and cross-guest conflicts."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from conftest import WriteFile, write_trusted
from virt_forward.config import GuestConfig, Settings, load_guest, load_settings
from virt_forward.errors import ConfigError
from virt_forward.plan import Forward, GuestPlan, find_conflicts, plan_guest

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


@pytest.mark.parametrize("source", INVALID, ids=[p.stem for p in INVALID])
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
