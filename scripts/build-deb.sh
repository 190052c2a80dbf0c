#!/usr/bin/env bash
# Builds virt-forward_<version>_all.deb from this checkout with Debian's own tools
# (debian/: debhelper + pybuild) and checks it with lintian, which must report no
# error and no warning.  The build runs in a temporary copy, so the checkout stays
# clean.  Prints the .deb's path as its last line.  Run as root on Debian 12 or 13:
# installs the build tools it lacks with apt-get.  Never installs the .deb.
#
# Usage: scripts/build-deb.sh [--version V] [--out DIR]
#   --version V  the package's version and the one virt-forward reports (default: the
#                project's, from src/virt_forward/__init__.py); two builds with two
#                versions (0.1.0, 0.1.0+1) test an upgrade.  V must be valid for both
#                Debian and Python (PEP 440), without a hyphen (a native package).
#   --out DIR    where the .deb goes (default dist/)
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' src/virt_forward/__init__.py)
out=dist
while [ $# -gt 0 ]; do
  case $1 in
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a value}; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "build-deb: unknown argument: $1" >&2; exit 2 ;;
  esac
done
if ! [[ $version =~ ^[0-9][A-Za-z0-9.+~]*$ ]]; then
  echo "build-deb: bad version ${version:-(none)}: digits first, then letters, digits, . + ~" >&2
  exit 2
fi

# debian/control's Build-Depends, and the tools that run the build and check it
need=()
for pkg in dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
           help2man bash-completion lintian; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "build-deb: apt-get install ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/virt-forward-deb.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
src=$tmp/virt-forward-$version
mkdir "$src"
# what is not in git's tree anyway: the venv, caches, earlier builds (and the output dir)
tar -C "$top" -cf - --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude="./${out#"$top"/}" --exclude=__pycache__ --exclude='*.egg-info' --exclude=./.mypy_cache \
    --exclude=./.pytest_cache --exclude=./.hypothesis --exclude=./debian/generated . | tar -C "$src" -xf -

# one version everywhere: the package's, the hook header's (__version__), the wheel's
sed -i "1s/^virt-forward ([^)]*)/virt-forward ($version)/" "$src/debian/changelog"
sed -i "s/^__version__ = .*/__version__ = \"$version\"/" "$src/src/virt_forward/__init__.py"
sed -i "0,/^version = /s/^version = .*/version = \"$version\"/" "$src/pyproject.toml"

start=$(date +%s)
# Debian's python3 and nothing from the caller's environment (a pyenv or venv first on
# PATH would otherwise build for the wrong interpreter)
if ! (cd "$src" && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$tmp" LC_ALL=C.UTF-8 \
        dpkg-buildpackage -b -us -uc) >"$tmp/build.log" 2>&1; then
  tail -n 60 "$tmp/build.log" >&2
  echo "build-deb: dpkg-buildpackage failed (the last lines above)" >&2
  exit 1
fi
deb=virt-forward_${version}_all.deb
echo "build-deb: built $deb in $(( $(date +%s) - start )) s" >&2

# the overrides shipped in the .deb apply; each one says in a comment why.  Not as root:
# lintian unpacks what it checks, and says so when it runs as root.  As nobody it must be able
# to reach the .deb and its working directory: neither the checkout nor $TMPDIR may be (root's
# home is 0700), so the .deb is checked from a directory of its own in /tmp, and from there.
lint=$(mktemp -d /tmp/virt-forward-lintian.XXXXXX)
trap 'rm -rf "$tmp" "$lint"' EXIT
cp "$tmp/$deb" "$lint/$deb"
chmod 0755 "$lint"
chmod 0644 "$lint/$deb"
as_user=()
who=$(id -un)
if [ "$(id -u)" = 0 ]; then
  as_user=(setpriv --reuid=nobody --regid=nogroup --clear-groups)
  who=nobody
fi
if ! (cd "$lint" && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 HOME=/tmp \
        "${as_user[@]}" lintian --fail-on error,warning "$deb" >&2); then
  echo "build-deb: lintian (run as $who in $lint) reported errors or warnings on $deb" >&2
  exit 1
fi
echo "build-deb: lintian: no error, no warning" >&2
cp "$tmp/$deb" "$out/$deb"
echo "$out/$deb"
