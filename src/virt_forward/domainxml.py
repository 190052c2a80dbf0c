"""What the hook reads from the domain XML on its stdin: name, NICs, our metadata.

Forwards can travel with the guest (migration, `virsh dumpxml`) in the domain's
<metadata> under our namespace, set with:

  virsh metadata DOMAIN --uri https://virt-forward.org/xmlns/guest/1 --key virt-forward \\
      --set '<config><address>192.168.122.10</address><port>2222:22</port><port>80</port></config>' \\
      --live --config
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

NAMESPACE = "https://virt-forward.org/xmlns/guest/1"
# element name in the metadata -> guest file key (lists, like the file's)
_KEYS = {"address": "address", "public": "public", "port": "ports", "allow": "allow"}


@dataclass(frozen=True)
class Nic:
    mac: str
    network: str | None
    bridge: str | None


@dataclass(frozen=True)
class DomainXML:
    name: str | None
    nics: tuple[Nic, ...]
    metadata: dict[str, Any] | None  # guest-file-shaped data, None when absent


def parse(text: str) -> DomainXML | None:
    if not text.strip():
        return None
    try:
        root = ET.fromstring(text)
    except (ET.ParseError, UnicodeEncodeError):  # lone surrogates cannot even be encoded for the parser
        return None
    nics = []
    for iface in root.iterfind("devices/interface"):
        mac = iface.find("mac")
        source = iface.find("source")
        if mac is not None and mac.get("address"):
            nics.append(Nic(mac.get("address", "").lower(),
                            source.get("network") if source is not None else None,
                            source.get("bridge") if source is not None else None))
    name = root.findtext("name")
    return DomainXML(name.strip() if name else None, tuple(nics), _metadata(root))


def _metadata(root: ET.Element) -> dict[str, Any] | None:
    meta = root.find("metadata")
    if meta is None:
        return None
    for child in meta:
        if child.tag.startswith("{" + NAMESPACE + "}"):
            data: dict[str, Any] = {}
            for item in child:
                tag = item.tag.split("}", 1)[-1]
                # an unknown element stays, as <tag>, for validation to refuse by name
                key = _KEYS.get(tag, f"<{tag}>")
                data.setdefault(key, []).append((item.text or "").strip())
            return data
    return None
