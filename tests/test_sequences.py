"""The exact commands the hook, apply, remove and reconcile run, without root and without a kernel.

A fake executor (runner.use) records every command with its input and answers listings as a
host would: libvirt's nftables backend present or not, an iptables FORWARD chain with
libvirt 9.0's rules or none.  The config is trusted for this test's own uid
(config.TRUSTED_UIDS).  What the kernel then does with these batches is the namespace tests'
business; here it is the order, the count and the content of the transactions.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from virt_forward import config, engine, fastpath, hook, runner
from virt_forward.consts import GUARD_SPEC, NFT_GUARD_RULE
from virt_forward.reconcile import reconcile

pytestmark = pytest.mark.noroot

LIBVIRT_FILTER = """*filter
:FORWARD ACCEPT [0:0]
:LIBVIRT_FWX - [0:0]
-A FORWARD -j LIBVIRT_FWX
COMMIT
"""
# libvirt >= 10.4's nftables backend: the chain our guard goes on top of
LIBVIRT_NFT_CHAINS = {"nftables": [{"chain": {"family": "ip", "table": "libvirt_network", "name": "forward",
                                              "handle": 1, "type": "filter", "hook": "forward", "prio": 0}}]}
LIBVIRT_NFT_FORWARD = {"nftables": [
    {"chain": {"family": "ip", "table": "libvirt_network", "name": "forward", "handle": 1}},
    {"rule": {"family": "ip", "table": "libvirt_network", "chain": "forward", "handle": 5,
              "expr": [{"jump": {"target": "guest_input"}}]}}]}
# What nft.py must send, written out (not rendered by nft.py: a change there shows here as a
# diff to review).  The fixed part of our table with hairpin on: every first apply and every
# rebuild sends it before the elements; its last line is the skeleton's mark (a hash of the
# lines above it), which the fast path checks for.
SKELETON = (
    "add table inet virt_forward\n"
    "add map inet virt_forward dnat4 { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service ; counter ; }\n"
    "add map inet virt_forward dnat4_any { type inet_proto . inet_service : ipv4_addr . inet_service ; counter ; }\n"
    "add map inet virt_forward acl4 { type ipv4_addr . inet_proto . inet_service : verdict ; }\n"
    "add map inet virt_forward acl4_any { type inet_proto . inet_service : verdict ; }\n"
    "add set inet virt_forward traffic4 { type ipv4_addr . inet_proto . inet_service ; counter ; }\n"
    "add set inet virt_forward traffic4_any { type inet_proto . inet_service ; counter ; }\n"
    "add map inet virt_forward dnat6 { type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service ; counter ; }\n"
    "add map inet virt_forward dnat6_any { type inet_proto . inet_service : ipv6_addr . inet_service ; counter ; }\n"
    "add map inet virt_forward acl6 { type ipv6_addr . inet_proto . inet_service : verdict ; }\n"
    "add map inet virt_forward acl6_any { type inet_proto . inet_service : verdict ; }\n"
    "add set inet virt_forward traffic6 { type ipv6_addr . inet_proto . inet_service ; counter ; }\n"
    "add set inet virt_forward traffic6_any { type inet_proto . inet_service ; counter ; }\n"
    "add chain inet virt_forward nat_prerouting { type nat hook prerouting priority dstnat ; policy accept ; }\n"
    "add chain inet virt_forward nat_output { type nat hook output priority -100 ; policy accept ; }\n"
    "add chain inet virt_forward nat_postrouting { type nat hook postrouting priority srcnat ; policy accept ; }\n"
    "add chain inet virt_forward mark_forward { type filter hook forward priority filter - 5 ; policy accept ; }\n"
    "add chain inet virt_forward lookup\n"
    "flush chain inet virt_forward nat_prerouting\n"
    "flush chain inet virt_forward nat_output\n"
    "flush chain inet virt_forward nat_postrouting\n"
    "flush chain inet virt_forward mark_forward\n"
    "flush chain inet virt_forward lookup\n"
    "add rule inet virt_forward nat_prerouting fib daddr type local jump lookup\n"
    "add rule inet virt_forward nat_output ip daddr 127.0.0.0/8 return\n"
    "add rule inet virt_forward nat_output ip6 daddr ::1 return\n"
    "add rule inet virt_forward nat_output fib daddr type local jump lookup\n"
    "add rule inet virt_forward mark_forward ct state new ct mark & 0x10000000 == 0x10000000 fib daddr . iif oif exists ct mark set ct mark | 0x20000000\n"
    "add rule inet virt_forward nat_postrouting ct mark & 0x20000000 == 0x20000000 masquerade\n"
    "add rule inet virt_forward mark_forward meta l4proto tcp ct mark & 0x10000000 == 0x10000000 ct original ip daddr . meta l4proto . ct original proto-dst @traffic4\n"
    "add rule inet virt_forward mark_forward meta nfproto ipv4 meta l4proto tcp ct mark & 0x10000000 == 0x10000000 meta l4proto . ct original proto-dst @traffic4_any\n"
    "add rule inet virt_forward mark_forward meta l4proto udp ct mark & 0x10000000 == 0x10000000 ct original ip daddr . meta l4proto . ct original proto-dst @traffic4\n"
    "add rule inet virt_forward mark_forward meta nfproto ipv4 meta l4proto udp ct mark & 0x10000000 == 0x10000000 meta l4proto . ct original proto-dst @traffic4_any\n"
    "add rule inet virt_forward mark_forward meta l4proto tcp ct mark & 0x10000000 == 0x10000000 ct original ip6 daddr . meta l4proto . ct original proto-dst @traffic6\n"
    "add rule inet virt_forward mark_forward meta nfproto ipv6 meta l4proto tcp ct mark & 0x10000000 == 0x10000000 meta l4proto . ct original proto-dst @traffic6_any\n"
    "add rule inet virt_forward mark_forward meta l4proto udp ct mark & 0x10000000 == 0x10000000 ct original ip6 daddr . meta l4proto . ct original proto-dst @traffic6\n"
    "add rule inet virt_forward mark_forward meta nfproto ipv6 meta l4proto udp ct mark & 0x10000000 == 0x10000000 meta l4proto . ct original proto-dst @traffic6_any\n"
    "add rule inet virt_forward lookup ip daddr . meta l4proto . th dport vmap @acl4\n"
    "add rule inet virt_forward lookup meta nfproto ipv4 meta l4proto . th dport vmap @acl4_any\n"
    "add rule inet virt_forward lookup ip6 daddr . meta l4proto . th dport vmap @acl6\n"
    "add rule inet virt_forward lookup meta nfproto ipv6 meta l4proto . th dport vmap @acl6_any\n"
    "add rule inet virt_forward lookup ct mark set ct mark | 0x10000000\n"
    "add rule inet virt_forward lookup dnat ip to ip daddr . meta l4proto . th dport map @dnat4\n"
    "add rule inet virt_forward lookup meta nfproto ipv4 dnat ip to meta l4proto . th dport map @dnat4_any\n"
    "add rule inet virt_forward lookup dnat ip6 to ip6 daddr . meta l4proto . th dport map @dnat6\n"
    "add rule inet virt_forward lookup meta nfproto ipv6 dnat ip6 to meta l4proto . th dport map @dnat6_any\n"
    "add rule inet virt_forward lookup ct mark set ct mark & 0xefffffff\n"
    "add chain inet virt_forward skel_7332e1b9\n"
)
MARK = "skel_7332e1b9"
WEB_ELEMENTS = ("add element inet virt_forward dnat4_any { tcp . 2222 : 192.168.122.10 . 22, "
                "tcp . 8080 : 192.168.122.10 . 80 }\n"
                "add element inet virt_forward traffic4_any { tcp . 2222, tcp . 8080 }\n")
DB_AND_WEB_ELEMENTS = ("add element inet virt_forward dnat4_any { tcp . 5432 : 192.168.122.11 . 5432, "
                       "tcp . 2222 : 192.168.122.10 . 22, tcp . 8080 : 192.168.122.10 . 80 }\n"
                       "add element inet virt_forward traffic4_any { tcp . 5432, tcp . 2222, tcp . 8080 }\n")
REBUILD_HEAD = "add table inet virt_forward\ndelete table inet virt_forward\n"  # a rebuild replaces the table
XML = ("<domain type='kvm' id='1'><name>web</name><uuid>6f1c5ce0-6b8a-4a3e-9b36-000000000001</uuid>"
       "<devices><interface type='network'><mac address='52:54:00:00:00:01'/>"
       "<source network='default' bridge='virbr0'/><target dev='vnet0'/></interface></devices></domain>")


@dataclass
class Host:
    """What the fake host answers, and every command it was asked to run."""

    libvirt_nft: bool = False
    iptables_filter: str = ""  # iptables-save -t filter; "" = no filter table
    tools: frozenset[str] = frozenset({"nft", "iptables-save", "iptables-restore", "ip6tables-save",
                                       "ip6tables-restore", "conntrack", "sh"})
    calls: list[tuple[str, str]] = field(default_factory=list)  # (argv joined, stdin)

    def which(self, name: str) -> str | None:
        return f"/usr/sbin/{name}" if name in self.tools else None

    def spawn_all(self, argvs: list[list[str]], stdins: list[bytes | None],
                  timeout: float) -> list[tuple[int, bytes, bytes] | None]:
        return [self._one(argv, data) for argv, data in zip(argvs, stdins)]

    def _one(self, argv: list[str], data: bytes | None) -> tuple[int, bytes, bytes] | None:
        if argv[0] not in self.tools:
            return None
        self.calls.append((" ".join(argv), (data or b"").decode()))
        line = " ".join(argv)
        if line == "nft -j list chains":
            return 0, json.dumps(LIBVIRT_NFT_CHAINS if self.libvirt_nft else {"nftables": []}).encode(), b""
        if line == "nft list chains":
            text = "table ip libvirt_network {\n\tchain forward {\n\t}\n}\n" if self.libvirt_nft else ""
            return 0, text.encode(), b""
        if line == "nft -a -j list chain ip libvirt_network forward" and self.libvirt_nft:
            return 0, json.dumps(LIBVIRT_NFT_FORWARD).encode(), b""
        if line == "nft -a list chain ip libvirt_network forward" and self.libvirt_nft:
            return 0, b"table ip libvirt_network {\n\tchain forward { # handle 1\n\t\tjump guest_input # handle 5\n\t}\n}\n", b""
        if argv[0] == "nft" and "list" in argv:  # any other listing (options vary): no such table or chain
            return 1, b"", b"Error: No such file or directory\n"
        if argv[0] == "iptables-restore" and self.iptables_filter:
            self._restore((data or b"").decode())
        if argv[0] in ("iptables-save", "ip6tables-save") and argv[-1] == "filter":
            return (0, self.iptables_filter.encode(), b"") if self.iptables_filter else (1, b"", b"no table\n")
        return 0, b"", b""

    def _restore(self, text: str) -> None:
        """iptables-restore --noflush into the filter table: our guard's -I and -D lines."""
        rules = [ln for ln in self.iptables_filter.splitlines() if ln.startswith("-A FORWARD ")]
        section = ""
        for line in text.splitlines():
            if line.startswith("*"):
                section = line
            elif section == "*filter" and line.startswith("-I FORWARD 1 "):
                rules.insert(0, "-A FORWARD " + line[len("-I FORWARD 1 "):])
            elif section == "*filter" and line.startswith("-D FORWARD "):
                rules.remove("-A FORWARD " + line[len("-D FORWARD "):])
        head = [ln for ln in self.iptables_filter.splitlines() if not ln.startswith("-A FORWARD ") and ln != "COMMIT"]
        self.iptables_filter = "\n".join(head + rules + ["COMMIT"]) + "\n"

    def spawn_detached(self, argv: list[str]) -> bool:
        self.calls.append((" ".join(argv), ""))
        return True

    def commands(self) -> list[str]:
        return [c for c, _ in self.calls]

    def inputs(self, prefix: str) -> list[str]:
        return [data for c, data in self.calls if c.startswith(prefix)]


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[engine.Context, Host]]:
    monkeypatch.setattr(config, "TRUSTED_UIDS", frozenset({0, os.getuid()}))
    monkeypatch.setenv("VIRT_FORWARD_JOURNAL_SOCKET", str(tmp_path / "no-journal"))
    os.chmod(tmp_path, 0o755)
    cdir = tmp_path / "etc"
    (cdir / "guests").mkdir(parents=True, mode=0o755)
    for name, text in (("web", 'address = "192.168.122.10"\nports = ["8080:80", "2222:22"]\n'),
                       ("db", 'address = "192.168.122.11"\nports = ["5432"]\n')):
        (cdir / "guests" / f"{name}.toml").write_text(text)
        os.chmod(cdir / "guests" / f"{name}.toml", 0o644)
    host = Host()
    runner.use(host)
    try:
        yield engine.Context(cdir, tmp_path / "run"), host
    finally:
        runner.use(None)


def test_apply_is_one_nft_transaction_then_the_iptables_guard_where_libvirt_rejects(
        world: tuple[engine.Context, Host]) -> None:
    ctx, host = world
    host.iptables_filter = LIBVIRT_FILTER
    engine.apply(ctx, "web")
    assert host.commands() == ["nft -j list chains", "nft -f -", "iptables-save -t filter",
                               "iptables-restore -w 5 --noflush"]
    assert host.inputs("nft -f") == [SKELETON + WEB_ELEMENTS]
    assert host.inputs("iptables-restore") == [f"*filter\n-I FORWARD 1 {GUARD_SPEC}\nCOMMIT\n"]


def test_the_guard_in_libvirts_nft_chain_goes_into_the_same_transaction(world: tuple[engine.Context, Host]) -> None:
    ctx, host = world
    host.libvirt_nft = True
    engine.apply(ctx, "web")
    assert host.commands() == ["nft -j list chains", "nft -a -j list chain ip libvirt_network forward", "nft -f -",
                               "iptables-save -t filter"]
    assert host.inputs("nft -f") == [
        SKELETON + WEB_ELEMENTS + f"insert rule ip libvirt_network forward {NFT_GUARD_RULE}\n"]


def test_applying_twice_replaces_the_guests_elements_in_one_transaction(world: tuple[engine.Context, Host]) -> None:
    ctx, host = world
    engine.apply(ctx, "web")
    host.calls.clear()
    engine.apply(ctx, "web")
    assert host.commands().count("nft -f -") == 1
    # the same elements again: `add element` of an element that is there changes nothing, and
    # the skeleton's flushes and rules make the chains exactly what they were
    assert host.inputs("nft -f") == [SKELETON + WEB_ELEMENTS]


def test_the_last_removal_deletes_the_table_and_forgets_the_flows(world: tuple[engine.Context, Host]) -> None:
    ctx, host = world
    host.iptables_filter = LIBVIRT_FILTER
    engine.apply(ctx, "web")
    host.calls.clear()
    engine.remove(ctx, "web")
    cmds = host.commands()
    assert cmds[:4] == ["nft -j list chains", "nft -f -", "iptables-save -t filter", "iptables-restore -w 5 --noflush"], cmds
    assert host.inputs("nft -f") == ["add table inet virt_forward\ndelete table inet virt_forward\n"]
    assert host.inputs("iptables-restore")[0].startswith("*filter\n-D FORWARD ")  # our guard, by its text
    conntrack = [c for c in cmds if "conntrack" in c]
    assert len(conntrack) == 1 and "--reply-src 192.168.122.10" in conntrack[0]


def test_removing_one_of_two_guests_touches_only_its_elements(world: tuple[engine.Context, Host]) -> None:
    ctx, host = world
    engine.apply(ctx, "web")
    engine.apply(ctx, "db")
    host.calls.clear()
    engine.remove(ctx, "web")
    [batch] = host.inputs("nft -f")
    assert "delete table" not in batch and "192.168.122.11" not in batch and "192.168.122.10" in batch


def test_iptables_backend_one_restore_per_family_with_the_guard(world: tuple[engine.Context, Host]) -> None:
    ctx, host = world
    (ctx.config_dir / "config.toml").write_text('backend = "iptables"\n')
    os.chmod(ctx.config_dir / "config.toml", 0o644)
    host.iptables_filter = LIBVIRT_FILTER
    engine.apply(ctx, "web")
    # a v4-only guest: IPv6's tables are neither read nor written; nothing of nft
    assert host.commands() == ["iptables-save -t nat", "iptables-save -t mangle", "iptables-save -t filter",
                               "iptables-restore -w 5 --noflush"]
    [batch] = host.inputs("iptables-restore")
    assert batch.count("COMMIT") == 3 and f"-I FORWARD 1 {GUARD_SPEC}" in batch
    assert "-j DNAT --to-destination 192.168.122.10:80" in batch


def test_the_hook_takes_the_full_path_once_then_the_fast_path(world: tuple[engine.Context, Host],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, host = world
    # files written a moment ago are "racily clean" (their change may not show in their times
    # yet) and get no fast file; a host's files are older than that window
    monkeypatch.setattr(fastpath, "RACY_SECONDS", 0.0)

    def start() -> int:
        return hook.qemu_main(["web", "start", "begin", "-"], str(ctx.config_dir), str(ctx.state_dir),
                              stdin=io.BytesIO(XML.encode()))

    def stop() -> int:
        return hook.qemu_main(["web", "stopped", "end", "-"], str(ctx.config_dir), str(ctx.state_dir),
                              stdin=io.BytesIO(b""))

    assert start() == 0
    full = host.commands()
    assert full == ["nft -j list chains", "nft -f -", "iptables-save -t filter"]
    assert stop() == 0
    host.calls.clear()
    assert start() == 0
    # the fast path: one round of processes side by side: the transaction holding the guest's
    # elements (with the table's skeleton: no other guest has any, so the last stop took the
    # table away), nft's chains and the guest's families' FORWARD chains (text, no JSON)
    assert host.commands() == ["nft -f -", "nft list chains", "iptables-save -t filter"], full
    [batch] = host.inputs("nft -f")
    assert batch == SKELETON + WEB_ELEMENTS, batch


def test_a_fast_start_beside_other_guests_is_one_round(world: tuple[engine.Context, Host],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, host = world
    monkeypatch.setattr(fastpath, "RACY_SECONDS", 0.0)
    host.iptables_filter = LIBVIRT_FILTER
    engine.apply(ctx, "db")  # another guest of ours runs: our table and the guard are there

    def hook_call(op: str, sub: str) -> int:
        return hook.qemu_main(["web", op, sub, "-"], str(ctx.config_dir), str(ctx.state_dir),
                              stdin=io.BytesIO(XML.encode()))

    assert hook_call("start", "begin") == 0 and hook_call("stopped", "end") == 0  # the fast file
    host.calls.clear()
    assert hook_call("start", "begin") == 0
    # the elements behind a check that the table holds this skeleton's mark (an empty chain:
    # flushing it deletes nothing), side by side with the reads; the guard is on top: no more
    assert host.commands() == ["nft -f -", "nft list chains", "iptables-save -t filter"]
    [batch] = host.inputs("nft -f")
    assert batch == f"flush chain inet virt_forward {MARK}\n" + WEB_ELEMENTS, batch
    assert "add table" not in batch and "insert rule" not in batch
    # the guard gone (libvirt re-made its rules): a second round puts it back, the elements stay
    host.iptables_filter = LIBVIRT_FILTER
    assert hook_call("stopped", "end") == 0
    host.calls.clear()
    assert hook_call("start", "begin") == 0
    assert host.commands() == ["nft -f -", "nft list chains", "iptables-save -t filter",
                               "iptables-restore -w 5 --noflush"]
    assert host.inputs("iptables-restore") == [f"*filter\n-I FORWARD 1 {GUARD_SPEC}\nCOMMIT\n"]


def test_reconcile_rewrites_everything_in_one_transaction(world: tuple[engine.Context, Host]) -> None:
    ctx, host = world
    outcome = reconcile(ctx, running=["web", "db"])
    assert outcome.guests == 2
    assert host.inputs("nft -f") == [REBUILD_HEAD + SKELETON + DB_AND_WEB_ELEMENTS]
    host.calls.clear()
    reconcile(ctx, running=[])  # nothing runs: the table goes, the records too
    assert host.inputs("nft -f") == [REBUILD_HEAD]
    assert ctx.store.domains() == []


def test_plan_prints_the_transaction_apply_then_runs(world: tuple[engine.Context, Host],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`plan` is read-only and shows, byte for byte, the batch `apply` runs next."""
    from virt_forward.commands import plan
    ctx, host = world
    host.libvirt_nft = True
    engine.apply(ctx, "db")  # the table exists: the fixed part is not sent again
    host.calls.clear()
    plan(ctx, "web")
    assert "nft -f -" not in host.commands()  # read-only
    shown = capsys.readouterr().out.split("(one transaction, with the guards in nftables tables of others)\n")[1]
    shown = shown.split("EOF\n")[0]
    engine.apply(ctx, "web")
    assert host.inputs("nft -f") == [shown]


def test_reconcile_asks_libvirt_before_it_takes_the_lock(world: tuple[engine.Context, Host],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt holds a starting domain's lock while our hook runs, and the hook waits for our
    lock: asking libvirt while holding ours deadlocks a `virsh start` (seen on these machines)."""
    import fcntl

    from virt_forward import reconcile as reconcile_mod
    ctx, host = world
    held: list[bool] = []

    def libvirt_answers() -> dict[str, str]:
        ctx.store.root.mkdir(parents=True, exist_ok=True)
        with open(ctx.store.root / "lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return {"web": XML}

    monkeypatch.setattr(reconcile_mod, "running_from_libvirt", libvirt_answers)
    outcome = reconcile(ctx)
    assert held == [False] and outcome.source == "libvirt" and ctx.store.domains() == ["web"]
