"""The Debian packaging (debian/, scripts/build-deb.sh), checked without building it or root.

The hooks and units the package ships are made at build time by debian/rules from the
functions `virt-forward install` uses; here the rules' own generator commands run
against the source tree.  The maintainer scripts run for real with their system paths
moved into tmp_path and a stand-in for /usr/bin/python3.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from virt_forward import install

TOP = Path(__file__).resolve().parent.parent
DEBIAN = TOP / "debian"
PY = "/usr/bin/python3"
SITE = "/usr/lib/python3/dist-packages"


def test_hook_and_units_for_debian_name_debians_python_and_dist_packages() -> None:
    for kind in ("qemu", "network"):
        text = install.hook_script(kind, python=PY, location=SITE)
        assert text.splitlines()[0] == f"#!{PY} -IS"
        assert f"sys.path.append({SITE!r})" in text.splitlines()
        # nothing of the interpreter or tree that generated it may leak into the package
        assert sys.executable not in text and install.package_location() not in text
    units = install.units(python=PY)
    assert [ln for ln in units[install.WATCH_UNIT].splitlines() if ln.startswith("ExecStart=")] == \
        [f"ExecStart={PY} -I -m virt_forward watch"]
    assert [ln for ln in units[install.BOOT_UNIT].splitlines() if ln.startswith("ExecStart=")] == \
        [f"ExecStart={PY} -I -m virt_forward reconcile"]


def test_the_defaults_are_still_the_running_interpreter_and_package() -> None:
    text = install.hook_script("qemu")
    assert text.splitlines()[0] == f"#!{install.interpreter()} -IS"
    assert f"sys.path.append({install.package_location()!r})" in text
    assert "written by `virt-forward install`" in text
    assert f"ExecStart={install.interpreter()} -I -m virt_forward watch" in install.units()[install.WATCH_UNIT]


def _control_field(package: str, field: str) -> list[str]:
    text = (DEBIAN / "control").read_text()
    stanzas = [s for s in re.split(r"\n\s*\n", text) if re.search(rf"^Package: {re.escape(package)}$", s, re.M)]
    assert len(stanzas) == 1
    lines = [ln for ln in stanzas[0].splitlines() if not ln.startswith("#")]
    value: list[str] = []
    inside = False
    for line in lines:
        if line.startswith(f"{field}:"):
            inside = True
            value.append(line[len(field) + 1:])
        elif inside and line[:1] in (" ", "\t"):
            value.append(line)
        else:
            inside = False
    return [item.strip() for item in " ".join(value).split(",") if item.strip()]


def test_control_depends_and_recommends() -> None:
    depends = _control_field("virt-forward", "Depends")
    # conntrack: without it stale flows keep reaching a removed forward's old guest, silently (issue 19)
    for required in ("${misc:Depends}", "${python3:Depends}", "python3 (>= 3.11)", "nftables | iptables",
                     "python3-tomlkit", "iproute2", "conntrack"):
        assert required in depends
    recommends = _control_field("virt-forward", "Recommends")
    assert "python3-libvirt" in recommends and "conntrack" not in recommends
    assert _control_field("virt-forward", "Architecture") == ["all"]


def _rules() -> tuple[dict[str, str], list[str]]:
    """debian/rules' variables, and the recipe of execute_after_dh_auto_install (joined lines)."""
    text = (DEBIAN / "rules").read_text().replace("\\\n", " ")
    variables = dict(re.findall(r"^([A-Z]+) :?= (.*)$", text, re.M))
    recipe = text.split("\nexecute_after_dh_auto_install:\n", 1)[1]
    lines = []
    for line in recipe.splitlines():
        if not line.startswith("\t"):
            break
        lines.append(line[1:])
    return variables, lines


def test_rules_make_the_shipped_hooks_and_units_with_installs_functions(tmp_path: Path) -> None:
    variables, recipe = _rules()
    assert "export PYBUILD_DISABLE=test" in (DEBIAN / "rules").read_text()
    generators = [ln for ln in recipe if ln.startswith("$(RUN) ")]
    assert any("i.hook_script(\"qemu\", $(SYSTEM))" in ln for ln in generators)
    assert any("i.hook_script(\"network\", $(SYSTEM))" in ln for ln in generators)
    # not a copy of the template: the hook's own code is nowhere in debian/
    for path in DEBIAN.rglob("*"):
        if path.is_file():
            assert "os._exit(status)" not in path.read_text(errors="replace"), path
    # run the rules' commands against this tree, with the build tree's paths moved into tmp_path
    given = {"RUN": f"PYTHONPATH={TOP / 'src'} {sys.executable} -c", "HOOKS": str(tmp_path / "hooks"),
             "UNITS": str(tmp_path / "units"), "EXAMPLES": str(tmp_path / "examples")}
    for name in ("HOOKS", "UNITS", "EXAMPLES"):
        os.mkdir(given[name])

    def expand(line: str) -> str:
        return re.sub(r"\$\(([A-Z]+)\)", lambda m: expand(given.get(m.group(1), variables[m.group(1)])), line)

    for line in generators:
        subprocess.run(["sh", "-c", expand(line)], check=True, cwd=tmp_path)
    for kind in ("qemu", "network"):
        shipped = (tmp_path / "hooks" / kind).read_text()
        assert shipped.splitlines()[0] == f"#!{PY} -IS"
        assert f"sys.path.append({SITE!r})" in shipped.splitlines()
        assert shipped == install.hook_script(kind, python=PY, location=SITE,
                                              writer="`apt-get install --reinstall virt-forward`")
    assert "chmod 0755 $(HOOKS)/qemu $(HOOKS)/network" in recipe
    for name in (install.WATCH_UNIT, install.BOOT_UNIT):
        assert (tmp_path / "units" / name).read_text() == install.units(python=PY)[name]
    assert (tmp_path / "examples" / "config.toml").read_text() == install.CONFIG_EXAMPLE
    assert variables["UNITS"] == "$(PKG)/lib/systemd/system"
    assert variables["HOOKS"] == "$(PKG)/usr/lib/virt-forward/hooks"


def test_rules_start_the_watcher_but_not_the_boot_reconcile() -> None:
    text = (DEBIAN / "rules").read_text()
    override = text.split("\noverride_dh_installsystemd:\n", 1)[1]
    assert "\tdh_installsystemd --no-start virt-forward-reconcile.service\n" in override
    assert "\tdh_installsystemd virt-forward-watch.service\n" in override
    # compat 13 restarts after upgrade (prerm does not stop it) unless told otherwise
    assert "--no-restart-after-upgrade" not in text and "--no-stop-on-upgrade" not in text


SCRIPTS = ("postinst", "prerm", "postrm")


@pytest.mark.parametrize("name", SCRIPTS)
def test_maintainer_scripts_parse(name: str) -> None:
    path = DEBIAN / f"virt-forward.{name}"
    subprocess.run(["sh", "-n", str(path)], check=True)
    assert path.read_text().startswith("#!/bin/sh\nset -e\n") and "#DEBHELPER#" in path.read_text()


def test_prerm_acts_after_debhelpers_part_stopped_the_units() -> None:
    text = (DEBIAN / "virt-forward.prerm").read_text()
    assert text.index("#DEBHELPER#") < text.index('if [ "$1" = remove ]')


class Host:
    """The maintainer scripts with / moved to a temporary root and python3 replaced by a
    stand-in that logs its calls (and prints a config example)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "python3.log"
        (root / "usr/lib/virt-forward/hooks").mkdir(parents=True)
        for kind in ("qemu", "network"):
            (root / "usr/lib/virt-forward/hooks" / kind).write_text("#!/bin/sh\n")
        stub = root / "python3"
        stub.write_text(f'#!/bin/sh\necho "$*" >> {self.log}\necho "# example"\n')
        stub.chmod(0o755)

    def run(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        text = (DEBIAN / f"virt-forward.{name}").read_text()
        for path in ("/usr/lib/virt-forward", "/etc/libvirt", "/etc/virt-forward", "/run/virt-forward"):
            text = text.replace(path, f"{self.root}{path}")
        text = text.replace("/usr/bin/python3", str(self.root / "python3"))
        code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
        outside = re.search(rf"(?<!{re.escape(str(self.root))})/(etc|run|usr/lib/virt-forward)/", code)
        assert outside is None, outside  # the test must not touch this machine's files
        script = self.root / name
        script.write_text(text)
        script.chmod(0o755)
        return subprocess.run([str(script), *args], capture_output=True, text=True, check=True,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})

    def link(self, kind: str) -> Path:
        return self.root / f"etc/libvirt/hooks/{kind}.d/virt-forward"

    def calls(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def test_maintainer_scripts_install_upgrade_remove_purge(tmp_path: Path) -> None:
    host = Host(tmp_path)
    first = host.run("postinst", "configure", "")
    for kind in ("qemu", "network"):
        assert os.readlink(host.link(kind)) == f"{tmp_path}/usr/lib/virt-forward/hooks/{kind}"
    assert "restart libvirtd" in first.stdout
    assert (tmp_path / "etc/virt-forward/config.toml").read_text() == "# example\n"
    assert (tmp_path / "etc/virt-forward/guests/example.toml.sample").exists()
    assert "installed_hook_problem" in host.calls()  # the hook was run as libvirt runs it

    (tmp_path / "etc/virt-forward/config.toml").write_text("# the admin's\n")
    again = host.run("postinst", "configure", "0.1.0")
    assert "restart" not in again.stdout  # an upgrade: the links were there already
    assert (tmp_path / "etc/virt-forward/config.toml").read_text() == "# the admin's\n"

    calls = host.calls()
    for arg in ("upgrade", "deconfigure", "failed-upgrade"):
        host.run("prerm", arg, "0.1.0+1")
    assert host.link("qemu").is_symlink() and host.link("network").is_symlink()
    assert host.calls() == calls  # no rule removed during an upgrade

    removed = host.run("prerm", "remove")
    assert not host.link("qemu").is_symlink() and not host.link("network").is_symlink()
    assert "remove_rules_main" in host.calls()
    assert removed.returncode == 0
    host.run("postrm", "remove")
    assert (tmp_path / "etc/virt-forward/config.toml").exists()  # remove keeps the config

    host.run("postinst", "configure", "0.1.0")  # reinstall after remove: the links come back
    assert host.link("qemu").is_symlink()
    (tmp_path / "run/virt-forward").mkdir(parents=True)
    host.run("prerm", "remove")
    host.run("postrm", "purge")
    assert not (tmp_path / "etc/virt-forward").exists() and not (tmp_path / "run/virt-forward").exists()


def test_postinst_leaves_an_admins_hook_file_and_prerm_keeps_it(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.link("qemu").parent.mkdir(parents=True)
    host.link("qemu").write_text("#!/bin/sh\n# from virt-forward install\n")
    out = host.run("postinst", "configure", "").stdout
    assert f"{host.link('qemu')} is a file" in out
    assert host.link("qemu").read_text().endswith("# from virt-forward install\n")
    assert host.link("network").is_symlink()
    host.run("prerm", "remove")
    assert host.link("qemu").exists() and not host.link("network").is_symlink()


def test_a_failing_rule_removal_does_not_fail_prerm(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.run("postinst", "configure", "")
    (tmp_path / "python3").write_text("#!/bin/sh\necho broken >&2\nexit 1\n")
    assert host.run("prerm", "remove").returncode == 0


def test_build_script_is_valid_bash_and_excludes_what_git_does_not_track() -> None:
    script = TOP / "scripts" / "build-deb.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for excluded in ("./.git", "./.venv", "./build", "./dist", "__pycache__"):
        assert f"--exclude={excluded}" in text
    assert "dpkg-buildpackage -b -us -uc" in text and "--fail-on error,warning" in text


def test_install_and_uninstall_leave_the_packages_hooks_to_dpkg(tmp_path: Path) -> None:
    """`virt-forward install` over the package's links would leave files that `apt remove`
    does not take away; `uninstall` would take hooks from under an installed package."""
    from virt_forward import engine
    from virt_forward.install import InstallError, install, uninstall
    hooks = tmp_path / "etc/libvirt/hooks/qemu.d"
    hooks.mkdir(parents=True)
    (hooks / "virt-forward").symlink_to("/usr/lib/virt-forward/hooks/qemu")
    ctx = engine.Context(tmp_path / "etc/virt-forward", tmp_path / "run")
    with pytest.raises(InstallError, match="Debian package's hook"):
        install(tmp_path, ctx.config_dir, dry_run=False)
    with pytest.raises(InstallError, match="apt remove virt-forward"):
        uninstall(ctx, tmp_path, dry_run=True)
    assert (hooks / "virt-forward").is_symlink()
    assert not (tmp_path / "etc/systemd").exists()


def test_the_product_package_holds_no_test_or_demo_code() -> None:
    """The .deb installs all of src/virt_forward on every hypervisor: the namespace lab and the
    demo live in vflab/ at the repository root, which the package neither ships nor may import."""
    import ast
    import tomllib

    package = TOP / "src" / "virt_forward"
    assert sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py")
                  if p.name in ("lab.py", "demo.py")) == []
    importers = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            importers += [f"{path.relative_to(TOP)}:{node.lineno}" for m in modules
                          if m == "vflab" or m.startswith("vflab.")]
        if "vflab" in path.read_text():  # import_module("vflab...") and the like
            importers.append(f"{path.relative_to(TOP)} names vflab")
    assert importers == []
    # what keeps vflab/ out of the distribution, and so out of the .deb
    find = tomllib.loads((TOP / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert find["where"] == ["src"]
    assert (TOP / "vflab" / "lab.py").is_file() and not (TOP / "src" / "vflab").exists()
