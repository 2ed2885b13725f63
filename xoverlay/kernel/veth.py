"""Plumbing a local endpoint: a veth pair from the node into the container's netns, and
the container's side configured so that it needs nothing else (address, MTU, default
route via a gateway whose MAC is permanent, no IPv6 chatter). Runs in the node's netns.
Idempotent: an endpoint already plumbed is left as it is (that is how a restarted agent
adopts running containers without disturbing them)."""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import socket
import struct

from xoverlay.core.model import GATEWAY_IP, Endpoint, State
from xoverlay.errors import XoError
from xoverlay.kernel import bpf, netns, resolvconf

IFF_UP = 1

log = logging.getLogger("xoverlay.links")

GW_MAC = "ee:ee:ee:ee:ee:ee"      # same as XO_GW_MAC in bpf/lib/common.h
HOST_PREFIX = "xo"
IFA_F_NOPREFIXROUTE = 0x200
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
RT_SCOPE_LINK = 253

# Encap puts 50 bytes in front of every packet a container sends. A socket reserves in
# front of its packets what the device asks for (LL_RESERVED_SPACE), and a veth asks for
# nothing, so without more, bpf_skb_adjust_room reallocates and copies every small packet
# (measured: half the cost of encap). A veth asks for more only when a bridge it is a port
# of tells it to (ndo_set_rx_headroom, which sets both ends of the pair, the container's
# included), and a bridge asks for what its hungriest port needs: a vxlan device. So every
# host-side veth is a port of this bridge, whose other port is a vxlan device that only
# anchors the headroom. Both stay down: nothing is ever switched or tunnelled through
# them, and a frame our program passes up (TC_ACT_OK) reaches a port of a down bridge and
# is dropped, which keeps the endpoint program the only way out of a container.
HEADROOM_BRIDGE = "xo-headroom"
HEADROOM_ANCHOR = "xo-headroom0"


def host_ifname(endpoint: str) -> str:
    """Stable, at most 15 characters, and recognisable as ours."""
    return HOST_PREFIX + hashlib.sha1(endpoint.encode()).hexdigest()[:10]


def creating_ifname(host: str) -> str:
    """The container end's name while it is made, in the node's netns, before it moves."""
    return "xt" + host[len(HOST_PREFIX):]


def write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass   # IPv6 compiled out or the interface just went away: nothing to silence


def drop_unclaimed_replies(ipr) -> int:
    """Empty pyroute2's catch-all queue of `ipr`; returns how many messages it held.
    pyroute2 (0.9.7) asks for an ACK on every "get" (link_lookup by name, get_links of
    one index) but stops reading at the answer, so the ACK arrives for a request that is
    over and is queued where nothing ever reads it (no multicast group is bound). The
    agent makes several such requests a pass: measured, about 10 ACKs a second per agent
    under bench/soak's churn. Each is a 36-byte message, but received into a 256 KiB
    buffer (asyncio's datagram recvfrom) and shrunk in place, so each one kept alive pins
    its spot in the malloc heap. The heap fragmented and RSS grew 2.2 MiB a minute
    while tracemalloc's total stayed flat. Whoever keeps an IPRoute open calls this
    once a pass; a message nobody asked for is nothing we need."""
    queue = ipr.asyncore.msg_queue.root
    dropped = 0
    while not queue.empty():
        queue.get_nowait()
        queue.task_done()
        dropped += 1
    return dropped


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


def ensure_headroom_bridge(ipr) -> int:
    """The bridge that makes containers reserve room for encap (see HEADROOM_BRIDGE);
    returns its ifindex. Idempotent."""
    if not ipr.link_lookup(ifname=HEADROOM_BRIDGE):
        ipr.link("add", ifname=HEADROOM_BRIDGE, kind="bridge")
    bridge = ipr.link_lookup(ifname=HEADROOM_BRIDGE)[0]
    if not ipr.link_lookup(ifname=HEADROOM_ANCHOR):
        # collect_md: no VNI, no remote; never brought up, so it binds no UDP port.
        ipr.link("add", ifname=HEADROOM_ANCHOR, kind="vxlan", vxlan_collect_metadata=1)
    anchor = ipr.link_lookup(ifname=HEADROOM_ANCHOR)[0]
    if ipr.get_links(anchor)[0].get_attr("IFLA_MASTER") != bridge:
        ipr.link("set", index=anchor, master=bridge)
    return bridge


IFLA_HEADROOM = 68          # linux/if_link.h; pyroute2 0.9 does not decode it
ENCAP_HEADROOM = 50         # outer IPv4 + UDP + VXLAN + inner Ethernet (XO_ENCAP_LEN)


def needed_headroom(ifindex: int) -> int | None:
    """What a device of the current netns asks sockets to reserve in front of each
    packet (dev->needed_headroom), straight from rtnetlink; None if the kernel does not
    say."""
    RTM_NEWLINK, RTM_GETLINK, NLM_F_REQUEST = 16, 18, 1
    request = struct.pack("=IHHII", 32, RTM_GETLINK, NLM_F_REQUEST, 1, 0) + \
        struct.pack("=BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.send(request)
        reply = s.recv(1 << 16)
    length, kind = struct.unpack_from("=IH", reply)
    offset = 32                 # nlmsghdr + ifinfomsg, then the attributes
    while kind == RTM_NEWLINK and offset + 4 <= min(length, len(reply)):
        attr_len, attr_type = struct.unpack_from("=HH", reply, offset)
        if attr_len < 4:
            break
        if attr_type & 0x3fff == IFLA_HEADROOM:
            return struct.unpack_from("=H", reply, offset + 4)[0]
        offset += (attr_len + 3) & ~3
    return None


def remove_headroom_bridge(ipr) -> None:
    for name in (HEADROOM_ANCHOR, HEADROOM_BRIDGE):
        for index in ipr.link_lookup(ifname=name):
            ipr.link("del", index=index)


def plumb(ipr, state: State, ep: Endpoint, prog_fd: int, headroom_bridge: int) -> tuple[int, list[str]]:
    """Make sure the endpoint's veth pair exists and is configured, with the endpoint
    program attached. Returns the host-side ifindex and what it had to do (for an
    endpoint already plumbed, that is a repair)."""
    host = host_ifname(ep.name)
    found = ipr.link_lookup(ifname=host)
    link = ipr.get_links(found[0])[0] if found else None
    did = []
    if link is not None and not link["flags"] & IFF_UP:
        # _create sets the host end up last: one that is down was left half made (an
        # agent killed inside _create: the container end still here, or the container
        # without its address or route) or taken down by someone. Made again from scratch.
        unplumb(ipr, host)
        link = None
        did.append(f"deleted veth {host}, found down (half made)")
    if link is not None:
        ifindex = link["index"]
        if link.get_attr("IFLA_MASTER") != headroom_bridge:
            ipr.link("set", index=ifindex, master=headroom_bridge)   # plumbed by an older build
            did.append(f"put {host} back on {HEADROOM_BRIDGE}")
        _adopt_resolv_conf(ep)
    else:
        ifindex = _create(ipr, state, ep, host, headroom_bridge)
        did.append(f"created veth {host}")
    if bpf.tc_ensure(ifindex, prog_fd):
        did.append(f"attached the endpoint program to {host}")
    return ifindex, did


def _adopt_resolv_conf(ep: Endpoint) -> None:
    """A running endpoint whose resolv.conf is missing (plumbed by an agent from before
    DNS, or the file was deleted) gets one. Never a reason to unplumb it: only logged."""
    path = resolvconf.path_for(ep)
    if path and not os.path.exists(path):
        try:
            if resolvconf.write(ep):
                log.info("endpoint %s: wrote %s", ep.name, path)
        except XoError as e:
            log.error("%s", e)


class NetnsGone(XoError):
    """The endpoint's netns is not there (not ours to make: its container's)."""


def handed_to_runtime(ep: Endpoint) -> bool:
    """An endpoint whose container end a runtime moves into its netns itself (Docker's
    Join: we make the pair, it moves and names the container end): the first time, the
    pair is made and left whole in the node's netns. Made again later (a repair), it is
    plumbed into the netns as any endpoint is."""
    return not ep.ifname and not ep.ready


def _create(ipr, state: State, ep: Endpoint, host: str, headroom_bridge: int) -> int:
    from xoverlay.core.model import endpoint_mtu
    handover = handed_to_runtime(ep)
    if ep.owns_netns and not os.path.exists(ep.netns):
        netns.create(os.path.basename(ep.netns))
    if not handover and not netns.exists(ep.netns):
        raise NetnsGone(f"endpoint {ep.name}: netns {ep.netns} does not exist")
    mtu = endpoint_mtu(state, ep.network)
    tmp = creating_ifname(host)
    for stale in ipr.link_lookup(ifname=tmp):
        ipr.link("del", index=stale)
    ipr.link("add", ifname=host, kind="veth", peer={"ifname": tmp, "address": ep.mac, "mtu": mtu})
    ifindex = ipr.link_lookup(ifname=host)[0]
    peer = ipr.link_lookup(ifname=tmp)[0]
    try:
        write_sysctl(f"/proc/sys/net/ipv6/conf/{host}/disable_ipv6", "1")
        ipr.link("set", index=ifindex, address=GW_MAC, mtu=mtu)
        # Before the container can open a socket: its packets reserve headroom from now on.
        ipr.link("set", index=ifindex, master=headroom_bridge)
        if handover:
            write_sysctl(f"/proc/sys/net/ipv6/conf/{tmp}/disable_ipv6", "1")
            ipr.link("set", index=ifindex, state="up")
            return ifindex
        fd = os.open(ep.netns, os.O_RDONLY)
        try:
            ipr.link("set", index=peer, net_ns_fd=fd)
        finally:
            os.close(fd)
        prefixlen = ipaddress.IPv4Network(state.networks[ep.network].subnet).prefixlen
        _configure_container(ep, tmp, prefixlen)
        wrote = resolvconf.write(ep)
        try:
            ipr.link("set", index=ifindex, state="up")
        except Exception:
            if wrote:
                resolvconf.remove(ep)
            raise
    except Exception:
        ipr.link("del", index=ifindex)
        raise
    return ifindex


def _configure_container(ep: Endpoint, tmp: str, prefixlen: int) -> None:
    """The address carries the network's prefix (it looks like one LAN) but no prefix
    route: everything goes to the gateway, i.e. to our program on the host-side veth.
    The netns's first network gets the default route; each further one, a route to its
    subnet through its own interface."""
    with netns.iproute(ep.netns) as c:
        ifname = ep.ifname or _free_ifname(c)
        if c.link_lookup(ifname=ifname):
            raise XoError(f"endpoint {ep.name}: {ep.netns} already has an {ifname}")
        idx = c.link_lookup(ifname=tmp)[0]
        c.link("set", index=idx, ifname=ifname)
        with netns.entered(ep.netns):   # /proc/sys/net is the opener's netns
            write_sysctl(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "1")
        lo = c.link_lookup(ifname="lo")[0]
        c.link("set", index=lo, state="up")
        c.link("set", index=idx, state="up")
        c.addr("add", index=idx, address=ep.ip, prefixlen=prefixlen,
               flags=IFA_F_NOPREFIXROUTE)
        c.neigh("add", dst=GATEWAY_IP, lladdr=GW_MAC, ifindex=idx, state=NUD_PERMANENT)
        has_default = any(r["dst_len"] == 0 for r in c.get_routes(family=socket.AF_INET, table=254))
        dst = str(ipaddress.IPv4Interface(f"{ep.ip}/{prefixlen}").network) if has_default else "0.0.0.0/0"
        c.route("add", dst=dst, gateway=GATEWAY_IP, oif=idx, flags=RTNH_F_ONLINK)


def _free_ifname(c) -> str:
    """An endpoint the runtime named (Docker) and that is made again here: the first ethN
    its netns does not have."""
    return next(f"eth{i}" for i in range(1 << 16) if not c.link_lookup(ifname=f"eth{i}"))


def unplumb(ipr, ifname: str) -> None:
    """Remove a host-side veth (its container end goes with it)."""
    for index in ipr.link_lookup(ifname=ifname):
        ipr.link("del", index=index)


def remove_endpoint(ipr, ep: Endpoint, netns_in_use: bool = False) -> None:
    """`netns_in_use`: another endpoint (another network) is in the same netns, which
    keeps it and its resolv.conf."""
    unplumb(ipr, host_ifname(ep.name))
    if netns_in_use:
        return
    resolvconf.remove(ep)
    if ep.owns_netns:
        netns.remove(ep.netns)
