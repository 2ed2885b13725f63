"""Run xoverlay's BPF programs on single packets through BPF_PROG_TEST_RUN.

A `Datapath` is the three programs of a throwaway node, loaded and pinned the way the
agent does it (xoverlay.kernel.datapath.load), with its maps filled with a small fixed cluster
(`Topology`, below). Nothing is attached to any device: the kernel runs a program on a
packet we give it and hands back the verdict and the packet as the program left it.

Rules of BPF_PROG_TEST_RUN worth knowing (net/bpf/test_run.c, bpf_prog_test_run_skb):
  - data_in must be at least ETH_HLEN (14) bytes, for tc and XDP alike.
  - A tc program may be given a struct __sk_buff as ctx_in. Only mark, priority,
    ingress_ifindex, ifindex, cb, tstamp, wire_len, gso_segs, gso_size and hwtstamp
    may be non-zero (anything else: EINVAL). ctx_in may be shorter than the struct; the
    rest is read as zero.
  - ingress_ifindex is copied into skb->skb_iif as is, with no device lookup: a fake
    ifindex is fine, which is what lets us play any endpoint's veth.
  - ifindex, by contrast, must be 0/1 (loopback) or a device that exists (else ENODEV):
    leave it 0. skb->dev is then loopback.
  - On this kernel (6.18) a tc run is also refused (EINVAL) when the ethertype is IPv4
    and the frame is shorter than 14 + 20 bytes, or IPv6 and shorter than 14 + 40:
    a truncated IPv4 header can only be shown to tc as an IHL that runs past the frame.
    XDP runs take any frame of 14 bytes or more, and frames longer than a page minus
    headroom arrive in several buffers (only for frags-aware programs, which ours is).
  - Redirect helpers (bpf_redirect_peer, bpf_redirect_neigh) only record the target and
    return TC_ACT_REDIRECT: nothing is transmitted.

The benchmarks' per-packet cost of each program (bench/lib/prog_cost.py) runs on this
harness too, with maps of its own filling (Datapath(fill=None)) and the cost of a program
that only returns (ReturnOnly) to subtract.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass

from xoverlay.kernel import bpf
from xoverlay.maps.drops import REASONS
from xoverlay.maps.layout import (
    U32,
    Config,
    Endpoint,
    EndpointKey,
    LocalEndpoint,
    Peer,
    Subnet,
    Vni,
    ip_be,
    mac_bytes,
    subnet_key,
    sum_percpu,
)

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
XDP_DROP, XDP_PASS = 1, 2

GW_MAC = "ee:ee:ee:ee:ee:ee"
VXLAN_PORT = 4789
SPORT_MIN, SPORT_MAX = 32768, 60999     # the kernel's default ip_local_port_range


class SkbCtx(ctypes.Structure):
    """The leading fields of struct __sk_buff, up to the last one we may set. The kernel
    reads a shorter ctx_in as if the rest were zero."""
    _fields_ = [(name, ctypes.c_uint32) for name in (
        "len", "pkt_type", "mark", "queue_mapping", "protocol", "vlan_present", "vlan_tci",
        "vlan_proto", "priority", "ingress_ifindex", "ifindex", "tc_index")]


# --- the cluster every fixture runs against ----------------------------------------------

@dataclass(frozen=True)
class Ep:
    name: str
    vni: int
    ip: str
    node_ip: str
    ifindex: int = 0          # host-side veth, for endpoints on this node (fake numbers)

    @property
    def mac(self) -> str:
        # As xoverlay.core.model.mac_for does it: 02:58 + the IPv4 address.
        return "02:58:" + ":".join(f"{int(b):02x}" for b in self.ip.split("."))


@dataclass(frozen=True)
class Svc:
    """A service as the agent writes it: id, VNI, VIP, ports, backends (Ep, index,
    target port or 0)."""
    id: int
    vni: int
    vip: str
    ports: tuple            # ((80, "tcp"), ...)
    backends: tuple         # ((Ep, index, target port), ...)
    affinity: bool = False


class Topology:
    """This node (A) and two peers (B, C) on the underlay; two networks. Names, not
    numbers, in the fixtures."""
    NODE_IP = "192.168.50.1"          # this node
    PEER_B = "192.168.50.2"
    PEER_C = "192.168.50.3"
    STRANGER = "192.168.50.9"         # on the underlay, not a node of ours
    UNDERLAY_IFINDEX = 77             # only recorded by bpf_redirect_neigh
    GATEWAY_IFINDEX = 78              # xo-gw, where DNS to 169.254.1.1 is redirected
    NODE_MAC = "52:54:00:00:50:01"
    PEER_B_MAC = "52:54:00:00:50:02"

    BLUE_VNI, BLUE_SUBNET = 4097, "10.10.0.0/16"
    RED_VNI, RED_SUBNET = 4098, "10.20.0.0/16"
    UNUSED_VNI = 4099                 # a VNI with no endpoint on this node

    WEB1 = Ep("web1", BLUE_VNI, "10.10.1.2", NODE_IP, ifindex=1001)
    WEB2 = Ep("web2", BLUE_VNI, "10.10.1.3", NODE_IP, ifindex=1002)
    RED1 = Ep("red1", RED_VNI, "10.20.1.2", NODE_IP, ifindex=1003)
    API1 = Ep("api1", BLUE_VNI, "10.10.2.2", PEER_B)     # on B
    DB1 = Ep("db1", BLUE_VNI, "10.10.3.2", PEER_C)       # on C
    RED2 = Ep("red2", RED_VNI, "10.20.2.2", PEER_B)      # on B

    ENDPOINTS = (WEB1, WEB2, RED1, API1, DB1, RED2)

    # Services of the blue network, VIPs from the top of its subnet. ONE: a single remote
    # backend (api1 on B), TCP 80 and UDP 53, for exact output bytes. LOCAL: web2 on this
    # node, target port 8080. MANY and STICKY: web2, api1 and db1 (the same three, without
    # and with client-IP affinity). EMPTY: no backend at all.
    ONE = Svc(1, BLUE_VNI, "10.10.255.254", ((80, "tcp"), (53, "udp")), ((API1, 1, 0),))
    LOCAL = Svc(2, BLUE_VNI, "10.10.255.253", ((80, "tcp"),), ((WEB2, 1, 8080),))
    MANY = Svc(3, BLUE_VNI, "10.10.255.252", ((80, "tcp"), (53, "udp")),
               ((WEB2, 1, 0), (API1, 2, 0), (DB1, 3, 0)))
    STICKY = Svc(4, BLUE_VNI, "10.10.255.251", ((80, "tcp"),),
                 ((WEB2, 1, 0), (API1, 2, 0), (DB1, 3, 0)), affinity=True)
    EMPTY = Svc(5, BLUE_VNI, "10.10.255.250", ((80, "tcp"),), ())
    SERVICES = (ONE, LOCAL, MANY, STICKY, EMPTY)
    PEERS = (PEER_B, PEER_C)
    SUBNETS = ((BLUE_SUBNET, BLUE_VNI), (RED_SUBNET, RED_VNI))
    UNKNOWN_IFINDEX = 4242            # a veth that belongs to no endpoint


def service_table(svc: Svc, backends=None) -> tuple:
    """The Maglev table the agent would push for `svc` (its active backends, or the
    (Ep, index, port) triples given)."""
    from xoverlay.core import maglev
    backends = svc.backends if backends is None else backends
    m = maglev.size_for(max(len(svc.backends), 1))
    owners = maglev.build([ep.name for ep, _, _ in backends], m)
    return (m, *(backends[i][1] for i in owners))


def backend_slot(service: int, index: int) -> int:
    """A backend's counter slot, unique and never 0 (see peer_slot)."""
    return 100 * service + index


def backend_entry(svc: Svc, ep: Ep, index: int, port: int = 0, topo=Topology, draining: bool = False,
                  where=None):
    """A backend's entry as the agent writes it, with a copy of its endpoint's (or `where`:
    Endpoint() is nowhere, a local endpoint not plumbed yet)."""
    from xoverlay.maps.layout import LB_ACTIVE, LB_DRAINING, LbBackend, port_be
    return LbBackend(ip=ip_be(ep.ip), port=port_be(port) if port else 0,
                     state=LB_DRAINING if draining else LB_ACTIVE, slot=backend_slot(svc.id, index),
                     where=endpoint_entry(ep, topo) if where is None else where)


@contextlib.contextmanager
def entry_replaced(table, key, value):
    """`value` at `key` of a map for the with-block; the entry it had, back afterwards."""
    old = table.get(key)
    table.set(key, value)
    try:
        yield
    finally:
        table.set(key, old)


def write_service(maps: dict, svc: Svc, tables=None, topo=Topology) -> None:
    from xoverlay.kernel.maglev_maps import MaglevTables
    from xoverlay.maps.layout import IPPROTO, LB_AFFINITY, LbBackendKey, LbService, LbServiceKey, port_be
    for ep, index, port in svc.backends:
        maps["xo_lb_backends"].set(LbBackendKey(service=svc.id, index=index),
                                   backend_entry(svc, ep, index, port, topo))
    tables = tables or MaglevTables(maps["xo_lb_maglev"])
    if svc.backends:
        tables.set(svc.id, service_table(svc))
    for port, proto in svc.ports:
        maps["xo_lb_services"].set(
            LbServiceKey(vni=svc.vni, vip=ip_be(svc.vip), port=port_be(port), proto=IPPROTO[proto]),
            LbService(id=svc.id, flags=LB_AFFINITY if svc.affinity else 0))


def checksum_problems(ip_bytes: bytes) -> list[str]:
    """The checksums of an IPv4 packet that scapy, recomputing them, finds wrong:
    [] or some of "IPv4", "TCP", "UDP" (a UDP checksum of 0, "none", is left as it is)."""
    from scapy.layers.inet import IP, TCP, UDP
    pkt = IP(ip_bytes)
    fresh = IP(ip_bytes)
    del fresh.chksum
    l4 = fresh.payload
    if isinstance(l4, (TCP, UDP)) and not (isinstance(l4, UDP) and l4.chksum == 0):
        del l4.chksum
    again = IP(bytes(fresh))
    problems = [] if again.chksum == pkt.chksum else ["IPv4"]
    if isinstance(pkt.payload, (TCP, UDP)) and again.payload.chksum != pkt.payload.chksum:
        problems.append(pkt.payload.name)
    return problems


def _mac(mac: str):
    return (ctypes.c_uint8 * 6).from_buffer_copy(mac_bytes(mac))


def endpoint_flags(ep: Ep, topo=Topology) -> int:
    """As xoverlay.core.desired.endpoint_flags: service lookups only where services are."""
    from xoverlay.maps.layout import EP_NETWORK_HAS_SERVICES, EP_SERVICE_BACKEND
    flags = EP_NETWORK_HAS_SERVICES if any(s.vni == ep.vni for s in topo.SERVICES) else 0
    if any(b is ep for s in topo.SERVICES for b, _, _ in s.backends):
        flags |= EP_SERVICE_BACKEND
    return flags


# Counter slots as the agent would give them, but none at 0: a program that counted into
# slot 0 by mistake (an unset slot) would show nowhere a test looks.
def peer_slot(ip: str, topo=Topology) -> int:
    return 5 + list(topo.PEERS).index(ip)


def endpoint_slot(ep: Ep, topo=Topology) -> int:
    """A local endpoint's own slot; a remote one's is its node's (peer_slot)."""
    if not ep.ifindex:
        return peer_slot(ep.node_ip, topo)
    return 3 + [e for e in topo.ENDPOINTS if e.ifindex].index(ep)


def endpoint_entry(ep: Ep, topo=Topology):
    """An endpoint's entry in xo_endpoints on node A of `topo`."""
    return Endpoint(node_ip=ip_be(ep.node_ip), ifindex=ep.ifindex, mac=_mac(ep.mac),
                    flags=endpoint_flags(ep, topo), slot=endpoint_slot(ep, topo))


def fill_maps(maps: dict, topo=Topology) -> None:
    """What the agent would write for node A of `topo`."""
    maps["xo_config"].set(U32(0), Config(
        node_ip=ip_be(topo.NODE_IP), underlay_ifindex=topo.UNDERLAY_IFINDEX,
        gateway_ifindex=topo.GATEWAY_IFINDEX,
        vxlan_port=int.from_bytes(VXLAN_PORT.to_bytes(2, "big"), "little")))
    for peer in topo.PEERS:
        maps["xo_peers"].set(U32(ip_be(peer)), Peer(slot=peer_slot(peer, topo)))
    for cidr, vni in topo.SUBNETS:
        maps["xo_subnets"].set(subnet_key(cidr), Subnet(vni=vni))
    for ep in topo.ENDPOINTS:
        entry = endpoint_entry(ep, topo)
        maps["xo_endpoints"].set(EndpointKey(vni=ep.vni, ip=ip_be(ep.ip)), entry)
        if ep.ifindex:
            maps["xo_local_endpoints"].set(U32(ep.ifindex), LocalEndpoint(
                vni=ep.vni, ip=ip_be(ep.ip), mac=_mac(ep.mac), flags=entry.flags, slot=entry.slot))
            maps["xo_vnis"].set(U32(ep.vni), Vni())
    for svc in topo.SERVICES:
        write_service(maps, svc, topo=topo)


# --- running ----------------------------------------------------------------------------

@dataclass
class Run:
    verdict: int
    out: bytes
    ns: int                     # average run time reported by the kernel


def prog_run(fd: int, packet: bytes, ingress_ifindex: int | None = None, repeat: int = 1) -> Run:
    """One BPF_PROG_TEST_RUN of the program `fd` on a frame, `repeat` times on the same
    skb. ingress_ifindex: the veth it arrived on (tc only; None: no ctx at all)."""
    ctx = None
    if ingress_ifindex is not None:
        ctx = bytes(SkbCtx(ingress_ifindex=ingress_ifindex))
    verdict, out, ns = bpf.prog_test_run(fd, bytes(packet), ctx, repeat)
    return Run(verdict, out, ns)


class _Closed:
    """A with-block close()s it at the end."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Datapath(_Closed):
    """The programs and maps of one throwaway node. Always close() it: that unpins.
    fill: what writes the maps (maps -> None); None leaves them empty."""

    def __init__(self, node: str, fill=fill_maps):
        from xoverlay.kernel import datapath
        self._datapath = datapath
        self.node = node
        self.progs = None
        self.maps = {}
        try:
            self.progs = datapath.load(node, force=True)
            self.maps = datapath.open_maps(node)
            if fill is not None:
                fill(self.maps)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps = {}
        if self.progs is not None:
            self.progs.close()
            self.progs = None
        self._datapath.unpin(self.node)

    def run(self, prog: str, packet: bytes, ingress_ifindex: int | None = None,
            repeat: int = 1) -> Run:
        """Run program `prog` (a pin name: prog_endpoint, prog_underlay_tc,
        prog_underlay_xdp) on one frame. ingress_ifindex: the veth it arrived on (tc)."""
        return prog_run(self.progs.fds[prog], packet, ingress_ifindex, repeat)

    def drops(self) -> dict[int, tuple[int, int]]:
        """(packets, bytes) dropped per reason code, summed over CPUs."""
        out = {}
        for code in range(32):
            values = self.maps["xo_drops"].get(U32(code))
            total = sum_percpu(values)
            out[code] = (total.packets, total.bytes)
        return out

    def traffic(self, map_name: str, slot: int):
        values = self.maps[map_name].get(U32(slot))
        return sum_percpu(values) if values else None

    def endpoint_traffic(self, ep: Ep):
        """A local endpoint's counters."""
        return self.traffic("xo_endpoint_stats", endpoint_slot(ep))

    def peer_traffic(self, ip: str):
        return self.traffic("xo_peer_stats", peer_slot(ip))


class ReturnOnly(_Closed):
    """A program that only returns `verdict`, of kind "tc" or "xdp" (frags-aware, as ours):
    what a test run costs with nothing to run, the harness's own share of a program's
    time. Always close() it."""
    _MOV_R0, _EXIT = 0xb7, 0x95           # BPF_ALU64 | BPF_MOV | BPF_K into r0; BPF_JMP | BPF_EXIT

    def __init__(self, kind: str, verdict: int):
        prog_type, flags = {"tc": (bpf.BPF_PROG_TYPE_SCHED_CLS, 0),
                            "xdp": (bpf.BPF_PROG_TYPE_XDP, bpf.BPF_F_XDP_HAS_FRAGS)}[kind]
        insns = (bytes([self._MOV_R0, 0, 0, 0]) + verdict.to_bytes(4, "little") +
                 bytes([self._EXIT]) + bytes(7))
        self.fd = bpf.prog_load(prog_type, "xo_return_only", insns, flags)

    def run(self, packet: bytes, ingress_ifindex: int | None = None, repeat: int = 1) -> Run:
        return prog_run(self.fd, packet, ingress_ifindex, repeat)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def drop_delta(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    """Reasons whose counters moved, by name: {name: (packets, bytes)}."""
    delta = {}
    for code in after:
        p = after[code][0] - before[code][0]
        b = after[code][1] - before[code][1]
        if p or b:
            name = REASONS[code].name if code in REASONS else f"code {code}"
            delta[name] = (p, b)
    return delta


def ipv4_checksum(header: bytes) -> int:
    """Ones' complement sum over a header; 0 when the header's checksum is right (the
    reference model's RFC 1071 sum)."""
    from refmodel import csum
    return csum(header)
