#!/usr/bin/env bash
# The built-in demo: namespaces for a host, a guest and a client; no libvirt needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/virt-forward demo
