"""Metrics in Prometheus' text exposition format (version 0.0.4): what `status --format
prometheus` prints and what the watcher writes to node_exporter's textfile collector.

What is measured, and what is not:

- `virt_forward_connections_total`: the counter on each element of our dnat maps (the
  iptables backend: the packet counter of each forward's DNAT rule).  The nat hook sees only
  the first packet of a connection, so this is the NEW connections each forward DNAT-ed,
  truthfully, and nothing more.
- `virt_forward_packets_total` / `virt_forward_bytes_total`: the counters of the traffic
  sets (nft.py), keyed like the dnat maps, which mark_forward looks up for every packet of a
  connection our DNAT marked, both directions, by its original destination.  Connections
  from the host itself to a forward take the output path, not forward: not counted there.
  The iptables backend counts the same in the mangle table (iptables.py's accounting
  chains: one rule per forward matching the original destination).  (The nat element
  counter's `bytes` is the size of first packets alone: never exported.)
- `virt_forward_rules_in_place`: the check `status` and the watcher run (drift.problems).

This module only renders and parses; drift.snapshot reads the kernel and the records.
- `virt_forward_repairs_total` / `virt_forward_last_repair_timestamp_seconds`: the watcher's
  reconciles after a failed check, kept in the state dir so that `status` shows them too.
- `virt_forward_repair_failing` / `virt_forward_repair_failing_since_timestamp_seconds`: a
  repair that left what it repaired, which the watcher retries less and less often (1 s
  doubling to 5 min); present only while that lasts (in the same record).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import nft
from .plan import Family, Forward

if TYPE_CHECKING:
    from .problems import Problem

# in the state dir: {"count": N, "last": unix time or null} and, while a repair does not
# converge, "failing": [problem texts], "since", "retry_at": unix times, "attempts": N
REPAIRS_FILE = "repairs.json"
MAX_REPAIRS_FILE = 4096

Kind = Literal["counter", "gauge"]
Labels = tuple[tuple[str, str], ...]


# ---------------------------------------------------------------- the text format (pure)

def escape_label(value: str) -> str:
    r"""A label value as the text format wants it: backslash, double quote and line feed
    escaped (\\, \", \n).  A domain name that is not UTF-8 (argv bytes arrive as surrogates)
    has those bytes written as \xNN: the format is UTF-8 and one bad byte would make
    node_exporter drop the whole file."""
    text = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: only backslash and line feed are escaped there."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)  # shortest text that reads back to the same float


@dataclass(frozen=True)
class Sample:
    labels: Labels
    value: float


@dataclass(frozen=True)
class MetricFamily:
    name: str  # the sample name; a counter's ends in _total
    kind: Kind
    help: str
    samples: tuple[Sample, ...]


def render(families: list[MetricFamily]) -> str:
    """HELP and TYPE lines, then the samples of each family, in the order given."""
    lines: list[str] = []
    for fam in families:
        lines += [f"# HELP {fam.name} {escape_help(fam.help)}", f"# TYPE {fam.name} {fam.kind}"]
        for s in fam.samples:
            labels = ",".join(f'{k}="{escape_label(v)}"' for k, v in s.labels)
            lines.append(f"{fam.name}{{{labels}}} {format_value(s.value)}" if labels
                         else f"{fam.name} {format_value(s.value)}")
    return "".join(line + "\n" for line in lines)


# ---------------------------------------------------------------- what we measure

@dataclass(frozen=True)
class ForwardCount:
    guest: str
    forward: Forward
    live: bool  # in the kernel, with this target
    connections: int | None  # None: not in the kernel, or not readable
    traffic: tuple[int, int] | None = None  # (packets, bytes), both directions; None: not counted


@dataclass(frozen=True)
class Repairs:
    count: int = 0
    last: float | None = None  # unix time of the last one
    # a repair that left (some of) what it repaired, retried by the watcher with a growing delay
    failing: tuple[str, ...] = ()  # the problems it left, as status shows them; () when none
    since: float | None = None  # unix time of the first repair that left them
    attempts: int = 0  # repairs in a row that left them
    retry_at: float | None = None  # unix time of the next one


@dataclass(frozen=True)
class Snapshot:
    forwards: tuple[ForwardCount, ...]
    problems: tuple[Problem, ...]
    repairs: Repairs


def forward_labels(guest: str, fwd: Forward) -> Labels:
    target = f"[{fwd.guest}]:{fwd.guest_port}" if fwd.family == 6 else f"{fwd.guest}:{fwd.guest_port}"
    return (("guest", guest), ("family", f"ipv{fwd.family}"),
            ("public", "*" if fwd.public is None else str(fwd.public)),  # "*": every local address
            ("protocol", fwd.proto), ("port", str(fwd.public_port)), ("target", target))


def families(snap: Snapshot) -> list[MetricFamily]:
    conns = tuple(Sample(forward_labels(f.guest, f.forward), f.connections)
                  for f in snap.forwards if f.live and f.connections is not None)
    live = tuple(Sample(forward_labels(f.guest, f.forward), int(f.live)) for f in snap.forwards)
    counted = [f for f in snap.forwards if f.live and f.traffic is not None]
    out = [
        MetricFamily("virt_forward_connections_total", "counter",
                     "New connections DNAT-ed by the forward (the nat lookup sees the first packet of each "
                     "connection only).", conns),
        MetricFamily("virt_forward_packets_total", "counter",
                     "Packets of the forward's connections through the host's forward path, both directions.",
                     tuple(Sample(forward_labels(f.guest, f.forward), f.traffic[0]) for f in counted
                           if f.traffic is not None)),
        MetricFamily("virt_forward_bytes_total", "counter",
                     "Bytes (IP packets) of the forward's connections through the host's forward path, both "
                     "directions.",
                     tuple(Sample(forward_labels(f.guest, f.forward), f.traffic[1]) for f in counted
                           if f.traffic is not None)),
        MetricFamily("virt_forward_forward_live", "gauge",
                     "1 when the recorded forward is in the kernel with this target, 0 when it is missing.", live),
        MetricFamily("virt_forward_rules_in_place", "gauge",
                     "1 when records, rules and guards agree (the check of status and the watcher), else 0.",
                     (Sample((), int(not snap.problems)),)),
        MetricFamily("virt_forward_repairs_total", "counter",
                     "Reconciles the watcher ran after its check found rules or guards missing.",
                     (Sample((), snap.repairs.count),)),
    ]
    if snap.repairs.last is not None:
        out.append(MetricFamily("virt_forward_last_repair_timestamp_seconds", "gauge",
                                "Unix time of the watcher's last repair.", (Sample((), snap.repairs.last),)))
    if snap.repairs.failing:
        out.append(MetricFamily("virt_forward_repair_failing", "gauge",
                                "1 while the watcher's repair leaves the problems it repaired (it retries with a "
                                "growing delay; status and doctor name them).", (Sample((), 1),)))
        if snap.repairs.since is not None:
            out.append(MetricFamily("virt_forward_repair_failing_since_timestamp_seconds", "gauge",
                                    "Unix time of the first repair that did not fix them.",
                                    (Sample((), snap.repairs.since),)))
    return out


def exposition(snap: Snapshot) -> str:
    return render(families(snap))


# ---------------------------------------------------------------- reading the kernel

Elements = dict[str, dict[tuple[str, ...], tuple[str, ...]]]
Counts = dict[str, dict[tuple[str, ...], int]]


@dataclass(frozen=True)
class Live:
    """Our forwards as the kernel holds them, keyed like the nft maps (nft.dnat_element),
    and the NEW connections each one DNAT-ed."""

    elements: Elements
    connections: Counts
    traffic: dict[str, dict[tuple[str, ...], tuple[int, int]]] = field(default_factory=dict)  # set: key: (p, b)


def live_from_listing(listing: dict[str, Any]) -> Live:
    """Live from `nft -j list table inet virt_forward` output."""
    counts = nft.parse_element_counts(listing)
    traffic_sets = {n.traffic for n in nft.NAMES.values()} | {n.traffic_any for n in nft.NAMES.values()}
    traffic = {name: {key: (c.packets, c.bytes) for key, c in elems.items()}
               for name, elems in counts.items() if name in traffic_sets}
    return Live(nft.parse_live(listing), nft.parse_counters(listing), traffic)


def iptables_live(saves: dict[Family, str]) -> Live:
    """Live from `iptables-save -c -t nat` (and `-t mangle`) output per family, keyed like the
    nft maps and traffic sets."""
    from . import iptables
    elements: Elements = {}
    counts: Counts = {}
    traffic: dict[str, dict[tuple[str, ...], tuple[int, int]]] = {}
    for family, text in sorted(saves.items()):
        for (pub, proto, port), rule in iptables.parse_counters(text).items():
            try:
                fwd = Forward(family, proto, port, None if pub is None else ipaddress.ip_address(pub),  # type: ignore[arg-type]
                              ipaddress.ip_address(rule.guest), rule.guest_port)
            except ValueError:
                continue
            name, key, value = nft.dnat_element(fwd)
            elements.setdefault(name, {})[key] = value
            counts.setdefault(name, {})[key] = rule.packets
        names = nft.NAMES[family]  # keyed as the nftables backend's traffic sets are
        for (pub, proto, port), both in iptables.parse_traffic(text).items():
            if pub is None:
                traffic.setdefault(names.traffic_any, {})[(proto, str(port))] = both
            else:
                traffic.setdefault(names.traffic, {})[(str(ipaddress.ip_address(pub)), proto, str(port))] = both
    return Live(elements, counts, traffic)


def forward_counts(guest: str, forwards: tuple[Forward, ...], live: Live) -> tuple[ForwardCount, ...]:
    out = []
    for fwd in forwards:
        name, key, value = nft.dnat_element(fwd)
        here = live.elements.get(name, {}).get(key) == value
        traffic = live.traffic.get(nft.traffic_set(fwd), {}).get(key) if here else None
        out.append(ForwardCount(guest, fwd, here, live.connections.get(name, {}).get(key) if here else None,
                                traffic))
    return tuple(out)


# ---------------------------------------------------------------- the watcher's repairs

def read_repairs(state_dir: Path) -> Repairs:
    """What the watcher recorded; no file (no repair yet) or a damaged one reads as none (a
    damaged failing part alone: as not failing)."""
    path = state_dir / REPAIRS_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return Repairs()
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return Repairs()
        data = json.loads(os.read(fd, MAX_REPAIRS_FILE))
        count, last = data["count"], data["last"]
        if type(count) is int and count >= 0 and _time_or_none(last):
            return Repairs(count, None if last is None else float(last), *_failing(data))
        return Repairs()
    except (OSError, ValueError, KeyError, TypeError):
        return Repairs()
    finally:
        os.close(fd)


def _time_or_none(value: object) -> bool:
    return value is None or type(value) in (int, float)


def _failing(data: dict[str, Any]) -> tuple[tuple[str, ...], float | None, int, float | None]:
    failing, since = data.get("failing", []), data.get("since")
    attempts, retry_at = data.get("attempts", 0), data.get("retry_at")
    if (isinstance(failing, list) and all(isinstance(t, str) for t in failing) and type(attempts) is int
            and attempts >= 0 and _time_or_none(since) and _time_or_none(retry_at)):
        return (tuple(failing), None if since is None else float(since), attempts,
                None if retry_at is None else float(retry_at))
    return (), None, 0, None


def _write_repairs(state_dir: Path, repairs: Repairs) -> None:
    from . import files
    data: dict[str, object] = {"count": repairs.count, "last": repairs.last}
    if repairs.failing:
        data.update(failing=list(repairs.failing), since=repairs.since, attempts=repairs.attempts,
                    retry_at=repairs.retry_at)
    text = json.dumps(data).encode()
    if len(text) > MAX_REPAIRS_FILE:  # read_repairs reads that much: keep the record whole
        data["failing"] = [t[:200] for t in repairs.failing[:8]]
        text = json.dumps(data).encode()
    files.replace(str(state_dir / REPAIRS_FILE), text)


def record_repair(state_dir: Path, now: float | None = None) -> Repairs:
    """One more repair, at `now` (default: the current time); the caller holds the state lock."""
    before = read_repairs(state_dir)
    after = replace(before, count=before.count + 1, last=time.time() if now is None else now)
    _write_repairs(state_dir, after)
    return after


def record_failing(state_dir: Path, failing: tuple[str, ...], attempts: int, retry_at: float,
                   now: float | None = None) -> Repairs:
    """A repair left `failing` (attempts in a row so far, the next at unix time `retry_at`);
    the caller holds the state lock."""
    before = read_repairs(state_dir)
    since = before.since if before.failing and before.since is not None else (time.time() if now is None else now)
    after = replace(before, failing=failing, since=since, attempts=attempts, retry_at=retry_at)
    _write_repairs(state_dir, after)
    return after


def clear_failing(state_dir: Path) -> Repairs:
    """No repair fails (any more); the caller holds the state lock.  No file is written when
    there was nothing to clear."""
    before = read_repairs(state_dir)
    if not before.failing:
        return before
    after = Repairs(before.count, before.last)
    _write_repairs(state_dir, after)
    return after


# ---------------------------------------------------------------- the textfile

def write_textfile(path: str, text: str) -> None:
    """Atomically, readable by all (0644: node_exporter runs as its own user): a fresh temp file
    in the same directory (its name ends in .tmp, so node_exporter, which reads *.prom only,
    never sees a half-written file), then a rename over `path`; every directory on the way
    root's and not writable by others, no symlink followed (safefile.py, issue 19)."""
    from . import safefile
    safefile.write_strict(path, text.encode(), 0o644)
