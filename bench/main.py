"""virt-forward benchmarks: the installed hook on two interpreters, side by side with the
post's iptables scripts (issue 6; issue 9 item 5).

The hook timed is the file `virt-forward install` writes, for each of two interpreters
that bench/run made (see bench/README.md):

  venv    `python3 -m venv` of pyenv's python3, the snapshot pip-installed into it
  debian  Debian's /usr/bin/python3, the snapshot `pip install --target` into a dist-packages dir

run as libvirt runs it: argv `DOMAIN start begin -` / `DOMAIN stopped end -`, the domain
XML on stdin, env exactly PATH=/bin:/usr/bin.  Four labs (`vflab.lab.Lab`: a host
namespace with libvirt 9.0's rules, guest1 with servers, an outside client):

  A   ours, grows 0 -> 1,000 -> 10,000 forwards      B   the post's, grows alike
  A1  ours, 1 forward (the probe) / 0 while hooks run B1  the post's, same

Measurements are interleaved (both interpreters' hooks, their bare start, the post's
hook, in rotating order, round after round), so that the ratios printed come from one
run on the same noisy machine.  Every namespace is removed at the end, also on failure,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from vflab.lab import PUBLIC4, Lab

from . import parts
from .netns import netns
from .sides import HOOK_ENV, REPO, Interp, Ours, Post, interpreters, timed, tmpfs_dir

BENCH = Path(__file__).resolve().parent
GUEST1 = "192.168.122.10"  # the lab's guest1: the address every traffic test reaches
HTTP_PORT = 8000  # the probe forward: PUBLIC4:8000 -> guest1:8000 (bench/httpd)
TESTED = "bench-vm"  # the guest whose hook is timed: 10 forwards
TESTED_PORTS = list(range(7001, 7011))
PROBE = "probe"
# what the hook's children get (runner.run): nft and iptables live in sbin
CHILD_ENV = {"PATH": "/usr/sbin:/sbin:/usr/bin:/bin:/usr/local/sbin:/usr/local/bin", "LC_ALL": "C"}
GOALS = {"start/bare": 3.0, "10k/0": 1.2, "start+stop/bare": 6.0, "reconcile/bare": 50.0}


def other(i: int) -> tuple[str, str, list[int]]:
    """The i-th background guest: 10 forwards, public ports 10000+10i .. +9, same port inside."""
    return f"g{i:04d}", f"10.122.{i // 250}.{i % 250 + 1}", [10000 + 10 * i + k for k in range(10)]


def process_rows(rows: list[dict[str, Any]]) -> list[str]:
    """A markdown table of the processes one traced command spawned (bench/parts.py's rows)."""
    out = ["| spawned at | exec at | ms | command |", "|---:|---:|---:|---|"]
    for r in rows:
        sp = "" if r["spawn_ms"] is None else f"{r['spawn_ms']:.1f}"
        ms = "?" if r["ms"] is None else f"{r['ms']:.1f}"
        late = f" (still running {r['outlives_ms']:.1f} ms after the hook exited)" if r.get("outlives_ms") else ""
        out.append(f"| {sp} | {r['exec_ms']:.1f} | {ms} | `{r['cmd']}`{late} |")
    return out


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def p50(values: list[float]) -> float:
    return pct(values, 0.5)


def rotated(items: list[Any], i: int) -> list[Any]:
    """Round i starts at a different item: no side is always first (or always after the same one)."""
    k = i % len(items) if items else 0
    return items[k:] + items[:k]


# ------------------------------------------------------------------ the guest's HTTP server

def http_server_cmd(tmp: Path) -> tuple[list[str], str]:
    """bench/httpd.c compiled when a C compiler is there, else a 2-process Python one."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        exe = tmp / "httpd"
        subprocess.run([cc, "-O2", "-o", str(exe), str(BENCH / "httpd.c")], check=True)
        return [str(exe), str(HTTP_PORT), "2"], "bench/httpd.c (C, 2 processes)"
    code = (
        "import os,socket\n"
        "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(('0.0.0.0',{HTTP_PORT}));s.listen(4096);print('ready',flush=True);os.fork()\n"
        "r=b'HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\nConnection: close\\r\\n\\r\\nok\\n'\n"
        "while True:\n c,_=s.accept()\n try:\n  c.recv(4096);c.sendall(r)\n except OSError:pass\n c.close()\n")
    return [sys.executable, "-c", code], "Python accept loop (2 processes; no C compiler found)"


def start_http(lab: Lab, cmd: list[str]) -> None:
    g = lab.members[0]
    proc = subprocess.Popen(["ip", "netns", "exec", g.ns, *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    lab.servers.append(proc)  # lab.close() kills it
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        raise RuntimeError(f"http server in {g.ns} did not start")
    # the client side of a connection-rate test: many ports, reuse TIME_WAIT ones
    lab.sh(lab.client, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000",
           "net.ipv4.tcp_tw_reuse=1")


def http_get(lab: Lab) -> str:
    with netns(lab.client):
        try:
            with socket.create_connection((PUBLIC4, HTTP_PORT), timeout=2) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                return s.recv(200).decode(errors="replace").splitlines()[0]
        except OSError as exc:
            return f"ERR {exc}"


def wrk(lab: Lab, seconds: float, conns: int) -> dict[str, float]:
    with netns(lab.client):
        r = timed(["wrk", "-t", "1", "-c", str(conns), "-d", f"{max(1, round(seconds))}s", "-H", "Connection: close",
                   f"http://{PUBLIC4}:{HTTP_PORT}/"], dict(os.environ))
    m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    if r.rc != 0 or not m:
        raise RuntimeError(f"wrk failed: {r.stdout} {r.stderr}")
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", r.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
    total = re.search(r"(\d+) requests in", r.stdout)
    return {"rate": float(m.group(1)),
            "requests": float(total.group(1)) if total else 0.0,
            "errors": float(sum(map(int, errs.groups())) if errs else 0) + float(non2xx.group(1) if non2xx else 0)}


# ------------------------------------------------------------------ the benchmark

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.res: dict[str, Any] = {"hook": {}, "reconcile": {}, "packet": {}, "memory": {}, "breakdown": {},
                                    "trace": {}, "importtime": {}, "importtime_fast": {}, "settle": args.settle}
        self.labs: dict[str, Lab] = {}

    # -------------------------------------------------------------- setup
    def setup(self, stack: contextlib.ExitStack, tmp: Path) -> None:
        self.tmp = tmp
        self.interps = interpreters()
        self.res["interpreters"] = {ip.key: {"label": ip.label, "python": ip.python, "location": ip.location}
                                    for ip in self.interps}
        for key in ("A", "B", "A1", "B1"):
            say(f"lab {key}: namespaces, bridge, libvirt 9.0 rules, guest1")
            self.labs[key] = stack.enter_context(Lab(guests=1))
        cmd, self.res["server"] = http_server_cmd(tmp)
        for key, lab in self.labs.items():
            start_http(lab, cmd)
        self.run_root = tmpfs_dir()
        self.res["state_dir"] = "tmpfs (/dev/shm), like /run" if self.run_root else "disk (no tmpfs found)"
        say("ours: `virt-forward install --root R --config-dir C --state-dir S` with each interpreter, "
            "in labs A and A1")
        self.ours = {k: Ours(self.labs[k], tmp / k, self.interps, self.run_root and self.run_root / k)
                     for k in ("A", "A1")}
        self.res["hook_files"] = {k: str(p) for k, p in self.ours["A"].hooks.items()}
        # the hook's fast path (replays what an earlier full-path call left in the state dir)
        self.fast_path = all((Path(ip.location) / "virt_forward" / "fastpath.py").is_file() for ip in self.interps)
        self.res["fast_path"] = self.fast_path
        self.res["hook_text"] = self.ours["A"].hook_text
        self.post = {k: Post(self.labs[k], tmp / k) for k in ("B", "B1")}
        sides: list[Ours | Post] = [*self.ours.values(), *self.post.values()]
        for side in sides:
            side.write_guest(TESTED, GUEST1, TESTED_PORTS)
            side.write_guest(PROBE, GUEST1, [HTTP_PORT])
        for i in range(self.args.guests):
            name, addr, ports = other(i)
            self.ours["A"].write_guest(name, addr, ports)
            self.post["B"].write_guest(name, addr, ports)
        # the 1-forward labs: the probe only, for the whole run
        self.ours["A1"].apply(PROBE)
        self.post["B1"].hook(PROBE, "start", "begin")
        for key in ("A1", "B1"):
            got = http_get(self.labs[key])
            if not got.startswith("HTTP/1.1 200"):
                raise RuntimeError(f"lab {key}: probe forward does not work: {got}")

    def bare(self, ip: Interp) -> float:
        return timed(ip.bare(), HOOK_ENV).seconds

    # -------------------------------------------------------------- 1. hook latency
    def hook_latency(self, size: int) -> None:
        """Both interpreters' installed hooks, their bare start and the post's hook, interleaved.
        At size > 0, labs A1/B1 (probe removed: 0 others) run in the same rounds, so the ratio
        size/0 is measured side by side, not across minutes of a noisy machine."""
        a, b = self.ours["A"], self.post["B"]
        sides: list[tuple[str, Callable[[str, str], float]]] = []

        def ours_fn(o: Ours, key: str, full: bool = False) -> Callable[[str, str], float]:
            return lambda op, sub: o.hook(TESTED, op, sub, key, full_path=full and op == "start").seconds

        def post_fn(p: Post) -> Callable[[str, str], float]:
            return lambda op, sub: p.hook(TESTED, op, sub).seconds

        def bare_fn(ip: Interp) -> Callable[[str, str], float]:
            return lambda op, sub: self.bare(ip)
        for ip in self.interps:
            sides.append((f"ours-{ip.key}", ours_fn(a, ip.key)))
            if self.fast_path:
                sides.append((f"ours-{ip.key} full-path", ours_fn(a, ip.key, True)))
            sides.append((f"bare-{ip.key}", bare_fn(ip)))
        sides.append(("post", post_fn(b)))
        if size:
            self.ours["A1"].remove(PROBE)
            self.post["B1"].hook(PROBE, "stopped", "end")
            for ip in self.interps:
                sides.append((f"ours-{ip.key}@0", ours_fn(self.ours["A1"], ip.key)))
            sides.append(("post@0", post_fn(self.post["B1"])))
        say(f"hook latency with {size} other forwards: {self.args.runs} rounds of (start, stop) of each of "
            f"{', '.join(k for k, _ in sides)}")
        t: dict[str, list[float]] = {f"{k} {op}": [] for k, _ in sides for op in ("start", "stop")}
        # each side's start then its stop (the two interpreters' hooks share lab A's guest), each
        # after the pause (--settle): see back_to_back() for a start that gets none
        for i in range(self.args.runs):
            for k, fn in rotated(sides, i):
                self.settle()
                t[f"{k} start"].append(fn("start", "begin"))
                self.settle()
                t[f"{k} stop"].append(fn("stopped", "end"))
        self.res["hook"][size] = t
        self.res.setdefault("installed", {})[size] = {"ours": a.count(), "post": b.count()}
        if size:
            self.ours["A1"].apply(PROBE)
            self.post["B1"].hook(PROBE, "start", "begin")

    def lifecycle(self, size: int) -> None:
        """libvirt runs the qemu hook more than once per guest start and stop: `prepare begin`,
        `start begin`, `started begin` / `stopped end`, `release end`.  Each is a process; the
        installed hook acts on all five (it exits early only for operations not in its list)."""
        a = self.ours["A"]
        from vflab.lab import domain_xml
        seq = [("prepare", "begin"), ("start", "begin"), ("started", "begin"), ("stopped", "end"), ("release", "end")]
        t: dict[str, list[float]] = {f"{ip.key} {op}": [] for ip in self.interps for op, _ in seq}
        for ip in self.interps:
            t[f"bare-{ip.key}"] = []
        runs = max(3, self.args.runs // 2)
        say(f"libvirt's whole start and stop sequence ({', '.join(op for op, _ in seq)}) with {size} others: "
            f"{runs} rounds per interpreter, interleaved")
        for i in range(runs):
            for ip in rotated(self.interps, i):
                self.settle()
                for op, sub in seq:
                    with netns(a.lab.host):
                        r = timed([str(a.hooks[ip.key]), TESTED, op, sub, "-"], HOOK_ENV, domain_xml(TESTED))
                    if r.rc != 0 or "failed" in r.stderr:
                        raise RuntimeError(f"hook {ip.key} {op}: exit {r.rc}: {r.stderr.strip()}")
                    t[f"{ip.key} {op}"].append(r.seconds)
                    if op == "started" and a.count() != size + len(TESTED_PORTS):
                        raise RuntimeError(f"after {op}: {a.count()} elements, not {size + len(TESTED_PORTS)}")
                t[f"bare-{ip.key}"].append(self.bare(ip))
        self.res["lifecycle"] = {"size": size, "ops": [op for op, _ in seq], "t": t}

    def settle(self) -> None:
        """The pause before a timed hook process.  A stop's deletions are finished by the kernel
        after the stop's hook has its answer (one RCU grace period, 10-20 ms here), and the next
        process to touch nftables in that network namespace waits for it: timed back to back, a
        start would carry the previous stop's cost.  back_to_back() measures that case itself."""
        time.sleep(self.args.settle)

    def back_to_back(self, size: int) -> None:
        """A start right after a stop, no pause (a guest restarted, or another guest stopped a
        moment before), next to a start after the pause, in the same rounds, lab A."""
        a = self.ours["A"]
        runs = max(5, self.args.runs // 2)
        say(f"start right after a stop, and after a pause, with {size} others: {runs} rounds per interpreter")
        t: dict[str, list[float]] = {f"{ip.key} {case}": [] for ip in self.interps
                                     for case in ("paused", "back-to-back", "bare")}
        for i in range(runs):
            for ip in rotated(self.interps, i):
                self.settle()
                t[f"{ip.key} paused"].append(a.hook(TESTED, "start", "begin", ip.key).seconds)
                self.settle()
                a.hook(TESTED, "stopped", "end", ip.key)
                t[f"{ip.key} back-to-back"].append(a.hook(TESTED, "start", "begin", ip.key).seconds)
                self.settle()
                a.hook(TESTED, "stopped", "end", ip.key)
                self.settle()
                t[f"{ip.key} bare"].append(self.bare(ip))
        self.res["back_to_back"] = {"size": size, "runs": runs, "t": t}

    # -------------------------------------------------------------- where the hook's time goes
    def importtime(self, fast_too: bool = False) -> None:
        """`<python> -IS -X importtime HOOKFILE bench-vm start begin -`, same env: the imports of
        one real `start` (then stopped again); the full path (fast-path files removed first) and,
        `fast_too`, the start as it is after an earlier start of the guest."""
        a = self.ours["A"]
        from vflab.lab import domain_xml
        for ip in self.interps:
            for variant in ("full", "fast") if fast_too and self.fast_path else ("full",):
                if variant == "fast":  # an earlier start and stop of the guest: its fast file is there
                    a.hook(TESTED, "start", "begin", ip.key)
                    a.hook(TESTED, "stopped", "end", ip.key)
                else:
                    a.sync()
                    a.forget_fast(TESTED, ip.key)
                with netns(a.lab.host):
                    r = timed([ip.python, "-I", "-S", "-X", "importtime", str(a.hooks[ip.key]), TESTED, "start",
                               "begin", "-"], HOOK_ENV, domain_xml(TESTED))
                if r.rc != 0 or "live" not in r.stderr:
                    raise RuntimeError(f"importtime run ({ip.key}): {r.stderr[-500:]}")
                a.hook(TESTED, "stopped", "end", ip.key)
                self.res["importtime" if variant == "full" else "importtime_fast"][ip.key] = \
                    parts.parse_importtime(r.stderr)

    def start_modules(self, key: str) -> list[str]:
        """The top-level imports a hook `start` makes beyond a bare interpreter (from importtime)."""
        rows = self.res["importtime"].get(key, [])
        return [name for _, _, depth, name in rows if depth == 0]

    def trace(self, size: int) -> None:
        """One hook `start` and `stop` per interpreter under strace: every process it spawns,
        when and for how long."""
        strace = parts.strace_bin()
        if strace is None:
            return
        a = self.ours["A"]
        from vflab.lab import domain_xml
        out: dict[str, Any] = {}
        variants = [("start", "begin", False), ("stopped", "end", False)]
        if self.fast_path:
            variants.append(("start", "begin", True))
        got: dict[str, list[dict[str, Any]]] = {}
        for i in range(self.args.trace_runs):
            for ip in rotated(self.interps, i):
                for op, sub, full in variants:
                    a.sync()
                    if full:
                        a.forget_fast(TESTED, ip.key)
                    f = self.tmp / f"strace-{ip.key}-{op}.txt"
                    with netns(a.lab.host):
                        r = timed([strace, *parts.STRACE_ARGS, "-o", str(f), str(a.hooks[ip.key]), TESTED, op, sub,
                                   "-"], HOOK_ENV, domain_xml(TESTED))
                    if r.rc != 0:
                        raise RuntimeError(f"strace of the hook ({ip.key} {op}): {r.stderr[-500:]}")
                    tl = parts.timeline(parts.parse_strace(f))
                    tl["wall_ms"] = r.seconds * 1e3
                    got.setdefault(f"{ip.key} {op}" + (" full-path" if full else ""), []).append(tl)
                    if full:
                        a.hook(TESTED, "stopped", "end", ip.key)
        for key, tls in got.items():  # the call with the median total: one real call, not a mix
            tls.sort(key=lambda tl: tl.get("total_ms") or 0.0)
            out[key] = {**tls[len(tls) // 2], "calls": len(tls),
                        "totals_ms": [tl.get("total_ms") for tl in tls]}
        self.res["trace"][size] = out

    def breakdown(self, size: int) -> None:
        """The hook's parts run alone, interleaved with the whole hook, for each interpreter:
        interpreter start, imports, the `nft -f` batches, the reads of foreign chains."""
        a = self.ours["A"]
        cmds: dict[str, tuple[list[str], dict[str, str], str]] = {}
        for ip in self.interps:
            k = ip.key
            cmds[f"{k}: python -I -S -c pass"] = (ip.bare(), HOOK_ENV, "")
            cmds[f"{k}: python -I -c pass (with site)"] = ([ip.python, "-I", "-c", "pass"], HOOK_ENV, "")
            cmds[f"{k}: -IS + import virt_forward.hook"] = (
                ip.imports("from virt_forward.hook import qemu_main"), HOOK_ENV, "")
            cmds[f"{k}: -IS + import hook, engine"] = (
                ip.imports("from virt_forward.hook import qemu_main; import virt_forward.engine"), HOOK_ENV, "")
            if self.fast_path:
                cmds[f"{k}: -IS + import hook, fastpath (the fast path's imports)"] = (
                    ip.imports("from virt_forward.hook import qemu_main; import virt_forward.fastpath"), HOOK_ENV, "")
            mods = self.start_modules(k)
            if mods:
                cmds[f"{k}: -IS + every import of a start ({len(mods)} top-level)"] = (
                    ip.imports("import " + ", ".join(mods)), HOOK_ENV, "")
        # nft batches of the tested guest's start and stop (built by the snapshot's own code)
        nft_bin = shutil.which("nft", path="/usr/sbin:/sbin") or "nft"
        batches: list[tuple[str, str]] = []
        try:
            from virt_forward import engine, nft
            ctx = engine.Context(a.cfg, a.state)
            plan = engine.desired(ctx, TESTED).plan
            assert plan is not None
            batches = [("nft -f - of nft.change(None, plan): table skeleton + 10 elements in",
                        nft.change(None, plan, hairpin=True)),
                       ("nft -f - of nft.change(plan, None): skeleton + 10 elements out",
                        nft.change(plan, None, hairpin=True, last=False)),
                       ("nft -f - of the 10 elements alone, in", nft.batch(nft.add_guest(plan))),
                       ("nft -f - of the 10 elements alone, out", nft.batch(nft.remove_guest(plan)))]
        except Exception as exc:  # the engine's API moved: skip that part, say so
            self.res.setdefault("notes", []).append(f"nft batches not timed alone: {type(exc).__name__}: {exc}")
        # the reads the hook makes: every command seen in its strace that changes nothing
        reads: dict[str, list[str]] = {}
        for key_op, tl in self.res["trace"].get(size, {}).items():
            for row in tl.get("rows", []):
                argv = row["argv"]
                name = Path(argv[0]).name if argv else ""
                writes = "-f" in argv or "--noflush" in argv or name.endswith("-restore") or "-c" in argv
                if argv and not writes:
                    reads.setdefault(" ".join([name, *argv[1:]]), [row["exe"], *argv[1:]])
        t: dict[str, list[float]] = {k: [] for k in cmds}
        for ip in self.interps:
            t[f"{ip.key}: the hook, start"] = []
            t[f"{ip.key}: the hook, stop"] = []
            if self.fast_path:
                t[f"{ip.key}: the hook, start, full path"] = []
        a1 = self.ours["A1"]
        in_a1 = bool(size) and a1.count() > 0  # the probe's table: a table, but 1 forward in it
        for label, _ in batches:
            t[label] = []
            if in_a1:
                t[f"{label}, lab A1: the table holds 1 forward"] = []
        for label in reads:
            t[label] = []
        say(f"breakdown with {size} others: {len(t)} parts x {self.args.parts_runs} rounds, interleaved")
        with netns(a.lab.host):
            for i in range(self.args.parts_runs):
                items = list(cmds.items())
                for label, (argv, env, stdin) in rotated(items, i):
                    t[label].append(timed(argv, env, stdin).seconds)
                for ip in rotated(self.interps, i):
                    t[f"{ip.key}: the hook, start"].append(a.hook(TESTED, "start", "begin", ip.key).seconds)
                    t[f"{ip.key}: the hook, stop"].append(a.hook(TESTED, "stopped", "end", ip.key).seconds)
                    if self.fast_path:
                        t[f"{ip.key}: the hook, start, full path"].append(
                            a.hook(TESTED, "start", "begin", ip.key, full_path=True).seconds)
                        a.hook(TESTED, "stopped", "end", ip.key)
                for label, text in batches:  # start batch then stop batch: the kernel ends as it was
                    r = timed([nft_bin, "-f", "-"], CHILD_ENV, text)
                    if r.rc != 0:
                        raise RuntimeError(f"{label}: {r.stderr.strip()}")
                    t[label].append(r.seconds)
                if in_a1:  # the same batches where the table exists but holds 1 forward, not 10,000
                    with netns(a1.lab.host):
                        for label, text in batches:
                            r = timed([nft_bin, "-f", "-"], CHILD_ENV, text)
                            if r.rc != 0:
                                raise RuntimeError(f"{label} in A1: {r.stderr.strip()}")
                            t[f"{label}, lab A1: the table holds 1 forward"].append(r.seconds)
                for label, argv in reads.items():
                    t[label].append(timed(argv, CHILD_ENV).seconds)
        self.res["breakdown"][size] = t

    # -------------------------------------------------------------- 2. reconcile-like
    def install_others(self, lo: int, hi: int) -> None:
        """Guests lo..hi-1: the post's hook for each (its rules are where the post puts them);
        ours `virt-forward apply` for each, or, beyond --apply-sample guests at each end of the
        1,000, one `reconcile` for the middle ones (the same kernel state and records)."""
        a, b = self.ours["A"], self.post["B"]
        rec = self.res["reconcile"]
        n, k = self.args.guests, self.args.apply_sample
        sampled = [i for i in range(lo, hi) if self.args.apply_all or i < k or i >= n - k]
        say(f"guests {lo}..{hi - 1}: the post's hook each; ours `virt-forward apply` for {len(sampled)} of them, "
            "interleaved" + ("" if len(sampled) == hi - lo else ", one `reconcile` for the others"))
        middle = [i for i in range(lo, hi) if i not in set(sampled)]
        if middle:
            names = [other(i)[0] for i in range(0, max(middle) + 1)]
            r = a.cli("reconcile", "--running", *names)
            if r.rc != 0:
                raise RuntimeError(f"reconcile of guests 0..{max(middle)}: {r.stderr[-300:]}")
            rec.setdefault("ours_middle", []).append({"guests": len(names), "seconds": r.seconds})
        for i in range(lo, hi):
            name = other(i)[0]
            if i in sampled:
                rec.setdefault("ours", []).append(a.apply(name).seconds)
                rec.setdefault("ours_index", []).append(i)
            rec.setdefault("post", []).append(b.hook(name, "start", "begin").seconds)
            if (i + 1) % 100 == 0:
                say(f"  {i + 1} guests: ours {sum(rec.get('ours', [])):.1f} s ({len(rec.get('ours', []))} applies), "
                    f"post {sum(rec['post']):.1f} s so far")

    # -------------------------------------------------------------- 3. packet path
    def packet(self, stage: int) -> None:
        a, b = self.ours["A"], self.post["B"]
        a.apply(PROBE)
        b.install_as_if_started_first(GUEST1, HTTP_PORT)
        for key in ("A", "B"):
            got = http_get(self.labs[key])
            if not got.startswith("HTTP/1.1 200"):
                raise RuntimeError(f"lab {key}: probe forward does not work with {stage} others: {got}")
        counts = {"A": a.count(), "B": b.count(), "A1": self.ours["A1"].count(), "B1": self.post["B1"].count()}
        say(f"packet path, forwards installed {counts}: wrk {self.args.rounds} rounds x "
            f"{self.args.seconds:g} s per lab, interleaved A, A1, B, B1")
        for key in ("A", "A1", "B", "B1"):  # warm up (ARP, caches), not counted
            wrk(self.labs[key], 1, self.args.conns)
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in counts}
        for _ in range(self.args.rounds):
            for key in ("A", "A1", "B", "B1"):
                runs[key].append(wrk(self.labs[key], self.args.seconds, self.args.conns))
        self.res["packet"][stage] = {"counts": counts, "runs": runs,
                                     "post_forward_rules": self.post["B"].forward_rules()}
        a.remove(PROBE)
        b.hook(PROBE, "stopped", "end")

    # -------------------------------------------------------------- 4. memory
    def memory(self) -> None:
        a, b = self.ours["A"], self.post["B"]
        say("memory: peak RSS of the hook with all forwards installed")
        gtime = shutil.which("time", path="/usr/bin:/bin")
        if gtime is None:
            self.res["memory"] = {}
            return
        from vflab.lab import domain_xml
        a.sync()
        mem: dict[str, Any] = {}
        tree = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
        for ip in self.interps:
            # The hook's own code path in-process, so RUSAGE_SELF is the hook's Python alone.  Started
            # through /usr/bin/time: a child exec'ed straight from this (large) process would inherit
            # its high-water RSS in ru_maxrss.
            probe = (f"import json,resource,sys\nsys.path.append({ip.location!r})\n"
                     "from virt_forward.hook import qemu_main\n"
                     f"rc=qemu_main(sys.argv[1:], config_dir={str(a.cfg)!r}, state_dir={str(a.states[ip.key])!r})\n"
                     "print(json.dumps({'self':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))\n")
            for op, sub in (("start", "begin"), ("stopped", "end")):
                if op == "start":  # the full path: the most the hook imports and holds
                    a.forget_fast(TESTED, ip.key)
                with netns(a.lab.host):
                    r = timed([gtime, "-v", ip.python, "-I", "-S", "-c", probe, TESTED, op, sub, "-"], HOOK_ENV,
                              domain_xml(TESTED))
                if "live" not in r.stderr and "removed" not in r.stderr:
                    raise RuntimeError(f"memory probe ({ip.key}): hook {op} did not act: {r.stderr[-400:]}")
                mem[f"{ip.key} {op}"] = json.loads(r.stdout.strip().splitlines()[-1])["self"]
                # the hook file exactly as libvirt runs it, same op again
                back = ("stopped", "end") if op == "start" else ("start", "begin")
                a.hook(TESTED, *back, ip.key)
                with netns(a.lab.host):
                    r = timed([gtime, "-v", str(a.hooks[ip.key]), TESTED, op, sub, "-"], HOOK_ENV, domain_xml(TESTED))
                m = tree.search(r.stderr)
                mem[f"{ip.key} {op} tree"] = int(m.group(1)) if m else None
        for op, sub in (("start", "begin"), ("stopped", "end")):
            with netns(b.lab.host):
                r = timed([gtime, "-v", str(b.hook_script), TESTED, op, sub, "-"], b.env, "")
            m = tree.search(r.stderr)
            mem[f"post {op} tree"] = int(m.group(1)) if m else None
        self.res["memory"] = mem

    # -------------------------------------------------------------- watch: memory and repair time
    def watch(self, tmp: Path) -> None:
        a = self.ours["A"]
        lab = a.lab
        ip = a.main
        helptext = subprocess.run(ip.cli("--help"), capture_output=True, text=True, env=ip.env).stdout
        if not re.search(r"^\s+watch\b", helptext, re.M):
            self.res["watch"] = None
            return
        want = a.count()
        say(f"`virt-forward watch` with {want} forwards: peak RSS idle, then after `nft delete table` (repair)")
        log = tmp / "watch.log"
        with open(log, "w") as fh, netns(lab.host):
            proc = subprocess.Popen(ip.cli(*a.dirs(), "watch", "--interval", "30"), env=ip.env,
                                    stdout=fh, stderr=subprocess.STDOUT, cwd="/")
        lab.servers.append(proc)  # killed by lab.close() whatever happens

        def hwm(pid: int) -> int | None:
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                return None
            m = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
            return int(m.group(1)) if m else None

        def children(pid: int) -> list[int]:
            out: list[int] = []
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    out += [int(x) for x in (task / "children").read_text().split()]
                except OSError:
                    pass
            return out
        w: dict[str, Any] = {}
        try:
            deadline = time.monotonic() + 20
            while "watching" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(3)  # its first check: reads and compares the whole table
            w["idle_kib"] = hwm(proc.pid)
            t0 = time.perf_counter()
            lab.sh(lab.host, "nft", "delete", "table", "inet", "virt_forward")
            got = 0
            while time.perf_counter() - t0 < 60:
                got = a.count()
                if got == want:
                    break
                time.sleep(0.05)
            w["repair_s"] = time.perf_counter() - t0 if got == want else None
            time.sleep(1)
            w["after_repair_kib"] = hwm(proc.pid)
            w["children_kib"] = {str(c): hwm(c) for c in children(proc.pid)}
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        w["forwards"] = want
        w["log_tail"] = log.read_text()[-400:]
        self.res["watch"] = w

    # -------------------------------------------------------------- reconcile, one transaction
    def reconcile_command(self) -> None:
        """`virt-forward reconcile --running g0000 ...` after `nft flush ruleset` (libvirt's rules
        re-made), for each interpreter, records kept and wiped, state dir on tmpfs and on disk;
        plus: without --running (libvirt not importable: the records), and pyenv's python3 with
        its site (the interpreter earlier runs of this bench used).  All interleaved, with bare
        interpreter starts in the same rounds for the ratios."""
        a = self.ours["A"]
        lab = a.lab
        names = [other(i)[0] for i in range(self.args.guests)]
        # one --running with every name: repeated options cost argparse time in their square
        running = ["--running", *names]
        # A state dir per interpreter, as a host has one installation: the fast files name the code
        # that wrote them, and another installation's (another package dir) are stale by design.
        a.sync()  # Ours keeps one state dir per interpreter already (sides.Ours)
        states: dict[tuple[str, str], Path] = {}
        for ip in self.interps:
            disk = self.tmp / f"state-on-disk-{ip.key}"  # /tmp: the root file system here (not a tmpfs)
            shutil.copytree(a.states[ip.key], disk)
            states[("tmpfs", ip.key)], states[("disk", ip.key)] = a.states[ip.key], disk
        pyenv_python = os.path.realpath(a.main.python)  # the venv's base: pyenv's python3, with its site
        cases: list[tuple[str, Callable[[], Any]]] = []

        def case(key: str, state: Path, wipe: bool, args: list[str], env: dict[str, str] | None = None,
                 argv: list[str] | None = None) -> Callable[[], Any]:
            def run() -> Any:
                lab.sh(lab.host, "nft", "flush", "ruleset")
                lab.load_libvirt_rules()
                if wipe:
                    shutil.rmtree(state, ignore_errors=True)
                if argv is None:
                    r = a.cli("reconcile", *args, key=key, state=state, env=env)
                else:
                    with netns(lab.host):
                        r = timed([*argv, *a.dirs(state), "reconcile", *args], env or HOOK_ENV)
                n = a.count()
                if r.rc != 0 or n != 10 * len(names):
                    raise RuntimeError(f"reconcile: exit {r.rc}, {n} elements: {(r.stdout + r.stderr)[-300:]}")
                return r.seconds
            return run
        for (where, key), state in states.items():
            for records in ("kept", "wiped"):
                label = f"{key}, --running x{len(names)}, state on {where}, records {records}"
                cases.append((label, case(key, state, records == "wiped", running)))
        main = self.interps[0]
        cases.append((f"{main.key}, no --running (libvirt-python absent: the records), state on tmpfs, records kept",
                      case(main.key, a.state, False, [])))
        cases.append((f"pyenv python3 with its site (.pth files), --running x{len(names)}, state on tmpfs, records kept",
                      case(main.key, a.state, False, running,
                           env={"PATH": HOOK_ENV["PATH"], "PYTHONPATH": main.location},
                           argv=[pyenv_python, "-m", "virt_forward"])))
        say(f"`virt-forward reconcile` of {len(names)} guests after `nft flush ruleset`: {len(cases)} cases x "
            f"{self.args.reconcile_runs} runs, interleaved")
        out: dict[str, list[float]] = {k: [] for k, _ in cases}
        bare: dict[str, list[float]] = {ip.key: [] for ip in self.interps}
        bare["pyenv -I -S"] = []
        for i in range(self.args.reconcile_runs):
            for label, fn in rotated(cases, i):
                if "state on disk" in label and i >= self.args.reconcile_disk_runs:
                    continue  # seconds each: fewer rounds (they are not the figure the goal is about)
                out[label].append(fn())
                for ip in self.interps:
                    bare[ip.key].append(self.bare(ip))
                bare["pyenv -I -S"].append(timed([pyenv_python, "-I", "-S", "-c", "pass"], HOOK_ENV).seconds)
        self.res["reconcile_cmd"] = {"cases": out, "bare": bare, "guests": len(names)}
        self.reconcile_profile(running)

    def reconcile_profile(self, running: list[str]) -> None:
        """Where one `reconcile` (venv, state on tmpfs, records kept) spends its time: the processes
        it spawns (strace) and its Python functions (cProfile, in a second run)."""
        a = self.ours["A"]
        lab = a.lab
        ip = a.main
        prof: dict[str, Any] = {}
        strace = parts.strace_bin()
        for mode in ("strace", "cprofile"):
            if mode == "strace" and strace is None:
                continue
            lab.sh(lab.host, "nft", "flush", "ruleset")
            lab.load_libvirt_rules()
            f = self.tmp / f"reconcile.{mode}"
            argv = [*ip.cli(*a.dirs(), "reconcile", *running)]
            if mode == "strace":
                argv = [str(strace), *parts.STRACE_ARGS, "-o", str(f), *argv]
            else:
                argv = [ip.python, "-m", "cProfile", "-o", str(f), *argv[1:]]
            with netns(lab.host):
                r = timed(argv, ip.env)
            if r.rc != 0:
                raise RuntimeError(f"reconcile under {mode}: {r.stderr[-300:]}")
            if mode == "strace":
                tl = parts.timeline(parts.parse_strace(f))
                tl["wall_ms"] = r.seconds * 1e3
                prof["strace"] = tl
            else:
                import pstats
                st = pstats.Stats(str(f))
                rows = []
                for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
                    if file.startswith(("<frozen", "<string>")) or "builtins.exec" in fn or "__import__" in fn:
                        continue  # runpy and the import machinery: the imports show in importtime
                    rows.append({"func": f"{Path(file).name}:{line}({fn})", "calls": nc, "tottime": tt, "cumtime": ct})
                io: dict[str, list[float]] = {}
                for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
                    for name in ("fsync", "replace", "rename", "open", "unlink", "write", "mkdir", "listdir", "scandir"):
                        if fn in (f"<built-in method posix.{name}>", f"<built-in method {name}>"):
                            io[name] = [nc, tt * 1e3]
                prof["cprofile"] = {"wall_ms": r.seconds * 1e3, "io": io,
                                    "cumulative": sorted(rows, key=lambda x: -x["cumtime"])[:25],
                                    "tottime": sorted(rows, key=lambda x: -x["tottime"])[:15]}
        self.res["reconcile_profile"] = prof

    # -------------------------------------------------------------- the whole run
    def run(self) -> None:
        n = self.args.guests
        first = min(100, n)
        self.importtime()
        self.hook_latency(0)
        self.trace(0)
        self.breakdown(0)
        self.install_others(0, first)
        if not self.args.quick:
            self.hook_latency(10 * first)
            self.packet(10 * first)
        if n > first:
            self.install_others(first, n)
        self.hook_latency(10 * n)
        self.importtime(fast_too=True)
        self.lifecycle(10 * n)
        self.back_to_back(10 * n)
        self.trace(10 * n)
        self.breakdown(10 * n)
        self.packet(10 * n)
        self.memory()
        self.watch(self.tmp)
        self.reconcile_command()


# ------------------------------------------------------------------ report

def fmt_ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def goal(value: float, limit: float) -> str:
    return f"**{value:.2f}x** ({'met' if value <= limit else 'NOT met'}: <= {limit:g}x)"


def summary(res: dict[str, Any]) -> list[str]:
    """The table issue 9 asks for: per interpreter, figures and ratios from the last stage's rounds."""
    L: list[str] = []
    hook = res["hook"]
    big = max(hook, key=int)
    t = hook[big]
    interps = list(res["interpreters"])
    rc = res.get("reconcile_cmd") or {}
    L.append(f"| figure (p50; ratios from the same interleaved rounds) | " + " | ".join(interps) + " |")
    L.append("|---|" + "---:|" * len(interps))

    def row(label: str, f: Callable[[str], str]) -> None:
        L.append(f"| {label} | " + " | ".join(f(k) for k in interps) + " |")

    def bare(k: str) -> float:
        return p50(t[f"bare-{k} start"] + t[f"bare-{k} stop"])

    def both(k: str, key: str) -> list[float]:
        return [x + y for x, y in zip(t[f"{key} start"], t[f"{key} stop"])]
    n = f"{int(big):,}"
    zero = "@0" if int(big) else ""
    full = f"ours-{interps[0]} full-path start" in t
    row("bare start `python -I -S -c pass` (ms)", lambda k: fmt_ms(bare(k)))
    row("hook `start`, 0 others (the first guest: creates the table and the guard) (ms)",
        lambda k: fmt_ms(p50(t[f"ours-{k}{zero} start"])))
    row("... / bare (goal <= 3x)", lambda k: goal(p50(t[f"ours-{k}{zero} start"]) / bare(k), GOALS["start/bare"]))
    row(f"hook `start`, {n} others" + (", the guest started before (fast path)" if full else "") + " (ms)",
        lambda k: fmt_ms(p50(t[f"ours-{k} start"])))
    row("... / bare (goal <= 3x)", lambda k: goal(p50(t[f"ours-{k} start"]) / bare(k), GOALS["start/bare"]))
    if full:
        row(f"hook `start`, {n} others, full path (first start of the guest, or after any change) (ms)",
            lambda k: fmt_ms(p50(t[f"ours-{k} full-path start"])))
        row("... / bare (goal <= 3x)",
            lambda k: goal(p50(t[f"ours-{k} full-path start"]) / bare(k), GOALS["start/bare"]))
    if int(big):
        # (the @0 side starts on the fast path: a full-path @10k / fast @0 ratio would compare unlike
        # things; the full path's cost at 0 and at 10,000 others is in the stage tables below)
        row(f"`start` {n} others" + (" (fast path)" if full else "") + " / 0 others (goal <= 1.2x)",
            lambda k: goal(p50(t[f"ours-{k} start"]) / p50(t[f"ours-{k}@0 start"]), GOALS["10k/0"]))
    row(f"hook `stopped`, {n} others (ms)", lambda k: fmt_ms(p50(t[f"ours-{k} stop"])))
    row(f"`start` + `stopped`, {n} others (ms)", lambda k: fmt_ms(p50(both(k, f"ours-{k}"))))
    row("... / bare (goal <= 6x)", lambda k: goal(p50(both(k, f"ours-{k}")) / bare(k), GOALS["start+stop/bare"]))
    bb = res.get("back_to_back")
    if bb:
        b = bb["t"]
        row(f"hook `start` right after a stop, no pause (a restart), {bb['size']:,} others: ms, / bare "
            "(no goal: it carries the stop's kernel clean-up)",
            lambda k: f"{fmt_ms(p50(b[f'{k} back-to-back']))} = {p50(b[f'{k} back-to-back']) / p50(b[f'{k} bare']):.2f}x"
                      f" (after the pause: {fmt_ms(p50(b[f'{k} paused']))})")
    lc = res.get("lifecycle")
    if lc:
        def seq(k: str) -> list[float]:
            return [sum(x) for x in zip(*(lc["t"][f"{k} {op}"] for op in lc["ops"]))]
        row(f"libvirt's whole start + stop ({len(lc['ops'])} hook processes: {', '.join(lc['ops'])}), "
            f"{lc['size']:,} others (ms)", lambda k: fmt_ms(p50(seq(k))))
        row("... / bare of the same rounds", lambda k: f"{p50(seq(k)) / p50(lc['t'][f'bare-{k}']):.1f}x")
    if rc:
        g = rc["guests"]
        for where in ("tmpfs", "disk"):
            for records in ("kept", "wiped"):
                def cell(k: str, where: str = where, records: str = records) -> str:
                    v = rc["cases"].get(f"{k}, --running x{g}, state on {where}, records {records}")
                    if not v:
                        return "-"
                    return f"{p50(v):.2f} s = {goal(p50(v) / p50(rc['bare'][k]), GOALS['reconcile/bare'])}"
                row(f"`reconcile` {g:,} x 10 after a flush, state on {where}, records {records}: s, / bare "
                    "(goal <= 50x)", cell)
    return L


def meta(args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    """What the report says about the run, kept in results.json (bench/run --report re-renders it)."""
    return {"date": f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", "elapsed": elapsed,
            "loadavg": list(os.getloadavg()), "nproc": os.cpu_count(), "kernel": platform.release(),
            "nft": subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip(),
            "iptables": subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout.strip(),
            "code": os.environ.get("BENCH_CODE", "?"), "command": " ".join(["bench/run", *sys.argv[1:]]),
            "conns": args.conns}


def report(res: dict[str, Any]) -> str:
    L: list[str] = []
    m = res["meta"]
    L.append("# virt-forward benchmark results\n")
    L.append(f"- date: {m['date']}; wall time of the run: {m['elapsed']:.0f} s")
    L.append(f"- machine: nproc {m['nproc']}, kernel {m['kernel']}, {m['nft']}, {m['iptables']}")
    L.append(f"- load average at the end (1, 5, 15 min): {' '.join(f'{x:.1f}' for x in m['loadavg'])} "
             f"on {m['nproc']} cores (other work on the machine shows here; ratios are side by side)")
    L.append(f"- code: {m['code']}")
    L.append(f"- command: `{m['command']}`")
    for k, ip in res["interpreters"].items():
        L.append(f"- interpreter `{k}`: {ip['label']}; the hook file `virt-forward install` wrote starts "
                 f"`#!{ip['python']} -IS` and appends `{ip['location']}` to sys.path")
    L.append(f"- hooks run with env exactly `PATH=/bin:/usr/bin`, argv `bench-vm start begin -` / "
             f"`bench-vm stopped end -`, the domain XML on stdin; config and state dirs baked in by "
             f"`install --config-dir --state-dir`; state dir: {res.get('state_dir')}")
    L.append(f"- traffic: wrk {m['conns']} connections, 1 thread, `Connection: close` (one NEW TCP "
             f"connection per request) against {res.get('server')} in the guest namespace")
    for note in res.get("notes", []):
        L.append(f"- note: {note}")
    L.append("")
    L.append("## Summary (issue 9 item 5): the installed hook, per interpreter\n")
    L += summary(res)
    L.append("")

    # 1. hook latency
    hook = res["hook"]
    sizes = sorted(hook, key=int)
    interps = list(res["interpreters"])
    L.append("## 1. Hook latency (ms): one hook process, guest with 10 forwards\n")
    L.append(f"{len(hook[sizes[0]]['post start'])} runs per cell, p50 / p90. 'others' = forwards of other guests "
             "installed. In each stage every side below ran in the same rounds (rotating order): the hooks of "
             "both interpreters in lab A, their bare `python -I -S -c pass`, the post's hook in lab B and, at "
             "stages with others, labs A1/B1 with 0 others (@0). Each process started after a pause of "
             f"{res.get('settle', 0) * 1000:.0f} ms: a stop's deletions are finished by the kernel after the stop "
             "has its answer (an RCU grace period), and the next process touching nftables waits for that; a "
             "start right after a stop is measured on its own (summary).\n")
    for s_ in sizes:
        t = hook[s_]
        L.append(f"### {int(s_):,} others (kernel: ours {res['installed'][s_]['ours']:,} elements, "
                 f"post {res['installed'][s_]['post']:,} DNAT rules)\n")
        L.append("| side | start p50 | p90 | stop p50 | p90 | start+stop p50 | start / bare | start+stop / bare |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        keys = sorted({k.rsplit(" ", 1)[0] for k in t}, key=lambda k: (k.startswith("bare"), k))
        for k in keys:
            both = [x + y for x, y in zip(t[f"{k} start"], t[f"{k} stop"])]
            ip = next((i for i in interps if k.startswith(f"ours-{i}")), None)
            bare = p50(t[f"bare-{ip} start"] + t[f"bare-{ip} stop"]) if ip else None
            r1 = f"{p50(t[f'{k} start']) / bare:.2f}" if bare else ""
            r2 = f"{p50(both) / bare:.2f}" if bare else ""
            L.append(f"| {k} | {fmt_ms(p50(t[f'{k} start']))} | {fmt_ms(pct(t[f'{k} start'], .9))} "
                     f"| {fmt_ms(p50(t[f'{k} stop']))} | {fmt_ms(pct(t[f'{k} stop'], .9))} | {fmt_ms(p50(both))} "
                     f"| {r1} | {r2} |")
        if int(s_):
            ratios = ", ".join(f"{k} {op} **{p50(t[f'{k} {op}']) / p50(t[f'{k}@0 {op}']):.2f}x**"
                               for k in [f"ours-{i}" for i in interps] + ["post"] for op in ("start", "stop"))
            L.append(f"\np50 with {int(s_):,} others / with 0 (same rounds): {ratios}")
        L.append("")

    lc = res.get("lifecycle")
    if lc:
        L.append(f"### libvirt's whole sequence for one guest start and stop, {lc['size']:,} others (ms, p50)\n")
        L.append("libvirt runs the qemu hook at `prepare begin`, `start begin`, `started begin` when a guest "
                 "starts and `stopped end`, `release end` when it stops; the installed hook acts on all five "
                 "(`started` applies again, `release` removes again). Each column below is a hook process.\n")
        ops = lc["ops"]
        t = lc["t"]
        L.append("| interpreter | " + " | ".join(ops) + " | all five | / bare |")
        L.append("|---|" + "---:|" * (len(ops) + 2))
        for k in interps:
            seq_tot = [sum(x) for x in zip(*(t[f"{k} {op}"] for op in ops))]
            L.append(f"| {k} | " + " | ".join(fmt_ms(p50(t[f"{k} {op}"])) for op in ops) +
                     f" | {fmt_ms(p50(seq_tot))} | {p50(seq_tot) / p50(t[f'bare-{k}']):.1f}x |")
        L.append("")

    # where the time goes
    L += where_time_goes(res)

    # 2. reconcile
    rec = res["reconcile"]
    if rec:
        o, p = rec.get("ours", []), rec["post"]
        idx = rec.get("ours_index", [])
        L.append(f"## 2. {len(p):,} guests x 10 forwards from an empty ruleset, one process per guest, sequential\n")
        first = [x for x, i in zip(o, idx) if i < 100]
        last = [x for x, i in zip(o, idx) if i >= len(p) - 100]
        L.append("| | total s | per guest ms, first 100 | per guest ms, last 100 |")
        L.append("|---|---:|---:|---:|")
        if len(o) == len(p):
            total = f"{sum(o):.1f}"
        else:
            total = f"~{statistics.mean(o) * len(p):.0f} (est.: {len(o)} of {len(p):,} timed)"
        L.append(f"| ours: `virt-forward apply GUEST` each ({interps[0]}) | {total} | "
                 f"{statistics.mean(first) * 1000:.1f} | {statistics.mean(last) * 1000:.1f} |")
        L.append(f"| post: its hook `qemu GUEST start` each | {sum(p):.1f} | {statistics.mean(p[:100]) * 1000:.1f} "
                 f"| {statistics.mean(p[-100:]) * 1000:.1f} |")
        if rec.get("ours_middle"):
            mid = rec["ours_middle"][0]
            L.append(f"\nOurs' middle guests were installed by one `reconcile` of {mid['guests']} guests "
                     f"({mid['seconds']:.2f} s), to keep the run short (`--apply-all` applies them one by one).")
        L.append("")
    rc = res.get("reconcile_cmd")
    if rc:
        L.append(f"### `virt-forward reconcile` of {rc['guests']:,} guests x 10 forwards after `nft flush ruleset` "
                 "(libvirt's rules re-made), one transaction\n")
        L.append("Wall time of the process; every case ran in the same rounds (rotating order), with bare "
                 "interpreter starts after each case for the ratio.\n")
        L.append("| case | runs | p50 s | min s | max s | / bare of its interpreter |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for case, v in rc["cases"].items():
            k = case.split(",")[0]
            bk = "pyenv -I -S" if k.startswith("pyenv") else k
            bare = p50(rc["bare"][bk])
            L.append(f"| {case} | {len(v)} | {p50(v):.2f} | {min(v):.2f} | {max(v):.2f} | {p50(v) / bare:.0f}x |")
        L.append("\nbare starts in these rounds (ms, p50): " +
                 ", ".join(f"{k} {fmt_ms(p50(v))}" for k, v in rc["bare"].items()))
        L.append("")
        L += reconcile_analysis(res)
        prof = res.get("reconcile_profile") or {}
        rtl = prof.get("strace")
        if rtl:
            tot = rtl.get("total_ms") or 0.0
            L.append(f"One `reconcile` ({interps[0]}, tmpfs, records kept) under strace: {tot:.0f} ms; Python before "
                     f"its first child {rtl['before_first_child_ms']:.0f} ms; children {rtl['children_ms']:.0f} ms; "
                     f"Python alone {tot - rtl.get('with_children_ms', rtl['children_ms']):.0f} ms\n")
            L += process_rows(rtl["rows"])
            L.append("")
        cp = prof.get("cprofile")
        if cp:
            L.append(f"The same under cProfile ({cp['wall_ms']:.0f} ms wall with the profiler's overhead), "
                     "top functions by cumulative time:\n")
            L.append("| function | calls | cumulative ms | own ms |")
            L.append("|---|---:|---:|---:|")
            for r in cp["cumulative"]:
                L.append(f"| `{r['func']}` | {r['calls']} | {r['cumtime'] * 1e3:.1f} | {r['tottime'] * 1e3:.1f} |")
            L.append("")

    # 3. packet path
    pk = res["packet"]
    if pk:
        L.append("## 3. Packet path: NEW TCP connections/s through the DNAT (median of rounds)\n")
        L.append("Each stage measures 4 labs in turn (A, A1, B, B1) per round: ours and the post's at N "
                 "forwards and at 1 forward, side by side. The post's probe forward is the last rule of "
                 "nat PREROUTING and its FORWARD accept the last of the post's FORWARD rules (the guest "
                 "started first: the linear chain's worst case).\n")
        L.append("| forwards installed | ours conn/s | post conn/s | ours/post | ours N/1 | post N/1 | errors |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|")
        for stage in sorted(pk, key=int):
            d = pk[stage]
            med = {k: statistics.median(r["rate"] for r in v) for k, v in d["runs"].items()}
            errs = sum(r["errors"] for v in d["runs"].values() for r in v)
            L.append(f"| 1 (A1, B1) | {med['A1']:,.0f} | {med['B1']:,.0f} | {med['A1'] / med['B1']:.2f} | 1 | 1 | |")
            L.append(f"| {d['counts']['A']:,} (A, B: {d['counts']['B']:,} DNAT + {d['post_forward_rules']:,} "
                     f"FORWARD rules) | {med['A']:,.0f} | {med['B']:,.0f} | {med['A'] / med['B']:.2f} "
                     f"| **{med['A'] / med['A1']:.2f}** | **{med['B'] / med['B1']:.2f}** | {errs:.0f} |")
        L.append("\nGoal (issue 6): ours with 10,000 forwards >= 0.9x ours with 1.")
        L.append("")

    # 4. memory
    mem = res["memory"]
    if mem:
        L.append(f"## 4. Memory with {int(sizes[-1]):,} other forwards installed (peak RSS, MiB)\n")
        L.append("| process | start | stopped |")
        L.append("|---|---:|---:|")

        def mib(v: Any) -> str:
            return "-" if v is None else f"{v / 1024:.1f}"
        for k in interps:
            L.append(f"| ours ({k}): the hook's Python process alone (in-process RUSAGE_SELF; start on the full path) | "
                     f"{mib(mem.get(f'{k} start'))} | {mib(mem.get(f'{k} stopped'))} |")
            L.append(f"| ours ({k}): the hook file under /usr/bin/time -v, whole tree (max of any process; after an earlier start) | "
                     f"{mib(mem.get(f'{k} start tree'))} | {mib(mem.get(f'{k} stopped tree'))} |")
        L.append(f"| post: /usr/bin/time -v, whole tree | {mib(mem.get('post start tree'))} | "
                 f"{mib(mem.get('post stopped tree'))} |")
        w = res.get("watch")
        if w:
            kids = ", ".join(mib(v) for v in w["children_kib"].values()) or "-"
            rep = "did not finish in 60 s" if w["repair_s"] is None else f"{w['repair_s']:.2f} s"
            L.append(f"\n`virt-forward watch` ({interps[0]}) with {w['forwards']:,} forwards (VmHWM of its Python "
                     f"process): {mib(w['idle_kib'])} MiB after its start check, {mib(w['after_repair_kib'])} MiB "
                     f"after repairing a deleted table (repair: table deleted -> all {w['forwards']:,} elements "
                     f"back in {rep}); its `nft monitor` child: {kids} MiB.")
        L.append("")
    return "\n".join(L)


def fs_type(path: str) -> str:
    """The file system type of the mount holding `path` (longest mount point that is a prefix)."""
    best, kind = "", "?"
    with open("/proc/mounts") as fh:
        for line in fh:
            f = line.split()
            if len(f) > 2 and (path == f[1] or path.startswith(f[1].rstrip("/") + "/")) and len(f[1]) >= len(best):
                best, kind = f[1], f"{f[2]} ({f[1]})"
    return kind


def reconcile_analysis(res: dict[str, Any]) -> list[str]:
    """Which factor moves `reconcile`: from the cases measured side by side in this run."""
    rc = res["reconcile_cmd"]
    g = rc["guests"]
    interps = list(res["interpreters"])

    def get(k: str, where: str, rec: str) -> float:
        return p50(rc["cases"][f"{k}, --running x{g}, state on {where}, records {rec}"])
    k = interps[0]
    base, tw, dk, dw = (get(k, "tmpfs", "kept"), get(k, "tmpfs", "wiped"), get(k, "disk", "kept"),
                        get(k, "disk", "wiped"))
    L = ["### What moves `reconcile` (the 1.70 s / 0.60 s question)\n",
         f"Side by side in this run ({k}, p50): tmpfs + records kept {base:.2f} s; tmpfs + records wiped "
         f"{tw:.2f} s; disk + records kept {dk:.2f} s; disk + records wiped {dw:.2f} s "
         f"({dw / base:.1f}x the first)."]
    L.append(f"- records wiped vs kept, state on disk: +{dw - dk:.2f} s, {(dw - dk) / g * 1e3:.2f} ms per guest: "
             "with the records gone, reconcile writes every record again, and `StateStore.write` fsyncs each "
             "record and its directory; on the tmpfs the same costs "
             f"{tw - base:+.2f} s (an fsync is free there).")
    L.append(f"- disk vs tmpfs, records kept: {dk - base:+.2f} s"
             + (" (nothing is fsynced when nothing changed)." if dk / base < 1.25 else
                ": reconcile writes files even when no record changed."))
    cp = (res.get("reconcile_profile") or {}).get("cprofile") or {}
    if cp.get("io"):
        L.append("- system calls of one `reconcile` (tmpfs, records kept; cProfile, calls and ms): " +
                 ", ".join(f"os.{n} {int(v[0]):,} ({v[1]:.0f} ms)" for n, v in sorted(cp["io"].items())) + ".")
    by_interp = " vs ".join(f"{i} {get(i, 'tmpfs', 'kept'):.2f} s" for i in interps)
    others = [f"interpreter: {by_interp}"]
    for case, v in rc["cases"].items():
        if case.startswith(("pyenv", f"{k}, no --running")):
            others.append(f"{case.split(',')[0] if case.startswith('pyenv') else 'no --running (the records)'} "
                          f"{p50(v):.2f} s")
    L.append("- smaller factors, same rounds (tmpfs, records kept): " + "; ".join(others) + ". Asking libvirt "
             "for the running guests was not measured: neither interpreter has libvirt-python (reconcile "
             "without --running then falls back to the records, as the row above shows); with it, reconcile "
             "would also pay `import libvirt` and one XMLDesc call per running guest.")
    L.append(f"\nHere /run is {fs_type('/run')}, /tmp is {fs_type('/tmp')}, /dev/shm is {fs_type('/dev/shm')}: "
             "a state dir left at its default /run/virt-forward, or a test's temp dir, is on a disk on these "
             "machines; on a real host /run is a tmpfs.")
    bare = p50(rc["bare"][k])
    cases = {f"{w} + records {r}": get(k, w, r) for w in ("tmpfs", "disk") for r in ("kept", "wiped")}
    near = min(cases, key=lambda c: abs(cases[c] - 1.70))
    L.append(f"\nThe earlier figures: **0.60 s** (this bench, commit b577e8b) was measured with the state on "
             f"/dev/shm, records kept, `--running`, pyenv's python3 with its site: {base:.2f} s in this run. "
             f"**1.70 s (73x)**: the case of this run nearest to it is {near} ({cases[near]:.2f} s). 1.70 s / 73 "
             f"= 23 ms for the bare start it was divided by, {23 / (bare * 1e3):.1f}x the {bare * 1e3:.1f} ms a "
             "bare start takes in these rounds: that ratio was not taken side by side. Side by side here: "
             + "; ".join(f"{c} {v / bare:.0f}x" for c, v in cases.items()) + " a bare start.")
    L.append("")
    return L


def where_time_goes(res: dict[str, Any]) -> list[str]:
    L: list[str] = []
    interps = list(res["interpreters"])
    it = res.get("importtime") or {}
    if it:
        L.append("## Where the hook's time goes\n")
        L.append("### Imports of one hook `start` on the full path (`python -IS -X importtime HOOKFILE bench-vm start "
                 "begin -`; fast-path files removed first)\n")
        for k in interps:
            rows = it.get(k) or []
            total = sum(r[0] for r in rows)
            ours = sum(r[0] for r in rows if r[3].startswith("virt_forward"))
            L.append(f"**{k}**: {len(rows)} modules imported, {total / 1000:.1f} ms in all (self times summed; "
                     f"importtime itself adds some), of which virt_forward's own modules {ours / 1000:.1f} ms. "
                     "'cumulative' of a standard module counts what it imported itself, the first time anything "
                     "imported it.\n")
            # importtime prints a module after the modules it imported, one level deeper: a row's
            # parent is the next row one level up
            parent: list[str] = []
            for i, (_, _, depth, _) in enumerate(rows):
                parent.append(next((r[3] for r in rows[i + 1:] if r[2] == depth - 1), "(the hook file)")
                              if depth else "(the hook file)")
            ours_rows = [r for r in rows if r[3].startswith("virt_forward")]
            pulled = sorted(((r, parent[i]) for i, r in enumerate(rows)
                             if parent[i].startswith("virt_forward") and not r[3].startswith("virt_forward")),
                            key=lambda x: -x[0][1])[:14]
            L.append("| module the package imports (first importer) | cumulative ms | | virt_forward module | "
                     "self ms | | slowest modules, self | ms |")
            L.append("|---|---:|---|---|---:|---|---|---:|")
            slow = sorted(rows, key=lambda r: -r[0])[:14]
            mine = sorted(ours_rows, key=lambda r: -r[0])[:14]
            for i in range(max(len(pulled), len(slow), len(mine))):
                a = f"{pulled[i][0][3]} ({pulled[i][1]}) | {pulled[i][0][1] / 1000:.1f}" if i < len(pulled) else " | "
                m = f"{mine[i][3]} | {mine[i][0] / 1000:.1f}" if i < len(mine) else " | "
                b = f"{slow[i][3]} | {slow[i][0] / 1000:.1f}" if i < len(slow) else " | "
                L.append(f"| {a} | | {m} | | {b} |")
            L.append("")
    itf = res.get("importtime_fast") or {}
    if itf:
        L.append("### Imports of a `start` on the fast path (the guest started before; nothing changed since)\n")
        L.append("| interpreter | modules | ms in all (self summed) | virt_forward modules | the slowest, self ms |")
        L.append("|---|---:|---:|---|---|")
        for k in interps:
            rows = itf.get(k) or []
            mine_s = ", ".join(r[3] for r in rows if r[3].startswith("virt_forward"))
            slow_s = ", ".join(f"{r[3]} {r[0] / 1000:.1f}" for r in sorted(rows, key=lambda r: -r[0])[:6])
            L.append(f"| {k} | {len(rows)} | {sum(r[0] for r in rows) / 1000:.1f} | {mine_s} | {slow_s} |")
        L.append("")
    tr = res.get("trace") or {}
    bd = res.get("breakdown") or {}
    if tr:
        big = max(tr, key=int)
        for op in ("start", "stopped", "start full-path"):
            if not any(f"{k} {op}" in tr[big] for k in interps):
                continue
            L.append(f"### Per part: one hook `{op}`, {int(big):,} others (ms)\n")
            L.append("From the strace of one call (the processes) and the parts run alone (p50, same stage); "
                     "'Python before its first child' is interpreter start + imports + reading the config, "
                     "the record and planning.\n")
            L.append("| part | " + " | ".join(interps) + " |")
            L.append("|---|" + "---:|" * len(interps))

            def alone(k: str, label: str) -> str:
                v = bd.get(big, {}).get(f"{k}: {label}")
                return fmt_ms(p50(v)) if v else "-"

            def imports(k: str) -> str:
                v = bd.get(big, {})
                a, b = v.get(f"{k}: -IS + import hook, engine"), v.get(f"{k}: python -I -S -c pass")
                return fmt_ms(p50(a) - p50(b)) if a and b else "-"
            parts_rows: list[tuple[str, Callable[[str], str]]] = [
                ("interpreter start alone (`-I -S -c pass`)", lambda k: alone(k, "python -I -S -c pass")),
                ("imports alone (`-IS` + hook, engine) minus that", imports),
                ("Python before its first child (strace)",
                 lambda k: f"{tr[big][f'{k} {op}']['before_first_child_ms']:.1f}" if tr[big].get(f"{k} {op}") else "-"),
            ]
            cmds: list[str] = []
            for k in interps:
                for r in tr[big].get(f"{k} {op}", {}).get("rows", []):
                    if r["cmd"] not in cmds:
                        cmds.append(r["cmd"])
            for c in cmds:
                def child(k: str, c: str = c) -> str:
                    got = [r["ms"] for r in tr[big].get(f"{k} {op}", {}).get("rows", []) if r["cmd"] == c and r["ms"]]
                    return f"{sum(got):.1f}" if got else "-"
                parts_rows.append((f"child `{c}` (strace)", child))

            def field(name: str) -> Callable[[str], str]:
                def f(k: str) -> str:
                    tl = tr[big].get(f"{k} {op}")
                    return f"{tl[name]:.1f}" if tl and tl.get(name) is not None else "-"
                return f

            def after(k: str) -> str:
                tl = tr[big].get(f"{k} {op}")
                if not tl or tl.get("total_ms") is None or "with_children_ms" not in tl:
                    return "-"
                return f"{tl['total_ms'] - tl['before_first_child_ms'] - tl['with_children_ms']:.1f}"

            def par(k: str) -> str:
                tl = tr[big].get(f"{k} {op}")
                return "yes" if tl and tl.get("parallel") else "no"
            parts_rows += [("children overlap (several run at once)?", par),
                           ("children, wall time while the hook runs (union of their runs)", field("children_ms")),
                           ("a child still runs after the hook exited, for (ms)", field("outlive_ms")),
                           ("waiting for children to exec (vfork/clone3 to exec, union)", field("spawn_ms")),
                           ("Python alone after its first spawn (not waiting, no child running)", after),
                     ("total under strace", lambda k: f"{tr[big][f'{k} {op}']['total_ms']:.1f}"
                      if tr[big].get(f"{k} {op}") else "-"),
                     ("the hook alone, p50 of the breakdown rounds",
                      lambda k: alone(k, {"start": "the hook, start", "stopped": "the hook, stop",
                                          "start full-path": "the hook, start, full path"}[op]))]
            for label, f in parts_rows:
                L.append(f"| {label} | " + " | ".join(f(k) for k in interps) + " |")
            L.append("")
    for size in sorted(tr, key=int):
        L.append(f"### One hook call under strace, {int(size):,} others (`strace -f -ttt --seccomp-bpf -e "
                 "trace=execve,exit_group,vfork,clone,clone3`)\n")
        L.append("Each process the hook spawns: when it was spawned and exec'ed (ms after the hook's exec) and "
                 "how long it ran. 'Python alone' = the hook's wall time minus the time a child was running or "
                 "being spawned. Of the calls traced, the one with the median total is shown.\n")
        for key, tl in tr[size].items():
            if not tl:
                continue
            tot = tl.get("total_ms") or 0.0
            calls = f", median of {tl['calls']} calls: " + "/".join(f"{x:.0f}" for x in tl["totals_ms"]) \
                if tl.get("calls", 1) > 1 else ""
            alone = tot - tl.get("with_children_ms", tl["children_ms"])
            L.append(f"**{key}**: {tot:.1f} ms traced{calls} ({tl['wall_ms']:.1f} ms wall incl. strace's start); "
                     f"Python before its first child {tl['before_first_child_ms']:.1f} ms; children "
                     f"{tl['children_ms']:.1f} ms of wall time{' (some side by side)' if tl.get('parallel') else ''}; "
                     f"Python alone (no child running or being spawned) {alone:.1f} ms\n")
            L += process_rows(tl["rows"])
            L.append("")
    if bd:
        bsizes = sorted(bd, key=int)
        L.append("### The parts run alone (ms, p50; interleaved with the whole hook, lab A)\n")
        L.append("| part | " + " | ".join(f"{int(s):,} others" for s in bsizes) + " |")
        L.append("|---|" + "---:|" * len(bsizes))
        labels: list[str] = []
        for s in bsizes:
            labels += [x for x in bd[s] if x not in labels]
        for part in labels:
            L.append(f"| {part} | " + " | ".join(fmt_ms(p50(bd[s][part])) if part in bd[s] else "-"
                                                 for s in bsizes) + " |")
        L.append("")
    return L


# ------------------------------------------------------------------ entry

def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guests", type=int, default=1000, help="background guests x 10 forwards (default 1000)")
    ap.add_argument("--runs", type=int, default=20, help="hook runs per cell (default 20)")
    ap.add_argument("--settle", type=float, default=0.05,
                    help="seconds of pause before each timed hook process (default 0.05; see Bench.settle)")
    ap.add_argument("--rounds", type=int, default=3, help="traffic rounds per lab and stage (default 3)")
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds per traffic measurement (default 2)")
    ap.add_argument("--conns", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--reconcile-runs", type=int, default=5, help="runs of `reconcile` per case (default 5)")
    ap.add_argument("--reconcile-disk-runs", type=int, default=3,
                    help="of those, runs of the cases with the state dir on disk (default 3: seconds each)")
    ap.add_argument("--trace-runs", type=int, default=3,
                    help="hook calls under strace per interpreter and op; the median one is shown (default 3)")
    ap.add_argument("--parts-runs", type=int, default=7, help="rounds of the hook's parts in the breakdown")
    ap.add_argument("--apply-sample", type=int, default=100,
                    help="ours: `apply` one by one for this many guests at each end of the run (default 100)")
    ap.add_argument("--apply-all", action="store_true", help="ours: `apply` every background guest one by one")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 20 guests, 5 runs, 1 round of 1 s, no 1,000 stage")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS.md")
    ap.add_argument("--report", metavar="JSON", help="only render RESULTS.md again from a results.json")
    args = ap.parse_args(argv)
    if args.report:
        text = report(json.loads(Path(args.report).read_text()))
        print(text)
        if not args.no_write:
            (BENCH / "RESULTS.md").write_text(text + "\n")
        return 0
    if args.quick:
        args.guests, args.runs, args.rounds, args.seconds, args.parts_runs, args.reconcile_runs = 20, 5, 1, 1.0, 3, 1
        args.trace_runs = 1
    if os.geteuid() != 0:
        print("bench/run: needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    for tool in ("wrk", "nft", "iptables"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            print(f"bench/run: {tool} is not installed (bench/run installs it with apt-get)", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    t0 = time.perf_counter()
    bench = Bench(args)
    prefixes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="vf-bench-"))
    ok = False
    try:
        with contextlib.ExitStack() as stack:
            try:
                bench.setup(stack, tmp)
                prefixes = [lab.prefix for lab in bench.labs.values()]
                bench.run()
                ok = True
            finally:
                prefixes = prefixes or [lab.prefix for lab in bench.labs.values()]
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # let the cleanup finish
                    signal.signal(sig, signal.SIG_IGN)
                say("removing namespaces")
    except KeyboardInterrupt:
        say("interrupted: namespaces removed")
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(bench, "run_root", None):
            shutil.rmtree(bench.run_root, ignore_errors=True)
        left = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if any(ns.startswith(p) for p in prefixes)]
        if left:
            print(f"bench/run: namespaces left behind: {left}", file=sys.stderr)
    if not ok:
        return 1
    bench.res["meta"] = meta(args, time.perf_counter() - t0)
    text = report(bench.res)
    print(text)
    if not args.no_write:
        (BENCH / "RESULTS.md").write_text(text + "\n")
        (BENCH / "results.json").write_text(json.dumps(bench.res, indent=1, default=str) + "\n")
        say(f"written {BENCH / 'RESULTS.md'} and {BENCH / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
