"""Where the hook's time goes with 0 and N other forwards (python3 -m bench.profile; root).

One lab; the N background forwards are installed with one `virt-forward reconcile`
(same kernel state and records as N/10 hook calls, in a second).  Then, at each
size: the hook's wall time, the parts it is made of run alone (interpreter,
imports, each nft/iptables command the engine runs, found by tracing the hook's
children), `python -X importtime`, and py-spy (if installed) over a few hook
runs, aggregated by function.  Writes bench/PROFILE.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from virt_forward.lab import Lab

from .main import GUEST1, TESTED, TESTED_PORTS, other, say
from .netns import netns
from .sides import Ours, timed

BENCH = Path(__file__).resolve().parent


def p50(f, n: int) -> float:  # type: ignore[no-untyped-def]
    return statistics.median(f() for _ in range(n))


def traced_children(ours: Ours, op: str, sub: str, tmp: Path) -> list[tuple[list[str], str]]:
    """The commands the hook runs (argv, executable), seen by strace; [] without strace."""
    strace = shutil.which("strace")
    if strace is None:
        return []
    out = tmp / "strace.txt"
    with netns(ours.lab.host):
        timed([strace, "-f", "-qq", "-e", "trace=execve", "-s", "200", "-o", str(out), str(ours.hook_script),
               TESTED, op, sub, "-"], ours.env, "")
    cmds = []
    for line in out.read_text().splitlines():
        m = re.search(r'execve\("([^"]+)", \[(.*?)\]', line)
        if m and "resumed" not in line and not m.group(1).endswith(("python3", "python3.11", "qemu-hook")):
            cmds.append(([a.strip('" ') for a in m.group(2).split(", ")], m.group(1)))
    return cmds


def main() -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.profile")
    ap.add_argument("--guests", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    lines: list[str] = [f"# Where the hook's time goes\n",
                        f"- {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, nproc {os.cpu_count()}, "
                        f"kernel {platform.release()}; code: {os.environ.get('BENCH_CODE', 'work tree')}",
                        f"- command: `bench/run --profile` (python3 -m bench.profile)\n"]
    tmp = Path(tempfile.mkdtemp(prefix="vf-prof-"))
    try:
        with Lab(guests=1) as lab:
            ours = Ours(lab, tmp / "A")
            ours.write_guest(TESTED, GUEST1, TESTED_PORTS)
            names = []
            for i in range(args.guests):
                name, addr, ports = other(i)
                ours.write_guest(name, addr, ports)
                names.append(name)
            for size in (0, 10 * args.guests):
                if size:
                    say(f"installing {size} forwards with one reconcile")
                    with netns(lab.host):
                        r = timed([ours.cli, "reconcile", *[x for n in names for x in ("--running", n)]],
                                  ours.env)
                    assert r.rc == 0 and ours.count() == size, r.stderr
                say(f"profiling the hook with {size} other forwards")
                lines.append(f"## {size:,} other forwards\n")
                hook_start = p50(lambda: ours.hook(TESTED, "start", "begin").seconds
                                 + 0 * ours.hook(TESTED, "stopped", "end").seconds, args.runs)
                ours.hook(TESTED, "start", "begin")
                hook_stop = p50(lambda: ours.hook(TESTED, "stopped", "end").seconds
                                + 0 * ours.hook(TESTED, "start", "begin").seconds, args.runs)
                lines.append(f"hook wall time p50: start {hook_start * 1e3:.1f} ms, stop {hook_stop * 1e3:.1f} ms "
                             f"(the tested guest has 10 forwards)\n")
                lines.append("| part, run alone | p50 ms |")
                lines.append("|---|---:|")
                with netns(lab.host):
                    py = sys.executable
                    for label, argv in (("python -c pass (interpreter + site)", [py, "-c", "pass"]),
                                        ("python -I -S -c pass (bare interpreter)", [py, "-I", "-S", "-c", "pass"]),
                                        ("python + the hook's imports", [py, "-c", "import virt_forward.cli, "
                                         "virt_forward.hook, virt_forward.engine, virt_forward.config"])):
                        lines.append(f"| {label} | {p50(lambda: timed(argv, ours.env).seconds, args.runs) * 1e3:.1f} |")
                # every command the hook runs (start, with the guest stopped; then stop), timed alone
                ours.hook(TESTED, "stopped", "end")
                for op, sub in (("start", "begin"), ("stopped", "end")):
                    for argv, exe in traced_children(ours, op, sub, tmp):
                        # replay reads only; a replayed write would change the state
                        if any(w in argv for w in ("-f", "--noflush")):
                            lines.append(f"| {op}: `{' '.join(argv)}` (writes; not replayed) | |")
                            continue
                        with netns(lab.host):
                            ms = p50(lambda: timed([exe, *argv[1:]], ours.env).seconds, args.runs) * 1e3
                        lines.append(f"| {op}: `{' '.join(argv)}` | {ms:.1f} |")
                # nft -f of the exact batches, applied and undone
                from virt_forward import engine, nft
                plan = engine.desired(engine.Context(ours.cfg, ours.state), TESTED).plan
                assert plan is not None
                add = nft.change(None, plan, hairpin=True)
                rm = nft.change(plan, None, hairpin=True, last=False)
                skel = nft.batch(nft.skeleton(True))
                elems = nft.batch(nft.add_guest(plan))
                nft_bin = shutil.which("nft", path="/usr/sbin:/sbin") or "nft"
                had = ours.count() > 0
                with netns(lab.host):
                    if not had:
                        timed([nft_bin, "-f", "-"], ours.env, skel)
                    for label, text in (("nft -f: skeleton only (table, maps, chains, rules)", skel),
                                        ("nft -f: skeleton + add 10 elements (start)", add),
                                        ("nft -f: add 10 elements only", elems),
                                        ("nft -f: skeleton + delete 10 elements (stop)", rm)):
                        ms = []
                        for _ in range(args.runs):
                            ms.append(timed([nft_bin, "-f", "-"], ours.env, text).seconds)
                            if text is elems or text is add:
                                timed([nft_bin, "-f", "-"], ours.env, rm)
                        lines.append(f"| {label} | {statistics.median(ms) * 1e3:.1f} |")
                    lines.append(f"| nft list table inet virt_forward | "
                                 f"{p50(lambda: timed([nft_bin, 'list', 'table', 'inet', 'virt_forward'], ours.env).seconds, args.runs) * 1e3:.1f} |")
                    if not had:
                        timed([nft_bin, "delete", "table", "inet", "virt_forward"], ours.env)
                lines.append("")
                # py-spy: where the Python process spends its wall time (idle = waiting for children)
                spy = shutil.which("py-spy")
                if spy:
                    folded: collections.Counter[str] = collections.Counter()
                    for _ in range(5):
                        out = tmp / "spy.txt"
                        with netns(lab.host):
                            subprocess.run([spy, "record", "--idle", "-r", "1000", "-f", "raw", "-o", str(out),
                                            "--", str(ours.hook_script), TESTED, "start", "begin", "-"],
                                           env=ours.env, input="", capture_output=True, text=True)
                            ours.hook(TESTED, "stopped", "end")
                        for line in out.read_text().splitlines():
                            stack, _, count = line.rpartition(" ")
                            folded[stack] += int(count)
                    total = sum(folded.values()) or 1
                    incl: collections.Counter[str] = collections.Counter()
                    for stack, n in folded.items():
                        seen = set()
                        for frame in stack.split(";"):
                            fn = re.sub(r" \(.*?:\d+\)$", "", frame)
                            m = re.search(r"\((.*?):\d+\)$", frame)
                            key = f"{fn} ({Path(m.group(1)).name if m else '?'})"
                            if key not in seen:
                                incl[key] += n
                                seen.add(key)
                    lines.append(f"py-spy, hook `start` x5 with {size:,} others, share of the hook's wall time "
                                 "(inclusive, --idle: time waiting for nft/iptables counts):\n")
                    lines.append("| function (file) | share |")
                    lines.append("|---|---:|")
                    for key, n in incl.most_common(45):
                        if n / total >= 0.03:
                            lines.append(f"| `{key}` | {n / total:.0%} |")
                    lines.append("")
                # importtime (cumulative, top)
                with netns(lab.host):
                    r = timed([sys.executable, "-X", "importtime", "-c",
                               "import virt_forward.cli, virt_forward.hook, virt_forward.engine"], ours.env)
                rows = []
                for line in r.stderr.splitlines():
                    m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
                    if m:
                        rows.append((int(m.group(2)), len(m.group(3)), m.group(4)))
                if size == 0:
                    lines.append("`python -X importtime` (cumulative us, top level and the slowest):\n")
                    lines.append("| module | cumulative ms |")
                    lines.append("|---|---:|")
                    for us, depth, mod in sorted(rows, reverse=True)[:18]:
                        lines.append(f"| {'  ' * (depth - 1)}{mod} | {us / 1000:.1f} |")
                    lines.append("")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    (BENCH / "PROFILE.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
