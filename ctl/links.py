"""Plumbing a local endpoint: a veth pair from the node into the container's netns, and
the container's side configured so that it needs nothing else (address, MTU, default
route via a gateway whose MAC is permanent, no IPv6 chatter). Runs in the node's netns.
Idempotent: an endpoint already plumbed is left as it is (that is how a restarted agent
adopts running containers without disturbing them)."""
from __future__ import annotations

import hashlib
import ipaddress
import os

from maps import bpf

from . import netns
from .errors import XoError
from .model import GATEWAY_IP, Endpoint, State

GW_MAC = "ee:ee:ee:ee:ee:ee"      # same as XO_GW_MAC in bpf/lib/common.h
CONTAINER_IFNAME = "eth0"
HOST_PREFIX = "xo"
IFA_F_NOPREFIXROUTE = 0x200
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80


def host_ifname(endpoint: str) -> str:
    """Stable, at most 15 characters, and recognisable as ours."""
    return HOST_PREFIX + hashlib.sha1(endpoint.encode()).hexdigest()[:10]


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass   # IPv6 compiled out or the interface just went away: nothing to silence


def our_veths(ipr) -> dict[str, int]:
    """Host-side veths we made, by name."""
    out = {}
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        if kind == "veth" and name.startswith(HOST_PREFIX) and len(name) == len(HOST_PREFIX) + 10:
            out[name] = link["index"]
    return out


def plumb(ipr, state: State, ep: Endpoint, prog_fd: int) -> int:
    """Make sure the endpoint's veth pair exists and is configured; returns the host-side
    ifindex. Attaches the endpoint program to it."""
    host = host_ifname(ep.name)
    found = ipr.link_lookup(ifname=host)
    if found:
        ifindex = found[0]
    else:
        ifindex = _create(ipr, state, ep, host)
    if bpf.tc_query(ifindex) != bpf.prog_info(prog_fd).id:
        bpf.tc_attach(ifindex, prog_fd)
    return ifindex


def _create(ipr, state: State, ep: Endpoint, host: str) -> int:
    from .model import endpoint_mtu
    if ep.owns_netns and not os.path.exists(ep.netns):
        netns.create(os.path.basename(ep.netns))
    if not netns.exists(ep.netns):
        raise XoError(f"endpoint {ep.name}: netns {ep.netns} does not exist")
    mtu = endpoint_mtu(state)
    tmp = "xt" + host[len(HOST_PREFIX):]
    for stale in ipr.link_lookup(ifname=tmp):
        ipr.link("del", index=stale)
    ipr.link("add", ifname=host, kind="veth", peer={"ifname": tmp, "address": ep.mac, "mtu": mtu})
    ifindex = ipr.link_lookup(ifname=host)[0]
    peer = ipr.link_lookup(ifname=tmp)[0]
    try:
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{host}/disable_ipv6", "1")
        ipr.link("set", index=ifindex, address=GW_MAC, mtu=mtu)
        fd = os.open(ep.netns, os.O_RDONLY)
        try:
            ipr.link("set", index=peer, net_ns_fd=fd)
        finally:
            os.close(fd)
        prefixlen = ipaddress.IPv4Network(state.networks[ep.network].subnet).prefixlen
        _configure_container(ep, tmp, prefixlen)
        ipr.link("set", index=ifindex, state="up")
    except Exception:
        ipr.link("del", index=ifindex)
        raise
    return ifindex


def _configure_container(ep: Endpoint, tmp: str, prefixlen: int) -> None:
    """The address carries the network's prefix (it looks like one LAN) but no prefix
    route: everything goes to the gateway, i.e. to our program on the host-side veth."""
    with netns.iproute(ep.netns) as c:
        if c.link_lookup(ifname=CONTAINER_IFNAME):
            raise XoError(f"endpoint {ep.name}: {ep.netns} already has an {CONTAINER_IFNAME}")
        idx = c.link_lookup(ifname=tmp)[0]
        c.link("set", index=idx, ifname=CONTAINER_IFNAME)
        with netns.entered(ep.netns):   # /proc/sys/net is the opener's netns
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{CONTAINER_IFNAME}/disable_ipv6", "1")
        lo = c.link_lookup(ifname="lo")[0]
        c.link("set", index=lo, state="up")
        c.link("set", index=idx, state="up")
        c.addr("add", index=idx, address=ep.ip, prefixlen=prefixlen,
               flags=IFA_F_NOPREFIXROUTE)
        c.neigh("add", dst=GATEWAY_IP, lladdr=GW_MAC, ifindex=idx, state=NUD_PERMANENT)
        c.route("add", dst="0.0.0.0/0", gateway=GATEWAY_IP, oif=idx, flags=RTNH_F_ONLINK)


def unplumb(ipr, ifname: str) -> None:
    """Remove a host-side veth (its container end goes with it)."""
    for index in ipr.link_lookup(ifname=ifname):
        ipr.link("del", index=index)


def remove_endpoint(ipr, ep: Endpoint) -> None:
    unplumb(ipr, host_ifname(ep.name))
    if ep.owns_netns:
        netns.remove(ep.netns)
