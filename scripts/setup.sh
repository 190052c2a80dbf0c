#!/usr/bin/env bash
# Installs what virt-forward's demo and tests need on a fresh Debian 12/13 machine (as root)
# and makes a virtualenv in .venv with the package and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# libvirt-dev, pkg-config, gcc, python3-dev: to build libvirt-python (reconcile/watch ask libvirt);
# conntrack: to forget the flows of a removed or re-pointed forward
for pkg in nftables iptables iproute2 conntrack python3 python3-venv python3-dev libvirt-dev pkg-config gcc; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: ${need[*]} missing, and installing them needs root: sudo $0" >&2
    echo "  (the noroot tier alone needs none of them: python3 -m venv .venv && .venv/bin/pip install -e '.[test]')" >&2
    exit 2
  fi
  echo "setup: apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

py=python3
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,libvirt]'
