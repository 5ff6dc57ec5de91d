"""What "someone else removed the rules" means for each mode (check 21).

Each sabotage acts from outside the data plane, as an administrator or another agent
would, inside one node's namespace, and returns one line saying what it removed. A mode
without an entry here skips the check with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from dataplanes.base import Dataplane, NodeHandle


def flush_iptables_nat(dataplane: Dataplane, node: NodeHandle) -> str:
    """`iptables -t nat -F; -X` with the mode's own backend: every NAT rule and user chain goes."""
    backend = getattr(dataplane, "backend", "nft")
    iptables = [f"iptables-{backend}"] + (["-w"] if backend == "legacy" else [])
    node.run([*iptables, "-t", "nat", "-F"])
    node.run([*iptables, "-t", "nat", "-X"])
    return f"flushed and deleted every chain of the nat table ({iptables[0]}) on {node.name}"


def flush_nft_ruleset(dataplane: Dataplane, node: NodeHandle) -> str:
    """`nft flush ruleset`: every table in the node's namespace goes, the mode's included."""
    node.run(["nft", "flush", "ruleset"])
    return f"flushed the whole nftables ruleset on {node.name}"


def detach_xdp(dataplane: Dataplane, node: NodeHandle) -> str:
    """An administrator turning XDP off on every interface of the node."""
    links = json.loads(node.run(["ip", "-j", "link", "show"]).stdout)
    names = [link["ifname"] for link in links if "xdp" in link]
    for name in names:
        node.run(["ip", "link", "set", "dev", name, "xdp", "off"])
    return f"detached XDP from {', '.join(names)} on {node.name}"


def flush_ipvs(dataplane: Dataplane, node: NodeHandle) -> str:
    """Someone clears IPVS, its ipsets and the nat table (`ipvsadm -C; ipset flush; iptables -t nat -F`)."""
    from dataplanes.ipvs_kernel import IpvsNetlink

    flushed = flush_iptables_nat(dataplane, node)
    node.call(lambda: IpvsNetlink().flush())
    node.run(["ipset", "flush"])
    return f"{flushed}; flushed IPVS and every ipset on {node.name}"


SABOTAGES: dict[str, Callable[[Dataplane, NodeHandle], str]] = {
    "iptables": flush_iptables_nat,
    "nftables": flush_nft_ruleset,
    # The userspace proxy steers with iptables-nft nat REDIRECT rules.
    "userspace": flush_iptables_nat,
    "ebpf": detach_xdp,
    "ipvs": flush_ipvs,
}


def sabotage_for(dataplane: Dataplane) -> Callable[[Dataplane, NodeHandle], str] | None:
    return SABOTAGES.get(dataplane.name)
