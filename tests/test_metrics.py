"""metrics.py and the counters behind it: the Prometheus text, the nft/iptables counter
parsing, the carry-over of counters across a rebuild, the watcher's textfile.

Pure tests read tests/data/metrics/, captured from the lab (see its README.md); the
namespace tests make real connections and read what `status --format prometheus` and the
watcher report.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import ipaddress
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import write_trusted
from netns_util import Watcher, World, lab_world, wait_until
from vflab.lab import CLIENT4, PUBLIC4, PUBLIC6
from virt_forward import engine, iptables, metrics, nft
from virt_forward.plan import Family, Forward, GuestPlan

DATA = Path(__file__).parent / "data" / "metrics"
G1_4, G1_6, G2_4 = "192.168.122.10", "fd00:122::a", "192.168.122.11"


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# The forwards the fixtures were captured with (tests/data/metrics/README.md).
GUEST1 = GuestPlan("guest1", (
    Forward(4, "tcp", 80, ip(PUBLIC4), ip(G1_4), 80), Forward(4, "tcp", 2222, ip(PUBLIC4), ip(G1_4), 22),
    Forward(4, "udp", 8001, ip(PUBLIC4), ip(G1_4), 9001), Forward(6, "tcp", 80, ip(PUBLIC6), ip(G1_6), 80),
    Forward(6, "tcp", 2222, ip(PUBLIC6), ip(G1_6), 22), Forward(6, "udp", 8001, ip(PUBLIC6), ip(G1_6), 9001)))
GUEST2 = GuestPlan("guest2", (Forward(4, "tcp", 443, None, ip(G2_4), 443),))
# what the capture did: 3 TCP connections to PUBLIC4:80, 1 to [PUBLIC6]:80, 1 UDP flow to
# PUBLIC4:8001, 2 TCP connections to *:443
CAPTURED = {(PUBLIC4, "tcp", 80): 3, (PUBLIC4, "tcp", 2222): 0, (PUBLIC4, "udp", 8001): 1,
            (PUBLIC6, "tcp", 80): 1, (PUBLIC6, "tcp", 2222): 0, (PUBLIC6, "udp", 8001): 0, ("*", "tcp", 443): 2}


def listing() -> dict[str, object]:
    data: dict[str, object] = json.loads((DATA / "nft-listing.json").read_text())
    return data


def iptables_saves() -> dict[Family, str]:
    return {4: (DATA / "iptables-save-c-nat4.txt").read_text(), 6: (DATA / "iptables-save-c-nat6.txt").read_text()}


def golden(name: str, text: str, update: bool) -> None:
    """Compare with the golden file; under --update-golden write it and skip (a test that compares
    its own output with itself proves nothing)."""
    path = DATA / name
    if update:
        path.write_text(text)
        pytest.skip(f"--update-golden: wrote {path}: review the diff")
    assert path.exists(), f"{path} missing: run pytest --update-golden and review it"
    assert text == path.read_text(), f"{path} differs: run pytest --update-golden and review the diff"


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}}, through prometheus_client's own parser."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def connections(parsed: dict[str, dict[tuple[tuple[str, str], ...], float]],
                metric: str = "virt_forward_connections_total") -> dict[tuple[str, str, int], float]:
    """{(public, protocol, port): value} of virt_forward_connections_total (or `metric`)."""
    return {(dict(k)["public"], dict(k)["protocol"], int(dict(k)["port"])): v
            for k, v in parsed.get(metric, {}).items()}


def snapshot_of(live: metrics.Live, problems: tuple[str, ...] = (),
                repairs: metrics.Repairs = metrics.Repairs()) -> metrics.Snapshot:
    forwards = metrics.forward_counts("guest1", GUEST1.forwards, live) + metrics.forward_counts(
        "guest2", GUEST2.forwards, live)
    return metrics.Snapshot(forwards, problems, repairs)


# ---------------------------------------------------------------- the text format

@pytest.mark.parametrize("raw,escaped", [
    ("web", "web"),
    ('a"b', 'a\\"b'),
    ("back\\slash", "back\\\\slash"),
    ("new\nline", "new\\nline"),
    ("end\\", "end\\\\"),
    ("ünï cödé {}=,#", "ünï cödé {}=,#"),
    ("bad\udcffbyte", "bad\\\\xffbyte"),  # a byte that is not UTF-8, as argv gives it (surrogate)
])
def test_escape_label(raw: str, escaped: str) -> None:
    assert metrics.escape_label(raw) == escaped


@pytest.mark.parametrize("name", ["web", 'a"b', "back\\slash", "new\nline", "end\\", "\\n", '\\"', "ünï cödé {}=,#",
                                  "tab\there", "-h", "$(reboot)", " "])
def test_any_guest_name_reads_back_through_prometheus_client(name: str) -> None:
    snap = metrics.Snapshot(metrics.forward_counts(
        name, GUEST2.forwards, metrics.Live({"dnat4_any": {("tcp", "443"): (G2_4, "443")}},
                                            {"dnat4_any": {("tcp", "443"): 7}})), (), metrics.Repairs())
    parsed = parse(metrics.exposition(snap))
    [(labels, value)] = parsed["virt_forward_connections_total"].items()
    assert dict(labels)["guest"] == name and value == 7


def test_a_name_that_is_not_utf8_gives_valid_utf8() -> None:
    text = metrics.render([metrics.MetricFamily("m", "gauge", "h", (metrics.Sample((("guest", "x\udcffy"),), 1),))])
    text.encode("utf-8")  # strict: a lone surrogate would raise here
    [(labels, _)] = parse(text)["m"].items()
    assert dict(labels)["guest"] == "x\\xffy"


def test_help_and_values() -> None:
    assert metrics.escape_help("a\\b\nc \"q\"") == 'a\\\\b\\nc "q"'  # quotes stay as they are in HELP
    assert [metrics.format_value(v) for v in (0, 12, 1.5, 1733100000.25, float("nan"), float("inf"), -float("inf"))] \
        == ["0", "12", "1.5", "1733100000.25", "NaN", "+Inf", "-Inf"]
    text = metrics.render([metrics.MetricFamily("x_total", "counter", "line\none", (metrics.Sample((), 3),)),
                           metrics.MetricFamily("y", "gauge", "h", (metrics.Sample((("a", "1"), ("b", "2")), 0.5),))])
    assert text == ('# HELP x_total line\\none\n# TYPE x_total counter\nx_total 3\n'
                    '# HELP y h\n# TYPE y gauge\ny{a="1",b="2"} 0.5\n')
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["x"].type == "counter" and fams["x"].documentation == "line\none"


# ---------------------------------------------------------------- counters from the kernel's output

def test_nft_element_counts_from_a_real_listing() -> None:
    counts = nft.parse_element_counts(listing())
    assert counts["dnat4"][(PUBLIC4, "tcp", "80")] == nft.ElementCount((G1_4, "80"), 3, 180)
    assert counts["dnat6"][(PUBLIC6, "tcp", "80")] == nft.ElementCount((G1_6, "80"), 1, 80)
    assert counts["dnat4_any"][("tcp", "443")].packets == 2
    assert "acl4" not in counts  # no counters there
    assert nft.parse_counters(listing())["dnat4"][(PUBLIC4, "udp", "8001")] == 1


def test_iptables_counts_from_a_real_save() -> None:
    rules = iptables.parse_counters(iptables_saves()[4])
    assert rules[(PUBLIC4, "tcp", 80)] == iptables.RuleCount(G1_4, 80, 3, 180)
    assert rules[(None, "tcp", 443)] == iptables.RuleCount(G2_4, 443, 2, 120)
    assert iptables.parse_counters(iptables_saves()[6])[(PUBLIC6, "tcp", 80)] == iptables.RuleCount(G1_6, 80, 1, 80)
    # iptables-save without -c, libvirt's own rules, the filter table: nothing of ours counted
    assert iptables.parse_counters(iptables_saves()[4].replace("[3:180] ", "")) .get((PUBLIC4, "tcp", 80)) is None
    assert iptables.parse_counters("*filter\n[5:5] -A VF-x-D -p tcp --dport 1 -j DNAT --to-destination 1.1.1.1:1\n") == {}


def test_iptables_traffic_from_a_real_mangle_save() -> None:
    """The accounting rules' counters (tests/data/metrics/iptables-save-c-mangle*.txt, the same
    connections as the other captures, on our iptables backend)."""
    four = iptables.parse_traffic((DATA / "iptables-save-c-mangle4.txt").read_text())
    six = iptables.parse_traffic((DATA / "iptables-save-c-mangle6.txt").read_text())
    assert four == {(PUBLIC4, "tcp", 80): (24, 1380), (PUBLIC4, "tcp", 2222): (0, 0), (PUBLIC4, "udp", 8001): (2, 90),
                    (None, "tcp", 443): (16, 922)}
    assert six == {(PUBLIC6, "tcp", 80): (8, 621), (PUBLIC6, "tcp", 2222): (0, 0), (PUBLIC6, "udp", 8001): (0, 0)}
    assert iptables.parse_traffic(iptables_saves()[4]) == {}  # the nat table: no accounting rule there
    plain = "".join(ln.split("] ", 1)[-1] + "\n" for ln in (DATA / "iptables-save-c-mangle4.txt").read_text().splitlines())
    state = iptables.parse_nat(plain)  # as `iptables-save -t mangle` shows it, without -c
    assert state.acct_jumps == (iptables.ACCT_JUMP,) and len(state.acct_chains) == 3
    live = metrics.iptables_live({4: iptables_saves()[4] + (DATA / "iptables-save-c-mangle4.txt").read_text()})
    assert live.traffic["traffic4"][(PUBLIC4, "udp", "8001")] == (2, 90)
    assert live.traffic["traffic4_any"][("tcp", "443")] == (16, 922)


def test_both_backends_count_the_same_traffic_the_same() -> None:
    """The fixtures saw the same connections, one on each backend: the same connections and live forwards."""
    by_nft = snapshot_of(metrics.live_from_listing(listing()))
    by_iptables = snapshot_of(metrics.iptables_live(iptables_saves()))
    # the same but for the traffic counters, which the iptables backend does not have
    assert [replace(f, traffic=None) for f in by_nft.forwards] == list(by_iptables.forwards)
    assert all(f.traffic is None for f in by_iptables.forwards)
    assert sum(f.traffic is not None for f in by_nft.forwards) == len(by_nft.forwards)
    assert connections(parse(metrics.exposition(by_nft))) == CAPTURED


def test_golden_exposition(update_golden: bool) -> None:
    """The whole text for the captured table and two repairs (review its diff)."""
    snap = snapshot_of(metrics.live_from_listing(listing()),
                       repairs=metrics.Repairs(2, 1764650000.5))
    text = metrics.exposition(snap)
    golden("status.prom", text, update_golden)
    parsed = parse(text)
    assert parsed["virt_forward_rules_in_place"] == {(): 1.0}
    assert parsed["virt_forward_repairs_total"] == {(): 2.0}
    assert parsed["virt_forward_last_repair_timestamp_seconds"] == {(): 1764650000.5}
    assert set(parsed["virt_forward_forward_live"].values()) == {1.0} and len(parsed["virt_forward_forward_live"]) == 7
    labels = dict(next(k for k in parsed["virt_forward_connections_total"] if dict(k)["family"] == "ipv6"
                       and dict(k)["port"] == "80"))
    assert labels == {"guest": "guest1", "family": "ipv6", "public": PUBLIC6, "protocol": "tcp", "port": "80",
                      "target": f"[{G1_6}]:80"}


def test_missing_or_retargeted_forward_has_no_connections_and_live_0() -> None:
    live = metrics.live_from_listing(listing())
    del live.elements["dnat4"][(PUBLIC4, "tcp", "80")]  # lost by the kernel
    live.elements["dnat4"][(PUBLIC4, "tcp", "2222")] = ("192.168.122.99", "22")  # someone else's now
    parsed = parse(metrics.exposition(snapshot_of(live, problems=("map dnat4 differs from the records",))))
    assert (PUBLIC4, "tcp", 80) not in connections(parsed) and (PUBLIC4, "tcp", 2222) not in connections(parsed)
    down = {dict(k)["port"] for k, v in parsed["virt_forward_forward_live"].items() if v == 0 and dict(k)["family"] == "ipv4"}
    assert down == {"80", "2222"}
    assert parsed["virt_forward_rules_in_place"] == {(): 0.0}
    assert "virt_forward_last_repair_timestamp_seconds" not in parsed  # no repair yet: no made-up time


# ---------------------------------------------------------------- counters carried over a rebuild

def test_carry_counters_golden(update_golden: bool) -> None:
    """nft.full for the captured guests, with the captured counters put back on each element."""
    counts = nft.parse_element_counts(listing())
    plain = nft.full([GUEST1, GUEST2], hairpin=True)
    carried = nft.carry_counters(plain, counts)
    golden("rebuild.nft", carried, update_golden)
    assert "add element inet virt_forward dnat4 { 198.51.100.1 . tcp . 80 counter packets 3 bytes 180 : " \
           "192.168.122.10 . 80" in carried
    assert "tcp . 443 counter packets 2 bytes 120 : 192.168.122.11 . 443" in carried
    # only counters were added: taking them out gives back the very batch nft.full made
    import re
    assert re.sub(r" counter packets \d+ bytes \d+", "", carried) == plain
    assert nft.carry_counters(plain, {}) == plain


def test_carry_counters_only_for_the_same_target() -> None:
    counts = nft.parse_element_counts(listing())
    moved = GuestPlan("guest1", (Forward(4, "tcp", 80, ip(PUBLIC4), ip("192.168.122.12"), 80),
                                 Forward(4, "udp", 8001, ip(PUBLIC4), ip(G1_4), 9001)))
    carried = nft.carry_counters(nft.full([moved], hairpin=True), counts)
    assert "198.51.100.1 . tcp . 80 : 192.168.122.12 . 80" in carried  # another guest now: starts at 0
    assert "198.51.100.1 . udp . 8001 counter packets 1 bytes 32 : 192.168.122.10 . 9001" in carried


# ---------------------------------------------------------------- the textfile and the repairs record

def test_textfile_is_world_readable_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "virt_forward.prom"
    old = os.umask(0o077)
    try:
        metrics.write_textfile(str(path), "a 1\n")
    finally:
        os.umask(old)
    assert path.read_text() == "a 1\n" and (path.stat().st_mode & 0o777) == 0o644
    assert os.listdir(tmp_path) == ["virt_forward.prom"]  # no temp file left


def test_textfile_replaces_a_planted_symlink_without_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "virt_forward.prom").symlink_to(victim)
    metrics.write_textfile(str(tmp_path / "virt_forward.prom"), "a 1\n")
    assert victim.read_text() == "keep\n" and not (tmp_path / "virt_forward.prom").is_symlink()


def test_textfile_is_never_seen_half_written(tmp_path: Path) -> None:
    """A reader polling the file while it is rewritten sees one whole version or the other."""
    path = tmp_path / "virt_forward.prom"
    texts = [f"# {n}\n" + f"m{{i=\"{n}\"}} 1\n" * 20000 for n in ("a", "b")]  # ~320 KB each
    metrics.write_textfile(str(path), texts[0])
    done = threading.Event()
    seen: list[str] = []

    def read() -> None:
        while not done.is_set():
            seen.append(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(60):
            metrics.write_textfile(str(path), texts[n % 2])
    finally:
        done.set()
        reader.join()
    assert len(seen) > 10
    assert all(s in texts for s in seen), "a reader saw a partial file"
    assert sorted(os.listdir(tmp_path)) == ["virt_forward.prom"]


def test_repairs_record(tmp_path: Path) -> None:
    assert metrics.read_repairs(tmp_path) == metrics.Repairs()
    assert metrics.record_repair(tmp_path, now=100.0) == metrics.Repairs(1, 100.0)
    assert metrics.record_repair(tmp_path, now=200.5) == metrics.Repairs(2, 200.5)
    assert metrics.read_repairs(tmp_path) == metrics.Repairs(2, 200.5)
    for damaged in ("{", '{"count": -1, "last": null}', '{"count": "2", "last": 1}', "[]", '{"count": 1}'):
        (tmp_path / metrics.REPAIRS_FILE).write_text(damaged)
        assert metrics.read_repairs(tmp_path) == metrics.Repairs(), damaged
    (tmp_path / metrics.REPAIRS_FILE).unlink()
    (tmp_path / "elsewhere").write_text('{"count": 9, "last": 1}')
    (tmp_path / metrics.REPAIRS_FILE).symlink_to(tmp_path / "elsewhere")
    assert metrics.read_repairs(tmp_path) == metrics.Repairs()  # not followed


class _Rounds(threading.Event):
    """The metrics loop's stop event; it counts the loop's rounds (each ends in a wait)."""

    def __init__(self) -> None:
        super().__init__()
        self.done = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.done += 1
        return super().wait(timeout)

    def wait_rounds(self, more: int, what: str) -> None:
        """Until `more` rounds more have ended: the last of them began after this call."""
        target = self.done + more
        wait_until(lambda: self.done, lambda done: done >= target, timeout=30, what=what)


def test_metrics_loop_writes_config_tomls_file(tmp_path: Path, cdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher's writing loop, its kernel reads replaced by a fixed table: the file
    named by config.toml appears, parseable, and is rewritten; metrics_file removed: no more writes."""
    from virt_forward import watch
    out = tmp_path / "textfile" / "virt_forward.prom"
    out.parent.mkdir()
    config = write_trusted(cdir / "config.toml", f'metrics_file = "{out}"\nmetrics_interval = 1\n')
    live = metrics.live_from_listing(listing())
    from virt_forward import drift
    from virt_forward.backends.nftables import NftablesBackend
    monkeypatch.setattr(NftablesBackend, "read_live", lambda self: live)
    monkeypatch.setattr(drift, "current_problems", lambda ctx, backend: [])
    ctx = engine.Context(cdir, tmp_path / "state", Path("/"))
    ctx.store.write(GUEST1, "nftables")
    stop = _Rounds()
    loop = threading.Thread(target=watch.metrics_loop, args=(ctx, stop))
    loop.start()
    try:
        # measured: the first write at once, the next ~1 s later; the bounds only catch a hang
        wait_until(out.exists, timeout=30, what=f"{out} written by the loop")
        first = out.stat().st_mtime_ns
        parsed = parse(out.read_text())
        assert connections(parsed) == {k: v for k, v in CAPTURED.items() if k[0] != "*"}
        assert parsed["virt_forward_rules_in_place"] == {(): 1.0}
        wait_until(lambda: out.stat().st_mtime_ns, lambda mtime: mtime != first, timeout=30,
                   what=f"{out} rewritten at metrics_interval = 1")
        write_trusted(config, "metrics_interval = 1\n")
        # the round under way may have read the old config.toml; the one after it reads the new one
        stop.wait_rounds(2, "a whole round of the loop that read the config.toml without metrics_file")
        out.unlink()
        stop.wait_rounds(2, "a whole round of the loop begun after the file was removed")
        assert not out.exists()
    finally:
        stop.set()
        loop.join()
    assert sorted(os.listdir(out.parent)) == []


# ---------------------------------------------------------------- real connections in namespaces

def scrape(w: World, *args: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    return parse(w.cli("status", "--format", "prometheus", *args).stdout)


def start(w: World, *names: str) -> None:
    for name in names:
        r = w.hook(name, "start")
        assert r.returncode == 0 and "error" not in r.stderr.lower(), r.stderr


@pytest.fixture(params=["nftables", "iptables"])
def backend_world(request: pytest.FixtureRequest) -> Iterator[World]:
    """Our nftables backend beside libvirt's nftables rules, or our iptables backend beside libvirt 9.0's."""
    with lab_world(backend=request.param) as w:
        extra = 'backend = "iptables"\n' if request.param == "iptables" else ""
        w.write("config.toml", f'{extra}public = ["{PUBLIC4}", "{PUBLIC6}"]\n')
        w.guest_file("guest1", f'address = ["{G1_4}", "{G1_6}"]\nports = ["80", "8001:9001/udp"]\n')
        yield w


@pytest.mark.netns
def test_connections_counter_rises_with_real_connections(backend_world: World) -> None:
    w = backend_world
    start(w, "guest1")
    before = scrape(w)
    assert connections(before) == {(PUBLIC4, "tcp", 80): 0, (PUBLIC4, "udp", 8001): 0,
                                   (PUBLIC6, "tcp", 80): 0, (PUBLIC6, "udp", 8001): 0}
    assert before["virt_forward_rules_in_place"] == {(): 1.0}
    for n in range(1, 4):
        assert w.probe("tcp", PUBLIC4, 80) == f"guest1:80 from {CLIENT4}"
        assert connections(scrape(w))[(PUBLIC4, "tcp", 80)] == n
    assert w.probe("udp", PUBLIC4, 8001) == f"guest1:9001 from {CLIENT4}"
    assert w.probe("tcp", PUBLIC6, 80).startswith("guest1:80")
    assert w.probe("tcp", PUBLIC4, 3306).startswith("ERR")  # not forwarded: counted nowhere
    after = scrape(w)
    assert connections(after) == {(PUBLIC4, "tcp", 80): 3, (PUBLIC4, "udp", 8001): 1,
                                  (PUBLIC6, "tcp", 80): 1, (PUBLIC6, "udp", 8001): 0}
    packets, size = connections(after, "virt_forward_packets_total"), connections(after, "virt_forward_bytes_total")
    # both directions of every packet, on either backend: the UDP exchange is "ping" (20+8+4
    # bytes) and its answer "guest1:9001 from 198.51.100.2\n" (20+8+30); each TCP connection a
    # handshake, the answer, and the close
    assert packets[(PUBLIC4, "udp", 8001)] == 2 and size[(PUBLIC4, "udp", 8001)] == 32 + 58
    assert packets[(PUBLIC4, "tcp", 80)] >= 3 * 6 and size[(PUBLIC4, "tcp", 80)] >= 3 * 6 * 40
    assert packets[(PUBLIC6, "tcp", 80)] >= 6 and packets[(PUBLIC6, "udp", 8001)] == 0
    # the text and JSON views show the same counts (the JSON one by --json and --format json alike)
    line = next(ln for ln in w.cli("status").stdout.splitlines() if f"{PUBLIC4}:80/tcp" in ln)
    assert line.split()[-2:] == ["3", "connection(s)"], line
    assert json.loads(w.cli("status", "--json").stdout) == json.loads(w.cli("status", "--format", "json").stdout)
    assert "virt_forward_connections_total" not in scrape(w, "guest2")  # another guest: none of guest1's series
    # a forward the kernel lost: live 0, no connections series, rules not in place
    if w.backend == "iptables":
        w.lab.sh(w.lab.host, "iptables", "-w", "-t", "nat", "-F", f"VF-{GuestPlan('guest1', ()).tag}-D")
    else:
        w.nft("delete", "element", "inet", "virt_forward", "dnat4", "{", f"{PUBLIC4} . tcp . 80", "}")
    lost = scrape(w)
    assert (PUBLIC4, "tcp", 80) not in connections(lost)
    assert lost["virt_forward_rules_in_place"] == {(): 0.0}
    assert 0.0 in lost["virt_forward_forward_live"].values()


@contextmanager
def three_connections() -> Iterator[World]:
    """guest1 forwarding port 80 (nftables), with 3 connections counted through it."""
    with lab_world(backend="nftables") as w:
        w.write("config.toml", f'public = ["{PUBLIC4}"]\n')
        w.guest_file("guest1", f'address = "{G1_4}"\nports = ["80"]\n')
        start(w, "guest1")
        for _ in range(3):
            assert w.probe("tcp", PUBLIC4, 80).startswith("guest1:80")
        yield w


@pytest.mark.netns
def test_counter_survives_a_rebuild_of_the_table() -> None:
    """nft.full's rebuild (what reconcile applies) with keep_counters: the counter stays;
    without it the same rebuild resets it."""
    with three_connections() as w:
        code = ("import sys\nfrom pathlib import Path\nfrom virt_forward import nft\n"
                "from virt_forward.backends.nftables import keep_counters\n"
                "from virt_forward.state import StateStore\nstore = StateStore(Path(sys.argv[1]))\n"
                "batch = nft.full([store.read(d) for d in store.domains()], hairpin=True)\n"
                "sys.stdout.write(keep_counters(batch) if sys.argv[2] == 'keep' else batch)\n")

        def rebuild(mode: str) -> int:
            batch = w.lab.sh(w.lab.host, sys.executable, "-c", code, str(w.state), mode).stdout
            assert batch.startswith("add table inet virt_forward\ndelete table inet virt_forward\n")
            w.lab.sh(w.lab.host, "nft", "-f", "-", stdin=batch)
            tables = json.loads(w.nft("-j", "list", "tables").stdout)["nftables"]
            return int(next(t["table"]["handle"] for t in tables if "table" in t and t["table"]["name"] == "virt_forward"))

        handle = rebuild("keep")
        assert connections(scrape(w))[(PUBLIC4, "tcp", 80)] == 3
        assert w.probe("tcp", PUBLIC4, 80).startswith("guest1:80")  # the rebuilt table forwards, and counts on
        assert connections(scrape(w))[(PUBLIC4, "tcp", 80)] == 4
        assert rebuild("keep") != handle  # a new table each time: the count really crossed a rebuild
        assert connections(scrape(w))[(PUBLIC4, "tcp", 80)] == 4
        rebuild("plain")
        assert connections(scrape(w))[(PUBLIC4, "tcp", 80)] == 0


@pytest.mark.netns
def test_reconcile_keeps_the_counters() -> None:
    with three_connections() as w:
        assert connections(scrape(w))[(PUBLIC4, "tcp", 80)] == 3
        w.cli("reconcile")
        assert w.probe("tcp", PUBLIC4, 80).startswith("guest1:80")
        assert connections(scrape(w))[(PUBLIC4, "tcp", 80)] == 4


def _wait_for(what: str, check: Callable[[], object], timeout: float = 15.0) -> None:
    wait_until(check, timeout=timeout, what=what, every=0.1)


@pytest.mark.netns
def test_watcher_writes_the_textfile_and_counts_its_repairs() -> None:
    with lab_world(backend="nftables") as w:
        out = w.root / "textfile" / "virt_forward.prom"
        out.parent.mkdir(mode=0o755)
        w.write("config.toml", f'public = ["{PUBLIC4}"]\nmetrics_file = "{out}"\nmetrics_interval = 1\n')
        w.guest_file("guest1", f'address = "{G1_4}"\nports = ["80"]\n')
        start(w, "guest1")
        watcher = Watcher(w)
        try:
            watcher.wait_monitoring()  # else the reset below waits for the 30 s timer
            _wait_for("the textfile", out.exists)
            assert (out.stat().st_mode & 0o777) == 0o644
            first = parse(out.read_text())
            assert connections(first) == {(PUBLIC4, "tcp", 80): 0}
            assert first["virt_forward_repairs_total"] == {(): 0.0}
            for _ in range(2):
                assert w.probe("tcp", PUBLIC4, 80).startswith("guest1:80")
            _wait_for("2 connections in the textfile",
                      lambda: connections(parse(out.read_text())) == {(PUBLIC4, "tcp", 80): 2})
            t0 = time.time()
            w.nft("delete", "table", "inet", "virt_forward")  # a reset: the watcher repairs it
            _wait_for("the repair in the textfile",
                      lambda: parse(out.read_text()).get("virt_forward_repairs_total") == {(): 1.0})
            repaired = parse(out.read_text())
            [stamp] = repaired["virt_forward_last_repair_timestamp_seconds"].values()
            assert t0 <= stamp <= time.time()
            assert repaired["virt_forward_rules_in_place"] == {(): 1.0}
            assert w.probe("tcp", PUBLIC4, 80).startswith("guest1:80")
            # status reads the same record of repairs
            assert scrape(w)["virt_forward_repairs_total"] == {(): 1.0}
            assert os.listdir(out.parent) == ["virt_forward.prom"]  # no temp file left behind
        finally:
            err = watcher.stop()
        assert "Traceback" not in err, err
