#!/bin/bash
# Build a tiny guest for the virt-forward e2e lab: a Debian cloud kernel plus an
# initramfs made of busybox-static, the virtio-net modules and a small static
# UDP responder.  Idempotent: a second run with the same inputs does nothing.
#
# Usage: build_guest.sh [CACHE_DIR]      (default /var/cache/virt-forward-e2e)
#
# Outputs in CACHE_DIR:
#   vmlinuz             guest kernel
#   initramfs.cpio.gz   guest initramfs (its /init is written below)
#   guest.env           KERNEL=..., INITRD=..., KVER=... (shell-sourceable)
#
# Guest kernel command line understood by /init:
#   vf.name=NAME            name shown on every service (default: "guest")
#   vf.ip=A.B.C.D/PREFIX    static IPv4 address of eth0 (required for networking)
#   vf.gw=A.B.C.D           IPv4 default gateway
#   vf.ip6=ADDR/PREFIX      optional static IPv6 address
#   vf.gw6=ADDR             optional IPv6 default gateway
#   vf.ip1=A.B.C.D/PREFIX   optional IPv4 address of eth1 (a second NIC)
#   vf.self=HOST:PORT       ask http://HOST:PORT/ every second (IPv4), log "vf-e2e self HOST:PORT: ANSWER"
# Services:
#   TCP 80, 8080   busybox httpd; body "vf-e2e guest=NAME port=PORT"
#   TCP 22         banner "SSH-2.0-vfe2e NAME", then echoes what it gets
#   UDP 5353       answers each datagram with "NAME " + the datagram
#   TCP 9000       writes "NAME\n" and closes, without forking (load tests: many connections/s)
# Serial console line when ready:  "VF-E2E-READY name=NAME ip=..."
set -euo pipefail

CACHE_DIR="${1:-/var/cache/virt-forward-e2e}"
META_PKG="linux-image-cloud-amd64"
# Bump when /init, the module list or the layout below changes.
RECIPE_VERSION=4

export DEBIAN_FRONTEND=noninteractive
log() { echo "build_guest: $*" >&2; }

need_pkgs=()
for p in busybox-static cpio xz-utils gzip gcc libc6-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]}"
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >&2
fi

mkdir -p "$CACHE_DIR"
CACHE_DIR="$(cd "$CACHE_DIR" && pwd)"
DEB_DIR="$CACHE_DIR/debs"
mkdir -p "$DEB_DIR"

# Which versioned image does the meta package want?  Ask apt-cache (no download).
KPKG="$(apt-cache depends "$META_PKG" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
if [[ -z "$KPKG" ]]; then
    apt-get update -q >&2 || true
    KPKG="$(apt-cache depends "$META_PKG" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
fi
if [[ -z "$KPKG" && -s "$CACHE_DIR/vmlinuz" && -s "$CACHE_DIR/initramfs.cpio.gz" ]]; then
    log "apt cannot resolve $META_PKG; keeping the guest already in $CACHE_DIR"
    exit 0
fi
[[ -n "$KPKG" ]] || { log "cannot resolve the versioned image of $META_PKG"; exit 1; }
KVER="${KPKG#linux-image-}"
SELF_SUM="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
STAMP="recipe=$RECIPE_VERSION kver=$KVER script=$SELF_SUM busybox=$(dpkg-query -W -f='${Version}' busybox-static)"

if [[ -f "$CACHE_DIR/stamp" && "$(cat "$CACHE_DIR/stamp")" == "$STAMP" \
      && -s "$CACHE_DIR/vmlinuz" && -s "$CACHE_DIR/initramfs.cpio.gz" ]]; then
    log "up to date ($KVER)"
    exit 0
fi

log "building guest with kernel $KVER into $CACHE_DIR"
if ! ls "$DEB_DIR/${KPKG}_"*.deb >/dev/null 2>&1; then
    # _apt cannot write into root-only dirs; download into a world-writable temp dir.
    dl="$(mktemp -d)"
    chmod 777 "$dl"
    (cd "$dl" && apt-get download "$META_PKG" "$KPKG" >&2)
    mv "$dl"/*.deb "$DEB_DIR/"
    rm -rf "$dl"
fi
KDEB="$(ls "$DEB_DIR/${KPKG}_"*.deb | head -n1)"

WORK="$(mktemp -d "$CACHE_DIR/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
dpkg-deb -x "$KDEB" "$WORK/kernel"
cp "$WORK/kernel/boot/vmlinuz-$KVER" "$WORK/vmlinuz"

ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,etc,run,lib/modules,www80,www8080}
mknod -m 600 "$ROOT/dev/console" c 5 1
mknod -m 666 "$ROOT/dev/null" c 1 3
cp /bin/busybox "$ROOT/bin/busybox"
for applet in $("$ROOT/bin/busybox" --list); do
    [[ "$applet" == busybox ]] && continue
    ln -sf busybox "$ROOT/bin/$applet"
done

MODS=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net)
KMODDIR="$WORK/kernel/lib/modules/$KVER"
for m in "${MODS[@]}"; do
    f="$(find "$KMODDIR" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)"
    if [[ -z "$f" ]]; then
        # Built into this kernel: nothing to load.
        grep -q "/$m.ko\$" "$KMODDIR/modules.builtin" 2>/dev/null && continue
        log "module $m not found (neither .ko nor builtin)"; exit 1
    fi
    case "$f" in
        *.ko.xz) xz -dc "$f" >"$ROOT/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$ROOT/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -dc "$f" >"$ROOT/lib/modules/$m.ko" ;;
        *) cp "$f" "$ROOT/lib/modules/$m.ko" ;;
    esac
done
printf '%s\n' "${MODS[@]}" >"$ROOT/lib/modules/order"

# A UDP responder: busybox's nc here has no -u.  Static, so it needs no libc in the guest.
cat >"$WORK/udpecho.c" <<'EOF'
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 5353;
    const char *name = argc > 2 ? argv[2] : "guest";
    int off = 0, s = socket(AF_INET6, SOCK_DGRAM, 0);
    if (s >= 0) {
        struct sockaddr_in6 a;
        memset(&a, 0, sizeof a);
        a.sin6_family = AF_INET6;
        a.sin6_port = htons(port);
        setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
        if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) { close(s); s = -1; }
    }
    if (s < 0) {
        struct sockaddr_in b;
        memset(&b, 0, sizeof b);
        b.sin_family = AF_INET;
        b.sin_port = htons(port);
        s = socket(AF_INET, SOCK_DGRAM, 0);
        if (s < 0 || bind(s, (struct sockaddr *)&b, sizeof b) < 0) { perror("udpecho"); return 1; }
    }
    size_t hl = strlen(name) + 1;
    for (;;) {
        char in[2048], out[2048 + 256];
        struct sockaddr_storage from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(s, in, sizeof in, 0, (struct sockaddr *)&from, &fl);
        if (n < 0) continue;
        if (hl > 256) hl = 256;
        memcpy(out, name, hl - 1);
        out[hl - 1] = ' ';
        memcpy(out + hl, in, (size_t)n);
        sendto(s, out, hl + (size_t)n, 0, (struct sockaddr *)&from, fl);
    }
}
EOF
gcc -O2 -static -o "$ROOT/bin/udpecho" "$WORK/udpecho.c"
strip "$ROOT/bin/udpecho" || true

# A TCP greeter for load tests: busybox httpd forks a child per connection, which under TCG
# caps a guest at a few dozen connections/s on a busy host; this answers in its accept loop.
cat >"$WORK/tcpgreet.c" <<'EOF'
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 9000;
    const char *name = argc > 2 ? argv[2] : "guest";
    char msg[260];
    size_t n = strlen(name);
    if (n > 256) n = 256;
    memcpy(msg, name, n);
    msg[n++] = '\n';
    int one = 1, s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    if (s >= 0) setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 1024) < 0) { perror("tcpgreet"); return 1; }
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        if (write(c, msg, n) < 0) { /* the client went away: nothing to do */ }
        close(c);
    }
}
EOF
gcc -O2 -static -o "$ROOT/bin/tcpgreet" "$WORK/tcpgreet.c"
strip "$ROOT/bin/tcpgreet" || true

cat >"$ROOT/bin/banner" <<'EOF'
#!/bin/sh
echo "SSH-2.0-vfe2e $(cat /etc/vf-name)"
exec cat
EOF
chmod 755 "$ROOT/bin/banner"

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
echo "vf-e2e init: starting"

NAME=guest IP= GW= IP6= GW6= SELF= IP1=
for kv in $(cat /proc/cmdline); do
    case "$kv" in
        vf.name=*) NAME="${kv#vf.name=}" ;;
        vf.ip=*) IP="${kv#vf.ip=}" ;;
        vf.gw=*) GW="${kv#vf.gw=}" ;;
        vf.ip6=*) IP6="${kv#vf.ip6=}" ;;
        vf.gw6=*) GW6="${kv#vf.gw6=}" ;;
        vf.self=*) SELF="${kv#vf.self=}" ;;
        vf.ip1=*) IP1="${kv#vf.ip1=}" ;;
    esac
done
echo "$NAME" >/etc/vf-name
hostname "$NAME"

for m in $(cat /lib/modules/order); do
    [ -f "/lib/modules/$m.ko" ] && insmod "/lib/modules/$m.ko"
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done

ip link set lo up
# One IPv6 address only: with SLAAC from libvirt's router advertisements a UDP server bound
# to :: may answer from another address than the one it was asked on, and that reply then
# misses the conntrack entry (seen: UDP over IPv6 through DNAT timed out in 1 run of 3).
echo 0 >/proc/sys/net/ipv6/conf/eth0/autoconf 2>/dev/null
echo 0 >/proc/sys/net/ipv6/conf/default/autoconf 2>/dev/null
ip link set eth0 up
[ -n "$IP" ] && ip addr add "$IP" dev eth0
[ -n "$GW" ] && ip route add default via "$GW"
if [ -n "$IP1" ]; then
    i=0
    while [ ! -e /sys/class/net/eth1 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
    ip link set eth1 up && ip addr add "$IP1" dev eth1 || echo "vf-e2e init: cannot set up eth1"
fi
if [ -n "$IP6" ]; then
    echo 0 >/proc/sys/net/ipv6/conf/eth0/accept_dad 2>/dev/null
    ip -6 addr add "$IP6" dev eth0 || echo "vf-e2e init: cannot add $IP6"
    [ -n "$GW6" ] && ip -6 route add default via "$GW6"
fi

for p in 80 8080; do
    echo "vf-e2e guest=$NAME port=$p" >"/www$p/index.html"
    httpd -p "$p" -h "/www$p"
done
nc -ll -p 22 -e /bin/banner &
udpecho 5353 "$NAME" &
tcpgreet 9000 "$NAME" &
sleep 0.2
ip -o addr show dev eth0
echo "VF-E2E-READY name=$NAME ip=$IP ip6=$IP6"
# Tell the host side we exist (fills its neighbour table early).
[ -n "$GW" ] && ping -c 1 -W 1 "$GW" >/dev/null 2>&1
# A guest calling a forward, maybe its own (hairpin): the host reads the answers on the console.
# (busybox-static's wget segfaults: nc it is, and the body is the response's last line)
if [ -n "$SELF" ]; then
    ( while true; do
        out="$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 "${SELF%:*}" "${SELF##*:}" 2>&1 | tail -n 1)"
        echo "vf-e2e self $SELF: ${out:-no answer}"
        sleep 1
      done ) &
fi
while true; do sleep 3600; done
EOF
chmod 755 "$ROOT/init"

(cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -9 >"$WORK/initramfs.cpio.gz"

mv -f "$WORK/vmlinuz" "$CACHE_DIR/vmlinuz"
mv -f "$WORK/initramfs.cpio.gz" "$CACHE_DIR/initramfs.cpio.gz"
cat >"$CACHE_DIR/guest.env" <<EOF
KERNEL=$CACHE_DIR/vmlinuz
INITRD=$CACHE_DIR/initramfs.cpio.gz
KVER=$KVER
EOF
echo "$STAMP" >"$CACHE_DIR/stamp"
log "done: $CACHE_DIR/vmlinuz $CACHE_DIR/initramfs.cpio.gz"
