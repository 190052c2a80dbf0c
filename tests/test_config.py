"""config.py: reading, trusting and validating /etc/virt-forward."""

from __future__ import annotations

import ipaddress
import os
import threading
from pathlib import Path

import pytest

from conftest import WriteFile, write_trusted
from virt_forward.config import (
    MAX_FILE_BYTES, Settings, check_domain_name, config_dir, guest_names, guest_path, load_guest,
    load_settings,
)
from virt_forward.errors import ConfigError, ExitCode, UsageError
from virt_forward.plan import plan_guest

GOOD = 'address = "10.1.1.2"\nports = ["80"]\n'


def load_error(cdir: Path, name: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        guest = load_guest(cdir, name)
        assert guest is not None
        plan_guest(guest, load_settings(cdir))
    err = info.value
    assert "\n" not in str(err), "errors are one line"
    assert err.exit_code == ExitCode.CONFIG
    return err


# ---------------------------------------------------------------- the good case

def test_full_example_from_the_issue(cdir: Path, write_guest: WriteFile) -> None:
    write_guest("web", '''\
address = "10.1.1.2"            # the guest's address
public  = "192.168.0.2"
ports   = ["80", "443/tcp", "2222:22", "8000-8009:9000-9009/udp", "tcp:25"]
allow   = ["203.0.113.0/24"]
''')
    guest = load_guest(cdir, "web")
    assert guest is not None
    assert guest.name == "web"
    assert guest.path == str(cdir / "guests" / "web.toml")
    assert guest.addresses == (ipaddress.ip_address("10.1.1.2"),)
    assert guest.public == (ipaddress.ip_address("192.168.0.2"),)
    assert [e.text for e in guest.ports] == ["80", "443/tcp", "2222:22", "8000-8009:9000-9009/udp", "tcp:25"]
    assert all(e.line == 3 for e in guest.ports)
    assert guest.allow == (ipaddress.ip_network("203.0.113.0/24"),)
    assert guest.line_of("address") == 1 and guest.line_of("allow") == 4


def test_lists_strings_and_multiline_arrays(cdir: Path, write_guest: WriteFile) -> None:
    write_guest("g", '''\
# comment
address = ["10.1.1.2", "fd00::2"]
ports = [
  "80",
  '443',   # literal strings too
  "53/udp",
]
''')
    guest = load_guest(cdir, "g")
    assert guest is not None
    assert [(e.text, e.line) for e in guest.ports] == [("80", 4), ("443", 5), ("53/udp", 6)]
    assert guest.public is None and guest.allow is None
    assert [a.version for a in guest.addresses] == [4, 6]


def test_no_file_means_not_ours(cdir: Path) -> None:
    assert load_guest(cdir, "nobody") is None


def test_crlf_file_is_fine_and_lines_count(cdir: Path, write_guest: WriteFile) -> None:
    write_guest("crlf", 'address = "10.1.1.2"\r\n\r\nports = ["80", "0"]\r\n')
    err = load_error(cdir, "crlf")
    assert err.line == 3 and err.key == "ports"


# ---------------------------------------------------------------- the error format

def test_error_format_is_path_line_key_message(cdir: Path, write_guest: WriteFile) -> None:
    path = write_guest("web", 'address = "10.1.1.2"\n\nports = ["80", "70000"]\n')
    err = load_error(cdir, "web")
    assert str(err) == f"{path}:3: ports: '70000': port 70000 is out of range 1-65535"
    assert (err.path, err.line, err.key) == (str(path), 3, "ports")


def test_error_names_the_line_of_the_element_in_a_multiline_array(cdir: Path, write_guest: WriteFile) -> None:
    path = write_guest("web", 'address = "10.1.1.2"\nports = [\n  "80",\n  "443",\n  "8010-8000",\n]\n')
    err = load_error(cdir, "web")
    assert str(err).startswith(f"{path}:5: ports: '8010-8000': ")
    assert "ends before it starts" in str(err)


@pytest.mark.parametrize("text,line,key,message", [
    ('address = "10.1.1.2"\nports = ["80"]\nport = ["81"]\n', 3, "port", "unknown key (known: address, allow, ports, public)"),
    ('Address = "10.1.1.2"\n', 1, "Address", "unknown key"),
    ('address = "10.1.1.2"\nports = ["80"]\nhairpin = false\n', 3, "hairpin", "unknown key"),
    ('address = "10.1.1.2"\nports = ["80"]\n\n[extra]\nports = 1\n', 4, "extra", "unknown key"),
    ('address = "10.1.1.2"\nports = ["80"]\nextra.deep = 1\n', 3, "extra", "unknown key"),
    ('address = "10.1.1.2"\nports = ["80"]\n"a b" = 1\n', 3, "'a b'", "unknown key"),
    ('address = "10.1.1.2"\nports = ["80"]\n\'lit\' = 1\n', 3, "lit", "unknown key"),
])
def test_unknown_keys(cdir: Path, write_guest: WriteFile, text: str, line: int, key: str, message: str) -> None:
    path = write_guest("g", text)
    err = load_error(cdir, "g")
    assert str(err).startswith(f"{path}:{line}: {key}: {message}")


def test_a_quoted_key_with_a_newline_stays_on_one_line(cdir: Path, write_guest: WriteFile) -> None:
    path = write_guest("g", GOOD + '"evil\\nkey" = 1\n')
    err = load_error(cdir, "g")
    assert str(err).startswith(f"{path}:3: 'evil\\nkey': unknown key")


@pytest.mark.parametrize("text,line,key,message", [
    ('address = 5\nports = ["80"]\n', 1, "address", "must be a string or a list of strings, not 5"),
    ('address = true\nports = ["80"]\n', 1, "address", "not True"),
    ('address = ["10.1.1.2", 5]\nports = ["80"]\n', 1, "address", "not ['10.1.1.2', 5]"),
    ('address = "10.1.1.2"\nports = 80\n', 2, "ports", "not 80"),
    ('address = "10.1.1.2"\nports = [80, 443]\n', 2, "ports", "not [80, 443]"),
    ('address = "10.1.1.2"\nports = [["80"]]\n', 2, "ports", "must be a string or a list"),
    ('address = "10.1.1.2"\n[ports]\nhttp = "80"\n', 2, "ports", "not {'http': '80'}"),
    ('address = "10.1.1.2"\nports.http = "80"\n', 2, "ports", "must be a string or a list"),
    ('address = "10.1.1.2"\nports = ["80"]\npublic = 1\n', 3, "public", "not 1"),
    ('address = "10.1.1.2"\nports = ["80"]\nallow = [true]\n', 3, "allow", "not [True]"),
])
def test_wrong_types(cdir: Path, write_guest: WriteFile, text: str, line: int, key: str, message: str) -> None:
    path = write_guest("g", text)
    err = load_error(cdir, "g")
    assert str(err).startswith(f"{path}:{line}: {key}: ")
    assert message in str(err)


@pytest.mark.parametrize("text,line", [
    ('ports = [\n  "80", # "0" in a comment\n  \'81\',\n  "1\\u0030",  "0",\n]\n', 5),
    ('ports = ["80", """\n22""", "0"]\n', 3),
    ('ports = "0"\n', 2),
])
def test_element_lines_skip_comments_escapes_and_multiline_strings(cdir: Path, write_guest: WriteFile,
                                                                  text: str, line: int) -> None:
    write_guest("g", 'address = "10.1.1.2"\n' + text)
    err = load_error(cdir, "g")
    assert (err.line, err.key) == (line, "ports")
    assert "'0'" in str(err)


def test_value_lines_scanner() -> None:
    from virt_forward.config import _value_lines
    lines = ['x = ["a\\"]", \'b\\\', # "c"', ' "d" ,', "]", 'y = "e"']
    assert _value_lines(lines, 1, 3) == [1, 1, 2]
    assert _value_lines(lines, 4, 1) == [4]
    assert _value_lines(lines, None, 2) == [None, None]
    assert _value_lines(lines, 1, 9)[-1] == 1, "missing strings fall back to the key's line"


def test_huge_wrong_value_is_cut_short(cdir: Path, write_guest: WriteFile) -> None:
    write_guest("g", 'address = "10.1.1.2"\nports = [' + ", ".join(["1"] * 5000) + "]\n")
    err = load_error(cdir, "g")
    assert err.line == 2 and err.key == "ports"
    assert len(str(err)) < 300


@pytest.mark.parametrize("text,line,key,message", [
    ('address = "10.1.1.256"\nports = ["80"]\n', 1, "address", "'10.1.1.256' is not an IP address"),
    ('address = "10.1.1.2/24"\nports = ["80"]\n', 1, "address", "is not an IP address"),
    ('address = "guest.example"\nports = ["80"]\n', 1, "address", "is not an IP address"),
    ('address = "0.0.0.0"\nports = ["80"]\n', 1, "address", "cannot be used here"),
    ('address = "ff02::1"\nports = ["80"]\n', 1, "address", "cannot be used here"),
    ('address = "fe80::2%virbr0"\nports = ["80"]\n', 1, "address", "zone index"),
    ('address = ["10.1.1.2", "10.1.1.3"]\nports = ["80"]\n', 1, "address", "more than one IPv4 address"),
    ('address = ["10.1.1.2",\n  "10.1.1.2"]\nports = ["80"]\n', 2, "address", "listed twice"),  # the copy's line
    ('address = []\nports = ["80"]\n', 1, "address", "is empty"),
    ('address = "10.1.1.2"\n', None, "ports", "missing"),
    ('address = "10.1.1.2"\nports = ["80"]\npublic = "nope"\n', 3, "public", "'nope' is not an IP address"),
    ('address = "10.1.1.2"\nports = ["80"]\nallow = ["10.0.0.1/24"]\n', 3, "allow", "has host bits set"),
    ('address = "10.1.1.2"\nports = ["80"]\nallow = ["10.0.0.0/33"]\n', 3, "allow", "is not a CIDR"),
    ('address = "10.1.1.2"\nports = ["80"]\nallow = ["fe80::%eth0/64"]\n', 3, "allow", "zone index"),
    ('address = "10.1.1.2"\nports = ["80"]\nallow = [\n "10.0.0.0/8",\n "x/8",\n]\n', 5, "allow", "'x/8' is not a CIDR"),
    ('address = "10.1.1.2"\nports = ["80"]\nallow = []\n', 3, "allow", "is empty"),
    ('address = "10.1.1.2"\nports = ["80"]\nallow = ["2001:db8::/32"]\n', 3, "allow", "has no IPv4 network"),
])
def test_bad_values(cdir: Path, write_guest: WriteFile, text: str, line: int | None, key: str,
                    message: str) -> None:
    path = write_guest("g", text)
    err = load_error(cdir, "g")
    where = f"{path}:{line}" if line is not None else str(path)
    assert str(err).startswith(f"{where}: {key}: ")
    assert message in str(err)


def test_ipv4_forward_to_ipv6_only_guest(cdir: Path, write_guest: WriteFile) -> None:
    path = write_guest("v6", 'address = "fd00::2"\nports = [\n  "[2001:db8::1]:80:80",\n  "192.0.2.1:81:81",\n]\n')
    err = load_error(cdir, "v6")
    assert str(err).startswith(f"{path}:4: ports: '192.0.2.1:81:81': IPv4 forward from 192.0.2.1 to a guest")
    assert "IPv6-only" in str(err)


# ---------------------------------------------------------------- TOML syntax

@pytest.mark.parametrize("text,line,message", [
    ('address = "10.1.1.2"\nports = ["80]\n', 2, "TOML syntax error"),
    ('address = "10.1.1.2"\naddress = "10.1.1.3"\n', 2, "Cannot overwrite a value"),
    ('address = 10.1.1.2\n', 1, "TOML syntax error"),
    ('address = "10.1.1.2"\n\n\nports = ["80"\n', 4, "Unclosed array"),  # at end of document
    ('address = "10.1.1.2"\r\nports = \r\n', 2, "Invalid value"),
])
def test_toml_syntax_errors_give_the_line(cdir: Path, write_guest: WriteFile, text: str, line: int,
                                          message: str) -> None:
    path = write_guest("g", text)
    err = load_error(cdir, "g")
    assert str(err).startswith(f"{path}:{line}: TOML syntax error: ")
    assert message in str(err)
    assert "(at " not in str(err), "tomllib's position is replaced by path:line"


def test_line_numbers_count_newlines_only(cdir: Path, write_guest: WriteFile) -> None:
    # U+2028 and U+0085 are legal in TOML comments; str.splitlines() would split there
    write_guest("g", '# one\u2028two\x85three\naddress = "10.1.1.2"\nports = ["0"]\n')
    err = load_error(cdir, "g")
    assert (err.line, err.key) == (3, "ports")


def test_byte_order_mark(cdir: Path, write_guest: WriteFile) -> None:
    path = write_guest("g", "\ufeff" + GOOD)
    err = load_error(cdir, "g")
    assert str(err).startswith(f"{path}:1: starts with a byte order mark (U+FEFF)")


def test_not_utf8_gives_the_line(cdir: Path, write_guest: WriteFile) -> None:
    path = write_guest("g", b'address = "10.1.1.2"\n# caf\xe9\nports = ["80"]\n')
    err = load_error(cdir, "g")
    assert str(err) == f"{path}:2: not UTF-8 text (byte 26)"


def test_huge_file_is_refused_before_reading(cdir: Path, write_guest: WriteFile) -> None:
    path = write_guest("big", GOOD + "#" * MAX_FILE_BYTES + "\n")
    err = load_error(cdir, "big")
    assert str(err).startswith(f"{path}: refused: ")
    assert "larger than" in str(err)


# ---------------------------------------------------------------- trust (StrictModes)

@pytest.mark.parametrize("mode,uid,message", [
    (0o664, 0, "writable by group or others (mode 0664"),
    (0o646, 0, "writable by group or others (mode 0646"),
    (0o666, 0, "writable by group or others"),
    (0o644, 65534, "owned by uid 65534, not root"),
    (0o600, 65534, "owned by uid 65534, not root"),
])
def test_untrusted_guest_files_are_refused(cdir: Path, write_guest: WriteFile, mode: int, uid: int,
                                           message: str) -> None:
    path = write_guest("g", GOOD, mode=mode, uid=uid)
    err = load_error(cdir, "g")
    assert str(err).startswith(f"{path}: refused: ")
    assert message in str(err)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o444])
def test_root_owned_not_group_writable_is_trusted(cdir: Path, write_guest: WriteFile, mode: int) -> None:
    write_guest("g", GOOD, mode=mode)
    assert load_guest(cdir, "g") is not None


def test_group_writable_guests_dir_is_refused(cdir: Path, write_guest: WriteFile) -> None:
    write_guest("g", GOOD)
    os.chmod(cdir / "guests", 0o775)
    err = load_error(cdir, "g")
    assert str(err).startswith(f"{cdir / 'guests'}: refused: writable by group or others")


def test_guests_dir_owned_by_someone_else_is_refused(cdir: Path, write_guest: WriteFile) -> None:
    write_guest("g", GOOD)
    os.chown(cdir / "guests", 65534, 65534)
    err = load_error(cdir, "g")
    assert "owned by uid 65534" in str(err)


def test_symlinked_guest_file_is_refused(cdir: Path, write_guest: WriteFile, tmp_path: Path) -> None:
    target = write_trusted(tmp_path / "elsewhere.toml", GOOD)
    (cdir / "guests" / "g.toml").symlink_to(target)
    err = load_error(cdir, "g")
    assert str(err).startswith(f"{cdir / 'guests' / 'g.toml'}: cannot read: ")


def test_directory_is_not_a_regular_file(cdir: Path) -> None:
    (cdir / "guests" / "d.toml").mkdir()
    err = load_error(cdir, "d")
    assert str(err) == f"{cdir / 'guests' / 'd.toml'}: not a regular file"


def test_fifo_does_not_hang(cdir: Path) -> None:
    """A FIFO in guests/ must not block the hook (libvirt waits for it, the guest never starts)."""
    os.mkfifo(cdir / "guests" / "f.toml", 0o644)
    result: list[BaseException | None] = []

    def load() -> None:
        try:
            load_guest(cdir, "f")
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            result.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():  # unblock the thread so the test run can end
        fd = os.open(cdir / "guests" / "f.toml", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("load_guest blocked on a FIFO")
    assert isinstance(result[0], ConfigError)
    assert "not a regular file" in str(result[0])


# ---------------------------------------------------------------- config.toml

def test_settings_defaults_without_file(cdir: Path) -> None:
    assert load_settings(cdir) == Settings()
    assert Settings().backend == "auto" and Settings().hairpin is True and Settings().strict is False


def test_settings_all_keys(cdir: Path, write_config: WriteFile) -> None:
    path = write_config('backend = "nftables"\npublic = ["192.0.2.1", "2001:db8::1"]\n'
                        'hairpin = false\nstrict = true\n')
    s = load_settings(cdir)
    assert s.backend == "nftables"
    assert s.public == (ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("2001:db8::1"))
    assert s.hairpin is False and s.strict is True
    assert s.path == str(path)


def test_settings_public_as_string(cdir: Path, write_config: WriteFile) -> None:
    write_config('public = "192.0.2.1"\n')
    assert load_settings(cdir).public == (ipaddress.ip_address("192.0.2.1"),)


@pytest.mark.parametrize("text,line,key,message", [
    ('backend = "firewalld"\n', 1, "backend", "'firewalld' is not one of auto, nftables, iptables"),
    ('backend = 1\n', 1, "backend", "1 is not one of"),
    ('hairpin = "yes"\n', 1, "hairpin", "must be true or false, not 'yes'"),
    ('\nstrict = 1\n', 2, "strict", "must be true or false, not 1"),
    ('public = ["192.0.2.1", "192.0.2.300"]\n', 1, "public", "'192.0.2.300' is not an IP address"),
    ('public = "::"\n', 1, "public", "cannot be used here"),
    ('hairpin = true\nports = ["80"]\n', 2, "ports", "unknown key (known: backend, hairpin, metadata, public, strict)"),
])
def test_settings_errors(cdir: Path, write_config: WriteFile, text: str, line: int, key: str,
                         message: str) -> None:
    path = write_config(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cdir)
    assert str(info.value).startswith(f"{path}:{line}: {key}: ")
    assert message in str(info.value)


def test_settings_syntax_error(cdir: Path, write_config: WriteFile) -> None:
    path = write_config('backend = "auto"\nhairpin = tru\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cdir)
    assert str(info.value).startswith(f"{path}:2: TOML syntax error: ")


@pytest.mark.parametrize("mode,uid", [(0o664, 0), (0o644, 65534)])
def test_untrusted_config_toml_is_refused(cdir: Path, write_config: WriteFile, mode: int, uid: int) -> None:
    path = write_config('hairpin = false\n', mode=mode, uid=uid)
    with pytest.raises(ConfigError, match="refused") as info:
        load_settings(cdir)
    assert str(info.value).startswith(f"{path}: refused: ")


# ---------------------------------------------------------------- names and dirs

@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../etc/passwd", "/abs", "a\0b", ".hidden",
                                  "x" * 201, "new\nline", "tab\there", "esc\x1b[31m", "\udcff"])
def test_unusable_domain_names_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="cannot name a guest file") as info:
        check_domain_name(name)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize("name", ["web", "my guest", "$(reboot)", "`id`", "a;b|c&&d", "gäst-ünïcödé",
                                  "\u0645\u0636\u064a\u0641", "emoji-\U0001f600", "'quoted\"", "*", "-rf",
                                  "x" * 200, "a.b.c", "a..b"])
def test_odd_but_legal_domain_names(cdir: Path, write_guest: WriteFile, name: str) -> None:
    assert check_domain_name(name) == name
    path = write_guest(name, GOOD)
    assert guest_path(cdir, name) == path
    guest = load_guest(cdir, name)
    assert guest is not None and guest.name == name
    plan = plan_guest(guest, Settings())
    assert plan.domain == name
    assert plan.tag.startswith("g") and plan.tag[1:].isalnum() and len(plan.tag) == 13
    assert name in guest_names(cdir)


def test_guest_path_refuses_traversal(cdir: Path) -> None:
    with pytest.raises(UsageError):
        guest_path(cdir, "../config")


def test_guest_names_lists_toml_files_only(cdir: Path, write_guest: WriteFile) -> None:
    write_guest("b", GOOD)
    write_guest("a", GOOD)
    write_trusted(cdir / "guests" / "notes.txt", "x")
    write_trusted(cdir / "guests" / ".b.toml.swp", "x")
    write_trusted(cdir / "guests" / ".hidden.toml", GOOD)
    assert guest_names(cdir) == ["a", "b"]


def test_guest_names_without_guests_dir(tmp_path: Path) -> None:
    assert guest_names(tmp_path) == []


def test_config_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VIRT_FORWARD_CONFIG_DIR", raising=False)
    assert config_dir() == Path("/etc/virt-forward")
    monkeypatch.setenv("VIRT_FORWARD_CONFIG_DIR", str(tmp_path))
    assert config_dir() == tmp_path
    assert config_dir("/explicit") == Path("/explicit")
