"""A hypervisor in network namespaces: host, guests on a bridge, an outside client.

Used by the demo (`python -m vflab`), the namespace tests and the benchmarks, so that all
three exercise the same topology.  It reproduces the firewall rules libvirt 9.0
(iptables backend) puts in place for a NAT network, because getting past those
is what the product exists for.  Everything lives in namespaces this object
made, and `close()` removes them all (also after a failure or Ctrl-C).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PUBLIC4, CLIENT4, CLIENT4_OTHER = "198.51.100.1", "198.51.100.2", "198.51.100.3"
PUBLIC6, CLIENT6 = "2001:db8:1::1", "2001:db8:1::2"
GUEST_NET4, BRIDGE4 = "192.168.122.0/24", "192.168.122.1"
GUEST_NET6, BRIDGE6 = "fd00:122::/64", "fd00:122::1"

# What libvirt 9.0 installs for <network><forward mode='nat'/> on virbr0 (iptables-save form).
LIBVIRT_FILTER = """*filter
:LIBVIRT_INP - [0:0]
:LIBVIRT_OUT - [0:0]
:LIBVIRT_FWO - [0:0]
:LIBVIRT_FWI - [0:0]
:LIBVIRT_FWX - [0:0]
-A INPUT -j LIBVIRT_INP
-A FORWARD -j LIBVIRT_FWX
-A FORWARD -j LIBVIRT_FWI
-A FORWARD -j LIBVIRT_FWO
-A OUTPUT -j LIBVIRT_OUT
-A LIBVIRT_INP -i virbr0 -p udp -m udp --dport 53 -j ACCEPT
-A LIBVIRT_INP -i virbr0 -p tcp -m tcp --dport 53 -j ACCEPT
-A LIBVIRT_INP -i virbr0 -p udp -m udp --dport 67 -j ACCEPT
-A LIBVIRT_INP -i virbr0 -p tcp -m tcp --dport 67 -j ACCEPT
-A LIBVIRT_OUT -o virbr0 -p udp -m udp --dport 53 -j ACCEPT
-A LIBVIRT_OUT -o virbr0 -p tcp -m tcp --dport 53 -j ACCEPT
-A LIBVIRT_OUT -o virbr0 -p udp -m udp --dport 68 -j ACCEPT
-A LIBVIRT_OUT -o virbr0 -p tcp -m tcp --dport 68 -j ACCEPT
-A LIBVIRT_FWO -s {net} -i virbr0 -j ACCEPT
-A LIBVIRT_FWO -i virbr0 -j REJECT --reject-with {unreach}
-A LIBVIRT_FWI -d {net} -o virbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A LIBVIRT_FWI -o virbr0 -j REJECT --reject-with {unreach}
-A LIBVIRT_FWX -i virbr0 -o virbr0 -j ACCEPT
COMMIT
"""
LIBVIRT_NAT4 = """*nat
:LIBVIRT_PRT - [0:0]
-A POSTROUTING -j LIBVIRT_PRT
-A LIBVIRT_PRT -s {net} -d 224.0.0.0/24 -j RETURN
-A LIBVIRT_PRT -s {net} -d 255.255.255.255/32 -j RETURN
-A LIBVIRT_PRT -s {net} ! -d {net} -p tcp -j MASQUERADE --to-ports 1024-65535
-A LIBVIRT_PRT -s {net} ! -d {net} -p udp -j MASQUERADE --to-ports 1024-65535
-A LIBVIRT_PRT -s {net} ! -d {net} -j MASQUERADE
COMMIT
"""

# What libvirt >= 10.4 with firewall_backend = "nftables" makes for the same network
# (nft -f form; libvirt `insert`s each rule, so the last inserted is first).
LIBVIRT_NFT = """
add table {fam} libvirt_network
add chain {fam} libvirt_network forward {{ type filter hook forward priority 0; policy accept; }}
add chain {fam} libvirt_network guest_output
add chain {fam} libvirt_network guest_input
add chain {fam} libvirt_network guest_cross
add chain {fam} libvirt_network guest_nat {{ type nat hook postrouting priority 100; policy accept; }}
add chain {fam} libvirt_network postroute_mangle {{ type filter hook postrouting priority 0; policy accept; }}
insert rule {fam} libvirt_network forward counter jump guest_output
insert rule {fam} libvirt_network forward counter jump guest_input
insert rule {fam} libvirt_network forward counter jump guest_cross
{network_rules}"""
LIBVIRT_NFT_NETWORK = """insert rule {fam} libvirt_network guest_output iif virbr0 counter reject
insert rule {fam} libvirt_network guest_input oif virbr0 counter reject
insert rule {fam} libvirt_network guest_cross iif virbr0 oif virbr0 counter accept
insert rule {fam} libvirt_network guest_output {ip} saddr {net} iif virbr0 counter accept
insert rule {fam} libvirt_network guest_input oif virbr0 {ip} daddr {net} ct state related,established counter accept
insert rule {fam} libvirt_network guest_nat {ip} saddr {net} {ip} daddr != {net} counter masquerade
"""

# A guest's services: every TCP/UDP port answers "<guest>:<port>".
SERVER = r"""
import selectors, socket, sys
name, tcp, udp = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
sel = selectors.DefaultSelector()
for kind, ports in ((socket.SOCK_STREAM, tcp), (socket.SOCK_DGRAM, udp)):
    for p in filter(None, ports):
        s = socket.socket(socket.AF_INET6, kind)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", int(p)))
        if kind == socket.SOCK_STREAM:
            s.listen(512)
        sel.register(s, selectors.EVENT_READ, (kind, p))
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        kind, p = key.data
        s = key.fileobj
        try:
            if kind == socket.SOCK_STREAM:
                c, peer = s.accept()
                c.sendall(f"{name}:{p} from {peer[0].removeprefix('::ffff:')}\n".encode())
                c.close()
            else:
                data, peer = s.recvfrom(2048)
                s.sendto(f"{name}:{p} from {peer[0].removeprefix('::ffff:')}\n".encode(), peer)
        except OSError:
            pass
"""

# One probe from a namespace; prints the reply or "ERR <reason>".
PROBE = r"""
import socket, sys
proto, addr, port, timeout, src = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.settimeout(timeout)
try:
    if src:
        s.bind((src, 0))
    if proto == "tcp":
        s.connect((addr, port))
        print(s.recv(200).decode().strip())
    else:
        s.sendto(b"ping", (addr, port))
        print(s.recvfrom(200)[0].decode().strip())
except OSError as e:
    print("ERR", type(e).__name__, e)
"""

TCP_PORTS = (22, 80, 443, 3306, 8080)
UDP_PORTS = (53, 5353, 9000, 9001, 9002)


@dataclass(frozen=True)
class Guest:
    name: str
    ns: str
    addr4: str
    addr6: str
    port: str  # its tap-like port on the host's bridge


@dataclass
class Lab:
    libvirt_rules: bool = True
    libvirt_backend: str = "iptables"  # or "nftables" (libvirt >= 10.4)
    guests: int = 2
    # hairpin mode on the guests' ports, as virt-forward sets it on libvirt's taps (hairpin.py);
    # off: the ports as libvirt leaves them
    hairpin_ports: bool = True
    prefix: str = field(default_factory=lambda: f"vf{os.getpid() % 100000}{secrets.token_hex(2)}")
    namespaces: list[str] = field(default_factory=list)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    members: list[Guest] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"{self.prefix}-host"

    @property
    def client(self) -> str:
        return f"{self.prefix}-client"

    # ------------------------------------------------------------ plumbing
    def sh(self, ns: str | None, *argv: str, check: bool = True, stdin: str | None = None,
           env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def _ip(self, ns: str, *args: str) -> None:
        self.sh(None, "ip", "-n", ns, *args)

    def _add_ns(self, name: str) -> None:
        self.sh(None, "ip", "netns", "add", name)
        self.namespaces.append(name)
        self._ip(name, "link", "set", "lo", "up")
        # no DAD: addresses must work at once
        self.sh(name, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")

    # ------------------------------------------------------------ life
    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        host, client = self.host, self.client
        self._add_ns(host)
        self._add_ns(client)
        self.sh(host, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # uplink: the host's public side
        self._ip(host, "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", client)
        self._ip(host, "addr", "add", f"{PUBLIC4}/24", "dev", "uplink")
        self._ip(host, "addr", "add", f"{PUBLIC6}/64", "dev", "uplink", "nodad")
        self._ip(host, "link", "set", "uplink", "up")
        self._ip(client, "addr", "add", f"{CLIENT4}/24", "dev", "eth0")
        self._ip(client, "addr", "add", f"{CLIENT4_OTHER}/24", "dev", "eth0")
        self._ip(client, "addr", "add", f"{CLIENT6}/64", "dev", "eth0", "nodad")
        self._ip(client, "link", "set", "eth0", "up")
        # the libvirt-like NAT network
        self._ip(host, "link", "add", "virbr0", "type", "bridge")
        self._ip(host, "addr", "add", f"{BRIDGE4}/24", "dev", "virbr0")
        self._ip(host, "addr", "add", f"{BRIDGE6}/64", "dev", "virbr0", "nodad")
        self._ip(host, "link", "set", "virbr0", "up")
        for i in range(self.guests):
            self.add_guest(f"guest{i + 1}", f"192.168.122.{10 + i}", f"fd00:122::{10 + i:x}")
        if self.libvirt_rules:
            self.load_libvirt_rules()

    def add_guest(self, name: str, addr4: str, addr6: str) -> Guest:
        host, ns = self.host, f"{self.prefix}-{name}"
        port = f"vnet{len(self.members)}"
        self._add_ns(ns)
        self._ip(host, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._ip(host, "link", "set", port, "master", "virbr0")
        if self.hairpin_ports:  # a guest calling its own public port comes back out of the same bridge port
            self._ip(host, "link", "set", port, "type", "bridge_slave", "hairpin", "on")
        self._ip(host, "link", "set", port, "up")
        self._ip(ns, "addr", "add", f"{addr4}/24", "dev", "eth0")
        self._ip(ns, "addr", "add", f"{addr6}/64", "dev", "eth0", "nodad")
        self._ip(ns, "link", "set", "eth0", "up")
        self._ip(ns, "route", "add", "default", "via", BRIDGE4)
        self._ip(ns, "-6", "route", "add", "default", "via", BRIDGE6)
        guest = Guest(name, ns, addr4, addr6, port)
        self.members.append(guest)
        self.serve(guest)
        return guest

    def serve(self, guest: Guest, tcp: tuple[int, ...] = TCP_PORTS, udp: tuple[int, ...] = UDP_PORTS) -> None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", guest.ns, sys.executable, "-c", SERVER, guest.name,
             ",".join(map(str, tcp)), ",".join(map(str, udp))],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.servers.append(proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"server in {guest.ns} did not start")

    def load_libvirt_rules(self) -> None:
        if self.libvirt_backend == "nftables":
            self.sh(self.host, "nft", "-f", "-", stdin=self.libvirt_nft_ruleset(with_base=True))
            return
        for tool, net, unreach in (("iptables-restore", GUEST_NET4, "icmp-port-unreachable"),
                                   ("ip6tables-restore", GUEST_NET6, "icmp6-port-unreachable")):
            self.sh(self.host, tool, "-w", "--noflush", stdin=LIBVIRT_FILTER.format(net=net, unreach=unreach))
        self.sh(self.host, "iptables-restore", "-w", "--noflush", stdin=LIBVIRT_NAT4.format(net=GUEST_NET4))

    def libvirt_nft_ruleset(self, with_base: bool) -> str:
        """libvirt's nftables rules; without the base, what a network (re)start inserts again."""
        text = ""
        for fam, ip, net in (("ip", "ip", GUEST_NET4), ("ip6", "ip6", GUEST_NET6)):
            rules = LIBVIRT_NFT_NETWORK.format(fam=fam, ip=ip, net=net)
            text += LIBVIRT_NFT.format(fam=fam, network_rules=rules) if with_base else rules
        return text

    def close(self) -> None:
        for proc in self.servers:
            proc.kill()
        for proc in self.servers:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.servers.clear()
        for ns in reversed(self.namespaces):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            for _ in range(50):
                if subprocess.run(["ip", "netns", "del", ns], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
        self.namespaces.clear()

    # ------------------------------------------------------------ traffic
    def probe(self, ns: str, proto: str, addr: str, port: int, *, src: str = "", timeout: float = 2.0) -> str:
        """The reply ("guest1:80 from 198.51.100.2") or "ERR ..."."""
        out = self.sh(ns, sys.executable, "-c", PROBE, proto, addr, str(port), str(timeout), src,
                      timeout=timeout + 30)
        return out.stdout.strip()

    def guest(self, name: str) -> Guest:
        return next(g for g in self.members if g.name == name)


def domain_xml(name: str, uuid: str = "6f1c5ce0-6b8a-4a3e-9b36-000000000001") -> str:
    """A minimal live domain XML as libvirt passes it on the hook's stdin."""
    return (f"<domain type='kvm' id='1'><name>{name}</name><uuid>{uuid}</uuid>"
            "<devices><interface type='network'><mac address='52:54:00:00:00:01'/>"
            "<source network='default' bridge='virbr0'/><target dev='vnet0'/></interface></devices></domain>")


def install_hooks(root: Path, config_dir: Path, state_dir: Path) -> Path:
    """`virt-forward install --root ROOT --config-dir .. --state-dir ..`, in process: the hooks
    every demo, test and benchmark runs are the files `install` writes (and has checked).
    Returns the qemu hook's path; the network hook is beside it in network.d."""
    from virt_forward import install
    install.install(root, config_dir, dry_run=False,
                    dirs=("--config-dir", str(config_dir), "--state-dir", str(state_dir)))
    return root / install.QEMU_HOOK
