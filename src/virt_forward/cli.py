"""Command line.  Kept import-light: `virt-forward hook` runs at every guest start."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .errors import ExitCode, VirtForwardError

HELP = """\
Forward ports of this host to libvirt guests (DNAT with nftables maps), following each
guest's life through libvirt's qemu hook.  Config: /etc/virt-forward/guests/<domain>.toml."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virt-forward", description=HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-dir", help="default /etc/virt-forward (env VIRT_FORWARD_CONFIG_DIR)")
    p.add_argument("--state-dir", help="default /run/virt-forward (env VIRT_FORWARD_STATE_DIR)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    h = sub.add_parser("hook", help="entry point for libvirt's qemu hook (domain XML on stdin)")
    h.add_argument("args", nargs=argparse.REMAINDER, help="DOMAIN OPERATION SUB-OPERATION [EXTRA]")
    sub.add_parser("check", help="validate config.toml and every guest file; non-zero exit on any error")
    pl = sub.add_parser("plan", help="print the nft batch that `apply GUEST` would run; changes nothing")
    pl.add_argument("guest")
    a = sub.add_parser("apply", help="apply a guest's forwards now (what the hook does at start)")
    a.add_argument("guest")
    r = sub.add_parser("remove", help="remove what was applied for a guest (what the hook does at stop)")
    r.add_argument("guest")
    rc = sub.add_parser("reconcile", help="make the firewall match every running guest, in one transaction")
    # nargs="+": argparse's time grows with the square of the number of options, linearly with values
    rc.add_argument("--running", action="extend", nargs="+", metavar="DOMAIN",
                    help="running domains (one or more, option repeatable); default: ask libvirt, else the records "
                         "of what was applied")
    nh = sub.add_parser("network-hook", help="entry point for libvirt's network hook: re-place guards")
    nh.add_argument("args", nargs=argparse.REMAINDER, help="NETWORK OPERATION SUB-OPERATION [EXTRA]")
    for name, text in (("install", "write the libvirt hooks, systemd units and an example config"),
                       ("uninstall", "remove the hooks, units and every rule we own (keeps the config)")):
        i = sub.add_parser(name, help=text)
        i.add_argument("--dry-run", action="store_true", help="only say what would be done")
        i.add_argument("--root", default="/", help="install below this directory instead of / (packaging, tests)")
    wt = sub.add_parser("watch", help="daemon: put forwards and guards back after firewall resets")
    wt.add_argument("--interval", type=float, default=30.0, help="safety check every N seconds (default 30)")
    dr = sub.add_parser("doctor", help="check the classic causes of a forward that does not work")
    dr.add_argument("--libvirt-dir", default="/etc/libvirt", help=argparse.SUPPRESS)
    ad = sub.add_parser("add", help="add forwards to a guest's file (comments kept); apply now if it runs")
    ad.add_argument("guest")
    ad.add_argument("specs", nargs="+", metavar="SPEC", help="port specs, e.g. 2222:22 80 8000-8009:9000-9009/udp")
    ad.add_argument("--address", help="the guest's address, to create its file")
    rmp = sub.add_parser("rm", help="remove forwards from a guest's file; apply now if it runs")
    rmp.add_argument("guest")
    rmp.add_argument("specs", nargs="+", metavar="SPEC")
    im = sub.add_parser("import", help="turn the post's per-guest scripts or a hooks.json into guest files")
    im.add_argument("path")
    im.add_argument("--dry-run", action="store_true")
    im.add_argument("--force", action="store_true", help="replace existing guest files")
    s = sub.add_parser("status", help="guests, their forwards and whether they are live in the kernel")
    s.add_argument("guest", nargs="?")
    shown = s.add_mutually_exclusive_group()
    shown.add_argument("--format", choices=("text", "json", "prometheus"), default="text",
                       help="prometheus: the metrics the watcher writes to metrics_file (default text)")
    shown.add_argument("--json", dest="format", action="store_const", const="json", help="--format json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("hook", "network-hook"):  # by hand; the installed hooks call these directly
        from . import hook
        entry = hook.qemu_main if args.command == "hook" else hook.network_main
        return entry(args.args, args.config_dir, args.state_dir)
    from . import engine  # after parsing: --help stays cheap
    ctx = engine.default_context(args.config_dir, args.state_dir)
    try:
        if args.command == "check":
            from .commands import check
            return int(check(ctx))
        if args.command == "plan":
            from .commands import plan
            return int(plan(ctx, args.guest))
        if args.command in ("apply", "remove"):
            from . import log
            log.to_stderr = False
        if args.command == "apply":
            print(engine.apply(ctx, args.guest))
            return ExitCode.OK
        if args.command == "remove":
            print(engine.remove(ctx, args.guest, why="by hand"))
            return ExitCode.OK
        if args.command == "reconcile":
            from . import log
            from .reconcile import reconcile
            log.to_stderr = False
            print(reconcile(ctx, args.running).describe())
            return ExitCode.OK
        if args.command in ("install", "uninstall"):
            from pathlib import Path

            from . import install
            root = Path(args.root)
            if root != Path("/") and not args.config_dir and "VIRT_FORWARD_CONFIG_DIR" not in os.environ:
                ctx = engine.Context(root / "etc/virt-forward", ctx.state_dir)
            if args.command == "install":
                dirs: tuple[str, ...] = ()
                for flag, value in (("--config-dir", args.config_dir), ("--state-dir", args.state_dir)):
                    if value:
                        dirs += (flag, os.path.abspath(value))
                lines = install.install(root, ctx.config_dir, args.dry_run, dirs)
            else:
                lines = install.uninstall(ctx, Path(args.root), args.dry_run)
            print("\n".join(lines))
            return ExitCode.OK
        if args.command == "watch":
            from .watch import watch
            return int(watch(ctx, interval=args.interval))
        if args.command == "doctor":
            from pathlib import Path

            from .doctor import doctor
            return int(doctor(ctx, Path(args.libvirt_dir)))
        if args.command in ("add", "rm"):
            from . import edit, log
            log.to_stderr = False
            with ctx.store.lock():  # two edits at once must not lose one
                if args.command == "add":
                    lines = edit.add_ports(ctx.config_dir, args.guest, args.specs, args.address)
                else:
                    lines = edit.remove_ports(ctx.config_dir, args.guest, args.specs)
            print("\n".join(lines))
            if ctx.store.read(args.guest) is not None:  # it runs (applied): take the change now
                print(engine.apply(ctx, args.guest, ctx.store.read_xml(args.guest)))
            return ExitCode.OK
        if args.command == "import":
            from pathlib import Path

            from .importer import import_path
            lines = import_path(Path(args.path), ctx.config_dir, dry_run=args.dry_run, force=args.force)
            print("\n".join(lines))
            return ExitCode.CONFIG if any(ln.startswith("refused ") for ln in lines) else ExitCode.OK
        if args.command == "status":
            from .commands import status
            return int(status(ctx, args.guest, args.format))
    except VirtForwardError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"virt-forward: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    return ExitCode.USAGE


if __name__ == "__main__":
    sys.exit(main())
