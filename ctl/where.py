"""Where a node's kernel side lives on this machine: its network namespace (the agent's,
or the lab's `xo-NODE`, or this one) and the devices in it. status, monitor and the
lints use this to name interfaces and to look at the underlay; nothing here changes
anything."""
from __future__ import annotations

import os
import socket

from . import agent, netns

LAB_NETNS = "/run/netns/xo-{node}"     # ctl.lab.Lab.node_netns, for nodes without an agent


def node_netns(node: str) -> str | None:
    """A path to the node's netns: its running agent's, else the lab's if there is one;
    None means this process's own netns (a real node runs status where its agent runs)."""
    pid = agent.running_pid(node)
    if pid and os.path.exists(f"/proc/{pid}/ns/net"):
        return f"/proc/{pid}/ns/net"
    lab = LAB_NETNS.format(node=node)
    if os.path.exists(lab):
        return lab
    return None


def links(path: str | None) -> dict[int, dict]:
    """ifindex -> {"name", "mtu", "kind", "ipv4": [addresses]} of every device in the
    netns at `path` (None: this one). Empty if the netns cannot be entered."""
    try:
        ipr = netns.iproute(path)
    except Exception:
        return {}
    out = {}
    try:
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            out[link["index"]] = {"name": link.get_attr("IFLA_IFNAME"), "mtu": link.get_attr("IFLA_MTU"),
                                  "kind": info.get_attr("IFLA_INFO_KIND") if info else None, "ipv4": []}
        for addr in ipr.get_addr(family=socket.AF_INET):
            if addr["index"] in out:
                out[addr["index"]]["ipv4"].append(addr.get_attr("IFA_ADDRESS"))
    finally:
        ipr.close()
    return out
