"""Names and numbers shared by the renderers, the guards and the hook's fast path.

It imports nothing but os: the fast path (fastpath.py) runs at every guest start and
must not pull in the planner to learn a comment string.
"""

import os


def config_dir(explicit: str | None = None) -> str:
    """--config-dir, else $VIRT_FORWARD_CONFIG_DIR, else /etc/virt-forward."""
    return explicit or os.environ.get("VIRT_FORWARD_CONFIG_DIR") or "/etc/virt-forward"


def state_dir(explicit: str | None = None) -> str:
    """--state-dir, else $VIRT_FORWARD_STATE_DIR, else /run/virt-forward (a tmpfs: gone at boot)."""
    return explicit or os.environ.get("VIRT_FORWARD_STATE_DIR") or "/run/virt-forward"


# A guest start never waits longer than this for another virt-forward process.
HOOK_LOCK_DEADLINE = 10.0

# libvirt runs hooks with PATH=/bin:/usr/bin, but nft and iptables live in sbin.
SEARCH_PATH = "/usr/sbin:/sbin:/usr/bin:/bin:/usr/local/sbin:/usr/local/bin"

TABLE = "virt_forward"
FAMILY = "inet"
T = f"{FAMILY} {TABLE}"

# Conntrack mark bits.  FORWARDED: our DNAT made this connection (the guards'
# only test).  HAIRPIN: the client sits on the guest's own network, so the
# reply must come back through us (masquerade).
MARK_FORWARDED = 0x10000000
MARK_HAIRPIN = 0x20000000

# The one rule we put into chains we do not own (see guards.py).
GUARD_COMMENT = "virt-forward:guard"
GUARD_SPEC = (f"-m conntrack --ctstate DNAT -m connmark --mark {MARK_FORWARDED:#x}/{MARK_FORWARDED:#x}"
              f" -m comment --comment {GUARD_COMMENT} -j ACCEPT")
# The comment carries the mark, so a guard of an older version is recognised as ours
# (prefix) but not as current (exact comment), and gets replaced.
NFT_GUARD_COMMENT = f"{GUARD_COMMENT} {MARK_FORWARDED:#x}"
NFT_GUARD_RULE = (f"ct mark & {MARK_FORWARDED:#010x} == {MARK_FORWARDED:#010x} ct status dnat counter accept"
                  f' comment "{NFT_GUARD_COMMENT}"')

# Our table holds an empty chain named after the skeleton it was given (nft.skeleton):
# while it is there, a batch need not repeat the skeleton (13 ms of every `nft -f`).
SKELETON_MARK_PREFIX = "skel_"

# Base chains of others' nftables tables that may reject our forwards (guards.py says why).
NFT_GUARD_TARGETS = (
    ("ip", "libvirt_network", "forward"),
    ("ip6", "libvirt_network", "forward"),
    ("inet", "firewalld", "filter_FORWARD"),
)
