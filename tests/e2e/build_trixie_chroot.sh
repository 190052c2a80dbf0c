#!/bin/bash
# Build a Debian 13 (trixie) chroot holding libvirt 11, for the e2e lab's
# nftables-backend runs on hosts whose own libvirt is older than 10.4 (Debian 12).
# Idempotent: a stamp records the recipe version, the suite and the package list; a second
# run does nothing (edit RECIPE_VERSION to force a rebuild).
#
# Usage: build_trixie_chroot.sh [DIR]    (default /var/cache/virt-forward-e2e/trixie)
#
# Everything runs in a private mount namespace (unshare -m): the /proc, /sys
# and /dev mounts the package scripts need disappear with it.  A policy-rc.d
# keeps the packages from starting any daemon.  The tree is built in DIR.new
# and renamed to DIR at the end, so an interrupted build leaves no half DIR.
set -euo pipefail

DIR="${1:-/var/cache/virt-forward-e2e/trixie}"
SUITE="${VF_E2E_TRIXIE_SUITE:-trixie}"
MIRROR="${VF_E2E_MIRROR:-http://deb.debian.org/debian}"
PACKAGES=(libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu qemu-system-x86
          dnsmasq-base nftables iproute2 util-linux)
# Bump when the package list or the steps below change.
RECIPE_VERSION=1

export DEBIAN_FRONTEND=noninteractive
log() { echo "build_trixie_chroot: $*" >&2; }

WANT="recipe=$RECIPE_VERSION suite=$SUITE packages=${PACKAGES[*]}"
if [[ -x "$DIR/usr/sbin/libvirtd" && -f "$DIR/.vfe2e-stamp" && "$(cat "$DIR/.vfe2e-stamp")" == "$WANT" ]]; then
    exit 0
fi

# One builder at a time (two labs may start together on a cold cache).
mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock 9
if [[ -x "$DIR/usr/sbin/libvirtd" && -f "$DIR/.vfe2e-stamp" && "$(cat "$DIR/.vfe2e-stamp")" == "$WANT" ]]; then
    exit 0
fi

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends debootstrap >&2
fi

NEW="$DIR.new"
rm -rf --one-file-system "$NEW"
t0=$(date +%s)
log "debootstrap --variant=minbase $SUITE $NEW $MIRROR"
debootstrap --variant=minbase "$SUITE" "$NEW" "$MIRROR" >&2
log "debootstrap took $(( $(date +%s) - t0 )) s"

# No daemon may start from a package script (there is no init in the chroot anyway).
printf '#!/bin/sh\nexit 101\n' > "$NEW/usr/sbin/policy-rc.d"
chmod 0755 "$NEW/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$NEW/etc/resolv.conf"

t1=$(date +%s)
log "apt-get install ${PACKAGES[*]} (in the chroot)"
unshare --mount --propagation private -- sh -ec '
    NEW="$1"; shift
    mount -t proc proc "$NEW/proc"
    mount -t sysfs sys "$NEW/sys"
    mount --rbind /dev "$NEW/dev"
    mount -t tmpfs tmpfs "$NEW/run"
    chroot "$NEW" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        LC_ALL=C apt-get update -q
    chroot "$NEW" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        LC_ALL=C apt-get install -y -q --no-install-recommends "$@"
    chroot "$NEW" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C apt-get clean
' sh "$NEW" "${PACKAGES[@]}" >&2
log "apt-get install took $(( $(date +%s) - t1 )) s"

for b in usr/sbin/libvirtd usr/sbin/virtlogd usr/bin/virsh usr/bin/qemu-system-x86_64 usr/sbin/dnsmasq \
         usr/sbin/nft usr/sbin/tc usr/bin/nsenter; do
    [[ -x "$NEW/$b" ]] || { log "missing /$b in the chroot"; exit 1; }
done
# Mount points the lab uses.
mkdir -p "$NEW/var/lib/libvirt" "$NEW/var/log/libvirt" "$NEW/var/cache/libvirt" "$NEW/run"
echo "$WANT" > "$NEW/.vfe2e-stamp"
# A lab still running from an older tree keeps its open files; new labs get the new tree.
OLD="$DIR.old.$$"
[[ -e "$DIR" ]] && mv "$DIR" "$OLD"
mv "$NEW" "$DIR"
rm -rf --one-file-system "$OLD"
log "built $DIR in $(( $(date +%s) - t0 )) s: $(chroot "$DIR" dpkg-query -W -f='${Version}' libvirt-daemon) libvirt"
