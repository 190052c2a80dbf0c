"""Where the hook's time goes with 0 and N other forwards (bench/run --profile; root).

One lab; both interpreters' installed hooks (see bench/README.md).  The N background
forwards are installed with one `virt-forward reconcile` (same kernel state and
records as N/10 hook calls, in a second).  Then, at each size and for each
interpreter: the hook's wall time, its processes under strace, `-X importtime`, and
py-spy (if installed) over a few hook runs, aggregated by function.  Writes
bench/PROFILE.md.  bench/run (without --profile) prints the same kinds of figures,
fewer of them, interleaved with everything else.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from vflab.lab import Lab, domain_xml

from . import parts
from .main import GUEST1, TESTED, TESTED_PORTS, other, say
from .netns import netns
from .sides import HOOK_ENV, Ours, interpreters, timed, tmpfs_dir

BENCH = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/run --profile")
    ap.add_argument("--guests", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    interps = interpreters()
    lines: list[str] = ["# Where the hook's time goes\n",
                        f"- {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, nproc {os.cpu_count()}, "
                        f"kernel {platform.release()}; code: {os.environ.get('BENCH_CODE', '?')}",
                        "- command: `bench/run --profile` (python -m bench.profile)"]
    lines += [f"- `{ip.key}`: {ip.label}: hook `#!{ip.python} -IS`, package from {ip.location}" for ip in interps]
    lines.append("")
    tmp = Path(tempfile.mkdtemp(prefix="vf-prof-"))
    run_root = tmpfs_dir()  # the state dir on a tmpfs, as /run on a real host
    try:
        with Lab(guests=1) as lab:
            ours = Ours(lab, tmp / "A", interps, run_root)
            ours.write_guest(TESTED, GUEST1, TESTED_PORTS)
            names = []
            for i in range(args.guests):
                name, addr, ports = other(i)
                ours.write_guest(name, addr, ports)
                names.append(name)
            for size in (0, 10 * args.guests):
                if size:
                    say(f"installing {size} forwards with one reconcile")
                    r = ours.cli("reconcile", "--running", *names)
                    assert r.rc == 0 and ours.count() == size, r.stderr
                say(f"profiling the hook with {size} other forwards")
                lines.append(f"## {size:,} other forwards\n")
                lines.append("| interpreter | bare `-I -S -c pass` p50 ms | hook start p50 ms | hook stop p50 ms |")
                lines.append("|---|---:|---:|---:|")
                walls: dict[str, dict[str, list[float]]] = {ip.key: {"bare": [], "start": [], "stop": []}
                                                           for ip in interps}
                for _ in range(args.runs):
                    for ip in interps:
                        w = walls[ip.key]
                        w["bare"].append(timed(ip.bare(), HOOK_ENV).seconds)
                        w["start"].append(ours.hook(TESTED, "start", "begin", ip.key).seconds)
                        w["stop"].append(ours.hook(TESTED, "stopped", "end", ip.key).seconds)
                for ip in interps:
                    w = walls[ip.key]
                    lines.append(f"| {ip.key} | " + " | ".join(f"{statistics.median(w[k]) * 1e3:.1f}"
                                                               for k in ("bare", "start", "stop")) + " |")
                lines.append("")
                for ip in interps:
                    for op, sub in (("start", "begin"), ("stopped", "end")):
                        strace = parts.strace_bin()
                        if strace is None:
                            break
                        f = tmp / "strace.txt"
                        with netns(lab.host):
                            timed([strace, *parts.STRACE_ARGS, "-o", str(f), str(ours.hooks[ip.key]), TESTED, op,
                                   sub, "-"], HOOK_ENV, domain_xml(TESTED))
                        tl = parts.timeline(parts.parse_strace(f))
                        tot = tl.get("total_ms") or 0.0
                        lines.append(f"**{ip.key} {op}** under strace: {tot:.1f} ms; Python before its first "
                                     f"child {tl['before_first_child_ms']:.1f} ms; children {tl['children_ms']:.1f} "
                                     f"ms\n")
                        lines.append("| exec at | ms | command |")
                        lines.append("|---:|---:|---|")
                        for row in tl["rows"]:
                            lines.append(f"| {row['exec_ms']:.1f} | {row['ms'] or 0:.1f} | `{row['cmd']}` |")
                        lines.append("")
                # py-spy: where the Python process spends its wall time (idle = waiting for children)
                spy = shutil.which("py-spy")
                if spy:
                    for ip in interps:
                        folded: collections.Counter[str] = collections.Counter()
                        for _ in range(5):
                            out = tmp / "spy.txt"
                            with netns(lab.host):
                                subprocess.run([spy, "record", "--idle", "-r", "1000", "-f", "raw", "-o", str(out),
                                                "--", str(ours.hooks[ip.key]), TESTED, "start", "begin", "-"],
                                               env=HOOK_ENV, input=domain_xml(TESTED), capture_output=True, text=True)
                            ours.hook(TESTED, "stopped", "end", ip.key)
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
                        lines.append(f"py-spy ({ip.key}), hook `start` x5 with {size:,} others, share of the hook's "
                                     "wall time (inclusive, --idle: time waiting for nft/iptables counts):\n")
                        lines.append("| function (file) | share |")
                        lines.append("|---|---:|")
                        for key, n in incl.most_common(45):
                            if n / total >= 0.03:
                                lines.append(f"| `{key}` | {n / total:.0%} |")
                        lines.append("")
                if size == 0:
                    for ip in interps:
                        with netns(lab.host):
                            r = timed([ip.python, "-I", "-S", "-X", "importtime", str(ours.hooks[ip.key]), TESTED,
                                       "start", "begin", "-"], HOOK_ENV, domain_xml(TESTED))
                        ours.hook(TESTED, "stopped", "end", ip.key)
                        rows = parts.parse_importtime(r.stderr)
                        lines.append(f"`{ip.key}`: `-X importtime` of one hook start, cumulative, the 25 largest:\n")
                        lines.append("| module | cumulative ms | self ms |")
                        lines.append("|---|---:|---:|")
                        for self_us, cum, depth, mod in sorted(rows, key=lambda r: -r[1])[:25]:
                            lines.append(f"| {'&nbsp;' * 2 * depth}{mod} | {cum / 1000:.1f} | {self_us / 1000:.1f} |")
                        lines.append("")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if run_root is not None:
            shutil.rmtree(run_root, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text)
    (BENCH / "PROFILE.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
