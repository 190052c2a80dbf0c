"""runner: an `nft -f` is taken as done at its kernel commit, not at nft's exit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from virt_forward.runner import Commits, newgen_pids
from netns_util import empty_netns, need_root_and_tools

REPO = Path(__file__).resolve().parents[1]


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return size.to_bytes(2, "little") + kind.to_bytes(2, "little") + payload + b"\0" * (-size % 4)


def _message(kind: int, attrs: bytes) -> bytes:
    body = bytes([0, 0]) + (0).to_bytes(2, "big") + attrs  # nfgenmsg: family, version, res_id
    return (16 + len(body)).to_bytes(4, "little") + kind.to_bytes(2, "little") + b"\0" * 10 + body


def newgen(pid: int, gen: int = 7, comm: bytes = b"nft") -> bytes:
    return _message(Commits._NEWGEN, _attr(1, gen.to_bytes(4, "big")) + _attr(2, pid.to_bytes(4, "big"))
                    + _attr(3, comm + b"\0"))


def test_newgen_pids_finds_the_committing_processes() -> None:
    delsetelem = _message((10 << 8) | 14, _attr(1, b"virt_forward\0"))
    assert newgen_pids(newgen(4242), b"nft") == [4242]
    assert newgen_pids(delsetelem + newgen(17) + newgen(99), b"nft") == [17, 99]
    assert newgen_pids(delsetelem, b"nft") == []
    # another program's commit is not nft's, whatever its pid
    assert newgen_pids(newgen(17, comm=b"iptables-nft-re") + newgen(18), b"nft") == [18]


@pytest.mark.parametrize("data", [b"", b"\x00" * 8, newgen(5)[:-6], b"\x14\x00\x00\x00" + b"\xff" * 30,
                                  b"\x00\x00\x00\x00" * 8])
def test_newgen_pids_survives_truncated_or_odd_data(data: bytes) -> None:
    assert newgen_pids(data, b"nft") == []


# Runs inside the namespace: what the runner returned, whether the elements were already gone
# then, and whether the process was taken at its commit (left to reap) or at its exit.
PROBE = textwrap.dedent("""
    import json, sys
    from virt_forward import runner
    T = "inet vftest"
    keys = ", ".join(f"203.0.113.9 . tcp . {2000 + i}" for i in range(10))
    def nft(batch):
        before = set(runner._unreaped)
        got = runner.spawn(["nft", "-f", "-"], batch.encode(), timeout=10)
        left = sorted(set(runner._unreaped) - before)  # this call's nft, when taken at its commit
        listed = runner.spawn(["nft", "list", "set", "inet", "vftest", "s"])[1].decode()
        return {"status": got[0], "stderr": got[2].decode(), "taken_at_commit": left, "listed": listed}
    out = {}
    out["create"] = nft(f"add table {T}\\nadd set {T} s {{ type ipv4_addr . inet_proto . inet_service ; counter ; }}\\n")
    out["add"] = nft(f"add element {T} s {{ {keys} }}\\n")
    out["delete"] = nft(f"delete element {T} s {{ {keys} }}\\n")
    out["refused"] = nft(f"delete element {T} nosuch {{ {keys} }}\\n")
    out["nothing_to_commit"] = nft(f"add table {T}\\n")
    runner.spawn(["true"])
    # until the nft processes taken at their commit have exited (not reaped: WNOWAIT), then
    # one more call, which must reap them
    import os, time
    deadline = time.monotonic() + 30
    while any(os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None for pid in runner._unreaped):
        assert time.monotonic() < deadline, f"nft {runner._unreaped} still running after 30 s"
        time.sleep(0.01)
    runner.spawn(["true"])
    out["unreaped_at_the_end"] = runner._unreaped
    out["own_pids"] = runner._own_pids()
    print(json.dumps(out))
""")


@pytest.fixture
def netns() -> Iterator[str]:
    need_root_and_tools()
    with empty_netns("vfrun-") as name:
        yield name


def test_an_nft_transaction_is_done_at_its_commit(netns: str) -> None:
    got = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", PROBE], capture_output=True,
                         text=True, cwd=REPO, timeout=60, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                               "PYTHONPATH": str(REPO / "src")})
    assert got.returncode == 0, got.stderr
    out = json.loads(got.stdout)
    for step in ("create", "add", "delete"):
        assert out[step]["status"] == 0, (step, out[step])
    # nft exits within a millisecond of an add (the runner may see its exit or its commit first);
    # after a delete its exit waits an RCU grace period, which the runner does not wait for
    assert out["delete"]["taken_at_commit"], f"the runner waited for nft's exit: {out['delete']}"
    # when the runner returns, the kernel holds the change already
    assert "203.0.113.9 . tcp . 2000" in out["add"]["listed"]
    assert "203.0.113.9" not in out["delete"]["listed"]
    # a refused batch commits nothing: its status and message come from its exit
    assert out["refused"]["status"] == 1 and "No such file or directory" in out["refused"]["stderr"]
    assert not out["refused"]["taken_at_commit"]
    # a batch the kernel has nothing to commit for: no notification, the exit is waited for
    assert out["nothing_to_commit"]["status"] == 0
    # the processes taken at their commit are reaped by a later call
    assert out["unreaped_at_the_end"] == []
    assert out["own_pids"] is True


def test_in_a_pid_namespace_nft_is_waited_for_to_its_exit(netns: str) -> None:
    """NEWGEN names the initial namespace's pid: in a container's, a pid we gave could be
    another process's there, so nothing is taken at a commit."""
    import shutil
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    got = subprocess.run(["ip", "netns", "exec", netns, "unshare", "--pid", "--fork", "--mount-proc",
                          sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO / "src")})
    assert got.returncode == 0, got.stderr
    out = json.loads(got.stdout)
    assert out["delete"]["status"] == 0 and "203.0.113.9" not in out["delete"]["listed"]
    assert out["own_pids"] is False
    assert not any(out[step]["taken_at_commit"] for step in ("create", "add", "delete"))
    assert out["refused"]["status"] == 1
