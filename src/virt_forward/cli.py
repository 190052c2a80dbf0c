"""Command line: a table of sub-commands, each with its arguments and its handler.

Kept import-light: a handler imports what it needs when it runs, so `--help` and the hook
entries stay cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ExitCode, VirtForwardError

if TYPE_CHECKING:
    from .engine import Context
    from .plan import GuestPlan

HELP = """\
Forward ports of this host to libvirt guests (DNAT with nftables maps), following each
guest's life through libvirt's qemu hook.  Config: /etc/virt-forward/guests/<domain>.toml."""

Handler = Callable[["Context", argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Handler
    # the command prints its own result line: its log lines go to the journal only
    prints_result: bool = False


def _guest(p: argparse.ArgumentParser) -> None:
    p.add_argument("guest")


def _nothing(p: argparse.ArgumentParser) -> None:
    pass


def _install_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="only say what would be done")
    p.add_argument("--root", default="/", help="install below this directory instead of / (packaging, tests)")


def _check(ctx: Context, args: argparse.Namespace) -> int:
    from .commands import check
    return int(check(ctx))


def _plan(ctx: Context, args: argparse.Namespace) -> int:
    from .commands import plan
    return int(plan(ctx, args.guest))


def _apply(ctx: Context, args: argparse.Namespace) -> int:
    from . import engine
    print(engine.apply(ctx, args.guest))
    return ExitCode.OK


def _remove(ctx: Context, args: argparse.Namespace) -> int:
    from . import engine
    print(engine.remove(ctx, args.guest, why="by hand"))
    return ExitCode.OK


def _reconcile_args(p: argparse.ArgumentParser) -> None:
    # nargs="+": argparse's time grows with the square of the number of options, linearly with values
    p.add_argument("--running", action="extend", nargs="+", metavar="DOMAIN",
                   help="running domains (one or more, option repeatable); default: ask libvirt, else the records "
                        "of what was applied")


def _reconcile(ctx: Context, args: argparse.Namespace) -> int:
    from .reconcile import reconcile
    print(reconcile(ctx, args.running).describe())
    return ExitCode.OK


def _install_context(ctx: Context, args: argparse.Namespace) -> Context:
    """--root without --config-dir: the config goes below the root too."""
    from . import engine
    root = Path(args.root)
    if root != Path("/") and not args.config_dir and "VIRT_FORWARD_CONFIG_DIR" not in os.environ:
        return engine.Context(root / "etc/virt-forward", ctx.state_dir)
    return ctx


def _install(ctx: Context, args: argparse.Namespace) -> int:
    from . import install
    # given at install time, baked into the hooks: libvirt passes hooks no environment
    dirs: tuple[str, ...] = ()
    for flag, value in (("--config-dir", args.config_dir), ("--state-dir", args.state_dir)):
        if value:
            dirs += (flag, os.path.abspath(value))
    print("\n".join(install.install(Path(args.root), _install_context(ctx, args).config_dir, args.dry_run, dirs)))
    return ExitCode.OK


def _uninstall(ctx: Context, args: argparse.Namespace) -> int:
    from . import install
    print("\n".join(install.uninstall(_install_context(ctx, args), Path(args.root), args.dry_run)))
    return ExitCode.OK


def _watch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=float, default=30.0, help="safety check every N seconds (default 30)")


def _watch(ctx: Context, args: argparse.Namespace) -> int:
    from .watch import watch
    return int(watch(ctx, interval=args.interval))


def _doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--libvirt-dir", default="/etc/libvirt", help=argparse.SUPPRESS)


def _doctor(ctx: Context, args: argparse.Namespace) -> int:
    from .doctor import doctor
    return int(doctor(ctx, Path(args.libvirt_dir)))


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("guest")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="port specs, e.g. 2222:22 80 8000-8009:9000-9009/udp")
    p.add_argument("--address", help="the guest's address, to create its file")


def _rm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("guest")
    p.add_argument("specs", nargs="+", metavar="SPEC")


def _edit(ctx: Context, args: argparse.Namespace) -> int:
    from . import edit, engine
    from .config import load_settings

    def check(plan: GuestPlan) -> None:  # a held port is refused before the file changes
        engine.check_ledger(ctx, args.guest, plan, load_settings(ctx.config_dir))

    with ctx.store.lock():  # two edits at once must not lose one
        if args.command == "add":
            lines = edit.add_ports(ctx.config_dir, args.guest, args.specs, args.address, check)
        else:
            lines = edit.remove_ports(ctx.config_dir, args.guest, args.specs, check)
    print("\n".join(lines))
    if ctx.store.read(args.guest) is not None:  # it runs (applied): take the change now
        print(engine.apply(ctx, args.guest, ctx.store.read_xml(args.guest)))
    return ExitCode.OK


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--force", action="store_true", help="replace existing guest files")


def _import(ctx: Context, args: argparse.Namespace) -> int:
    from .importer import import_path
    lines = import_path(Path(args.path), ctx.config_dir, dry_run=args.dry_run, force=args.force)
    print("\n".join(lines))
    return ExitCode.CONFIG if any(ln.startswith("refused ") for ln in lines) else ExitCode.OK


def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("guest", nargs="?")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--format", choices=("text", "json", "prometheus"), default="text",
                       help="prometheus: the metrics the watcher writes to metrics_file (default text)")
    shown.add_argument("--json", dest="format", action="store_const", const="json", help="--format json")


def _status(ctx: Context, args: argparse.Namespace) -> int:
    from .commands import status
    return int(status(ctx, args.guest, args.format))


def _hook(ctx: Context, args: argparse.Namespace) -> int:
    from . import hook
    return hook.qemu_main(args.args, args.config_dir, args.state_dir)


def _network_hook(ctx: Context, args: argparse.Namespace) -> int:
    from . import hook
    return hook.network_main(args.args, args.config_dir, args.state_dir)


def _hook_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs=argparse.REMAINDER, help="DOMAIN OPERATION SUB-OPERATION [EXTRA]")


def _network_hook_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs=argparse.REMAINDER, help="NETWORK OPERATION SUB-OPERATION [EXTRA]")


COMMANDS: tuple[Command, ...] = (
    # by hand: the installed hooks call hook.qemu_main / hook.network_main without this module
    Command("hook", "entry point for libvirt's qemu hook (domain XML on stdin)", _hook_args, _hook),
    Command("check", "validate config.toml and every guest file; non-zero exit on any error", _nothing, _check),
    Command("plan", "print the batch that `apply GUEST` would run (nft, or iptables-restore); changes nothing",
            _guest, _plan),
    Command("apply", "apply a guest's forwards now (what the hook does at start)", _guest, _apply, True),
    Command("remove", "remove what was applied for a guest (what the hook does at stop)", _guest, _remove, True),
    Command("reconcile", "make the firewall match every running guest, in one transaction", _reconcile_args,
            _reconcile, True),
    Command("network-hook", "entry point for libvirt's network hook: re-place guards", _network_hook_args,
            _network_hook),
    Command("install", "write the libvirt hooks, systemd units and an example config", _install_args, _install),
    Command("uninstall", "remove the hooks, units and every rule we own (keeps the config)", _install_args,
            _uninstall),
    Command("watch", "daemon: put forwards and guards back after firewall resets", _watch_args, _watch),
    Command("doctor", "check the classic causes of a forward that does not work", _doctor_args, _doctor),
    Command("add", "add forwards to a guest's file (comments kept); apply now if it runs", _add_args, _edit, True),
    Command("rm", "remove forwards from a guest's file; apply now if it runs", _rm_args, _edit, True),
    Command("import", "turn the post's per-guest scripts or a hooks.json into guest files", _import_args, _import),
    Command("status", "guests, their forwards and whether they are live in the kernel", _status_args, _status),
)
_BY_NAME = {c.name: c for c in COMMANDS}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virt-forward", description=HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-dir", help="default /etc/virt-forward (env VIRT_FORWARD_CONFIG_DIR)")
    p.add_argument("--state-dir", help="default /run/virt-forward (env VIRT_FORWARD_STATE_DIR)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.arguments(sub.add_parser(command.name, help=command.help))
    return p


# libvirt's hooks: every word after the command is libvirt's (a domain may be named `-h`)
HOOK_COMMANDS = frozenset({"hook", "network-hook"})
_GLOBAL_WITH_VALUE = frozenset({"--config-dir", "--state-dir"})


def _split_hook(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(the words up to a hook command, what follows it) when the command is a hook entry:
    argparse would take a `-h` or `--debug` among libvirt's arguments as ours."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in HOOK_COMMANDS:
            return argv[:i + 1], argv[i + 1:]
        if word in _GLOBAL_WITH_VALUE:
            i += 2
        elif word.startswith("-") and word != "-":
            i += 1  # --debug, --config-dir=X, or a mistake argparse will name
        else:
            return None  # another command
    return None


def _parse(argv: list[str] | None) -> argparse.Namespace:
    words = sys.argv[1:] if argv is None else list(argv)
    split = _split_hook(words)
    if split is None:
        return _parser().parse_args(words)
    args = _parser().parse_args(split[0])
    args.args = split[1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    command = _BY_NAME[args.command]
    from . import engine, log  # after parsing: --help stays cheap
    log.configure(stderr=not command.prints_result)
    try:
        return command.run(engine.default_context(args.config_dir, args.state_dir), args)
    except VirtForwardError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"virt-forward: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
