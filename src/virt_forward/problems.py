"""Problems: what differs between what should be live and what is, as typed values that the
watcher acts on by kind and that status and doctor show by text.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    WAITING = "waiting"  # a guest's start is pending its address (DHCP lease): apply it alone, soon
    NOT_APPLIED = "not-applied"  # running, configured, not applied
    NOT_RUNNING = "not-running"  # applied, libvirt says not running
    HAIRPIN = "hairpin"  # a bridge port of ours lost hairpin mode: set it again, no firewall change
    TABLE = "table"  # our table gone, or there without any guest recorded
    RULES = "rules"  # our maps, chains or iptables rules differ from the records
    GUARD = "guard"  # a guard missing, misplaced or doubled in a chain of others
    TOOL = "tool"  # the backend's tool is not installed
    UNREADABLE = "unreadable"  # the records could not be read


@dataclass(frozen=True)
class Problem:
    kind: Kind
    subject: str  # the guest, chain, map or port it is about
    text: str  # one line for people: status, doctor, the journal

    def __str__(self) -> str:
        return self.text
