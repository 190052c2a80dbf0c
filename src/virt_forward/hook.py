"""libvirt's qemu hook: argv + domain XML on stdin -> the same engine the CLI calls.

Never calls back into libvirt (it waits for us: a call back deadlocks).  Exits 0
except when `strict = true` and the guest's config is invalid at prepare/start,
which aborts the start with the reason on stderr.  A failing `reconnect` makes
libvirt kill the guest, so that path never fails.
"""

from __future__ import annotations

import sys
from typing import TextIO

from . import engine, log
from .config import load_settings
from .errors import ConfigError, ExitCode, UsageError, VirtForwardError

APPLY = {"start", "started", "reconnect"}
REMOVE = {"stopped", "release"}
# libvirt reads our stdout as replacement XML for these: print nothing, ever.
SILENT = {"migrate", "restore"}


def run_hook(ctx: engine.Context, argv: list[str], stdin: TextIO) -> int:
    if len(argv) < 3:
        raise UsageError("hook needs DOMAIN OPERATION SUB-OPERATION [EXTRA] (as libvirt calls it)")
    domain, op, sub = argv[0], argv[1], argv[2]
    if op in SILENT:
        return ExitCode.OK
    if op not in APPLY | REMOVE | {"prepare"}:
        return ExitCode.OK
    try:
        xml = stdin.read()
    except (OSError, ValueError):
        xml = ""
    # The XML is parsed only when it is needed (no `address`, or metadata): xml.etree
    # costs milliseconds at every guest start, and argv names the domain anyway.

    strict = False  # a broken config.toml says nothing, so its default holds
    try:
        if op in REMOVE:
            engine.remove(ctx, domain, why=f"{op} {sub}")
            return ExitCode.OK
        settings = load_settings(ctx.config_dir)
        strict = settings.strict
        want = engine.desired(ctx, domain, xml, settings)  # validates; raises ConfigError
        if op == "prepare":
            return ExitCode.OK
        engine.apply(ctx, domain, xml, want)  # the same plan: the files are read once per call
    except ConfigError as exc:
        log.error(f"{domain}: {op}: {exc}" + ("; keeping what was applied before" if op == "reconnect" else ""))
        if strict and op in ("prepare", "start"):
            return exc.exit_code
    except VirtForwardError as exc:
        log.error(f"{domain}: {op}: {exc}")
    except Exception as exc:  # the hook must not take a guest down with a traceback
        log.error(f"{domain}: {op}: unexpected {type(exc).__name__}: {exc}")
    return ExitCode.OK


def network_hook(ctx: engine.Context, argv: list[str]) -> int:
    """libvirt's network hook: after a network (re)starts, libvirt has re-made its firewall
    rules above our guards; put everything back.  Never asks libvirt (it waits for us),
    so the running guests are those recorded as applied.  Never fails the network."""
    if len(argv) < 2 or argv[1] not in ("started", "updated"):
        return ExitCode.OK
    try:
        sys.stdin.read()
    except OSError:
        pass
    try:
        from .reconcile import reconcile
        if ctx.store.domains():
            reconcile(ctx, running=ctx.store.domains())
    except Exception as exc:
        log.error(f"network {argv[0]}: {argv[1]}: {exc}")
    return ExitCode.OK


def main(argv: list[str], ctx: engine.Context) -> int:
    return run_hook(ctx, argv, sys.stdin)
