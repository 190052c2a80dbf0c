"""The port-spec parser: every documented form, every error, and properties."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from virt_forward.errors import PortSpecError
from virt_forward.ports import MAX_SPEC_LENGTH, PROTOCOLS, PortRange, PortSpec, parse_port_spec

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def spec(host: tuple[int, int], guest: tuple[int, int], proto: str = "tcp",
         public: str | None = None) -> PortSpec:
    return PortSpec(None if public is None else ipaddress.ip_address(public), proto,  # type: ignore[arg-type]
                    PortRange(*host), PortRange(*guest))


VALID = [
    # bare port: same port on both sides, tcp by default
    ("80", spec((80, 80), (80, 80))),
    ("1", spec((1, 1), (1, 1))),
    ("65535", spec((65535, 65535), (65535, 65535))),
    (" 443 ", spec((443, 443), (443, 443))),
    ("0080", spec((80, 80), (80, 80))),
    # host:guest
    ("2222:22", spec((2222, 2222), (22, 22))),
    ("22:2222", spec((22, 22), (2222, 2222))),
    # protocols
    ("53/udp", spec((53, 53), (53, 53), "udp")),
    ("53/tcp", spec((53, 53), (53, 53), "tcp")),
    ("5353:53/udp", spec((5353, 5353), (53, 53), "udp")),
    ("80/TCP", spec((80, 80), (80, 80), "tcp")),
    ("53/Udp", spec((53, 53), (53, 53), "udp")),
    # ranges, one to one with an offset
    ("8000-8009", spec((8000, 8009), (8000, 8009))),
    ("8000-8009:9000-9009/udp", spec((8000, 8009), (9000, 9009), "udp")),
    ("9000-9009:8000-8009", spec((9000, 9009), (8000, 8009))),
    ("1-65535", spec((1, 65535), (1, 65535))),
    ("7000-7000:7001", spec((7000, 7000), (7001, 7001))),
    # IPv4 public address
    ("192.168.0.2:80:8080", spec((80, 80), (8080, 8080), public="192.168.0.2")),
    ("203.0.113.7:8000-8001:9000-9001/udp", spec((8000, 8001), (9000, 9001), "udp", "203.0.113.7")),
    # IPv6 public address in brackets
    ("[2001:db8::2]:443:443", spec((443, 443), (443, 443), public="2001:db8::2")),
    ("[2001:DB8::2]:443:8443/udp", spec((443, 443), (8443, 8443), "udp", "2001:db8::2")),
    ("[::ffff:192.0.2.1]:80:80", spec((80, 80), (80, 80), public="::ffff:192.0.2.1")),
    # the post's proto:port form
    ("tcp:25", spec((25, 25), (25, 25), "tcp")),
    ("udp:53", spec((53, 53), (53, 53), "udp")),
    ("TCP:80", spec((80, 80), (80, 80), "tcp")),
    ("tcp:6000-6010", spec((6000, 6010), (6000, 6010), "tcp")),
    # '@target': one NIC of a guest with several (an address, or a libvirt network's name)
    ("5432@10.2.2.3", PortSpec(None, "tcp", PortRange(5432, 5432), PortRange(5432, 5432), V4("10.2.2.3"))),
    ("2222:22@[fd00:2::3]", PortSpec(None, "tcp", PortRange(2222, 2222), PortRange(22, 22), V6("fd00:2::3"))),
    ("2222:22@fd00:2::3", PortSpec(None, "tcp", PortRange(2222, 2222), PortRange(22, 22), V6("fd00:2::3"))),
    ("53/udp@isolated", PortSpec(None, "udp", PortRange(53, 53), PortRange(53, 53), "isolated")),
    ("53@isolated/udp", PortSpec(None, "udp", PortRange(53, 53), PortRange(53, 53), "isolated")),
    ("tcp:25@mail-net.1", PortSpec(None, "tcp", PortRange(25, 25), PortRange(25, 25), "mail-net.1")),
    ("192.168.0.2:8080:80@10.2.2.3",
     PortSpec(V4("192.168.0.2"), "tcp", PortRange(8080, 8080), PortRange(80, 80), V4("10.2.2.3"))),
]


@pytest.mark.parametrize("text,expected", VALID, ids=[t for t, _ in VALID])
def test_valid_forms(text: str, expected: PortSpec) -> None:
    assert parse_port_spec(text) == expected


INVALID = [
    # (text, substring of the message)
    ("0", "out of range 1-65535"),
    ("0:80", "host port 0 is out of range"),
    ("80:0", "guest port 0 is out of range"),
    ("65536", "65536 is out of range"),
    ("99999", "99999 is out of range"),
    ("100000", "is not a port or a range"),
    ("0-10", "out of range"),
    ("1-65536", "65536 is out of range"),
    ("8010-8000", "ends before it starts"),
    ("8000-8009:9010-9000", "ends before it starts"),
    ("8000-8009:9000-9008", "has 10 ports but guest range 9000-9008 has 9"),
    ("80:9000-9001", "has 1 ports but guest range 9000-9001 has 2"),
    ("80/sctp", "unknown protocol 'sctp'"),
    ("80/", "unknown protocol ''"),
    ("80/tcp/udp", "is not a port"),
    ("sctp:80", "unknown protocol 'sctp'"),
    ("icmp:1", "unknown protocol 'icmp'"),
    (":80", "host port is empty"),
    ("1.2.3.4::80", "host port is empty"),
    ("80:", "guest port is empty"),
    ("2001:db8::1:80:80", "put an IPv6 address in brackets"),
    ("::1:80", "put an IPv6 address in brackets"),
    ("fe80::1:80:80", "put an IPv6 address in brackets"),
    ("[1.2.3.4]:80:80", "only IPv6 addresses go in brackets"),
    ("[2001:db8::1:80:80", "'[' without ']'"),
    ("[2001:db8::1]80:80", "expected ':' after the bracketed address"),
    ("[2001:db8::1]:80", "give host and guest port after the address"),
    ("[2001:db8::1]:80:80:80", "too many ':'"),
    ("[nope]:80:80", "public address 'nope' is not an IP address"),
    ("80@", "nothing after '@'"),
    ("80@a b", "neither an IP address nor a libvirt network name"),
    ("80@-net", "neither an IP address nor a libvirt network name"),
    ("80@net/udp/tcp", "is not a port"),
    ("80/tcp@net/udp", "two protocols"),
    ("80@0.0.0.0", "cannot be a guest's address"),
    ("80@::1", "cannot be a guest's address"),
    ("80@fe80::1%eth0", "zone index"),
    ("192.168.0.2:80:80@fd00::1", "different families"),
    ("300.1.1.1:80:80", "is not an IP address"),
    ("01.2.3.4:80:80", "is not an IP address"),
    ("0.0.0.0:80:80", "means every address"),
    ("[::]:80:80", "means every address"),
    ("224.0.0.1:80:80", "multicast"),
    ("[ff02::1]:80:80", "multicast"),
    ("[fe80::1%eth0]:80:80", "zone index"),
    ("", "empty port spec"),
    ("   ", "empty port spec"),
    ("abc", "is not a port"),
    ("http", "is not a port"),
    ("-80", "is not a port"),
    ("80-", "is not a port"),
    ("80--90", "is not a port"),
    ("8 0", "is not a port"),
    ("80 :80", "is not a port"),
    ("1.2.3.4:80", "host port '1.2.3.4' is not a port"),
    ("80:80:80:80", "too many ':'"),
    ("\u0668\u0660", "is not a port"),  # Arabic-Indic "80": \d would have taken it
    ("\uff18\uff10", "is not a port"),  # fullwidth "80"
    ("80\n:90", "is not a port"),  # $ matched before a trailing newline
    ("80\n/udp", "is not a port"),
    ("tcp:80\n:1", "public address 'tcp' is not an IP address"),
    ("8" * 200, "too long for a port spec"),
]


@pytest.mark.parametrize("text,message", INVALID, ids=[repr(t)[:40] for t, _ in INVALID])
def test_invalid_forms(text: str, message: str) -> None:
    with pytest.raises(PortSpecError) as info:
        parse_port_spec(text)
    text_of = str(info.value)
    assert message in text_of
    assert "\n" not in text_of
    # the user sees the value they wrote (or its start, when it is huge)
    assert text_of.startswith(repr(text) if len(text) <= MAX_SPEC_LENGTH else repr(text[:20]))


def test_not_a_string() -> None:
    with pytest.raises(PortSpecError, match="is not a string"):
        parse_port_spec(80)  # type: ignore[arg-type]


def test_pairs_keep_the_offset() -> None:
    assert list(parse_port_spec("8000-8002:9000-9002").pairs()) == [(8000, 9000), (8001, 9001), (8002, 9002)]
    assert list(parse_port_spec("9000-9001:80-81").pairs()) == [(9000, 80), (9001, 81)]
    assert list(parse_port_spec("22").pairs()) == [(22, 22)]


def test_str_is_canonical() -> None:
    assert str(parse_port_spec("tcp:25")) == "25:25/tcp"
    assert str(parse_port_spec("[2001:DB8:0::2]:1-2:3-4/UDP")) == "[2001:db8::2]:1-2:3-4/udp"
    assert str(parse_port_spec("192.0.2.1:8080:80")) == "192.0.2.1:8080:80/tcp"


# ---------------------------------------------------------------- properties

ports = st.integers(1, 65535)


@st.composite
def port_specs(draw: st.DrawFn) -> PortSpec:
    length = draw(st.integers(1, 200))
    hstart = draw(st.integers(1, 65536 - length))
    gstart = draw(st.integers(1, 65536 - length))
    public = draw(st.one_of(
        st.none(),
        st.ip_addresses(v=4).filter(lambda a: not (a.is_unspecified or a.is_multicast)),
        st.ip_addresses(v=6).filter(lambda a: not (a.is_unspecified or a.is_multicast)),
    ))
    proto = draw(st.sampled_from(PROTOCOLS))
    return PortSpec(public, proto, PortRange(hstart, hstart + length - 1),
                    PortRange(gstart, gstart + length - 1))


@given(port_specs())
def test_str_round_trips(value: PortSpec) -> None:
    assert parse_port_spec(str(value)) == value


@given(port_specs())
def test_pairs_keep_offset_and_length(value: PortSpec) -> None:
    pairs = list(value.pairs())
    assert len(pairs) == len(value.host) == len(value.guest)
    assert pairs[0] == (value.host.start, value.guest.start)
    assert pairs[-1] == (value.host.end, value.guest.end)
    offset = value.guest.start - value.host.start
    assert all(g - h == offset for h, g in pairs)
    assert all(1 <= p <= 65535 for pair in pairs for p in pair)


@given(st.sampled_from(["tcp", "udp", "TCP", "Udp"]), ports, ports)
def test_post_form_and_docker_form_agree(proto: str, a: int, b: int) -> None:
    lo, hi = min(a, b), max(a, b)
    assert parse_port_spec(f"{proto}:{lo}-{hi}") == parse_port_spec(f"{lo}-{hi}/{proto}")


# Text built from the grammar's own alphabet hits the interesting branches far
# more often than arbitrary unicode does; both are tried.
grammar_text = st.text(alphabet="0123456789-:/[].abcdefptuTCPUD% \n\u0660\u0668", max_size=40)


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=120), grammar_text))
@example("[")
@example("[]:1:1")
@example("[::1]:")
@example("tcp:")
@example("/")
@example("::")
@example("99999999999999999999")
def test_parser_raises_only_port_spec_errors(text: str) -> None:
    try:
        result = parse_port_spec(text)
    except PortSpecError as exc:
        assert "\n" not in str(exc)
        return
    # whatever was accepted is a real, usable forward
    assert 1 <= result.host.start <= result.host.end <= 65535
    assert 1 <= result.guest.start <= result.guest.end <= 65535
    assert len(result.host) == len(result.guest)
    assert result.proto in ("tcp", "udp")
    assert parse_port_spec(str(result)) == result
