"""Differential fuzzing of the BPF programs against tests/refmodel.py.

`Generator(seed)` makes frames for each program, valid and malformed, from a seeded
random.Random (fast: struct, not scapy), aimed at the fixed cluster of bpfrun.Topology
plus the routing mesh's published ports of tests/test_bpf_mesh.py, and at the
connections the model knows (so replies, reverse NAT and the mesh's return path get
exercised, not only first packets). `Differ` runs each frame through the kernel
(BPF_PROG_TEST_RUN) and the model and records every disagreement: verdict, output
bytes, drop counters (per batch: every drop counted once, under its reason, with its
length) and the form of what is forwarded (checked with scapy). Used by
tests/test_fuzz_datapath.py (CI) and bench/fuzz (the long campaign)."""
from __future__ import annotations

import ctypes
import random
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field

import refmodel as M
from bpfrun import Topology as T, checksum_problems, service_table

from xoverlay.kernel import bpf
from xoverlay.maps.drops import BY_NAME
from xoverlay.maps.layout import CT_SERVICE, Ct, CtKey, ip_be, mac_bytes, port_be

PROGS = ("prog_endpoint", "prog_underlay_xdp", "prog_underlay_tc", "prog_loopback")
CLIENT = "192.168.50.77"            # outside clients of the routing mesh (test_bpf_mesh.py)
CLIENT2 = "198.51.100.7"
GONE_INDEX = 9                      # a backend index no service has: its connections are over
GONE_SPORTS = range(47000, 47008)


def a(addr: str) -> bytes:
    return socket.inet_aton(addr)


# --- the model's maps: the same cluster as the kernel's ------------------------------------------

def model_maps(mesh_services, published, neighbours, gateway_ifindex=T.GATEWAY_IFINDEX) -> M.Maps:
    """bpfrun.Topology (+ the mesh fixture's extra services and published ports) as the
    model sees it. `published`: (port, proto, Svc, target port)."""
    import ipaddress
    services = T.SERVICES + tuple(mesh_services)
    eps, local = {}, {}
    for ep in T.ENDPOINTS:
        has = any(s.vni == ep.vni for s in T.SERVICES)
        eps[(ep.vni, a(ep.ip))] = M.EndpointEntry(a(ep.node_ip), ep.ifindex, mac_bytes(ep.mac),
                                                  ep.name in {e.name for s in T.SERVICES for e, _, _ in s.backends},
                                                  has)
        if ep.ifindex:
            local[ep.ifindex] = (ep.vni, a(ep.ip))
    proto = {"tcp": M.TCP, "udp": M.UDP}
    svc_map, backends, maglev = {}, {}, {}
    for s in services:
        for port, p in s.ports:
            svc_map[(s.vni, a(s.vip), port, proto[p])] = (s.id, s.affinity)
        for ep, index, port in s.backends:
            backends[(s.id, index)] = (a(ep.ip), port, eps.get((ep.vni, a(ep.ip))))
        if s.backends:
            maglev[s.id] = service_table(s)
    return M.Maps(
        node_ip=a(T.NODE_IP), node_mac=mac_bytes(T.NODE_MAC), vxlan_port=4789, gateway_ifindex=gateway_ifindex,
        peers={a(p) for p in T.PEERS},
        subnets=[(ipaddress.IPv4Network(c), v) for c, v in T.SUBNETS],
        endpoints=eps, local=local, services=svc_map, backends=backends, maglev=maglev,
        mesh={(port, proto[p]): (s.id, s.affinity, s.vni, vport) for port, p, s, vport in published},
        neighbours={a(ip): mac_bytes(mac) for ip, mac in neighbours.items()})


def seed_gone(maps: M.Maps, kernel_ct) -> None:
    """Connections of MANY whose backend has since been removed, in both tables: their
    next packet is LB_BACKEND_GONE (TCP: a reset back to the client)."""
    for sport in GONE_SPORTS:
        for port, proto in ((80, M.TCP), (53, M.UDP)):
            maps.ct[(a(T.WEB1.ip), a(T.MANY.vip), sport, port, proto, M.CT_SERVICE)] = M.Ct(T.MANY.id, GONE_INDEX)
            kernel_ct.set(CtKey(saddr=ip_be(T.WEB1.ip), daddr=ip_be(T.MANY.vip), sport=port_be(sport),
                                dport=port_be(port), proto=proto, dir=CT_SERVICE),
                          Ct(service=T.MANY.id, backend=GONE_INDEX))


# --- frames, by hand ---------------------------------------------------------------------------

def eth(dst: str | bytes, src: str | bytes, etype: int = 0x0800) -> bytes:
    d = dst if isinstance(dst, bytes) else mac_bytes(dst)
    s = src if isinstance(src, bytes) else mac_bytes(src)
    return d + s + struct.pack("!H", etype)


def l4_sum(src: bytes, dst: bytes, proto: int, seg: bytes) -> int:
    return M.csum(src + dst + struct.pack("!BBH", 0, proto, len(seg)) + seg)


def tcp(src, dst, sport, dport, flags, payload=b"", seq=1000, ack=0, bad_csum=False) -> bytes:
    h = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)) + payload
    c = l4_sum(src, dst, M.TCP, bytes(h))
    h[16:18] = ((c ^ 0x5a5a) if bad_csum else c).to_bytes(2, "big")
    return bytes(h)


def udp(src, dst, sport, dport, payload=b"", csum="good") -> bytes:
    h = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)) + payload
    if csum != "none":
        c = l4_sum(src, dst, M.UDP, bytes(h)) or 0xffff
        h[6:8] = ((c ^ 0x1234) if csum == "bad" else c).to_bytes(2, "big")
    return bytes(h)


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, *, ttl=64, frag=M.IP_DF, options=b"",
         ident=0x1c46, tos=0, tot_len=None, bad_csum=False, ver=4, ihl=None) -> bytes:
    hl = 20 + len(options)
    h = bytearray(struct.pack("!BBHHHBBH4s4s", (ver << 4) | ((hl // 4) if ihl is None else ihl), tos,
                              hl + len(payload) if tot_len is None else tot_len, ident, frag, ttl, proto, 0,
                              src, dst)) + options
    c = M.csum(bytes(h))
    h[10:12] = ((c ^ 0x0101) if bad_csum else c).to_bytes(2, "big")
    return bytes(h) + payload


def vxlan_hdr(vni: int, flags: int = 0x08) -> bytes:
    return bytes([flags, 0, 0, 0]) + ((vni & 0xffffff) << 8).to_bytes(4, "big")


# --- the generator --------------------------------------------------------------------------------

@dataclass
class Case:
    prog: str
    frame: bytes
    ifindex: int | None = None
    desc: str = ""
    clean: bool = True       # built without a deliberate fault (its checksums are right)


TCP_FLAGS = (M.SYN, M.SYN, M.SYN | M.ACK, M.ACK, M.ACK | 0x08, M.RST, M.FIN | M.ACK, M.RST | M.ACK, 0, 0xff)
SPORTS = tuple(range(41000, 41048))


class Generator:
    """Frames for each program from one seed. `maps` is the model's (read, never written:
    replies are built for the connections it holds)."""

    def __init__(self, seed: int, maps: M.Maps):
        self.r = random.Random(seed)
        self.maps = maps
        self._ct_keys, self._ct_age = [], 0

    def ct_keys(self) -> list:
        """The model's connection table keys, looked at afresh every 100 frames (a scan
        per frame would cost more than the rest)."""
        self._ct_age -= 1
        if self._ct_age <= 0:
            self._ct_keys, self._ct_age = list(self.maps.ct), 100
        return self._ct_keys

    # -- shared pieces --

    def payload(self, big=False) -> bytes:
        r = self.r
        n = r.choice((0, 1, 5, 21, 64, 200, 1000)) if not big else r.randrange(1000, 3300)
        return bytes([r.randrange(256)]) * n

    def l4(self, src: bytes, dst: bytes, *, sport=None, dport=None, kind=None, big=False, flags=None):
        """(proto, segment, clean)"""
        r = self.r
        kind = kind or r.choices(("tcp", "udp", "icmp", "other"), (45, 40, 10, 5))[0]
        sport = sport if sport is not None else r.choice(SPORTS + (53, 80, 8080, r.randrange(65536)))
        dport = dport if dport is not None else r.choice((80, 53, 8080, 22, 443, 81, r.randrange(65536)))
        p = self.payload(big)
        if kind == "tcp":
            bad = r.random() < 0.05
            return M.TCP, tcp(src, dst, sport, dport, r.choice(TCP_FLAGS) if flags is None else flags, p,
                              seq=r.randrange(1 << 32), ack=r.randrange(1 << 32), bad_csum=bad), not bad
        if kind == "udp":
            cs = r.choices(("good", "none", "bad"), (80, 15, 5))[0]
            return M.UDP, udp(src, dst, sport, dport, p, cs), cs != "bad"
        if kind == "icmp":
            return 1, bytes([8, 0, 0, 0, 0, 1, 0, 1]) + p, True
        return r.choice((47, 132, 0, 255)), p, True

    def ip_packet(self, src, dst, *, l4=None, **l4kw) -> tuple[bytes, bool]:
        """An IPv4 packet, sometimes with a fault of the IP header. (bytes, clean)"""
        r = self.r
        proto, seg, clean = l4 if l4 is not None else self.l4(src, dst, **l4kw)
        kw = {}
        fault = r.random() < 0.3
        if fault:
            what = r.choice(("options", "mf", "offset", "ttl", "tot_short", "tot_long", "csum", "ihl_low",
                             "ihl_high", "version", "tos"))
            if what == "options":
                n = r.choice((4, 8, 20, 40))
                kw["options"] = bytes([1]) * (n - 1) + b"\0"        # NOPs, end of list
            elif what == "mf":
                kw["frag"] = M.IP_MF
            elif what == "offset":
                kw["frag"] = r.choice((1, 185, 0x1fff)) | r.choice((0, M.IP_MF))
            elif what == "ttl":
                kw["ttl"] = r.choice((0, 1))
            elif what == "tot_short":
                kw["tot_len"] = r.randrange(0, 20 + len(seg) + 1)
            elif what == "tot_long":
                kw["tot_len"] = 20 + len(seg) + r.randrange(1, 3000)
            elif what == "csum":
                kw["bad_csum"] = True
            elif what == "ihl_low":
                kw["ihl"] = r.randrange(0, 5)
            elif what == "ihl_high":
                kw["ihl"] = r.randrange(6, 16)
            elif what == "version":
                kw["ver"] = r.choice((0, 6, 15))
            else:
                kw["tos"] = r.randrange(256)
            clean = clean and what in ("ttl", "tos", "options")
        return ipv4(src, dst, proto, seg, **kw), clean

    def mutate_frame(self, frame: bytes, boundaries: list[int]) -> tuple[bytes, str]:
        """Maybe cut the frame at (or near) a header boundary, or pad it."""
        r = self.r
        x = r.random()
        if x < 0.12:
            cut = r.choice(boundaries) + r.choice((0, 0, 0, -1, 1, 2, 4))
            return frame[:max(cut, 0)], f"cut at {cut}"
        if x < 0.15:
            return frame + bytes(r.randrange(1, 40)), "padded"
        return frame, ""

    # -- endpoint program --

    def endpoint(self) -> Case:
        r = self.r
        me = r.choices((T.WEB1, T.WEB2, T.RED1), (50, 35, 15))[0]
        x = r.random()
        if x < 0.15:
            ctc = self._endpoint_reply()
            if ctc:
                return ctc
        # Destinations: endpoints here and elsewhere, other networks, VIPs, the gateway, outside.
        vips = [(s.vip, [p for p, _ in s.ports]) for s in T.SERVICES]
        dst_ip = r.choice([e.ip for e in T.ENDPOINTS] + [v for v, _ in vips] * 3 +
                          ["10.10.9.9", "10.20.9.9", "8.8.8.8", M_GW, CLIENT, "10.10.255.249", me.ip])
        dport = None
        if dst_ip == M_GW:
            dport = r.choice((53, 53, 54, 22))
        elif any(dst_ip == v for v, _ in vips):
            dport = r.choice(dict(vips)[dst_ip] + [81, 8080])
        src_ip, src_mac = me.ip, me.mac
        if r.random() < 0.05:
            src_ip = r.choice(("10.10.1.99", T.WEB2.ip if me is not T.WEB2 else T.WEB1.ip, "0.0.0.0"))
        if r.random() < 0.04:
            src_mac = "02:58:0a:0a:01:63"
        sport = r.choice(SPORTS + tuple(GONE_SPORTS)) if dst_ip == T.MANY.vip else None
        ip, clean = self.ip_packet(a(src_ip), a(dst_ip), sport=sport, dport=dport,
                                   big=r.random() < 0.03)
        return self._l2_faults("prog_endpoint", eth(M.GW_MAC, src_mac), ip, clean,
                               ifindex=r.choices((me.ifindex, T.UNKNOWN_IFINDEX, 0), (96, 2, 2))[0],
                               desc=f"{me.name} -> {dst_ip}")

    def _endpoint_reply(self) -> Case | None:
        """A local backend answering a connection the model holds (reverse NAT, the mesh's
        return path), or a client's next packet of a gone backend's connection."""
        r = self.r
        local = {ip: ep for ep in T.ENDPOINTS if ep.ifindex for ip in [a(ep.ip)]}
        keys = [k for k in self.ct_keys() if k[5] in (M.CT_REPLY, M.CT_MESH) and k[0] in local]
        if not keys:
            return None
        saddr, daddr, sport, dport, proto, _ = r.choice(keys)
        me = local[saddr]
        kind = "tcp" if proto == M.TCP else "udp"
        ip, clean = self.ip_packet(saddr, daddr, sport=sport, dport=dport, kind=kind)
        return self._l2_faults("prog_endpoint", eth(M.GW_MAC, me.mac), ip, clean, ifindex=me.ifindex,
                               desc=f"reply from {me.name}")

    def _l2_faults(self, prog, l2: bytes, ip: bytes, clean: bool, ifindex=None, desc="") -> Case:
        r = self.r
        x = r.random()
        if x < 0.03:
            frame = l2[:12] + b"\x81\x00" + struct.pack("!H", r.randrange(4096)) + l2[12:] + ip
            return Case(prog, frame, ifindex, desc + ", VLAN tag", False)
        if x < 0.05:
            v6 = (struct.pack("!IHBB", 0x60000000, len(ip) - 20, 17, 64) + bytes(15) + b"\1" + bytes(15) + b"\2"
                  + ip[20:])
            return Case(prog, l2[:12] + b"\x86\xdd" + v6, ifindex, desc + ", IPv6", False)
        if x < 0.08:
            return self._arp(prog, l2, ip, ifindex, desc)
        hl = (ip[0] & 0xf) * 4 if len(ip) else 20
        frame, how = self.mutate_frame(l2 + ip, [ETH_, ETH_ + 20, ETH_ + hl, ETH_ + hl + 4, ETH_ + hl + 8,
                                                 ETH_ + hl + 20])
        return Case(prog, frame, ifindex, desc + (", " + how if how else ""), clean and not how)

    def _arp(self, prog, l2: bytes, ip: bytes, ifindex, desc: str) -> Case:
        """ARP from the frame's sender: mostly a request from the IP packet's source for its
        destination (an endpoint's is answered); also replies and other operations, probes
        (sender 0.0.0.0), announcements (target = sender), another format, cut short or
        padded."""
        r = self.r
        op = r.choices((1, 2, 3), (80, 15, 5))[0]
        spa = ip[12:16] if r.random() < 0.9 else bytes(4)
        tpa = ip[16:20] if r.random() < 0.9 else r.choice((spa, ip[12:16]))
        fmt = (1, 0x0800, 6, 4)
        if r.random() < 0.08:
            fmt = r.choice(((6, 0x0800, 6, 4), (1, 0x86dd, 6, 4), (1, 0x0800, 8, 4), (1, 0x0800, 6, 16)))
        sha = l2[6:12] if r.random() < 0.95 else mac_bytes("02:58:0a:0a:01:63")
        dst = b"\xff" * 6 if r.random() < 0.8 else M.GW_MAC
        frame = dst + l2[6:12] + b"\x08\x06" + struct.pack("!HHBBH6s4s6s4s", *fmt, op, sha, spa, bytes(6), tpa)
        how = ""
        x = r.random()
        if x < 0.08:
            cut = r.randrange(ETH_, len(frame))
            frame, how = frame[:cut], f", cut at {cut}"
        elif x < 0.15:
            frame, how = frame + bytes(18), ", padded"
        return Case(prog, frame, ifindex, f"{desc}, ARP op {op} {socket.inet_ntoa(spa)} asks for "
                    f"{socket.inet_ntoa(tpa)}{how}", False)

    # -- underlay programs --

    def underlay(self, prog: str) -> Case:
        r = self.r
        x = r.random()
        if x < 0.55:
            return self._vxlan(prog)
        if x < 0.85:
            return self._outside(prog)
        src, dst = r.choice((T.PEER_B, CLIENT, T.STRANGER)), r.choice((T.NODE_IP, T.PEER_C, "224.0.0.1"))
        ip, clean = self.ip_packet(a(src), a(dst))
        return self._l2_faults(prog, eth(T.NODE_MAC, T.PEER_B_MAC), ip, clean, desc=f"{src} -> {dst}")

    def _outside(self, prog: str) -> Case:
        """Traffic to this node's address: published ports (the routing mesh) and others."""
        r = self.r
        src = r.choices((CLIENT, CLIENT2, T.API1.ip, T.PEER_B, T.NODE_IP), (45, 25, 10, 10, 10))[0]
        port, kind = r.choice(((8080, "tcp"), (5353, "udp"), (8081, "tcp"), (8082, "tcp"), (8083, "tcp"),
                               (8080, "udp"), (22, "tcp"), (4789, "tcp")))
        big = r.random() < 0.1
        l4 = self.l4(a(src), a(T.NODE_IP), sport=r.choice(SPORTS), dport=port, kind=kind)
        if big:
            p = r.choice((1400, 1421, 1422, 1423, 1450, 1480, 2000, 3000))
            seg = l4[1] + bytes(p)
            if l4[0] == M.UDP:
                seg = udp(a(src), a(T.NODE_IP), *struct.unpack("!HH", seg[:4]), seg[8:])
            else:
                seg = seg[:16] + b"\0\0" + seg[18:]
                seg = seg[:16] + l4_sum(a(src), a(T.NODE_IP), M.TCP, seg).to_bytes(2, "big") + seg[18:]
            l4 = (l4[0], seg, l4[2])
        ip, clean = self.ip_packet(a(src), a(r.choice((T.NODE_IP,) * 9 + (T.PEER_B,))), l4=l4)
        return self._l2_faults(prog, eth(T.NODE_MAC, "52:54:00:00:50:77"), ip, clean,
                               desc=f"outside {src} -> :{port}/{kind}")

    def _inner(self) -> tuple[bytes, str, bool, int, str]:
        """(inner frame, desc, clean, vni, the outer source it needs)"""
        r = self.r
        x = r.random()
        maps = self.maps
        # Replies of connections the model holds, from a backend on another node.
        remote = {a(ep.ip): ep for ep in T.ENDPOINTS if not ep.ifindex}
        if x < 0.3:
            keys = [k for k in self.ct_keys() if k[5] == M.CT_REPLY and k[0] in remote]
            if keys:
                saddr, daddr, sport, dport, proto, _ = r.choice(keys)
                ep = remote[saddr]
                mesh = maps.subnet_vni(daddr) is None
                ip, clean = self.ip_packet(saddr, daddr, sport=sport, dport=dport,
                                           kind="tcp" if proto == M.TCP else "udp")
                return (eth(M.GW_MAC if mesh else T.WEB1.mac, ep.mac) + ip, f"reply from {ep.name}", clean,
                        ep.vni, ep.node_ip) + (("mesh",) if mesh else ())
        if x < 0.45:
            # A mesh request for a backend here, from an outside client (or a liar).
            src = r.choice((CLIENT, CLIENT2, CLIENT, T.DB1.ip))
            ip, clean = self.ip_packet(a(src), a(r.choice((T.WEB2.ip, T.WEB1.ip, T.API1.ip))),
                                       sport=r.choice(SPORTS), dport=r.choice((80, 8080)))
            return eth(T.WEB2.mac, M.GW_MAC) + ip, f"mesh request from {src}", clean, T.BLUE_VNI, \
                r.choice((T.PEER_B, T.PEER_C)), "mesh"
        src = r.choices((T.API1, T.DB1, T.RED2, T.WEB2), (40, 25, 25, 10))[0]
        dst = r.choice([e for e in T.ENDPOINTS if e.vni == src.vni] + [T.WEB1, T.WEB2, T.RED1])
        dst_ip = dst.ip if r.random() < 0.9 else r.choice(("10.10.9.9", CLIENT, T.ONE.vip))
        if r.random() < 0.05:
            # Nested VXLAN: a tunnel packet inside a tunnel packet.
            inner2 = eth(T.WEB1.mac, src.mac) + ipv4(a(src.ip), a(dst_ip), M.UDP,
                                                      udp(a(src.ip), a(dst_ip), 1234, 80, b"x"))
            seg = udp(a(src.ip), a(dst_ip), 40000, 4789, vxlan_hdr(src.vni) + inner2)
            ip, clean = ipv4(a(src.ip), a(dst_ip), M.UDP, seg), True
        else:
            ip, clean = self.ip_packet(a(src.ip), a(dst_ip))
        etype = r.choices((0x0800, 0x0806, 0x86dd, 0x8100), (94, 2, 2, 2))[0]
        return eth(dst.mac, src.mac, etype) + ip, f"{src.name} -> {dst_ip}", clean and etype == 0x0800, \
            src.vni, src.node_ip

    def _vxlan(self, prog: str) -> Case:
        r = self.r
        inner, desc, clean, vni, peer, *mesh = self._inner()
        flags = 0x09 if mesh else 0x08
        if r.random() < 0.1:
            flags = r.choice((0x00, 0x01, 0x09, 0x08, 0xff, 0x88, r.randrange(256)))
        if r.random() < 0.08:
            vni = r.choice((0, 0xffffff, T.UNUSED_VNI, T.RED_VNI, T.BLUE_VNI))
        if r.random() < 0.06:
            peer = r.choice((T.STRANGER, T.PEER_B, T.PEER_C, T.NODE_IP))
        outer_dst = T.NODE_IP if r.random() < 0.95 else T.PEER_C
        dport = 4789 if r.random() < 0.95 else r.choice((4790, 8472))
        if prog == "prog_underlay_xdp" and r.random() < 0.03:
            inner += bytes(r.randrange(3000, 9000))          # jumbo: several buffers in XDP
        seg = udp(a(peer), a(outer_dst), r.randrange(32768, 61000), dport, vxlan_hdr(vni, flags) + inner,
                  csum="none" if r.random() < 0.9 else "good")
        kw = {}
        x = r.random()
        if x < 0.25:
            what = r.choice(("options", "mf", "offset", "csum", "ttl", "tot_short", "tot_long", "udp_short",
                             "udp_long", "ihl"))
            if what == "options":
                kw["options"] = b"\1\1\1\0"
            elif what == "mf":
                kw["frag"] = M.IP_MF | M.IP_DF
            elif what == "offset":
                kw["frag"] = r.choice((1, 185))
            elif what == "csum":
                kw["bad_csum"] = True
            elif what == "ttl":
                kw["ttl"] = r.choice((0, 1))
            elif what == "tot_short":
                kw["tot_len"] = r.randrange(20, 20 + len(seg))
            elif what == "tot_long":
                kw["tot_len"] = 20 + len(seg) + r.randrange(1, 100)
            elif what in ("udp_short", "udp_long"):
                n = r.randrange(0, len(seg)) if what == "udp_short" else len(seg) + r.randrange(1, 100)
                seg = seg[:4] + struct.pack("!H", n) + seg[6:]
            else:
                kw["ihl"] = r.choice((0, 4, 6, 15))
            desc += f", outer {what}"
        ip = ipv4(a(peer), a(outer_dst), M.UDP, seg, **kw)
        hl = 20 + len(kw.get("options", b""))
        o = ETH_ + hl
        frame, how = self.mutate_frame(eth(T.NODE_MAC, T.PEER_B_MAC) + ip,
                                       [ETH_, ETH_ + 20, o, o + 4, o + 8, o + 12, o + 16, o + 16 + 14,
                                        o + 16 + 14 + 20, o + 16 + 14 + 28, o + 16 + 14 + 40])
        return Case(prog, frame, None, f"vxlan vni {vni} flags {flags:#x} from {peer}: {desc}"
                    + (", " + how if how else ""), clean and not how and not kw)

    def case(self, prog: str) -> Case:
        if prog == "prog_endpoint":
            return self.endpoint()
        return self.underlay(prog)


ETH_ = M.ETH_HLEN
M_GW = "169.254.1.1"


# --- running: kernel and model side by side ------------------------------------------------------

class XdpCtx(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("data", "data_end", "data_meta", "ingress_ifindex",
                                                  "rx_queue_index", "egress_ifindex")]


VERDICTS = {"prog_endpoint": M.TC, "prog_underlay_tc": M.TC, "prog_underlay_xdp": M.XDP, "prog_loopback": M.TC}
MODEL = {"prog_endpoint": lambda c, m: M.endpoint(c.frame, m, c.ifindex),
         "prog_underlay_tc": lambda c, m: M.underlay_tc(c.frame, m),
         "prog_loopback": lambda c, m: M.loopback(c.frame, m),
         "prog_underlay_xdp": lambda c, m: M.underlay_xdp(c.frame, m)}
LINEAR_MAX = 3000      # XDP test runs: beyond this the frame goes into fragments (multi-buffer)


def refused_by_test_run(case: Case) -> bool:
    """Frames BPF_PROG_TEST_RUN does not run a program on (bpfrun's notes): under 14
    bytes; for tc also an IPv4 ethertype with less than an IPv4 header, IPv6 with less
    than an IPv6 header, and a frame that does not fit one page with the skb's head-
    and tailroom (a real tc program sees such frames non-linear; XDP takes them in
    several buffers)."""
    if case.prog == "prog_underlay_xdp" or len(case.frame) < M.ETH_HLEN:
        return len(case.frame) < M.ETH_HLEN
    etype = struct.unpack_from("!H", case.frame, 12)[0]
    return ((etype == 0x0800 and len(case.frame) < 34) or (etype == 0x86dd and len(case.frame) < 54)
            or len(case.frame) > 3500)


@dataclass
class Disagreement:
    prog: str
    desc: str
    frame: bytes
    what: str

    def __str__(self):
        return f"{self.prog}: {self.desc}: {self.what}\n  frame {self.frame.hex()}"


@dataclass
class Differ:
    """Runs cases through a Datapath (maps filled, netns entered by the caller) and the
    model, keeping score."""
    dp: object
    maps: M.Maps
    xdp_ifindex: int
    run: Counter = field(default_factory=Counter)          # packets per program
    refused: Counter = field(default_factory=Counter)      # frames BPF_PROG_TEST_RUN will not run
    outcomes: Counter = field(default_factory=Counter)     # (program, verdict, reason)
    disagreements: list = field(default_factory=list)
    well_formed_checked: int = 0

    def kernel(self, case: Case):
        fd = self.dp.progs.fds[case.prog]
        if case.prog == "prog_underlay_xdp":
            ctx = bytes(XdpCtx(data_end=min(len(case.frame), LINEAR_MAX), ingress_ifindex=self.xdp_ifindex))
        else:
            from bpfrun import SkbCtx
            ctx = bytes(SkbCtx(ingress_ifindex=case.ifindex)) if case.ifindex is not None else None
        return bpf.prog_test_run(fd, case.frame, ctx, 1)

    def batch(self, cases: list[Case]) -> None:
        before = self.dp.drops()
        expected: Counter = Counter()
        for case in cases:
            try:
                verdict, out, _ = self.kernel(case)
            except bpf.BpfError:
                if not refused_by_test_run(case):
                    raise
                self.refused[case.prog] += 1
                continue
            self.run[case.prog] += 1
            want = MODEL[case.prog](case, self.maps)
            self.outcomes[(case.prog, want.verdict, want.reason or want.path)] += 1
            if want.reason:
                expected[want.reason] += 1
                expected[want.reason + " bytes"] += len(case.frame)
            self.compare(case, want, verdict, out)
        after = self.dp.drops()
        moved: Counter = Counter()
        for code, (p, b) in after.items():
            if p - before[code][0]:
                name = next(r.name for r in BY_NAME.values() if r.code == code)
                moved[name] += p - before[code][0]
                moved[name + " bytes"] += b - before[code][1]
        if moved != expected:
            diff = {k: (moved[k], expected[k]) for k in set(moved) | set(expected) if moved[k] != expected[k]}
            self.disagreements.append(Disagreement(
                "batch", f"{len(cases)} packets", b"", f"drop counters (kernel, model): {diff}"))

    def compare(self, case: Case, want: M.Outcome, verdict: int, out: bytes) -> None:
        prog = case.prog
        problems = []
        if verdict != VERDICTS[prog][want.verdict]:
            problems.append(f"verdict {verdict}, model {want.verdict} ({want.reason})")
        elif want.verdict != "drop":
            expected = want.frame(case.frame)
            if out != expected:
                problems.append(f"output differs:\n  kernel {out.hex()}\n  model  {expected.hex()}")
            elif want.out is not None:
                problems += well_formed(case, want, out)
                self.well_formed_checked += 1
        if problems:
            self.disagreements.append(Disagreement(prog, case.desc, case.frame, "; ".join(problems)))


def well_formed(case: Case, want: M.Outcome, out: bytes) -> list[str]:
    """What the program wrote, checked independently with scapy: outer headers of a VXLAN
    it built (lengths, IPv4 checksum), and an inner packet whose checksums were right on
    the way in is still right (NAT) on the way out."""
    from scapy.layers.inet import IP, UDP
    problems = []
    inner = out[M.ETH_HLEN:]
    if want.built == "encap":
        outer = IP(out[M.ETH_HLEN:M.ETH_HLEN + 28])
        if outer.len != len(out) - M.ETH_HLEN or outer[UDP].len != len(out) - M.ETH_HLEN - 20:
            problems.append("outer IP/UDP length")
        fresh = IP(bytes(outer)[:28])
        del fresh.chksum
        if IP(bytes(fresh)).chksum != outer.chksum or outer.ihl != 5 or outer.flags != "DF":
            problems.append("outer IPv4 header checksum / form")
        inner = out[M.ETH_HLEN + M.ENCAP_LEN:]
    if case.clean and len(inner) >= 20 and inner[0] == 0x45:
        pkt = IP(inner)
        if pkt.len == len(inner) and not pkt.frag and not pkt.flags.MF:
            problems += [f"inner {what} checksum" for what in checksum_problems(inner)]
    return problems


def new_differ(dp, ifindex: int) -> Differ:
    """A Differ for a datapath made by test_bpf_mesh.mesh_datapath (node A of
    bpfrun.Topology, underlay und0 with a neighbour entry for peer B only)."""
    from test_bpf_mesh import ONFARC, PUBLISHED

    from xoverlay.maps.layout import U32
    cfg = dp.maps["xo_config"].get(U32(0))
    cfg.gateway_ifindex = T.GATEWAY_IFINDEX      # the mesh fixture has no xo-gw: DNS needs one
    dp.maps["xo_config"].set(U32(0), cfg)
    maps = model_maps([ONFARC], PUBLISHED, {T.PEER_B: T.PEER_B_MAC})
    return Differ(dp, maps, ifindex)
