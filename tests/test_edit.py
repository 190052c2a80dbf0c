"""`add` / `rm`: edits keep comments and layout, are validated first, replace the file atomically."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import WriteFile, write_trusted
from virt_forward.config import load_guest, load_settings
from virt_forward.edit import add_ports, remove_ports
from virt_forward.errors import ConfigError
from virt_forward.plan import plan_guest

needs_tomlkit = pytest.mark.skipif(importlib.util.find_spec("tomlkit") is None, reason="tomlkit is not installed")

COMMENTED = """\
# web server, see ticket 42
address = "10.1.1.2"   # on virbr0
public = "192.168.0.2"
ports = [
    "80/tcp",    # http
    # https, for the shop
    "443",
    "8000-8009:9000-9009/udp",
]
"""

# (name, file before, op, specs, lines returned ({p}: the file's path), file after)
CASES = [
    ("add-multiline-keeps-comments", COMMENTED, "add", ["2222:22", "tcp:25"],
     ["added '2222:22' to {p}", "added 'tcp:25' to {p}", "{p}: 14 forward(s) now"],
     COMMENTED.replace('    "8000-8009:9000-9009/udp",\n',
                       '    "8000-8009:9000-9009/udp",\n    "2222:22",\n    "tcp:25",\n')),
    ("add-one-line", 'address = "10.1.1.2"\nports = ["80"]  # web\n', "add", ["53/udp"],
     ["added '53/udp' to {p}", "{p}: 2 forward(s) now"],
     'address = "10.1.1.2"\nports = ["80", "53/udp"]  # web\n'),
    ("add-to-string", 'address = "10.1.1.2"\nports = "80"\n', "add", ["443"],
     ["added '443' to {p}", "{p}: 2 forward(s) now"],
     'address = "10.1.1.2"\nports = ["80", "443"]\n'),
    ("add-to-empty", 'address = "10.1.1.2"\nports = []\n', "add", [" 80 "],
     ["added '80' to {p}", "{p}: 1 forward(s) now"],
     'address = "10.1.1.2"\nports = ["80"]\n'),
    ("rm-by-meaning", COMMENTED, "rm", ["80", "tcp:443"],
     ["removed '80/tcp' from {p}", "removed '443' from {p}", "{p}: 10 forward(s) now"],
     # a comment of its own line stays: it may say more than the removed entry
     COMMENTED.replace('    "80/tcp",    # http\n', '').replace('    "443",\n', '')),
    ("rm-range-by-other-spelling", COMMENTED, "rm", ["8000-8009:9000-9009/UDP"],
     ["removed '8000-8009:9000-9009/udp' from {p}", "{p}: 2 forward(s) now"],
     COMMENTED.replace('    "8000-8009:9000-9009/udp",\n', '')),
    ("rm-last", 'address = "10.1.1.2"\nports = ["2222:22"]  # ssh\n', "rm", ["2222:22/tcp"],
     ["removed '2222:22' from {p}", "{p}: 0 forward(s) now"],
     'address = "10.1.1.2"\nports = []  # ssh\n'),
    ("rm-broken-entry-by-text", 'address = "10.1.1.2"\nports = ["80", "70000"]\n', "rm", ["70000"],
     ["removed '70000' from {p}", "{p}: 1 forward(s) now"],
     'address = "10.1.1.2"\nports = ["80"]\n'),
]


@needs_tomlkit
@pytest.mark.parametrize("name,before,op,specs,out,after", CASES, ids=[c[0] for c in CASES])
def test_edit(name: str, before: str, op: str, specs: list[str], out: list[str], after: str,
              cdir: Path, write_guest: WriteFile) -> None:
    path = write_guest("web", before)
    lines = add_ports(cdir, "web", specs) if op == "add" else remove_ports(cdir, "web", specs)
    assert lines == [line.format(p=path) for line in out]
    assert path.read_text() == after
    guest = load_guest(cdir, "web")  # the hook reads it: trusted, valid
    assert guest is not None
    plan_guest(guest, load_settings(cdir))
    assert sorted(p.name for p in path.parent.iterdir()) == ["web.toml"]


# (name, file before (None: no file), op, specs, address, error ({p}: the file's path))
ERRORS = [
    ("add-no-file", None, "add", ["80"], None,
     "{p}: no such guest file: give the guest's address (--address) to create it"),
    ("add-duplicate-meaning", COMMENTED, "add", ["80"], None, "{p}: ports: '80' is already in ports as '80/tcp'"),
    ("add-duplicate-text", COMMENTED, "add", ["443"], None, "{p}: ports: '443' is already in ports"),
    ("add-twice", COMMENTED, "add", ["25", "tcp:25"], None, "{p}: ports: 'tcp:25' is given twice as '25'"),
    ("add-bad-spec", COMMENTED, "add", ["70000"], None,
     "{p}: ports: '70000': port 70000 is out of range 1-65535"),
    ("add-comma", COMMENTED, "add", ["25,26"], None,
     "{p}: ports: '25,26': one forward per list entry: split it at ',' into separate strings"),
    ("add-overlap", COMMENTED, "add", ["8005:22/udp"], None,
     "{p}: ports: '8005:22/udp' claims 192.168.0.2:8005/udp already claimed by "
     "'8000-8009:9000-9009/udp' (file left unchanged)"),
    ("add-other-address", COMMENTED, "add", ["25"], "10.1.1.3",
     "{p}: address: is '10.1.1.2', not '10.1.1.3': edit the file to change it (without --address, add keeps it)"),
    ("add-none", COMMENTED, "add", [], None, "{p}: ports: give at least one port spec to add"),
    ("rm-unknown", COMMENTED, "rm", ["8080"], None,
     "{p}: ports: '8080' is not in ports; ports: '80/tcp', '443', '8000-8009:9000-9009/udp'"),
    ("rm-udp-is-not-tcp", COMMENTED, "rm", ["443/udp"], None,
     "{p}: ports: '443/udp' is not in ports; ports: '80/tcp', '443', '8000-8009:9000-9009/udp'"),
    ("rm-part-of-range", COMMENTED, "rm", ["8003:9003/udp"], None,
     "{p}: ports: '8003:9003/udp' is not in ports (it is part of '8000-8009:9000-9009/udp': remove that whole "
     "entry); ports: '80/tcp', '443', '8000-8009:9000-9009/udp'"),
    ("rm-twice", COMMENTED, "rm", ["443", "443/tcp"], None, "{p}: ports: '443/tcp' is given twice"),
    ("rm-no-file", None, "rm", ["80"], None, "{p}: no such guest file"),
    ("rm-no-ports-key", 'address = "10.1.1.2"\n', "rm", ["80"], None, "{p}: ports: has no ports to remove"),
    ("bad-toml", 'address = "10.1.1.2"\nports = [\n', "add", ["80"], None,
     "{p}:2: TOML syntax error: Invalid value"),
]


@needs_tomlkit
@pytest.mark.parametrize("name,before,op,specs,address,error", ERRORS, ids=[c[0] for c in ERRORS])
def test_edit_refused(name: str, before: str | None, op: str, specs: list[str], address: str | None,
                      error: str, cdir: Path, write_guest: WriteFile) -> None:
    path = cdir / "guests" / "web.toml"
    if before is not None:
        write_guest("web", before)
    with pytest.raises(ConfigError) as info:
        if op == "add":
            add_ports(cdir, "web", specs, address=address)
        else:
            remove_ports(cdir, "web", specs)
    assert str(info.value) == error.format(p=path)
    assert "\n" not in str(info.value)
    if before is None:
        assert not path.exists()
    else:
        assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


@needs_tomlkit
def test_add_creates_file_with_address(cdir: Path) -> None:
    path = cdir / "guests" / "db.toml"
    old = os.umask(0o077)
    try:
        lines = add_ports(cdir, "db", ["5432", "198.51.100.1:15432:5432"], address="192.168.122.40")
    finally:
        os.umask(old)
    assert lines == [f"created {path} with address 192.168.122.40", f"added '5432' to {path}",
                     f"added '198.51.100.1:15432:5432' to {path}", f"{path}: 2 forward(s) now"]
    assert path.read_text() == ('address = "192.168.122.40"\n'
                                'ports = ["5432", "198.51.100.1:15432:5432"]\n')
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o644, 0)
    assert load_guest(cdir, "db") is not None


@needs_tomlkit
def test_add_creates_dirs(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    cdir = tmp_path / "etc"
    add_ports(cdir, "db", ["5432"], address="192.168.122.40")
    assert stat.S_IMODE((cdir / "guests").stat().st_mode) == 0o755
    assert load_guest(cdir, "db") is not None


@needs_tomlkit
def test_add_with_same_address_to_existing(cdir: Path, write_guest: WriteFile) -> None:
    path = write_guest("web", 'address = "10.1.1.2"\nports = ["80"]\n')
    assert add_ports(cdir, "web", ["443"], address="10.1.1.2") == [
        f"added '443' to {path}", f"{path}: 2 forward(s) now"]


@needs_tomlkit
def test_keeps_owner_and_mode(cdir: Path, write_guest: WriteFile) -> None:
    path = write_guest("web", 'address = "10.1.1.2"\nports = ["80"]\n', mode=0o600)
    os.chown(path, 0, 5)
    inode = path.stat().st_ino
    add_ports(cdir, "web", ["443"])
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 5)
    assert st.st_ino != inode  # replaced by rename, not rewritten in place


@needs_tomlkit
def test_refuses_symlink(cdir: Path, tmp_path: Path) -> None:
    target = write_trusted(tmp_path / "elsewhere.toml", 'address = "10.1.1.2"\nports = ["80"]\n')
    (cdir / "guests" / "web.toml").symlink_to(target)
    with pytest.raises(ConfigError, match="web.toml: cannot read: Too many levels of symbolic links"):
        add_ports(cdir, "web", ["443"])
    assert target.read_text() == 'address = "10.1.1.2"\nports = ["80"]\n'


@needs_tomlkit
def test_bad_config_toml_is_named(cdir: Path, write_guest: WriteFile, write_config: WriteFile) -> None:
    write_guest("web", 'address = "10.1.1.2"\nports = ["80"]\n')
    write_config('backend = "pf"\n')
    with pytest.raises(ConfigError, match=r"config\.toml:1: backend: 'pf' is not one of"):
        add_ports(cdir, "web", ["443"])


@needs_tomlkit
def test_conflict_with_default_public_family(cdir: Path, write_guest: WriteFile) -> None:
    """A v6-only public for a v4-only guest is refused by the planner: the file stays."""
    before = 'address = "10.1.1.2"\nports = ["80"]\n'
    path = write_guest("web", before)
    with pytest.raises(ConfigError) as info:
        add_ports(cdir, "web", ["[2001:db8::1]:443:443"])
    assert str(info.value) == (f"{path}: ports: '[2001:db8::1]:443:443': IPv6 forward from 2001:db8::1 to a "
                               "guest that is IPv4-only (address = 10.1.1.2) (file left unchanged)")
    assert path.read_text() == before


@needs_tomlkit
def test_file_without_address(cdir: Path, write_guest: WriteFile) -> None:
    """Guests whose address is found from their MAC at start: ports are still checked, the address is not made up."""
    before = '# address from DHCP\nports = ["80"]\n'
    path = write_guest("web", before)
    try:
        load_guest(cdir, "web")
    except ConfigError:
        pytest.skip("this config.py still requires address")
    assert add_ports(cdir, "web", ["443"]) == [
        f"added '443' to {path}", f"{path}: 2 port spec(s) now; the address is found from the guest's MAC at start"]
    assert path.read_text() == '# address from DHCP\nports = ["80", "443"]\n'
    with pytest.raises(ConfigError, match=r"'tcp:443' is already in ports as '443'"):
        add_ports(cdir, "web", ["tcp:443"])
    assert remove_ports(cdir, "web", ["80"])[0] == f"removed '80' from {path}"


# ---------------------------------------------------------------- completion/virt-forward.bash
# run in a real bash with COMP_WORDS as readline would split them

SCRIPT = Path(__file__).resolve().parent.parent / "completion" / "virt-forward.bash"
COMMANDS = "hook check plan apply remove reconcile watch install uninstall status doctor add rm import".split()

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

_RUN = """
source "$0"
COMP_WORDS=("$@")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE="$*"
COMP_POINT=${#COMP_LINE}
_virt_forward virt-forward "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\\n' "${COMPREPLY[@]}"
"""


def complete(*words: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> list[str]:
    """The candidates for the last word of `virt-forward WORDS...` ('' = completing a new word)."""
    run_env = {k: v for k, v in os.environ.items() if k != "VIRT_FORWARD_CONFIG_DIR"}
    run_env.update(env or {})
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", _RUN, str(SCRIPT), "virt-forward", *words],
                         capture_output=True, text=True, env=run_env, cwd=cwd, check=True)
    assert out.stderr == ""
    return [line for line in out.stdout.split("\n") if line]


@pytest.fixture
def comp_dir(tmp_path: Path) -> Path:
    guests = tmp_path / "conf" / "guests"
    guests.mkdir(parents=True)
    (guests / "web.toml").write_text(
        '# shop\naddress = "10.1.1.2"\nports = [\n  "80/tcp",  # http\n  "2222:22",\n'
        '  "[2001:db8::1]:443:443", "tcp:25"\n]\nallow = ["203.0.113.0/24"]\n')
    (guests / "db.toml").write_text('address = "10.1.1.3"\nports = "5432"\n')
    (guests / "my vm.toml").write_text('address = "10.1.1.4"\nports = []\n')
    (guests / ".hidden.toml").write_text("")
    (guests / "notes.txt").write_text("")
    return tmp_path / "conf"


@needs_bash
def test_registered() -> None:
    out = subprocess.run(["bash", "--norc", "-c", 'source "$0"; complete -p virt-forward', str(SCRIPT)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "complete -F _virt_forward virt-forward"


@needs_bash
def test_commands_and_global_options() -> None:
    assert complete("") == COMMANDS
    assert complete("re") == ["remove", "reconcile"]
    assert complete("--") == ["--config-dir", "--state-dir", "--debug", "--help"]
    assert complete("--debug", "u") == ["uninstall"]


@needs_bash
def test_guest_names_from_config_dir(comp_dir: Path) -> None:
    for command in ("plan", "apply", "remove", "status", "add", "rm"):
        assert complete("--config-dir", str(comp_dir), command, "") == ["db", "my\\ vm", "web"], command
    assert complete("--config-dir", str(comp_dir), "plan", "w") == ["web"]
    assert complete("--config-dir", "=", str(comp_dir), "plan", "") == ["db", "my\\ vm", "web"]  # --config-dir=DIR
    assert complete("--config-dir", str(comp_dir), "plan", "web", "") == []  # one guest only
    assert complete("plan", "", env={"VIRT_FORWARD_CONFIG_DIR": str(comp_dir)}) == ["db", "my\\ vm", "web"]
    assert complete("--config-dir", str(comp_dir), "--debug", "reconcile", "--running", "d") == ["db"]
    assert complete("--config-dir", str(comp_dir / "nowhere"), "plan", "") == []


@needs_bash
def test_command_options(comp_dir: Path) -> None:
    assert complete("status", "--") == ["--help", "--json", "--format"]
    assert complete("install", "--") == ["--help", "--dry-run", "--root"]
    assert complete("import", "--") == ["--help", "--dry-run", "--force"]
    assert complete("add", "web", "--a") == ["--address"]
    assert complete("add", "--address", "") == []
    assert complete("watch", "--interval", "") == []


@needs_bash
def test_rm_completes_the_guests_ports(comp_dir: Path) -> None:
    base = ("--config-dir", str(comp_dir), "rm", "web")
    assert complete(*base, "") == ["80/tcp", "2222:22", "[2001:db8::1]:443:443", "tcp:25"]
    # ':' is a word break: readline replaces only what follows the last ':'
    assert complete(*base, "2222", ":", "") == ["22"]
    assert complete(*base, "2222", ":", "2") == ["22"]
    assert complete(*base, "tcp", ":", "") == ["25"]
    assert complete(*base, "[2001", ":", "db8", ":", ":", "1]", ":", "") == ["443:443"]
    assert complete("--config-dir", str(comp_dir), "rm", "db", "") == ["5432"]


@needs_bash
def test_dirs_and_files(tmp_path: Path) -> None:
    (tmp_path / "networks").mkdir()
    (tmp_path / "hooks.json").write_text("{}")
    assert complete("--config-dir", "", cwd=tmp_path) == ["networks"]
    assert sorted(complete("import", "", cwd=tmp_path)) == ["hooks.json", "networks"]
    assert complete("import", "h", cwd=tmp_path) == ["hooks.json"]


@needs_bash
def test_status_formats() -> None:
    assert complete("status", "--f") == ["--format"]
    assert complete("status", "--format", "") == ["text", "json", "prometheus"]
    assert complete("status", "--format", "p") == ["prometheus"]


def test_completion_knows_every_command_of_the_cli_table() -> None:
    """The CLI's table is the one list of sub-commands; completion offers each (network-hook
    is libvirt's, not a person's)."""
    from virt_forward.cli import COMMANDS as TABLE
    assert sorted(c.name for c in TABLE if c.name != "network-hook") == sorted(COMMANDS)
