"""Entering network namespaces. `ip netns exec` remounts /sys (hiding bpffs) and pyroute2
cannot open /proc/PID/ns/net paths, so we setns() the calling thread ourselves: a
netlink socket opened inside stays bound to that namespace after we return."""
from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading

from pyroute2 import IPRoute

from xoverlay.errors import XoError
from xoverlay.kernel import processes

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def resolve(netns: str) -> str:
    """A netns given as a name under /run/netns or as a path -> its path."""
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


@contextlib.contextmanager
def entered(path: str):
    """Run the body with this thread inside the netns at `path`."""
    try:
        target = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise XoError(f"netns {path}: {e.strerror}") from None
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(home)
        os.close(home)
        os.close(target)


def iproute(path: str | None = None) -> IPRoute:
    """An IPRoute bound to the netns at `path` (or the current one)."""
    if path is None:
        return IPRoute()
    with entered(path):
        return IPRoute()


def create(name: str) -> str:
    """A new named netns, as `ip netns add` makes it: a bind mount under /run/netns."""
    path = resolve(name)
    if os.path.exists(path):
        raise XoError(f"netns {name} already exists")
    result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if result.returncode != 0:
        raise XoError(f"could not create netns {name}: {result.stderr.strip()}")
    return path


def remove(name_or_path: str) -> None:
    path = resolve(name_or_path)
    if os.path.exists(path):
            subprocess.run(["ip", "netns", "delete", os.path.basename(path)], capture_output=True)


def exists(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    os.close(fd)
    return True


# --- where a node's kernel side lives on this machine: its agent's netns, the lab's
# `xo-NODE`, or this one; status, monitor and the lints name devices through it.

LAB_NETNS = "/run/netns/xo-{node}"     # xoverlay.lab.namespace_lab.Lab.node_netns, for nodes without an agent


def node_netns(node: str) -> str | None:
    """A path to the node's netns: its running agent's, else the lab's if there is one;
    None means this process's own netns (a real node runs status where its agent runs)."""
    pid = processes.running_pid(node)
    if pid and os.path.exists(f"/proc/{pid}/ns/net"):
        return f"/proc/{pid}/ns/net"
    lab = LAB_NETNS.format(node=node)
    if os.path.exists(lab):
        return lab
    return None


def devices(path: str | None) -> dict[int, dict]:
    """ifindex -> {"name", "mtu", "kind", "ipv4": [addresses]} of every device in the
    netns at `path` (None: this one). Empty if the netns cannot be entered."""
    try:
        ipr = iproute(path)
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
