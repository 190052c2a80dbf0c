"""Where one hook call's time goes: parsers for `strace -f -ttt` and `python -X importtime`.

strace is run with `--seccomp-bpf -e trace=execve,exit_group,vfork,clone,clone3`: only
those system calls stop the traced processes, so the timeline is close to an untraced
run.  Each process: when its parent spawned it, when it exec'ed, when it exited.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRACE_ARGS = ["-f", "-ttt", "-qq", "--seccomp-bpf", "-s", "300",
               "-e", "trace=execve,exit_group,vfork,clone,clone3"]

_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
_EXEC = re.compile(r'^execve\("([^"]*)", \[(.*?)\](?:, 0x[0-9a-f]+ /\* \d+ vars \*/)?')
_SPAWN = re.compile(r"^(?:vfork|clone3?)\(.*\)\s+=\s+(\d+)\s*$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>.*=\s+(-?\d+)")


@dataclass
class Proc:
    pid: int
    spawned: float | None = None  # parent's vfork/clone returned (or entered) at
    exec_t: float | None = None
    exit_t: float | None = None
    argv: list[str] = field(default_factory=list)
    exe: str = ""

    @property
    def seconds(self) -> float | None:
        if self.exec_t is None or self.exit_t is None:
            return None
        return self.exit_t - self.exec_t


def strace_bin() -> str | None:
    return shutil.which("strace", path="/usr/bin:/bin:/usr/sbin")


def _argv(text: str) -> list[str]:
    return [a.encode().decode("unicode_escape") for a in re.findall(r'"((?:[^"\\]|\\.)*)"', text)]


def parse_strace(path: Path) -> list[Proc]:
    """Processes in order of their exec, with the time of spawn, exec and exit."""
    procs: dict[int, Proc] = {}
    pending_spawn: dict[int, tuple[str, float]] = {}  # pid -> (syscall, t) of an unfinished vfork/clone
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        pid, t, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        p = procs.setdefault(pid, Proc(pid))
        if rest.startswith("execve("):
            e = _EXEC.match(rest)
            failed = re.search(r"=\s+-1\s", rest)
            if e and not failed and p.exec_t is None:
                p.exec_t, p.exe, p.argv = t, e.group(1), _argv(e.group(2))
            elif e and "<unfinished" in rest and p.exec_t is None:
                p.exec_t, p.exe, p.argv = t, e.group(1), _argv(e.group(2))
        elif rest.startswith("exit_group("):
            p.exit_t = t
        elif rest.startswith(("vfork(", "clone(", "clone3(")):
            s = _SPAWN.match(rest)
            if s:
                procs.setdefault(int(s.group(1)), Proc(int(s.group(1)))).spawned = t
            elif "<unfinished" in rest:
                pending_spawn[pid] = (rest.split("(", 1)[0], t)
        elif rest.startswith("<..."):
            r = _RESUMED.match(rest)
            if r and r.group(1) in ("vfork", "clone", "clone3") and pid in pending_spawn and int(r.group(2)) > 0:
                child = procs.setdefault(int(r.group(2)), Proc(int(r.group(2))))
                child.spawned = pending_spawn.pop(pid)[1]
            elif r and r.group(1) == "execve" and int(r.group(2)) != 0:
                p.exec_t = None  # it failed after all
    return sorted((p for p in procs.values() if p.exec_t is not None), key=lambda p: p.exec_t or 0.0)


def describe(p: Proc) -> str:
    argv = list(p.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    text = " ".join(argv)
    return text if len(text) < 90 else text[:87] + "..."


def union_ms(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end] spans (ms): children may run side by side."""
    total, cur_s, cur_e = 0.0, None, None
    for a, b in sorted(spans):
        if cur_e is None or a > cur_e:
            if cur_e is not None and cur_s is not None:
                total += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    if cur_e is not None and cur_s is not None:
        total += cur_e - cur_s
    return total


def timeline(procs: list[Proc]) -> dict[str, Any]:
    """The hook's own process (first exec) and each child: offsets and durations, in ms.
    Children may overlap (the hook may start several at once): totals are unions of spans."""
    if not procs:
        return {}
    root = procs[0]
    t0 = root.exec_t or 0.0
    # the hook file is exec'ed once (the kernel runs its #! interpreter in the same process)
    kids = procs[1:]
    rows: list[dict[str, Any]] = []
    for p in kids:
        rows.append({"cmd": describe(p), "argv": p.argv, "exe": p.exe,
                     "spawn_ms": None if p.spawned is None else (p.spawned - t0) * 1e3,
                     "exec_ms": ((p.exec_t or t0) - t0) * 1e3,
                     "ms": None if p.seconds is None else p.seconds * 1e3})
    total = (root.exit_t - t0) * 1e3 if root.exit_t is not None else None
    first_spawn = min((r["spawn_ms"] if r["spawn_ms"] is not None else r["exec_ms"] for r in rows), default=total)
    end = total if total is not None else float("inf")
    for r in rows:  # a child left running in the background when the hook exits
        r["outlives_ms"] = (r["exec_ms"] + r["ms"] - end) if r["ms"] is not None and \
            r["exec_ms"] + r["ms"] > end else None

    def clip(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(a, min(b, end)) for a, b in spans if a < end]
    run_spans = [(r["exec_ms"], r["exec_ms"] + r["ms"]) for r in rows if r["ms"] is not None]
    # between the parent's vfork/clone and the child's exec the parent waits (CLONE_VFORK)
    spawn_spans = [(r["spawn_ms"], r["exec_ms"]) for r in rows if r["spawn_ms"] is not None]
    busy = [(r["spawn_ms"] if r["spawn_ms"] is not None else r["exec_ms"],
             r["exec_ms"] + (r["ms"] or 0.0)) for r in rows]
    overlap = sum(b - a for a, b in run_spans) - union_ms(run_spans) > 0.05
    return {"total_ms": total, "before_first_child_ms": first_spawn, "children_ms": union_ms(clip(run_spans)),
            "spawn_ms": union_ms(clip(spawn_spans)), "with_children_ms": union_ms(clip(busy)), "parallel": overlap,
            "outlive_ms": max((r["outlives_ms"] for r in rows if r["outlives_ms"] is not None), default=None),
            "rows": rows, "root": describe(root)}


# ------------------------------------------------------------------ -X importtime

_IMPORT = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def parse_importtime(stderr: str) -> list[tuple[int, int, int, str]]:
    """(self us, cumulative us, depth, module) per import, in the order Python reports them."""
    rows = []
    for line in stderr.splitlines():
        m = _IMPORT.match(line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2, m.group(4)))
    return rows
