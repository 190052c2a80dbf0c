"""The lab's guests and its NAT network: GuestSpec, their addresses, and the libvirt XML of both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

QEMU_BIN = "/usr/bin/qemu-system-x86_64"

NET_V4 = "192.168.122"
NET_V6 = "fd00:122:"
GATEWAY_V4 = f"{NET_V4}.1"
GATEWAY_V6 = f"{NET_V6}:1"
BRIDGE = "virbr0"


@dataclass(frozen=True)
class GuestSpec:
    """One guest: its domain name, static addresses (no prefix) and MAC."""

    name: str
    ip: str
    mac: str
    ip6: str | None = None
    memory_mib: int = 160
    # HOST:PORT the guest asks every second, logging the answer on its console ("vf-e2e self")
    selfcheck: str | None = None
    # more NICs: (libvirt network, MAC) each; the first of them (eth1) gets ip1 (ADDR/PREFIX)
    extra_nics: tuple[tuple[str, str], ...] = ()
    ip1: str | None = None

    @property
    def cmdline(self) -> str:
        parts = ["console=ttyS0", "panic=-1", f"vf.name={self.name}",
                 f"vf.ip={self.ip}/24", f"vf.gw={GATEWAY_V4}"]
        if self.ip6:
            parts += [f"vf.ip6={self.ip6}/64", f"vf.gw6={GATEWAY_V6}"]
        if self.selfcheck:
            parts.append(f"vf.self={self.selfcheck}")
        if self.ip1:
            parts.append(f"vf.ip1={self.ip1}")
        return " ".join(parts)


def default_guests(n: int, *, ipv6: bool = True, prefix: str = "vfguest") -> list[GuestSpec]:
    """``n`` guests named vfguest1..N at 192.168.122.10+i (and fd00:122::10+i)."""
    if not 0 <= n <= 80:
        raise ValueError("between 0 and 80 guests")
    return [
        GuestSpec(
            name=f"{prefix}{i + 1}",
            ip=f"{NET_V4}.{10 + i}",
            mac=f"52:54:00:e2:e0:{10 + i:02x}",
            ip6=f"{NET_V6}:{10 + i:x}" if ipv6 else None,
        )
        for i in range(n)
    ]


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;").replace('"', "&quot;")


def domain_xml(spec: GuestSpec, kernel: Path, initrd: Path, console: str, domain_type: str) -> str:
    extra = "".join(f"    <interface type='network'>\n      <source network='{_xml_escape(net)}'/>\n"
                    f"      <mac address='{mac}'/>\n      <model type='virtio'/>\n    </interface>\n"
                    for net, mac in spec.extra_nics)
    return f"""<domain type='{domain_type}'>
  <name>{_xml_escape(spec.name)}</name>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{_xml_escape(str(kernel))}</kernel>
    <initrd>{_xml_escape(str(initrd))}</initrd>
    <cmdline>{_xml_escape(spec.cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU_BIN}</emulator>
    <interface type='network'>
      <source network='default'/>
      <mac address='{spec.mac}'/>
      <model type='virtio'/>
    </interface>
{extra}    <serial type='file'>
      <source path='{_xml_escape(console)}'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{_xml_escape(console)}'/>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def network_xml(ipv6: bool) -> str:
    v6 = f"  <ip family='ipv6' address='{GATEWAY_V6}' prefix='64'/>\n" if ipv6 else ""
    return f"""<network>
  <name>default</name>
  <forward mode='nat'/>
  <bridge name='{BRIDGE}' stp='on' delay='0'/>
  <mac address='52:54:00:e2:e0:01'/>
  <ip address='{GATEWAY_V4}' netmask='255.255.255.0'>
    <dhcp><range start='{NET_V4}.100' end='{NET_V4}.254'/></dhcp>
  </ip>
{v6}</network>
"""


def nat_network_xml(name: str, bridge: str, gateway: str, hosts: Sequence[tuple[str, str]] = ()) -> str:
    """Another NAT network (/24 around `gateway`), with static DHCP hosts (mac, ip)."""
    entries = "".join(f"<host mac='{mac}' ip='{ip}'/>" for mac, ip in hosts)
    return (f"<network><name>{_xml_escape(name)}</name><forward mode='nat'/>"
            f"<bridge name='{bridge}' stp='on' delay='0'/><ip address='{gateway}' netmask='255.255.255.0'>"
            f"<dhcp>{entries}</dhcp></ip></network>\n")
