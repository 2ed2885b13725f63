"""A reference model of the data path's decisions, in plain Python, written from the spec
(README.md, docs/DESIGN.md, docs/SERVICES.md, issues 2 and 3, the drop reasons of
bpf/lib/drop.h and the fixture tables of tests/test_bpf_*.py), not from the C.

Three functions, one per program, each taking a frame, the map contents (`Maps`) and,
for the endpoint program, the veth it came in on; each returns an `Outcome`: the verdict,
the drop reason counted (or None) and the frame as the program leaves it. The
connection table (`Maps.ct`) is the one piece of state the programs write: the model
updates it the way the spec says the kernel does, so a run of packets through the model
and through the kernel must agree packet by packet.

Where the spec says what to do but not in which order two faults of one packet are
judged, the model judges the headers in the order they come (outer Ethernet, IPv4, UDP,
VXLAN, then lookups), and says so below. Hash formulas (Maglev's 5-tuple hash, the
VXLAN source port) are the control plane's (xoverlay/kernel/maglev_maps.py) and RFC 7348's."""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from xoverlay.core.maglev import _mix32, flow_hash, slot_of

ETH_HLEN = 14
ENCAP_LEN = 20 + 8 + 8 + 14          # outer IPv4 + UDP + VXLAN + inner Ethernet
ETH_IPV4, ETH_ARP = 0x0800, 0x0806
ARP_HLEN = 28                        # RFC 826, IPv4 over Ethernet
TCP, UDP = 6, 17
GW_MAC = b"\xee" * 6
GW_IP = bytes([169, 254, 1, 1])
DNS_PORT = 53
VXLAN_VNI_FLAG, VXLAN_MESH_FLAG = 0x08, 0x01
SYN, ACK, RST, FIN = 0x02, 0x10, 0x04, 0x01
IP_MF, IP_OFFSET, IP_DF = 0x2000, 0x1fff, 0x4000
SPORT_MIN, SPORT_MAX = 32768, 61000   # the kernel's local port range, as its vxlan device
SELF_RETRIES = 3                      # SERVICES.md: "up to 3 more picks with a perturbed hash"
CT_SERVICE, CT_REPLY, CT_MESH = "service", "reply", "mesh"

# Verdicts by program kind (linux/pkt_cls.h, linux/bpf.h)
TC = {"pass": 0, "drop": 2, "redirect": 7}
XDP = {"drop": 1, "pass": 2, "tx": 3}


# --- map contents -------------------------------------------------------------------------------

@dataclass(frozen=True)
class EndpointEntry:
    node_ip: bytes
    ifindex: int              # 0: on another node
    mac: bytes
    backend: bool             # a backend of some service (its replies may need reverse NAT)
    net_has_services: bool
    internal: bool = False    # its network is --internal: nothing leaves the overlay


@dataclass
class Maps:
    """What the agent writes (plus `ct`, which the data path writes). Addresses are
    4 bytes in network order, MACs 6 bytes, ports host-order ints."""
    node_ip: bytes
    node_mac: bytes
    vxlan_port: int
    gateway_ifindex: int
    peers: set                                   # node IPs
    subnets: list                                # (ipaddress.IPv4Network, vni)
    endpoints: dict                              # (vni, ip) -> EndpointEntry
    local: dict                                  # ifindex -> (vni, ip)
    services: dict                               # (vni, vip, port, proto) -> (sid, affinity)
    backends: dict                               # (sid, index) -> (ip, target port or 0, where: EndpointEntry | None)
    maglev: dict                                 # sid -> (M, index of slot 1, ..., index of slot M)
    mesh: dict = field(default_factory=dict)     # (port, proto) -> (sid, affinity, vni, target port)
    underlay_mtu: int = 1500
    neighbours: dict = field(default_factory=dict)   # node IP -> MAC (XDP's FIB lookup finds it)
    ct: dict = field(default_factory=dict)       # (saddr, daddr, sport, dport, proto, dir) -> Ct
    egress: bool = False                         # XO_CFG_EGRESS: the node masquerades what enters xo-gw

    @property
    def vnis(self) -> set:
        """VNIs with an endpoint on this node: the only ones a tunnel may carry here."""
        return {vni for vni, _ in self.local.values()}

    def subnet_vni(self, addr: bytes):
        a = ipaddress.IPv4Address(addr)
        for net, vni in self.subnets:
            if a in net:
                return vni
        return None


@dataclass(frozen=True)
class Ct:
    service: int = 0
    backend: int = 0
    vip: bytes = b"\0\0\0\0"      # REPLY: the address to put back; MESH: the ingress node
    vport: int = 0


@dataclass
class Outcome:
    verdict: str                  # "pass", "drop", "redirect", "tx"
    reason: str | None = None     # drop reason counted (name in bpf/lib/drop.h)
    out: bytes | None = None      # the frame as left (None: as it came)
    built: str = ""               # "encap": VXLAN headers written by the program
    path: str = ""                # which behaviour of the spec decided it (for coverage)

    def frame(self, original: bytes) -> bytes:
        return original if self.out is None else self.out


def drop(reason: str) -> Outcome:
    return Outcome("drop", reason)


# --- parsing ------------------------------------------------------------------------------------

@dataclass
class Ip:
    off: int
    hlen: int
    tot_len: int
    frag: int
    proto: int
    saddr: bytes
    daddr: bytes

    @property
    def is_fragment(self) -> bool:
        return bool(self.frag & (IP_MF | IP_OFFSET))


def parse_ipv4(frame: bytes, off: int) -> Ip | None:
    """An IPv4 header, version 4, IHL >= 5, entirely in the frame; else None (MALFORMED_IP)."""
    if len(frame) < off + 20:
        return None
    ver_ihl = frame[off]
    if ver_ihl >> 4 != 4 or ver_ihl & 0xf < 5 or len(frame) < off + (ver_ihl & 0xf) * 4:
        return None
    tot_len, frag = struct.unpack_from("!H2xH", frame, off + 2)
    return Ip(off, (ver_ihl & 0xf) * 4, tot_len, frag, frame[off + 9], frame[off + 12:off + 16],
              frame[off + 16:off + 20])


@dataclass
class Flow:
    """A TCP or UDP packet that is not a fragment and whose whole L4 header is there."""
    saddr: bytes
    daddr: bytes
    sport: int
    dport: int
    proto: int
    l4_off: int
    tcp_flags: int = 0
    seq: int = 0
    ack_seq: int = 0
    seg_len: int = 0

    @property
    def syn(self) -> bool:
        return self.proto == TCP and self.tcp_flags & (SYN | ACK) == SYN

    def key(self, direction: str) -> tuple:
        return (self.saddr, self.daddr, self.sport, self.dport, self.proto, direction)

    def reverse_key(self, direction: str) -> tuple:
        return (self.daddr, self.saddr, self.dport, self.sport, self.proto, direction)


def parse_flow(frame: bytes, ip: Ip) -> Flow | None:
    if ip.is_fragment:
        return None
    l4 = ip.off + ip.hlen
    if ip.proto == TCP and len(frame) >= l4 + 20:
        sport, dport, seq, ack, doff, flags = struct.unpack_from("!HHIIBB", frame, l4)
        headers = ip.hlen + (doff >> 4) * 4
        return Flow(ip.saddr, ip.daddr, sport, dport, TCP, l4, flags, seq, ack,
                    max(ip.tot_len - headers, 0))
    if ip.proto == UDP and len(frame) >= l4 + 8:
        sport, dport = struct.unpack_from("!HH", frame, l4)
        return Flow(ip.saddr, ip.daddr, sport, dport, UDP, l4)
    return None


def ports_word(frame: bytes, ip: Ip) -> int:
    """The first 4 bytes of the L4 header as an in-memory u32, for the flow hash; 0 for
    fragments (all pieces of a datagram take one path) and other protocols."""
    l4 = ip.off + ip.hlen
    if ip.is_fragment or ip.proto not in (TCP, UDP) or len(frame) < l4 + 4:
        return 0
    return int.from_bytes(frame[l4:l4 + 4], "little")


# --- checksums (RFC 1071 sums, RFC 1624 incremental updates) ------------------------------------

def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff


def csum_update(check: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), over the 16-bit words of a changed field."""
    s = ~check & 0xffff
    for i in range(0, len(old), 2):
        s += (~int.from_bytes(old[i:i + 2], "big") & 0xffff) + int.from_bytes(new[i:i + 2], "big")
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff


def nat(frame: bytes, f: Flow, *, src: tuple | None = None, dst: tuple | None = None) -> bytes:
    """Rewrite the source or destination (address, port) of the flow's packet with
    incremental checksums (IP header; L4, whose sum covers the address through the
    pseudo-header). A UDP checksum of 0 means none and stays 0; a UDP sum that comes
    out 0 is sent as 0xffff."""
    b = bytearray(frame)
    ip_off = ETH_HLEN
    addr_off, port_off = (12, 0) if src else (16, 2)
    new_addr, new_port = src or dst
    old_addr = bytes(b[ip_off + addr_off:ip_off + addr_off + 4])
    old_port = bytes(b[f.l4_off + port_off:f.l4_off + port_off + 2])
    new_port_b = new_port.to_bytes(2, "big")
    csum_off = f.l4_off + (16 if f.proto == TCP else 6)
    l4sum = int.from_bytes(b[csum_off:csum_off + 2], "big")
    if not (f.proto == UDP and l4sum == 0):
        l4sum = csum_update(l4sum, old_addr + old_port, new_addr + new_port_b)
        if f.proto == UDP and l4sum == 0:
            l4sum = 0xffff
        b[csum_off:csum_off + 2] = l4sum.to_bytes(2, "big")
    ipsum = int.from_bytes(b[ip_off + 10:ip_off + 12], "big")
    b[ip_off + 10:ip_off + 12] = csum_update(ipsum, old_addr, new_addr).to_bytes(2, "big")
    b[ip_off + addr_off:ip_off + addr_off + 4] = new_addr
    b[f.l4_off + port_off:f.l4_off + port_off + 2] = new_port_b
    return bytes(b)


# --- VXLAN encapsulation ------------------------------------------------------------------------

def flow_sport(frame: bytes) -> int:
    """RFC 7348: the outer source port is a hash of the inner flow (addresses, protocol,
    ports), mapped onto the local port range as the kernel's udp_flow_src_port() does."""
    ip = parse_ipv4(frame, ETH_HLEN)
    m = 0xffffffff
    s, d = (int.from_bytes(a, "little") for a in (ip.saddr, ip.daddr))
    h = _mix32((s * 0xcc9e2d51) & m ^ (((d ^ ((ports_word(frame, ip) * 0x1b873593) & m)) + ip.proto) & m))
    return ((h * (SPORT_MAX - SPORT_MIN)) >> 32) + SPORT_MIN


def encap(frame: bytes, maps: Maps, to_node: bytes, vni: int, inner_src: bytes, inner_dst: bytes,
          outer_eth: bytes, mesh: bool = False) -> bytes:
    """The IP packet of `frame` (everything after its Ethernet header) in VXLAN to
    `to_node`: outer IPv4 without options, DF, TTL 64, id 0; UDP checksum 0 (RFC 7348
    allows it over IPv4); VXLAN flags: VNI valid (+ the mesh bit); inner Ethernet from
    the arguments."""
    inner = frame[ETH_HLEN:]
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, ENCAP_LEN + len(inner), 0, IP_DF, 64, UDP, 0,
                               maps.node_ip, to_node))
    ip[10:12] = csum(bytes(ip)).to_bytes(2, "big")
    udp = struct.pack("!HHHH", flow_sport(frame), maps.vxlan_port, ENCAP_LEN - 20 + len(inner), 0)
    vx = bytes([VXLAN_VNI_FLAG | (VXLAN_MESH_FLAG if mesh else 0), 0, 0, 0]) + (vni << 8).to_bytes(4, "big")
    return outer_eth + bytes(ip) + udp + vx + inner_dst + inner_src + b"\x08\x00" + inner


# --- services: Maglev and the connection table ---------------------------------------------------

@dataclass
class Choice:
    sid: int
    index: int
    ip: bytes
    port: int
    fresh: bool
    where: object                # the backend's copy of its EndpointEntry, None: nowhere yet


def _be32(a: bytes) -> int:
    return int.from_bytes(a, "little")


def _be16(p: int) -> int:
    return int.from_bytes(p.to_bytes(2, "big"), "little")


def _pick(maps: Maps, sid: int, h: int) -> int:
    table = maps.maglev.get(sid)
    if not table or not table[0]:
        return 0
    return table[slot_of(h, table[0])]


def choose(maps: Maps, sid: int, affinity: bool, f: Flow, default_port: int) -> Choice | str:
    """SERVICES.md, connection table semantics: a known connection (not a SYN) keeps its
    backend, or is forgotten and dropped if that backend is gone; a new one is placed by
    Maglev, never on the client itself. Returns the choice or a drop reason; writes
    nothing but the forgetting."""
    key = f.key(CT_SERVICE)
    ct = None if f.syn else maps.ct.get(key)
    if ct is not None and ct.service == sid:
        be = maps.backends.get((sid, ct.backend))
        if be is None:
            del maps.ct[key]
            return "LB_BACKEND_GONE"
        return Choice(sid, ct.backend, be[0], be[1] or default_port, False, be[2])
    h = flow_hash(_be32(f.saddr), _be32(f.daddr), _be16(f.sport), _be16(f.dport), f.proto, affinity)
    index = _pick(maps, sid, h)
    be = maps.backends.get((sid, index)) if index else None
    for i in range(1, SELF_RETRIES + 1):
        if be is None or be[0] != f.saddr:
            break
        index = _pick(maps, sid, _mix32(h + i))
        be = maps.backends.get((sid, index)) if index else None
    if be is None or be[0] == f.saddr:
        return "LB_NO_BACKEND"
    return Choice(sid, index, be[0], be[1] or default_port, True, be[2])


def commit(maps: Maps, f: Flow, c: Choice) -> None:
    """A new connection: which backend, and what its replies get back (the address and
    port the client talked to)."""
    if c.fresh:
        maps.ct[f.key(CT_SERVICE)] = Ct(c.sid, c.index)
        maps.ct[(c.ip, f.saddr, c.port, f.sport, f.proto, CT_REPLY)] = Ct(c.sid, c.index, f.daddr, f.dport)


def reset_frame(f: Flow, client_mac: bytes) -> bytes:
    """RFC 793's answer to a segment of a connection that does not exist, from the VIP:
    RST with the segment's ACK as sequence number, or RST|ACK acknowledging it."""
    if f.tcp_flags & ACK:
        seq, ack, flags = f.ack_seq, 0, RST
    else:
        length = f.seg_len + bool(f.tcp_flags & SYN) + bool(f.tcp_flags & FIN)
        seq, ack, flags = 0, (f.seq + length) & 0xffffffff, RST | ACK
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, IP_DF, 64, TCP, 0, f.daddr, f.saddr))
    ip[10:12] = csum(bytes(ip)).to_bytes(2, "big")
    tcp = bytearray(struct.pack("!HHIIBBHHH", f.dport, f.sport, seq, ack, 5 << 4, flags, 0, 0, 0))
    pseudo = f.daddr + f.saddr + struct.pack("!BBH", 0, TCP, 20)
    tcp[16:18] = csum(pseudo + bytes(tcp)).to_bytes(2, "big")
    return client_mac + GW_MAC + b"\x08\x00" + bytes(ip) + bytes(tcp)


# --- the underlay: what is a valid tunnel packet -------------------------------------------------

@dataclass
class Tunnel:
    peer: bytes
    vni: int
    mesh: bool
    inner_off: int                # the inner Ethernet header


def classify_underlay(frame: bytes, maps: Maps):
    """None: not VXLAN for us (the stack's, or the mesh's); a str: the drop reason; or the
    Tunnel. Shared by XDP and tc (DESIGN.md: tc repeats XDP's checks). Malformed IPv4 or
    UDP is dropped whatever its port: a truncated tunnel packet cannot be told apart."""
    if len(frame) < ETH_HLEN or struct.unpack_from("!H", frame, 12)[0] != ETH_IPV4:
        return None
    ip = parse_ipv4(frame, ETH_HLEN)
    if ip is None:
        return "MALFORMED_IP"
    if ip.proto != UDP or ip.frag & IP_OFFSET:
        return None                       # a later fragment has no UDP header to judge
    u = ETH_HLEN + ip.hlen
    if len(frame) < u + 8:
        return "TRUNCATED_UDP"
    dport, udp_len = struct.unpack_from("!HH", frame, u + 2)
    if dport != maps.vxlan_port or ip.daddr != maps.node_ip:
        return None
    # Ours from here on: we never send fragments or options, and decap skips ip_rcv's checks.
    if ip.frag & IP_MF:
        return "OUTER_FRAGMENT"
    if ip.hlen != 20:
        return "OUTER_IP_OPTIONS"
    if csum(frame[ETH_HLEN:ETH_HLEN + 20]):
        return "OUTER_CHECKSUM"
    if udp_len < 8 + 8 + 14 or ip.tot_len < 20 + udp_len:
        return "TRUNCATED_UDP"
    vx = u + 8
    if len(frame) < vx + 8:
        return "TRUNCATED_VXLAN"
    if not frame[vx] & VXLAN_VNI_FLAG:
        return "BAD_VXLAN_FLAGS"
    if ip.saddr not in maps.peers:
        return "UNKNOWN_PEER"
    vni = int.from_bytes(frame[vx + 4:vx + 7], "big")
    if vni not in maps.vnis:
        return "UNKNOWN_VNI"
    if len(frame) < vx + 8 + ETH_HLEN:
        return "TRUNCATED_VXLAN"
    # Headers there but the packet shorter than its IPv4 total length: ip_rcv() drops
    # it, and decap skips ip_rcv(); cut, it would vanish uncounted in the container.
    if ip.tot_len > len(frame) - ETH_HLEN:
        return "TRUNCATED_UDP"
    return Tunnel(ip.saddr, vni, bool(frame[vx] & VXLAN_MESH_FLAG), vx + 8)


# --- the routing mesh, forward path ---------------------------------------------------------------

def mesh_match(frame: bytes, maps: Maps):
    """(flow, published entry) of a TCP/UDP packet to this node's IP on a published port,
    without IP options; None otherwise (not the mesh's: left alone)."""
    if len(frame) < ETH_HLEN or struct.unpack_from("!H", frame, 12)[0] != ETH_IPV4:
        return None
    ip = parse_ipv4(frame, ETH_HLEN)
    if ip is None or ip.daddr != maps.node_ip or ip.hlen != 20:
        return None
    f = parse_flow(frame, ip)
    if f is None or (f.dport, f.proto) not in maps.mesh:
        return None
    return f, maps.mesh[(f.dport, f.proto)]


def _mesh_forward(frame: bytes, maps: Maps, xdp: bool) -> Outcome | None:
    m = mesh_match(frame, maps)
    if m is None:
        return None
    f, (sid, affinity, vni, vport) = m
    if maps.subnet_vni(f.saddr) is not None:
        return drop("MESH_OVERLAY_SOURCE")
    c = choose(maps, sid, affinity, f, vport)
    if isinstance(c, str):
        return drop(c)
    be = c.where
    if be is None:
        return drop("UNKNOWN_DESTINATION")
    if be.ifindex:
        if xdp:
            return Outcome("pass", path="mesh: local backend, left to tc")
        commit(maps, f, c)
        out = nat(frame, f, dst=(c.ip, c.port))
        return Outcome("redirect", out=be.mac + GW_MAC + out[12:], path="mesh: DNAT to a local backend")
    if len(frame) - ETH_HLEN + ENCAP_LEN > maps.underlay_mtu:
        return drop("MESH_TOO_BIG")
    if xdp and be.node_ip not in maps.neighbours:
        return Outcome("pass", path="mesh: no neighbour, left to tc")   # redirect_neigh resolves it
    commit(maps, f, c)
    out = nat(frame, f, dst=(c.ip, c.port))
    if xdp:
        eth = maps.neighbours[be.node_ip] + maps.node_mac + b"\x08\x00"
        return Outcome("tx", out=encap(out, maps, be.node_ip, vni, GW_MAC, be.mac, eth, mesh=True), built="encap",
                       path="mesh: DNAT + VXLAN to the backend's node")
    return Outcome("redirect", out=encap(out, maps, be.node_ip, vni, GW_MAC, be.mac, out[:ETH_HLEN], mesh=True),
                   built="encap", path="mesh: DNAT + VXLAN to the backend's node")


# --- the programs ---------------------------------------------------------------------------

def underlay_xdp(frame: bytes, maps: Maps) -> Outcome:
    """XDP on the underlay: drop bad tunnel traffic; the mesh's forward path to remote
    backends; everything else passes."""
    t = classify_underlay(frame, maps)
    if isinstance(t, str):
        return drop(t)
    if t is None:
        return _mesh_forward(frame, maps, xdp=True) or Outcome("pass")
    return Outcome("pass")


def underlay_tc(frame: bytes, maps: Maps) -> Outcome:
    """tc ingress on the underlay: decap into local endpoints (inner source checked
    against the sending peer), reverse NAT of service replies; the mesh."""
    t = classify_underlay(frame, maps)
    if isinstance(t, str):
        return drop(t)
    if t is None:
        return _mesh_forward(frame, maps, xdp=False) or Outcome("pass")
    i = t.inner_off
    if struct.unpack_from("!H", frame, i + 12)[0] != ETH_IPV4:
        return drop("INNER_NOT_IPV4")
    inner = parse_ipv4(frame, i + ETH_HLEN)
    if inner is None:
        return drop("MALFORMED_IP")
    src = maps.endpoints.get((t.vni, inner.saddr))
    dst = maps.endpoints.get((t.vni, inner.daddr))
    request = t.mesh and dst is not None and dst.ifindex != 0
    reply = t.mesh and not request
    if request:
        # A mesh client is outside every overlay network.
        if maps.subnet_vni(inner.saddr) is not None:
            return drop("INNER_SPOOFED")
    elif src is None or src.node_ip != t.peer:
        return drop("INNER_SPOOFED")
    if not reply and (dst is None or not dst.ifindex):
        return drop("UNKNOWN_DESTINATION")
    dst_mac = b"\0" * 6 if reply else dst.mac
    out = dst_mac + GW_MAC + b"\x08\x00" + frame[i + ETH_HLEN:]
    ip = parse_ipv4(out, ETH_HLEN)
    f = parse_flow(out, ip)
    if reply:
        ct = maps.ct.get(f.key(CT_REPLY)) if f else None
        if ct is None:
            return drop("MESH_NO_CONNECTION")
        return Outcome("redirect", out=nat(out, f, src=(ct.vip, ct.vport)), path="mesh reply: decap, source := node:port")
    if request:
        if f is not None:
            key = f.reverse_key(CT_MESH)
            old = maps.ct.get(key)
            if old is None or old.vip != t.peer or f.syn:
                maps.ct[key] = Ct(vip=t.peer)
                maps.ct.pop(f.reverse_key(CT_REPLY), None)
    elif f is not None and src.backend:
        ct = maps.ct.get(f.key(CT_REPLY))
        if ct is not None:
            return Outcome("redirect", out=nat(out, f, src=(ct.vip, ct.vport)), path="decap + reverse NAT")
    return Outcome("redirect", out=out, path="mesh request: decap" if request else "decap")


def loopback(frame: bytes, maps: Maps) -> Outcome:
    """tc ingress on lo: the node's own connections to its published ports take the mesh's
    tc path; everything else on lo passes (a marked reply of ours too: never fuzzed)."""
    return _mesh_forward(frame, maps, xdp=False) or Outcome("pass")


def _unroutable(maps: Maps, vni: int, daddr: bytes) -> str:
    net = maps.subnet_vni(daddr)
    if net is None:
        return "NO_ROUTE"
    return "OTHER_NETWORK" if net != vni else "UNKNOWN_DESTINATION"


def _outside(maps: Maps, me: EndpointEntry, daddr: bytes) -> Outcome:
    """Outside every network: into the node's stack through xo-gw, unchanged, if it is a
    unicast address, the network may leave the overlay and the node masquerades."""
    first = daddr[0]
    if first in (0, 127) or first >= 224 or daddr[:2] == bytes([169, 254]):
        return drop("NO_ROUTE")
    if me.internal:
        return drop("EGRESS_INTERNAL")
    if not (maps.egress and maps.gateway_ifindex):
        return drop("NO_ROUTE")
    return Outcome("redirect", path="egress to the node's stack")


def _arp(frame: bytes, me: EndpointEntry, self_ip: bytes) -> Outcome:
    """ARP from a container, answered as Cilium's bpf_lxc does: a request for IPv4 over
    Ethernet from its own addresses (Ethernet source, sender MAC and IP) for any other
    address gets the gateway's MAC, back to it. A sender address not its own is spoofing
    (0.0.0.0, a probe's "no address yet", is not); every other ARP is not answered."""
    if len(frame) < ETH_HLEN + ARP_HLEN:
        return drop("ARP_NOT_ANSWERED")
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, ETH_HLEN)
    sha, spa, tpa = frame[22:28], frame[28:32], frame[38:42]
    if (htype, ptype, hlen, plen) != (1, ETH_IPV4, 6, 4):
        return drop("ARP_NOT_ANSWERED")
    if frame[6:12] != me.mac or sha != me.mac or spa not in (self_ip, bytes(4)):
        return drop("SPOOFED_SOURCE")
    if op != 1 or spa == bytes(4) or tpa == self_ip:
        return drop("ARP_NOT_ANSWERED")
    reply = struct.pack("!HHBBH", 1, ETH_IPV4, 6, 4, 2) + GW_MAC + tpa + me.mac + self_ip
    return Outcome("redirect", out=me.mac + GW_MAC + frame[12:14] + reply + frame[ETH_HLEN + ARP_HLEN:],
                   path="ARP answered")


def endpoint(frame: bytes, maps: Maps, ifindex: int) -> Outcome:
    """tc on an endpoint's host veth: everything its container sends."""
    if ifindex not in maps.local:
        return drop("UNKNOWN_INTERFACE")
    vni, self_ip = maps.local[ifindex]
    me = maps.endpoints[(vni, self_ip)]
    etype = struct.unpack_from("!H", frame, 12)[0] if len(frame) >= ETH_HLEN else None
    if etype == ETH_ARP:
        return _arp(frame, me, self_ip)
    if etype != ETH_IPV4:
        return drop("NOT_IPV4")
    ip = parse_ipv4(frame, ETH_HLEN)
    if ip is None:
        return drop("MALFORMED_IP")
    if ip.saddr != self_ip or frame[6:12] != me.mac:
        return drop("SPOOFED_SOURCE")

    # DNS to the gateway: into the node's stack, whole and unchanged (DNS.md).
    l4 = ETH_HLEN + ip.hlen
    if (ip.daddr == GW_IP and not ip.is_fragment and ip.proto in (TCP, UDP) and len(frame) >= l4 + 4
            and struct.unpack_from("!H", frame, l4 + 2)[0] == DNS_PORT and maps.gateway_ifindex):
        return Outcome("redirect", path="DNS to the gateway")

    f = parse_flow(frame, ip)
    daddr = ip.daddr
    service, where = False, None
    if f is not None and me.net_has_services:
        svc = maps.services.get((vni, f.daddr, f.dport, f.proto))
        if svc is None:
            if f.syn:   # a direct connection must not get an old service connection's reverse NAT
                maps.ct.pop(f.reverse_key(CT_REPLY), None)
        else:
            service = True
            c = choose(maps, svc[0], svc[1], f, f.dport)
            if c == "LB_BACKEND_GONE" and f.proto == TCP and not f.tcp_flags & RST:
                return Outcome("redirect", "LB_BACKEND_GONE", reset_frame(f, me.mac), path="reset from the VIP")
            if isinstance(c, str):
                return drop(c)
            commit(maps, f, c)
            frame = nat(frame, f, dst=(c.ip, c.port))
            daddr, where = c.ip, c.where

    # A backend is where its own entry says: no second lookup.
    dst = where if service else maps.endpoints.get((vni, daddr))
    if dst is None:
        if f is not None and not service and me.backend:
            # A reply of a routing-mesh connection (SERVICES.md): from the published port
            # of this node, or back in VXLAN to the node the client came in through.
            ct = maps.ct.get(f.key(CT_REPLY))
            if ct is not None:
                out = nat(frame, f, src=(ct.vip, ct.vport))
                if f.daddr == maps.node_ip:     # the node itself is the client: into its stack via lo
                    return Outcome("redirect", out=b"\0" * 6 + out[6:], path="mesh reply to the node: into lo")
                return Outcome("redirect", out=out, path="mesh reply: source := node:port")
            ct = maps.ct.get(f.key(CT_MESH))
            if ct is not None:
                return Outcome("redirect", out=encap(frame, maps, ct.vip, vni, me.mac, GW_MAC, frame[:ETH_HLEN],
                                                     mesh=True), built="encap", path="mesh reply: VXLAN to the ingress node")
        reason = _unroutable(maps, vni, daddr)
        return _outside(maps, me, daddr) if reason == "NO_ROUTE" else drop(reason)
    if dst.ifindex:
        if f is not None and not service and me.backend:
            ct = maps.ct.get(f.key(CT_REPLY))
            if ct is not None:
                return Outcome("redirect", out=dst.mac + GW_MAC + nat(frame, f, src=(ct.vip, ct.vport))[12:],
                               path="local + reverse NAT")
        return Outcome("redirect", out=dst.mac + GW_MAC + frame[12:], path="service, local" if service else "local")
    return Outcome("redirect", out=encap(frame, maps, dst.node_ip, vni, me.mac, dst.mac, frame[:ETH_HLEN]),
                   built="encap", path="service, VXLAN" if service else "VXLAN")
