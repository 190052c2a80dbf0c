"""Fuzzing what reaches the firewall from outside: config files, port specs, domain metadata.

Properties (hypothesis): whatever the text, the readers answer with the project's own
errors (ConfigError, PortSpecError, UsageError; one line each) or a valid result, never
another exception, and within a second.  What they found is kept in tests/data/fuzz/
and replayed by test_found_cases, so a fix cannot quietly come undone.

Each property is bounded (max_examples, deadline) so the file runs in seconds.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Callable
from xml.sax.saxutils import escape, quoteattr

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import trusted_owner, write_trusted
from virt_forward import domainxml
from virt_forward.config import Settings, guest_from_metadata, load_guest, load_settings
from virt_forward.errors import ConfigError, PortSpecError, UsageError
from virt_forward.plan import plan_guest
from virt_forward.ports import parse_port_spec

FOUND = Path(__file__).parent / "data" / "fuzz"
OURS = (ConfigError, PortSpecError, UsageError)
SECOND = 1.0  # "nothing takes more than about a second"
BOUNDED = settings(max_examples=200, deadline=SECOND * 1000,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
# the subnets and host address of the domain's network, as the engine passes them
SUBNETS = (ipaddress.ip_interface("192.168.122.1/24"), ipaddress.ip_network("fd00:1::/64"))


def only_ours(call: Callable[[], object]) -> object:
    """Run `call`; only our exceptions may come out, with a one-line message, and fast."""
    t0 = time.perf_counter()
    try:
        return call()
    except OURS as exc:
        assert "\n" not in str(exc) and "\r" not in str(exc), repr(str(exc))
        return exc
    finally:
        assert time.perf_counter() - t0 < SECOND


# ---------------------------------------------------------------- a trusted config dir per module

@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Module-scoped (hypothesis runs many examples in one test call): the trusted owner's (root,
    or without root the test's own uid, which conftest makes config.py trust), 0755."""
    root = tmp_path_factory.mktemp("fuzz") / "etc-virt-forward"
    (root / "guests").mkdir(parents=True)
    for d in (root, root / "guests"):
        os.chown(d, *trusted_owner())
        os.chmod(d, 0o755)
    return root


def run_config(cdir: Path, data: bytes) -> None:
    (cdir / "guests" / "g.toml").unlink(missing_ok=True)
    write_trusted(cdir / "config.toml", data)
    result = only_ours(lambda: load_settings(cdir))
    if isinstance(result, Settings):  # whatever was accepted is usable
        assert 1 <= result.max_forwards_per_guest and 1 <= result.max_forwards
        assert 1 <= result.metadata_ports.start <= result.metadata_ports.end <= 65535


def run_guest(cdir: Path, data: bytes) -> None:
    (cdir / "config.toml").unlink(missing_ok=True)
    write_trusted(cdir / "guests" / "g.toml", data)

    def load_and_plan() -> object:
        guest = load_guest(cdir, "g")
        assert guest is not None
        if not guest.addresses:
            return guest
        plan = plan_guest(guest, Settings(public=(ipaddress.ip_address("192.0.2.1"),)))
        assert len(plan.forwards) <= Settings().max_forwards_per_guest
        return plan

    only_ours(load_and_plan)


def run_spec(text: str) -> None:
    result = only_ours(lambda: parse_port_spec(text))
    if not isinstance(result, Exception):
        assert parse_port_spec(str(result)) == result


def run_metadata(text: str) -> None:
    def parse_and_plan() -> object:
        dom = domainxml.parse(text)
        if dom is None or dom.metadata is None:
            return dom
        guest = guest_from_metadata("fuzz", dom.metadata, subnets=SUBNETS)
        if not guest.addresses:
            return guest
        plan = plan_guest(guest, Settings(metadata=True))
        assert all(1024 <= f.public_port for f in plan.forwards)  # metadata_ports' default
        assert all(f.guest in ipaddress.ip_network("192.168.122.0/24") or f.guest in SUBNETS[1]
                   for f in plan.forwards)
        assert all(f.guest != ipaddress.ip_address("192.168.122.1") for f in plan.forwards)  # the host's own
        return plan

    only_ours(parse_and_plan)


# ---------------------------------------------------------------- strategies

SETTINGS_KEYS = ["backend", "public", "hairpin", "strict", "metadata", "max_forwards_per_guest", "max_forwards",
                 "metadata_ports"]
GUEST_KEYS = ["address", "public", "ports", "allow"]
# the grammar's own alphabet reaches the interesting branches far more often than any unicode
SPEC_ALPHABET = "0123456789-:/[].abcdefptuTCPUD% \n\u0660\u0668,"
spec_text = st.text(alphabet=SPEC_ALPHABET, max_size=40)
address_text = st.one_of(st.ip_addresses().map(str), st.ip_addresses().map(lambda a: f"{a}/{a.max_prefixlen}"),
                         st.sampled_from(["192.168.122.10", "192.168.122.1", "192.168.122.255", "fd00:1::10",
                                          "fe80::1%eth0", "0.0.0.0", "::", "10.0.0.0/8", "10.0.0.1/8"]),
                         spec_text)


@st.composite
def structured_specs(draw: st.DrawFn) -> str:
    """Specs built from the grammar: public address, ranges (valid, or at the edges), protocol."""
    def port() -> int:
        return draw(st.one_of(st.integers(1, 65535), st.sampled_from([0, 1, 1023, 1024, 65535, 65536, 99999])))

    host, length = port(), draw(st.sampled_from([1, 1, 2, 10, 1000, 2000]) | st.integers(1, 70000))
    guest = port() if draw(st.integers(0, 3)) else host
    if length == 1 and draw(st.booleans()):
        parts = [str(host)] if guest == host else [str(host), str(guest)]
    else:
        parts = [f"{host}-{host + length - 1}", f"{guest}-{guest + length - 1}"]
    public = draw(st.none() | st.none() | st.ip_addresses())
    text = ":".join(parts)
    if public is not None:
        text = (f"[{public}]" if public.version == 6 and draw(st.integers(0, 5)) else str(public)) + ":" + text
    return text + draw(st.sampled_from(["", "", "/tcp", "/udp", "/UDP", "/sctp", "/"]))


any_spec = st.one_of(st.text(max_size=120), spec_text, structured_specs())


def toml_string(text: str) -> str:
    # JSON's string escapes are all TOML escapes (\uXXXX included)
    return json.dumps(text, ensure_ascii=False)


toml_atoms = st.one_of(
    any_spec.map(toml_string), address_text.map(toml_string), st.text(max_size=20).map(toml_string),
    st.text(alphabet=st.characters(exclude_characters="'\n\r", codec="utf-8"), max_size=20).map(lambda t: f"'{t}'"),
    st.integers(-(2 ** 70), 2 ** 70).map(str), st.sampled_from(["true", "false", "1.5", "nan", "-inf", "0x10",
                                                                "1979-05-27", "07:32:00", "1_000", "0"]),
)
toml_values = st.recursive(
    toml_atoms,
    lambda kids: st.one_of(
        st.lists(kids, max_size=5).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.dictionaries(st.sampled_from(["a", "b", "ports", '"q k"']), kids, max_size=3).map(
            lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}"),
    ),
    max_leaves=12,
)


def string_or_list(strings: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(strings.map(toml_string),
                     st.lists(strings.map(toml_string), max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"))


# values that fit the key most of the time, so that validation (not only TOML) is reached
FITTING = {
    "address": string_or_list(address_text), "public": string_or_list(address_text),
    "allow": string_or_list(address_text), "ports": string_or_list(any_spec),
    "backend": st.sampled_from(['"auto"', '"nftables"', '"iptables"', '"firewalld"']),
    "max_forwards": st.integers(-5, 2 ** 21).map(str), "max_forwards_per_guest": st.integers(-5, 2 ** 21).map(str),
    "metadata_ports": any_spec.map(toml_string),
}


@st.composite
def toml_documents(draw: st.DrawFn, keys: list[str]) -> bytes:
    """Mostly well-formed TOML with our keys (and others), values of every type."""
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 9))
        if kind <= 6:
            key = draw(st.sampled_from(keys) | st.sampled_from(['"ports"', "a.b", "Ports", '"x\\ny"', "1"]))
            fitting = FITTING.get(key)
            value = draw(fitting) if fitting is not None and draw(st.integers(0, 3)) else draw(toml_values)
            lines.append(f"{key} = {value}")
        elif kind == 7:
            lines.append(draw(st.sampled_from(["[ports]", "[[x]]", "[a.b]", "# comment", ""])))
        else:
            lines.append(draw(st.text(max_size=30)))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    return eol.join(lines).encode() + draw(st.sampled_from([b"", b"\n", b"\xff", b"\xef\xbb\xbf"]))


@st.composite
def repeated(draw: st.DrawFn, keys: list[str]) -> bytes:
    """A key whose value (or the key itself) is one piece repeated up to 20,000 times: the sizes
    random text never reaches, where parsers recurse, convert or keep prefixes."""
    key = draw(st.sampled_from(keys))
    n = draw(st.integers(0, 20_000))
    body = draw(st.sampled_from([
        f"{key} = " + "[" * n + "]" * n, f"{key} = " + "{a=" * n + "1" + "}" * n, f"{key} = " + "9" * n,
        f"{key} = 0x" + "f" * n, f"{key}" + ".a" * n + " = 1", "[t" + ".a" * n + "]",
        f"{key} = {{a" + ".a" * n + " = 1}",
        f"{key} = [" + '"1",' * n + "]", f'{key} = "' + "\\u0041" * n + '"', "#" * n,
    ]))
    return body.encode()


def files(keys: list[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(toml_documents(keys), repeated(keys), st.binary(max_size=200),
                     st.text(max_size=200).map(str.encode))


likely_guest = st.one_of(st.integers(2, 254).map(lambda n: f"192.168.122.{n}"),
                         st.integers(1, 2 ** 16 - 1).map(lambda n: f"fd00:1::{n:x}"))
likely_spec = st.builds(lambda p, n, q, proto: f"{p}-{p + n}:{q}-{q + n}{proto}", st.integers(1, 65000),
                        st.integers(0, 500), st.integers(1, 65000), st.sampled_from(["", "/udp"]))
guest_address = st.one_of(st.integers(0, 255).map(lambda n: f"192.168.122.{n}"),
                          st.integers(0, 2 ** 16).map(lambda n: f"fd00:1::{n:x}"), address_text)


@st.composite
def metadata_xml(draw: st.DrawFn) -> str:
    """A domain XML whose <metadata> holds our element: half the time close to a valid one
    (an address, a few ports), else elements and texts of every kind, maybe not XML at all."""
    items = []
    if draw(st.integers(0, 2)):
        items.append(f"<vf:address>{escape(draw(likely_guest | guest_address))}</vf:address>")
        items += [f"<vf:port>{escape(draw(likely_spec | structured_specs()))}</vf:port>"
                  for _ in range(draw(st.integers(1, 3)))]
        items += [f"<vf:{tag}>{escape(draw(address_text))}</vf:{tag}>"
                  for tag in draw(st.lists(st.sampled_from(["public", "allow"]), max_size=2))]
    else:
        fitting = {"address": guest_address, "public": address_text, "allow": address_text, "port": any_spec}
        for _ in range(draw(st.integers(0, 6))):
            tag = draw(st.sampled_from(["address", "port", "port", "public", "allow", "ports", "evil"]))
            value = draw(fitting[tag] if tag in fitting and draw(st.integers(0, 3)) else st.text(max_size=30))
            value = escape(value) if draw(st.integers(0, 5)) else value  # raw: maybe not XML at all
            items.append(f"<vf:{tag}>{value}</vf:{tag}>")
    prefix = draw(st.sampled_from(["vf", "vf", "other"]))
    ns = draw(st.sampled_from([domainxml.NAMESPACE, domainxml.NAMESPACE, "http://example.org/x"]))
    inner = "".join(items).replace("vf:", f"{prefix}:")
    name = escape(draw(st.text(alphabet=st.characters(codec="ascii", min_codepoint=32), max_size=10)))
    return (f"<domain type='kvm'><name>{name}</name><metadata><{prefix}:config xmlns:{prefix}={quoteattr(ns)}>"
            f"{inner}</{prefix}:config></metadata><devices><interface type='network'>"
            f"<mac address='52:54:00:aa:bb:01'/><source network='default'/></interface></devices></domain>")


# ---------------------------------------------------------------- the properties

@BOUNDED
@given(data=files(SETTINGS_KEYS))
@example(data=b'max_forwards = ' + b"9" * 5000)
@example(data=b'public = ' + b"[" * 2000 + b"]" * 2000)
def test_any_config_toml(fuzz_dir: Path, data: bytes) -> None:
    run_config(fuzz_dir, data)


@BOUNDED
@given(data=files(GUEST_KEYS))
@example(data=b'address = "10.1.1.2"\nports = 0x' + b"f" * 4000)
@example(data=b'address = "10.1.1.2"\nports = ["1-65535", "1-65535/udp"]\npublic = ["192.0.2.1", "192.0.2.2"]\n')
def test_any_guest_file(fuzz_dir: Path, data: bytes) -> None:
    run_guest(fuzz_dir, data)


@BOUNDED
@given(text=any_spec)
def test_any_port_spec(text: str) -> None:
    run_spec(text)


@BOUNDED
@given(text=st.one_of(metadata_xml(), st.text(max_size=200)))
def test_any_domain_metadata(text: str) -> None:
    run_metadata(text)


# ---------------------------------------------------------------- what fuzzing found, replayed

CASES = sorted(p for p in FOUND.iterdir() if p.name != "README.md") if FOUND.is_dir() else []
@pytest.mark.parametrize("case", CASES, ids=[p.name for p in CASES])
def test_found_cases(fuzz_dir: Path, case: Path) -> None:
    data = case.read_bytes()
    kind = case.name.split("-", 1)[0]
    if kind == "config":
        run_config(fuzz_dir, data)
    elif kind == "guest":
        run_guest(fuzz_dir, data)
    elif kind == "spec":
        run_spec(data.decode("utf-8", "surrogateescape"))
    elif kind == "metadata":
        run_metadata(data.decode("utf-8", "surrogateescape"))
    else:
        pytest.fail(f"{case.name}: name it config-*, guest-*, spec-* or metadata-* (see README.md)")


def test_found_cases_are_kept() -> None:
    assert len(CASES) >= 5
