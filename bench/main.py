"""virt-forward benchmarks, side by side with the post's iptables scripts (issue 6).

Four labs (`virt_forward.lab.Lab`: a host namespace with libvirt 9.0's rules,
guest1 with servers, an outside client), all alive for the whole run:

  A   ours, grows 0 -> 1,000 -> 10,000 forwards      B   the post's, grows alike
  A1  ours, 1 forward (the probe) all along           B1  the post's, 1 forward all along

Measurements are interleaved between the labs (A, B, A, B ... and A, A1, B, B1 for
traffic), so that the ratios printed come from one run on the same noisy machine.
Every namespace is removed at the end, also on failure, Ctrl-C or SIGTERM.
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

from virt_forward.lab import PUBLIC4, Lab

from .netns import netns
from .sides import REPO, Ours, Post, console_script, timed, tmpfs_dir

BENCH = Path(__file__).resolve().parent
GUEST1 = "192.168.122.10"  # the lab's guest1: the address every traffic test reaches
HTTP_PORT = 8000  # the probe forward: PUBLIC4:8000 -> guest1:8000 (bench/httpd)
TESTED = "bench-vm"  # the guest whose hook is timed: 10 forwards
TESTED_PORTS = list(range(7001, 7011))
PROBE = "probe"


def other(i: int) -> tuple[str, str, list[int]]:
    """The i-th background guest: 10 forwards, public ports 10000+10i .. +9, same port inside."""
    return f"g{i:04d}", f"10.122.{i // 250}.{i % 250 + 1}", [10000 + 10 * i + k for k in range(10)]


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
        self.res: dict[str, Any] = {"hook": {}, "reconcile": {}, "packet": {}, "memory": {}, "breakdown": {}}
        self.labs: dict[str, Lab] = {}

    # -------------------------------------------------------------- setup
    def setup(self, stack: contextlib.ExitStack, tmp: Path) -> None:
        self.tmp = tmp
        for key in ("A", "B", "A1", "B1"):
            say(f"lab {key}: namespaces, bridge, libvirt 9.0 rules, guest1")
            self.labs[key] = stack.enter_context(Lab(guests=1))
        cmd, self.res["server"] = http_server_cmd(tmp)
        for key, lab in self.labs.items():
            start_http(lab, cmd)
        self.run_root = tmpfs_dir()
        self.res["state_dir"] = "tmpfs (/dev/shm), like /run" if self.run_root else "disk (no tmpfs found)"
        self.ours = {k: Ours(self.labs[k], tmp / k, self.run_root and self.run_root / k) for k in ("A", "A1")}
        self.post = {k: Post(self.labs[k], tmp / k) for k in ("B", "B1")}
        for side in (*self.ours.values(), *self.post.values()):
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

    # -------------------------------------------------------------- 1. hook latency
    def hook_latency(self, size: int) -> None:
        """At size > 0, labs A1/B1 (probe removed: 0 others) run in the same rounds, so the ratio
        size/0 is measured side by side, not across minutes of a noisy machine."""
        sides = {"ours": self.ours["A"], "post": self.post["B"]}
        if size:
            self.ours["A1"].remove(PROBE)
            self.post["B1"].hook(PROBE, "stopped", "end")
            sides.update({"ours@0": self.ours["A1"], "post@0": self.post["B1"]})
        say(f"hook latency with {size} other forwards: {self.args.runs} x (start, stop) per side, "
            f"interleaved {', '.join(sides)}")
        t: dict[str, list[float]] = {f"{k} {op}": [] for k in sides for op in ("start", "stop")}
        for _ in range(self.args.runs):
            for op, sub in (("start", "begin"), ("stop", "end")):
                for k, side in sides.items():
                    t[f"{k} {op}"].append(side.hook(TESTED, "start" if op == "start" else "stopped", sub).seconds)
        self.res["hook"][size] = t
        self.res.setdefault("installed", {})[size] = {"ours": sides["ours"].count(), "post": sides["post"].count()}
        if size:
            self.ours["A1"].apply(PROBE)
            self.post["B1"].hook(PROBE, "start", "begin")

    # -------------------------------------------------------------- 2. reconcile-like
    def install_others(self, lo: int, hi: int) -> None:
        a, b = self.ours["A"], self.post["B"]
        say(f"guests {lo}..{hi - 1}: one `virt-forward apply` each vs the post's hook each, interleaved")
        rec = self.res["reconcile"]
        for i in range(lo, hi):
            name = other(i)[0]
            rec.setdefault("ours", []).append(a.apply(name).seconds)
            rec.setdefault("post", []).append(b.hook(name, "start", "begin").seconds)
            if (i + 1) % 100 == 0:
                say(f"  {i + 1} guests: ours {sum(rec['ours']):.1f} s, post {sum(rec['post']):.1f} s so far")

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
        mem: dict[str, Any] = {}
        # The hook's own code path, in-process, so RUSAGE_SELF is the hook's Python alone.  Started
        # through /usr/bin/time: a child exec'ed straight from this (large) process would inherit
        # its high-water RSS in ru_maxrss.
        probe = ("import json,resource,sys\nfrom virt_forward.cli import main\n"
                 "rc=main(['hook',*sys.argv[1:]])\n"
                 "print(json.dumps({'self':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
                 "'children':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")
        tree = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
        for op, sub in (("start", "begin"), ("stopped", "end")):
            with netns(a.lab.host):
                r = timed([gtime, "-v", sys.executable, "-c", probe, TESTED, op, sub, "-"], a.env, "")
            if "live" not in r.stderr and "removed" not in r.stderr:
                raise RuntimeError(f"memory probe: hook {op} did not act: {r.stderr}")
            mem[f"ours {op}"] = json.loads(r.stdout.strip().splitlines()[-1])
            for side, lab, script, env in (("ours", a.lab, a.hook_script, a.env),
                                           ("post", b.lab, b.hook_script, b.env)):
                if side == "ours":  # the hook script exactly as libvirt runs it, same op again
                    with netns(lab.host):
                        r = timed([gtime, "-v", str(script), TESTED, "stopped" if op == "start" else "start",
                                   "end" if op == "start" else "begin", "-"], env, "")
                        r = timed([gtime, "-v", str(script), TESTED, op, sub, "-"], env, "")
                else:
                    with netns(lab.host):
                        r = timed([gtime, "-v", str(script), TESTED, op, sub, "-"], env, "")
                m = tree.search(r.stderr)
                mem[f"{side} {op} tree"] = int(m.group(1)) if m else None
        self.res["memory"] = mem

    # -------------------------------------------------------------- where the hook's time goes
    def breakdown(self, size: int) -> None:
        """Time the hook's parts alone: interpreter, imports, the nft batch, the reads it makes."""
        from virt_forward import engine, nft
        a = self.ours["A"]
        ctx = engine.Context(a.cfg, a.state)
        plan = engine.desired(ctx, TESTED).plan
        assert plan is not None
        add = nft.change(None, plan, hairpin=True)
        rm = nft.change(plan, None, hairpin=True, last=False)
        nft_bin = shutil.which("nft", path="/usr/sbin:/sbin") or "nft"
        save = shutil.which("iptables-save", path="/usr/sbin:/sbin") or "iptables-save"
        imports = "import virt_forward.cli, virt_forward.hook, virt_forward.engine, virt_forward.config"
        system_py = "/usr/bin/python3"
        cmds: dict[str, tuple[list[str], str]] = {
            "python -c pass (interpreter + site)": ([sys.executable, "-c", "pass"], ""),
            "python + imports": ([sys.executable, "-c", imports], ""),
        }
        if os.path.exists(system_py) and os.path.realpath(system_py) != os.path.realpath(sys.executable):
            cmds["/usr/bin/python3 -c pass (Debian's interpreter + site)"] = ([system_py, "-c", "pass"], "")
            cmds["/usr/bin/python3 + imports"] = ([system_py, "-c", imports], "")
        cmds.update({
            "nft -f (start batch)": ([nft_bin, "-f", "-"], add),
            "nft -f (stop batch)": ([nft_bin, "-f", "-"], rm),
            "iptables-save -t filter": ([save, "-t", "filter"], ""),
            "nft -j list tables (what the hook ran before b577e8b)": ([nft_bin, "-j", "list", "tables"], ""),
            "nft -j list chains (engine.nft_guard_chains now)": ([nft_bin, "-j", "list", "chains"], ""),
        })
        parts: dict[str, list[float]] = {k: [] for k in cmds}
        had_table = a.count() > 0
        for _ in range(self.args.parts_runs):
            with netns(a.lab.host):
                for label, (argv, stdin) in cmds.items():
                    parts[label].append(timed(argv, a.env, stdin).seconds)
        if not had_table:
            a.lab.sh(a.lab.host, "nft", "delete", "table", "inet", "virt_forward")
        self.res["breakdown"][size] = parts

    # -------------------------------------------------------------- watch: memory and repair time
    def watch(self, tmp: Path) -> None:
        a = self.ours["A"]
        lab = a.lab
        helptext = subprocess.run([a.cli, "--help"], capture_output=True, text=True).stdout
        if not re.search(r"^\s+watch\b", helptext, re.M):
            self.res["watch"] = None
            return
        want = a.count()
        say(f"`virt-forward watch` with {want} forwards: peak RSS idle, then after `nft delete table` (repair)")
        log = tmp / "watch.log"
        with open(log, "w") as fh, netns(lab.host):
            proc = subprocess.Popen([a.cli, "watch", "--interval", "30"], env=a.env,
                                    stdout=fh, stderr=subprocess.STDOUT)
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

    # -------------------------------------------------------------- a one-transaction reconcile, if any
    def reconcile_command(self) -> None:
        a = self.ours["A"]
        lab = a.lab
        helptext = subprocess.run([a.cli, "--help"], capture_output=True, text=True).stdout
        if not re.search(r"^\s+reconcile\b", helptext, re.M):
            self.res["reconcile_cmd"] = None
            return
        names = [other(i)[0] for i in range(self.args.guests)]
        running = [x for n in names for x in ("--running", n)]
        say(f"`virt-forward reconcile` of {len(names)} guests after `nft flush ruleset`, "
            "with /run records wiped (reboot) and kept, interleaved")
        out: dict[str, list[float]] = {"records wiped": [], "records kept": []}
        for _ in range(self.args.reconcile_runs):
            for case in out:
                lab.sh(lab.host, "nft", "flush", "ruleset")
                lab.load_libvirt_rules()
                if case == "records wiped":
                    shutil.rmtree(a.state, ignore_errors=True)
                with netns(lab.host):
                    r = timed([a.cli, "reconcile", *running], a.env)
                n = a.count()
                if r.rc != 0 or n != 10 * len(names):
                    raise RuntimeError(f"reconcile: exit {r.rc}, {n} elements: {(r.stdout + r.stderr)[-300:]}")
                out[case].append(r.seconds)
        self.res["reconcile_cmd"] = out

    # -------------------------------------------------------------- the whole run
    def run(self) -> None:
        n = self.args.guests
        first = min(100, n)
        self.hook_latency(0)
        self.breakdown(0)
        self.install_others(0, first)
        self.hook_latency(10 * first)
        self.breakdown(10 * first)
        self.packet(10 * first)
        if n > first:
            self.install_others(first, n)
            self.hook_latency(10 * n)
            self.breakdown(10 * n)
            self.packet(10 * n)
        self.memory()
        self.watch(self.tmp)
        self.reconcile_command()


# ------------------------------------------------------------------ report

def fmt_ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def report(res: dict[str, Any], args: argparse.Namespace, elapsed: float) -> str:
    L: list[str] = []
    now = datetime.datetime.now().astimezone()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src"], capture_output=True,
                           text=True).stdout.strip()
    nft_v = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    ipt_v = subprocess.run(["iptables", "--version"], capture_output=True, text=True).stdout.strip()
    L.append(f"# virt-forward benchmark results\n")
    L.append(f"- date: {now:%Y-%m-%d %H:%M %Z}; wall time of the run: {elapsed:.0f} s")
    L.append(f"- machine: nproc {os.cpu_count()}, kernel {platform.release()}, {nft_v}, {ipt_v}, "
             f"Python {platform.python_version()}")
    L.append(f"- load average at the end (1, 5, 15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
             f"on {os.cpu_count()} cores (other work on the machine shows here; ratios are side by side)")
    L.append(f"- code: {os.environ.get('BENCH_CODE') or f'work tree at {head}' + (' + uncommitted changes in src/' if dirty else '')}")
    L.append(f"- command: `{' '.join(['bench/run', *sys.argv[1:]])}`")
    L.append(f"- state dir of ours: {res.get('state_dir')}; interpreter of the hook: {sys.executable}")
    L.append(f"- traffic: wrk {args.conns} connections, 1 thread, `Connection: close` (one NEW TCP "
             f"connection per request) against {res.get('server')} in the guest namespace")
    L.append("")

    # 1. hook latency
    hook = res["hook"]
    sizes = sorted(hook, key=int)
    L.append("## 1. Hook latency (ms), guest with 10 forwards, wall time of one hook process\n")
    L.append(f"{len(hook[sizes[0]]['ours start'])} runs per cell. 'others' = forwards of other guests installed. "
             "At each stage with others, labs with 0 others (A1, B1 with their probe removed) run in the same "
             "rounds (order: ours, post, ours@0, post@0), so each N/0 ratio below is measured side by side.\n")
    L.append("| others | ours start p50 | p90 | ours stop p50 | p90 | post start p50 | p90 | post stop p50 | p90 "
             "| start ours/post | stop ours/post |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def hook_row(label: str, t: dict[str, list[float]], o: str, q: str) -> str:
        row = [label]
        for k in (f"{o} start", f"{o} stop", f"{q} start", f"{q} stop"):
            row += [fmt_ms(pct(t[k], .5)), fmt_ms(pct(t[k], .9))]
        row += [f"{pct(t[f'{o} start'], .5) / pct(t[f'{q} start'], .5):.2f}",
                f"{pct(t[f'{o} stop'], .5) / pct(t[f'{q} stop'], .5):.2f}"]
        return "| " + " | ".join(row) + " |"
    for s_ in sizes:
        t = hook[s_]
        if int(s_):
            L.append(hook_row("0 (same rounds)", t, "ours@0", "post@0"))
        c = res.get("installed", {}).get(s_, {})
        L.append(hook_row(f"**{int(s_):,}**" + (f" (kernel: {c.get('ours')}/{c.get('post')})"
                                                if c and int(s_) and c.get("ours") != int(s_) else ""),
                          t, "ours", "post"))
    L.append("")
    for s_ in sizes:
        if not int(s_):
            continue
        t = hook[s_]
        ratios = ", ".join(f"{k} **{pct(t[f'{k} {op}'], .5) / pct(t[f'{k}@0 {op}'], .5):.2f}x**" if False else
                           f"{k} {op} **{pct(t[f'{k} {op}'], .5) / pct(t[f'{k}@0 {op}'], .5):.2f}x**"
                           for k in ("ours", "post") for op in ("start", "stop"))
        L.append(f"- p50 with {int(s_):,} others / with 0, same rounds: {ratios}")
    L.append("\nGoals (issue 6): ours with 10,000 others <= 1.2x with 0; p50 under 80 ms.\n")

    # breakdown
    bd = res["breakdown"]
    if bd:
        L.append("### Where our hook's time goes (ms, p50; each part run alone in lab A)\n")
        bsizes = sorted(bd, key=int)
        L.append("| part | " + " | ".join(f"{int(s):,} others" for s in bsizes) + " |")
        L.append("|---|" + "---:|" * len(bsizes))
        for part in next(iter(bd.values())):
            L.append(f"| {part} | " + " | ".join(fmt_ms(pct(bd[s][part], .5)) for s in bsizes) + " |")
        L.append("")

    # 2. reconcile
    rec = res["reconcile"]
    if rec:
        o, p = rec["ours"], rec["post"]
        L.append(f"## 2. {len(o):,} guests x 10 forwards from an empty ruleset, one process per guest, sequential\n")
        L.append("| | total s | per guest ms, first 100 | per guest ms, last 100 |")
        L.append("|---|---:|---:|---:|")
        L.append(f"| ours: `virt-forward apply GUEST` each | {sum(o):.1f} | {statistics.mean(o[:100]) * 1000:.1f} "
                 f"| {statistics.mean(o[-100:]) * 1000:.1f} |")
        L.append(f"| post: its hook `qemu GUEST start` each | {sum(p):.1f} | {statistics.mean(p[:100]) * 1000:.1f} "
                 f"| {statistics.mean(p[-100:]) * 1000:.1f} |")
        L.append(f"\nours/post total: **{sum(o) / sum(p):.2f}x**. Goal (issue 6): under 1 s.")
        rc = res.get("reconcile_cmd")
        if rc is None:
            L.append("`virt-forward reconcile` (one transaction for all guests) does not exist in the CLI: "
                     "the figure above is the only way to reconcile.")
        else:
            L.append(f"\n`virt-forward reconcile --running ...` ({len(o):,} guests, one nft transaction) after "
                     "`nft flush ruleset` (libvirt's rules reloaded), wall time of the process:\n")
            L.append("| case | runs | p50 s | min s | max s | vs post's sequential re-run |")
            L.append("|---|---:|---:|---:|---:|---:|")
            for case, v in rc.items():
                L.append(f"| {case} | {len(v)} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} "
                         f"| {statistics.median(v) / sum(p):.3f}x |")
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
        L.append(f"| ours: the hook's Python process alone (in-process RUSAGE_SELF) | {mib(mem['ours start']['self'])} | {mib(mem['ours stopped']['self'])} |")
        L.append(f"| ours: /usr/bin/time -v, whole tree (max of any process) | {mib(mem.get('ours start tree'))} | "
                 f"{mib(mem.get('ours stopped tree'))} |")
        L.append(f"| post: /usr/bin/time -v, whole tree | {mib(mem.get('post start tree'))} | "
                 f"{mib(mem.get('post stopped tree'))} |")
        w = res.get("watch")
        if not w:
            L.append("\n`virt-forward watch`: does not exist in the CLI; not measured.")
        else:
            kids = ", ".join(mib(v) for v in w["children_kib"].values()) or "-"
            rep = "did not finish in 60 s" if w["repair_s"] is None else f"{w['repair_s']:.2f} s"
            L.append(f"\n`virt-forward watch` with {w['forwards']:,} forwards (VmHWM of its Python process): "
                     f"{mib(w['idle_kib'])} MiB after its start check, {mib(w['after_repair_kib'])} MiB after "
                     f"repairing a deleted table (repair: table deleted -> all {w['forwards']:,} elements back "
                     f"in {rep}); its `nft monitor` child: {kids} MiB.")
        L.append("")
    return "\n".join(L)


# ------------------------------------------------------------------ entry

def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guests", type=int, default=1000, help="background guests x 10 forwards (default 1000)")
    ap.add_argument("--runs", type=int, default=20, help="hook runs per cell (default 20)")
    ap.add_argument("--rounds", type=int, default=3, help="traffic rounds per lab and stage (default 3)")
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds per traffic measurement (default 2)")
    ap.add_argument("--conns", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--reconcile-runs", type=int, default=3, help="runs of `reconcile` per case")
    ap.add_argument("--parts-runs", type=int, default=7, help="runs of each hook part in the breakdown")
    ap.add_argument("--quick", action="store_true", help="smoke test: 20 guests, 5 runs, 1 round of 1 s")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.guests, args.runs, args.rounds, args.seconds, args.parts_runs, args.reconcile_runs = 20, 5, 1, 1.0, 3, 1
    if os.geteuid() != 0:
        print("bench/run: needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    for tool in ("wrk", "nft", "iptables"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            print(f"bench/run: {tool} is not installed (bench/run installs it with apt-get)", file=sys.stderr)
            return 2
    console_script("virt-forward")
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
    text = report(bench.res, args, time.perf_counter() - t0)
    print(text)
    if not args.no_write:
        (BENCH / "RESULTS.md").write_text(text + "\n")
        (BENCH / "results.json").write_text(json.dumps(bench.res, indent=1, default=str) + "\n")
        say(f"written {BENCH / 'RESULTS.md'} and {BENCH / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
