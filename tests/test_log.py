"""Events in the journal (log.py): one line per apply, remove, refusal and repair, with fields.

A datagram socket stands in for journald's (/run/systemd/journal/socket, moved with
VIRT_FORWARD_JOURNAL_SOCKET) and receives what the installed hook sends, full and fast path.
"""

from __future__ import annotations

import io
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from netns_util import World, lab_world
from vflab.lab import PUBLIC4, domain_xml
from virt_forward import fastpath, log


def decode(datagram: bytes) -> list[tuple[str, str]]:
    """journald's native protocol, read back (the reverse of log.encode)."""
    out, i = [], 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            out.append((key.decode(), value.decode("utf-8", "surrogateescape")))
            i = nl + 1
        else:
            size = int.from_bytes(datagram[nl + 1:nl + 9], "little")
            out.append((line.decode(), datagram[nl + 9:nl + 9 + size].decode("utf-8", "surrogateescape")))
            assert datagram[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
    return out


def test_encoding_is_journalds_native_protocol() -> None:
    pairs = [("MESSAGE", "web: 1 forward(s) live"), ("VIRT_FORWARD_GUEST", "we\nb\udcff")]
    raw = log.encode(pairs)
    assert raw.startswith(b"MESSAGE=web: 1 forward(s) live\nVIRT_FORWARD_GUEST\n" + (5).to_bytes(8, "little") + b"we\nb\xff\n")
    assert decode(raw) == pairs


def test_fields_of_an_event() -> None:
    got = dict(log.fields(6, "web: removed", {"event": "remove", "guest": "web", "forwards": ["a", "b"]}))
    assert got["SYSLOG_IDENTIFIER"] == "virt-forward" and got["PRIORITY"] == "6"
    assert got["VIRT_FORWARD_EVENT"] == "remove" and got["VIRT_FORWARD_GUEST"] == "web"
    repeated = [v for k, v in log.fields(6, "m", {"forwards": ["a", "b"]}) if k == "VIRT_FORWARD_FORWARD"]
    assert repeated == ["a", "b"]


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()


def _events(sock: socket.socket) -> list[dict[str, list[str]]]:
    """Every datagram waiting, each as {field: [values]}."""
    got = []
    sock.settimeout(0.5)
    try:
        while True:
            entry: dict[str, list[str]] = {}
            for key, value in decode(sock.recv(1 << 16)):
                entry.setdefault(key, []).append(value)
            got.append(entry)
    except TimeoutError:
        return got


def _hook(w: World, env: dict[str, str], domain: str, op: str) -> None:
    sub = "end" if op in ("stopped", "release") else "begin"
    r = w.lab.sh(w.lab.host, str(w.hook_path), domain, op, sub, "-", stdin=domain_xml(domain), env=env, check=False)
    assert r.returncode == 0 and r.stdout == "", r


@pytest.mark.netns
def test_the_hook_tells_the_journal_what_it_did(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    with lab_world(backend="nftables") as w:
        env = {**w.env(), "VIRT_FORWARD_JOURNAL_SOCKET": path}
        w.write("config.toml", f'public = ["{PUBLIC4}"]\n')
        w.guest_file("guest1", 'address = "192.168.122.10"\nports = ["8080:80", "53/udp"]\n')
        w.guest_file("guest2", 'address = "192.168.122.11"\nports = ["8080:80"]\n')  # guest1's port
        time.sleep(fastpath.RACY_SECONDS + 0.1)
        want = [f"{PUBLIC4}:8080/tcp -> 192.168.122.10:80", f"{PUBLIC4}:53/udp -> 192.168.122.10:53"]
        for round_ in ("full path", "fast path"):
            _hook(w, env, "guest1", "start")
            _hook(w, env, "guest2", "start")
            _hook(w, env, "guest1", "stopped")
            events = [e for e in _events(sock) if "VIRT_FORWARD_EVENT" in e]
            assert [(e["VIRT_FORWARD_EVENT"], e["VIRT_FORWARD_GUEST"]) for e in events] == [
                (["apply"], ["guest1"]), (["refused"], ["guest2"]), (["remove"], ["guest1"])], (round_, events)
            apply, refused, remove = events
            assert sorted(apply["VIRT_FORWARD_FORWARD"]) == sorted(want) == sorted(remove["VIRT_FORWARD_FORWARD"])
            assert all(e["SYSLOG_IDENTIFIER"] == ["virt-forward"] for e in events)
            assert "guest1" in refused["MESSAGE"][0] and refused["PRIORITY"] == ["3"], refused
            assert apply["MESSAGE"][0].startswith("guest1: 2 forward(s) live"), apply


def test_a_log_line_never_raises_with_stderr_a_closed_pipe(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    # what happened: the hook's catch-all logged to a closed pipe and exited 120 (libvirt
    # kills a guest whose `reconnect` hook fails)
    monkeypatch.setenv("VIRT_FORWARD_JOURNAL_SOCKET", str(tmp_path / "no-journal"))
    r, w = os.pipe()
    os.close(r)
    broken = io.TextIOWrapper(io.BufferedWriter(io.FileIO(w, "w")))
    monkeypatch.setattr(sys, "stderr", broken)
    monkeypatch.setattr(log, "to_stderr", True)
    try:
        for _ in range(3):
            log.error("web: reconnect: hook failed " + "x" * 10_000, event="error", guest="web")
            log.info("web: 1 forward(s) live")
        broken.flush()  # what the interpreter does at exit: the failed bytes are not pending any more
    finally:
        broken.close()


def test_no_stderr_means_no_line_rather_than_stdout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # fd 2 closed at start: sys.stderr is None, and print(file=None) writes to stdout, which
    # libvirt reads as replacement XML at migrate/restore
    monkeypatch.setenv("VIRT_FORWARD_JOURNAL_SOCKET", str(tmp_path / "no-journal"))
    monkeypatch.setattr(sys, "stderr", None)
    monkeypatch.setattr(log, "to_stderr", True)
    log.error("web: start: something")
    assert capsys.readouterr().out == ""


def test_a_journal_that_went_away_is_not_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "journal.socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("VIRT_FORWARD_JOURNAL_SOCKET", str(path))
    monkeypatch.setattr(log, "_journal", None)
    monkeypatch.setattr(log, "to_stderr", True)
    log.info("first")  # connected
    sock.close()  # journald restarted: the socket is gone
    log.info("second")
    assert capsys.readouterr().err.splitlines() == ["virt-forward: first", "virt-forward: second"]
