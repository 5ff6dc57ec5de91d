"""A node's host network as a proxy running on that node sees it (dataplanes.base.NodeHandle).

`svcbench agent` on a Kubernetes node (hostNetwork) programs the network namespace it
runs in; on this machine it programs a named namespace (`--netns`, a node of a svcbench
run), never the root one. Pods are found as the CNI plugins route them: a /32 route per
pod IP through the pod's veth (`ip -4 route show`).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from clusters.nsenter import in_netns, run_in_netns


@dataclass(eq=False)
class HostNode:
    name: str
    ip: str
    pod_cidr: str
    netns: str = ""  # "" : the namespace this process runs in
    uplink: str = "eth0"

    def run(self, argv: Sequence[str], *, input: str | bytes | None = None, check: bool = True,
            timeout: float | None = 120) -> subprocess.CompletedProcess:
        if isinstance(input, bytes):
            input = input.decode()
        argv = [str(a) for a in argv]
        if self.netns:
            proc = run_in_netns(self.netns, argv, input=input, timeout=timeout)
        else:
            proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                                  timeout=timeout)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return in_netns(self.netns, fn, *args, **kwargs) if self.netns else fn(*args, **kwargs)

    @classmethod
    def holding(cls, name: str, ip: str, pod_cidr: str, netns: str = "") -> HostNode:
        """The node whose interface holding `ip` (its InternalIP) is the uplink."""
        node = cls(name, ip, pod_cidr, netns)
        out = node.run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
        for line in out.splitlines():  # "2: eth0    inet 198.18.0.1/24 brd ... scope global"
            words = line.split()
            if len(words) >= 4 and words[2] == "inet" and words[3].split("/")[0] == ip:
                node.uplink = words[1].split("@")[0]
                break
        return node

    def pod_interfaces(self) -> dict[str, str]:
        """Pod IP -> the node-side interface of its veth: the direct /32 routes inside the
        pod CIDR (scope link here, scope host from the ptp plugin and kindnet)."""
        import ipaddress

        cidr = ipaddress.ip_network(self.pod_cidr)
        out = self.run(["ip", "-4", "-o", "route", "show", "table", "main"], check=False).stdout
        found = {}
        for line in out.splitlines():
            words = line.split()
            if len(words) < 3 or "via" in words or "dev" not in words:
                continue
            dst = words[0].removesuffix("/32")
            try:
                if "/" not in dst and ipaddress.ip_address(dst) in cidr:
                    found[dst] = words[words.index("dev") + 1]
            except (ValueError, IndexError):
                continue
        return found
