#!/bin/bash
# Build a Debian root file system that boots with systemd as PID 1 under systemd-nspawn and
# holds what a hypervisor admin would have before installing virt-forward: libvirt from Debian
# (daemon, client, QEMU), both firewalls' tools, and virt-forward's dependencies (the
# container has no network to the mirror, so apt must find them already installed).
#
# Usage: build_root.sh SUITE [DIR]     SUITE: bookworm | trixie
#        default DIR: /var/tmp/virt-forward-field/SUITE
#
# Idempotent: a stamp records the recipe, the suite and the build date; a tree older than
# VF_FIELD_MAX_AGE_DAYS (default 14) is rebuilt so security updates reach the tests.  The tree is
# built in DIR.new and renamed, so an interrupted build leaves no half tree; tests never write
# into it (they boot an overlay of it).
set -euo pipefail

SUITE="${1:?usage: build_root.sh bookworm|trixie [DIR]}"
DIR="${2:-/var/tmp/virt-forward-field/$SUITE}"
MIRROR="${VF_FIELD_MIRROR:-http://deb.debian.org/debian}"
MAX_AGE_DAYS="${VF_FIELD_MAX_AGE_DAYS:-14}"
PACKAGES=(systemd systemd-sysv dbus libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu
          qemu-system-x86 dnsmasq-base nftables iptables iproute2 procps util-linux
          python3 python3-tomlkit python3-libvirt python3-venv conntrack
          # the README's venv install builds libvirt-python with these (apt step done in advance:
          # the container has no network)
          libvirt-dev pkg-config gcc python3-dev
          # masked below; the tests that want it unmask it
          firewalld)
# Bump when the package list or the steps below change.
RECIPE_VERSION=5
WANT="recipe=$RECIPE_VERSION suite=$SUITE packages=${PACKAGES[*]}"

export DEBIAN_FRONTEND=noninteractive
log() { echo "build_root($SUITE): $*" >&2; }

fresh() {
    [[ -f "$DIR/.vf-field-stamp" && -f "$DIR/.vf-field-built" ]] || return 1
    [[ "$(cat "$DIR/.vf-field-stamp")" == "$WANT" ]] || return 1
    local built; built=$(cat "$DIR/.vf-field-built")
    (( $(date +%s) - built < MAX_AGE_DAYS * 86400 ))
}
fresh && exit 0

mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock 9
fresh && exit 0

if ! command -v debootstrap >/dev/null || ! command -v systemd-nspawn >/dev/null; then
    log "installing debootstrap and systemd-container"
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends debootstrap systemd-container >&2
fi

NEW="$DIR.new"
rm -rf --one-file-system "$NEW"
t0=$(date +%s)
log "debootstrap --variant=minbase $SUITE"
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus "$SUITE" "$NEW" "$MIRROR" >&2
# No daemon may start from a package script while we build (the tree is not booted yet).
printf '#!/bin/sh\nexit 101\n' > "$NEW/usr/sbin/policy-rc.d"
chmod 0755 "$NEW/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$NEW/etc/resolv.conf"
unshare --mount --propagation private -- sh -ec '
    NEW="$1"; shift
    mount -t proc proc "$NEW/proc"
    mount -t sysfs sys "$NEW/sys"
    mount --rbind /dev "$NEW/dev"
    mount -t tmpfs tmpfs "$NEW/run"
    run() { chroot "$NEW" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
    run apt-get update -q
    run apt-get install -y -q --no-install-recommends "$@"
    run apt-get clean
' sh "$NEW" "${PACKAGES[@]}" >&2
rm -f "$NEW/usr/sbin/policy-rc.d"

# A container, not a machine: no getty on a console nobody reads, no waiting for a network
# that nspawn's private namespace configures from outside.
ln -sf /dev/null "$NEW/etc/systemd/system/console-getty.service"
ln -sf /dev/null "$NEW/etc/systemd/system/systemd-networkd-wait-online.service"
echo "vf-field-$SUITE" > "$NEW/etc/hostname"
: > "$NEW/etc/machine-id"   # a fresh id at every boot of an overlay
# libvirt's own default network: the tests define theirs (with IPv6 and fixed addresses)
rm -f "$NEW/etc/libvirt/qemu/networks/autostart/default.xml" "$NEW/etc/libvirt/qemu/networks/default.xml"

# What this container needs and a real host does not (each seen failing without it here):
# - nspawn mounts the host's cgroup v1 controllers read-only, so libvirt cannot make a cgroup
#   per guest ("Failed to create v1 controller cpu for group: Read-only file system");
# - the kernel of these machines has no act_csum and cannot load modules, and libvirt >= 10.4
#   adds a `tc ... action csum` filter on its bridges: a tc earlier in systemd's PATH pretends
#   that one filter worked and runs the real tc for everything else.
printf '\n# virt-forward field test container\ncgroup_controllers = [ ]\n' >> "$NEW/etc/libvirt/qemu.conf"
cat > "$NEW/usr/local/sbin/tc" <<'TC'
#!/bin/sh
case " $* " in
  *" action csum "*) exit 0 ;;
esac
exec /usr/sbin/tc "$@"
TC
chmod 0755 "$NEW/usr/local/sbin/tc"
# firewalld changes how every firewall looks: only the tests that are about it run it
ln -sf /dev/null "$NEW/etc/systemd/system/firewalld.service"
# The test guests (busybox, no acpid) ignore ACPI shutdown: a power-off would wait for them for
# minutes.  Autostart decides what runs after a boot, not a saved list of running guests.
printf 'ON_BOOT=ignore\nON_SHUTDOWN=shutdown\nSHUTDOWN_TIMEOUT=3\n' >> "$NEW/etc/default/libvirt-guests"
for b in usr/sbin/libvirtd usr/bin/virsh usr/bin/qemu-system-x86_64 usr/sbin/dnsmasq usr/sbin/nft \
         usr/sbin/iptables usr/sbin/conntrack usr/bin/python3 lib/systemd/systemd usr/bin/firewall-cmd; do
    [[ -x "$NEW/$b" ]] || { log "missing /$b"; exit 1; }
done
echo "$WANT" > "$NEW/.vf-field-stamp"
date +%s > "$NEW/.vf-field-built"
rm -rf --one-file-system "$DIR.old"
[[ -d "$DIR" ]] && mv "$DIR" "$DIR.old"
mv "$NEW" "$DIR"
rm -rf --one-file-system "$DIR.old"
log "built in $(( $(date +%s) - t0 )) s"
