"""The firewall backends, one module each, chosen by name here and nowhere else.

A backend reads what it needs of the live firewall, renders with the pure modules (nft.py,
iptables.py, guards.py) and runs one transaction per change through runner.py.  The service
(engine.py: the lock, claims, records; reconcile.py) calls only this interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from ..errors import FirewallError

if TYPE_CHECKING:
    from ..config import Settings
    from ..metrics import Live
    from ..plan import Family, GuestPlan
    from ..problems import Problem


class Backend(Protocol):
    name: str  # recorded with each guest: removal uses the backend that applied it
    tool: str  # the command it cannot work without
    fast_path: bool  # the hook's fast path (fastpath.py) can replay its changes

    def is_supported(self) -> bool: ...

    def apply(self, old: GuestPlan | None, new: GuestPlan, others: Callable[[], list[GuestPlan]],
              hairpin: bool) -> bool:
        """One guest's change, one transaction.  `others`: the other applied guests (asked only by
        a backend that rewrites them).  True: our table is of an older schema and nothing was
        changed: the caller rebuilds it whole (`rebuild`)."""

    def after_apply(self, families: set[Family]) -> None:
        """What goes outside the transaction after a change (the iptables guard beside nft)."""

    def remove(self, old: GuestPlan, others: Callable[[], list[GuestPlan]], hairpin: bool, last: bool) -> None:
        """Take one guest's recorded forwards out; `last`: no other guest is applied."""

    def rebuild(self, plans: list[GuestPlan], hairpin: bool) -> None:
        """Exactly these guests, everything of ours rewritten in one transaction, guards included."""

    def plan_text(self, old: GuestPlan | None, new: GuestPlan, others: Callable[[], list[GuestPlan]],
                  hairpin: bool) -> str:
        """The exact batches `apply` would run now, for people to read (`plan`)."""

    def drift(self, plans: list[GuestPlan], hairpin: bool, waiting: bool) -> list[Problem]:
        """What differs between these recorded guests and the live firewall."""

    def read_live(self) -> Live:
        """Our forwards as the kernel holds them, with their counters (status, metrics)."""


def by_name(name: str) -> Backend:
    from .iptables import IptablesBackend
    from .nftables import NftablesBackend
    return IptablesBackend() if name == IptablesBackend.name else NftablesBackend()


def choose(settings: Settings, fallback: bool = False) -> Backend:
    """config.toml's `backend`: "auto" takes nftables where nft is installed.  `fallback`: for
    reading only (status, drift), nftables when neither tool can be found."""
    from .iptables import IptablesBackend
    from .nftables import NftablesBackend
    nft_backend, ipt_backend = NftablesBackend(), IptablesBackend()
    if settings.backend in ("auto", "nftables") and nft_backend.is_supported():
        return nft_backend
    if settings.backend == "nftables" and not fallback:
        raise FirewallError("backend = \"nftables\" but the nft command is not installed (apt install nftables)")
    if ipt_backend.is_supported() and settings.backend != "nftables":
        return ipt_backend
    if fallback:
        return nft_backend
    raise FirewallError("neither nft nor iptables-restore is installed (apt install nftables)")
