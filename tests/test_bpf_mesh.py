"""The routing mesh in the data path, through BPF_PROG_TEST_RUN on the real programs:
published ports on this node's underlay IP (bpfrun.Topology node A, 192.168.50.1), the
forward path in XDP (remote backend: DNAT + VXLAN built in XDP, XDP_TX) and in tc (local
backend; and all of it when XDP is off), the mesh's tunnelled requests and replies, and
what is left alone. Output frames are compared byte for byte with what scapy builds,
outer IPv4 checksum and inner TCP/UDP checksums included.

XDP's FIB lookup needs a real underlay: the programs run inside a throwaway netns whose
veth und0 is node A (192.168.50.1/24, MAC 52:54:00:00:50:01) with a permanent neighbour
entry for peer B and none for peer C.

Published here (the agent would write these from `--publish`):
    8080/tcp -> ONE:80 (api1 on B)     5353/udp -> ONE:53
    8081/tcp -> LOCAL:80 (web2 here, target port 8080)
    8082/tcp -> ONFARC:80 (db1 on C, for which A has no neighbour entry)
    8083/tcp -> EMPTY:80 (no backend)"""
from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import subprocess
import sys

import pytest
from bpfrun import (
    GW_MAC,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    VXLAN_PORT,
    XDP_DROP,
    XDP_PASS,
    Datapath,
    Svc,
    Topology as T,
    backend_entry,
    drop_delta,
    entry_replaced,
    ipv4_checksum,
    write_service,
)

from xoverlay.kernel import bpf, netns
from xoverlay.maps.layout import (
    CT_MESH,
    CT_REPLY,
    IPPROTO,
    LB_AFFINITY,
    U32,
    Config,
    CtKey,
    Endpoint,
    LbBackendKey,
    Mesh,
    MeshKey,
    ip_be,
    port_be,
)

pytest.importorskip("scapy")
from scapy.layers.inet import ICMP, IP, TCP, UDP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.layers.vxlan import VXLAN  # noqa: E402
from test_bpf_programs import ENCAP, ETH, IPH, PAYLOAD, vxlan  # noqa: E402
from test_bpf_services import assert_checksums_valid, rewritten  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root"),
    pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning"),
]

XDP_TX = 3
CLIENT = "192.168.50.77"            # outside every overlay network
CLIENT_MAC = "52:54:00:00:50:77"
PEER_C_MAC = "52:54:00:00:50:03"
ONFARC = Svc(6, T.BLUE_VNI, "10.10.255.249", ((80, "tcp"),), ((T.DB1, 1, 0),))
PUBLISHED = [(8080, "tcp", T.ONE, 80), (5353, "udp", T.ONE, 53), (8081, "tcp", T.LOCAL, 80),
             (8082, "tcp", ONFARC, 80), (8083, "tcp", T.EMPTY, 80)]


class XdpCtx(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in (
        "data", "data_end", "data_meta", "ingress_ifindex", "rx_queue_index", "egress_ifindex")]


@contextlib.contextmanager
def mesh_underlay():
    """A netns with node A's underlay device und0: (its path, und0's ifindex)."""
    name = f"xo-pytest-mesh-{os.getpid()}"

    def ip(*args):
        subprocess.run(["ip", "-n", name, *args], check=True, capture_output=True)
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        ip("link", "add", "und0", "address", T.NODE_MAC, "type", "veth", "peer", "name", "und1")
        ip("addr", "add", f"{T.NODE_IP}/24", "dev", "und0")
        ip("link", "set", "und0", "up")
        # XDP's FIB lookup answers only where the device forwards (as on a Docker host).
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.conf.und0.forwarding=1"],
                       check=True, capture_output=True)
        ip("link", "set", "und1", "up")
        ip("neigh", "replace", T.PEER_B, "lladdr", T.PEER_B_MAC, "dev", "und0", "nud", "permanent")
        path = netns.resolve(name)
        with netns.entered(path):
            ifindex = socket.if_nametoindex("und0")
        yield path, ifindex
    finally:
        netns.remove(name)


@contextlib.contextmanager
def mesh_datapath(path: str, ifindex: int):
    """Node A's programs and maps (bpfrun.Topology), its underlay und0, ports published."""
    datapath = Datapath(f"pytest-mesh-{os.getpid()}")
    try:
        m = datapath.maps
        m["xo_config"].set(U32(0), Config(node_ip=ip_be(T.NODE_IP), underlay_ifindex=ifindex,
                                          vxlan_port=port_be(VXLAN_PORT)))
        write_service(m, ONFARC)
        for port, proto, svc, vport in PUBLISHED:
            m["xo_lb_mesh"].set(MeshKey(port=port_be(port), proto=IPPROTO[proto]),
                                Mesh(service=svc.id, flags=LB_AFFINITY if svc.affinity else 0, vni=svc.vni,
                                     port=port_be(vport)))
        datapath.netns = path
        datapath.ifindex = ifindex
        yield datapath
    finally:
        datapath.close()


@pytest.fixture(scope="module")
def dp():
    with mesh_underlay() as (path, ifindex), mesh_datapath(path, ifindex) as datapath:
        yield datapath


def run(dp, prog: str, frame: bytes, ingress_ifindex: int | None = None, repeat: int = 1):
    """Run inside the underlay netns. XDP: ingress on und0; tc: as the agent attaches
    them (ingress_ifindex: an endpoint's veth for prog_endpoint)."""
    before = dp.drops()
    with netns.entered(dp.netns):
        if prog == "prog_underlay_xdp":
            ctx = bytes(XdpCtx(data_end=len(frame), ingress_ifindex=dp.ifindex))
            verdict, out, ns = bpf.prog_test_run(dp.progs.fds[prog], frame, ctx, repeat)
            r = type("Run", (), {"verdict": verdict, "out": out, "ns": ns})()
        else:
            r = dp.run(prog, frame, ingress_ifindex, repeat=repeat)
    r.drops = drop_delta(before, dp.drops())
    return r


# --- frames ------------------------------------------------------------------------------------

def outside(l4, src=CLIENT, dst=T.NODE_IP) -> bytes:
    """A frame from an outside client to node A's underlay MAC, checksums finished."""
    return bytes(Ether(src=CLIENT_MAC, dst=T.NODE_MAC) / IP(src=src, dst=dst) / l4)


def flow_sport(ip_packet: bytes) -> int:
    """bpf/lib/parsing.h xo_flow_hash() -> xo_flow_sport(), on an IPv4 packet."""
    ip = IP(ip_packet)
    saddr, daddr = ip_be(ip.src), ip_be(ip.dst)
    hl = ip.ihl * 4
    ports = int.from_bytes(ip_packet[hl:hl + 4], "little") if ip.proto in (6, 17) else 0
    m = 0xffffffff
    h = (saddr * 0xcc9e2d51) & m
    h ^= ((daddr ^ ((ports * 0x1b873593) & m)) + ip.proto) & m
    h ^= h >> 16
    h = (h * 0x85ebca6b) & m
    h ^= h >> 13
    h = (h * 0xc2b2ae35) & m
    h ^= h >> 16
    return ((h * (61000 - 32768)) >> 32) + 32768


def mesh_vxlan(inner_ip: bytes, to_node: str, inner_dst_mac: str, *, outer_eth=None, inner_src_mac=GW_MAC,
               vni=T.BLUE_VNI) -> bytes:
    """What node A sends to another node for a mesh connection: VXLAN with the mesh flag,
    outer headers exactly as xo_encap_fill() writes them (id 0, DF, TTL 64, UDP checksum
    0), the outer Ethernet header given (XDP: from the FIB) or left as it was (tc)."""
    outer = (IP(src=T.NODE_IP, dst=to_node, flags="DF", ttl=64, id=0) /
             UDP(sport=flow_sport(inner_ip), dport=VXLAN_PORT, chksum=0) / VXLAN(vni=vni, flags=0x09) /
             Ether(src=inner_src_mac, dst=inner_dst_mac, type=0x0800) / IP(inner_ip))
    return outer_eth + bytes(outer)


def eth(dst: str, src: str) -> bytes:
    return bytes(Ether(dst=dst, src=src, type=0x0800))


# --- forward path in XDP: a remote backend --------------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_xdp_encapsulates_to_the_backends_node(dp, proto):
    """TCP to 8080 (UDP to 5353) reaches ONE's backend api1 on B: DNAT to api1:80 (:53),
    the client's address kept, VXLAN to B with the mesh flag, MACs from the FIB
    (und0 -> B's neighbour entry), sent back out of the device it came in on."""
    l4 = (TCP(sport=50001, dport=8080, flags="S", seq=1000) if proto == "tcp"
          else UDP(sport=50002, dport=5353) / PAYLOAD)
    frame = outside(l4)
    r = run(dp, "prog_underlay_xdp", frame)
    assert r.verdict == XDP_TX and r.drops == {}
    inner = rewritten(frame, dst=T.API1.ip, dport=80 if proto == "tcp" else 53)
    want = mesh_vxlan(inner, T.PEER_B, T.API1.mac, outer_eth=eth(T.PEER_B_MAC, T.NODE_MAC))
    assert r.out.hex() == want.hex()
    assert ipv4_checksum(r.out[ETH:ETH + IPH]) == 0, "outer IPv4 checksum"
    assert_checksums_valid(r.out[ETH + ENCAP:])
    assert IP(r.out[ETH + ENCAP:]).src == CLIENT


def partial(frame: bytes) -> bytes:
    """The frame as a sender on this machine leaves it to offload (CHECKSUM_PARTIAL): its
    L4 checksum field holds only the pseudo-header's sum, folded (tcp_v4_send_check)."""
    ip = IP(frame[ETH:])
    l4_len = ip.len - ip.ihl * 4
    words = socket.inet_aton(ip.src) + socket.inet_aton(ip.dst) + struct.pack("!HH", ip.proto, l4_len)
    total = sum(struct.unpack("!6H", words))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    at = ETH + ip.ihl * 4 + (16 if ip.proto == 6 else 6)
    return frame[:at] + struct.pack("!H", total) + frame[at + 2:]


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_xdp_leaves_a_partial_checksum_to_tc(dp, proto):
    """A client on the same machine (a cluster node asking another's published port
    across veths) sends checksums left to offload; XDP's arithmetic would forward them as
    finished and the backend's stack would drop the packet as corrupt (TcpInCsumErrors,
    nothing counted here): XDP passes it untouched, nothing remembered, and tc, whose
    helpers keep a partial checksum partial, encapsulates it."""
    l4 = (TCP(sport=50005, dport=8080, flags="S", seq=1000) if proto == "tcp"
          else UDP(sport=50006, dport=5353) / PAYLOAD)
    frame = partial(outside(l4))
    r = run(dp, "prog_underlay_xdp", frame)
    assert r.verdict == XDP_PASS and r.out == frame and r.drops == {}
    sport = 50005 if proto == "tcp" else 50006
    assert not [k for k in dp.maps["xo_lb_ct"].keys() if k.sport == port_be(sport) or k.dport == port_be(sport)]
    r = run(dp, "prog_underlay_tc", frame)
    assert r.verdict == TC_ACT_REDIRECT and r.drops == {}
    assert IP(r.out[ETH + ENCAP:]).dst == T.API1.ip


def test_xdp_udp_without_checksum_keeps_none(dp):
    frame = outside(UDP(sport=50003, dport=5353, chksum=0) / PAYLOAD)
    r = run(dp, "prog_underlay_xdp", frame)
    assert r.verdict == XDP_TX
    assert UDP(r.out[ETH + ENCAP + IPH:]).chksum == 0


def test_xdp_connection_keeps_its_backend_and_counts(dp):
    """The SYN's choice is remembered on this node (both entries, the reply one saying
    what the client talked to: node IP:8080), later packets follow it, counted once."""
    frame = outside(TCP(sport=50010, dport=8080, flags="S"))
    run(dp, "prog_underlay_xdp", frame)
    rev = dp.maps["xo_lb_ct"].get(CtKey(saddr=ip_be(T.API1.ip), daddr=ip_be(CLIENT), sport=port_be(80),
                                        dport=port_be(50010), proto=6, dir=CT_REPLY))
    assert rev is not None and (rev.vip, rev.vport) == (ip_be(T.NODE_IP), port_be(8080))
    data = outside(TCP(sport=50010, dport=8080, flags="PA", seq=1001, ack=1) / PAYLOAD)
    r = run(dp, "prog_underlay_xdp", data)
    assert r.verdict == XDP_TX and IP(r.out[ETH + ENCAP:]).dst == T.API1.ip


def test_xdp_leaves_a_local_backend_to_tc(dp):
    frame = outside(TCP(sport=50020, dport=8081, flags="S"))
    r = run(dp, "prog_underlay_xdp", frame)
    assert r.verdict == XDP_PASS and r.out == frame and r.drops == {}


def test_xdp_without_a_neighbour_entry_leaves_it_to_tc(dp):
    """db1's node C has no neighbour entry on und0: XDP cannot fill in the MAC, so the
    frame passes untouched and tc (redirect_neigh) does it all."""
    frame = outside(TCP(sport=50030, dport=8082, flags="S"))
    r = run(dp, "prog_underlay_xdp", frame)
    assert r.verdict == XDP_PASS and r.out == frame and r.drops == {}
    r = run(dp, "prog_underlay_tc", frame)
    assert r.verdict == TC_ACT_REDIRECT and r.drops == {}
    inner = rewritten(frame, dst=T.DB1.ip, dport=80)
    assert r.out.hex() == mesh_vxlan(inner, T.PEER_C, T.DB1.mac, outer_eth=frame[:ETH]).hex()


# --- forward path in tc: local backends, and everything without XDP -----------------------------------

def test_tc_delivers_to_a_local_backend(dp):
    """8081 -> LOCAL: web2 here, target port 8080: DNAT and straight into web2."""
    frame = outside(TCP(sport=50040, dport=8081, flags="S", seq=7))
    r = run(dp, "prog_underlay_tc", frame)
    assert r.verdict == TC_ACT_REDIRECT and r.drops == {}
    want = eth(T.WEB2.mac, GW_MAC) + rewritten(frame, dst=T.WEB2.ip, dport=8080)
    assert r.out.hex() == want.hex()
    assert_checksums_valid(r.out[ETH:])


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_tc_encapsulates_without_xdp(dp, proto):
    """The same packet XDP would have sent, built by tc (the outer Ethernet header is
    left for redirect_neigh to fill in)."""
    l4 = (TCP(sport=50050, dport=8080, flags="S") if proto == "tcp" else UDP(sport=50051, dport=5353) / PAYLOAD)
    frame = outside(l4)
    r = run(dp, "prog_underlay_tc", frame)
    assert r.verdict == TC_ACT_REDIRECT and r.drops == {}
    inner = rewritten(frame, dst=T.API1.ip, dport=80 if proto == "tcp" else 53)
    assert r.out.hex() == mesh_vxlan(inner, T.PEER_B, T.API1.mac, outer_eth=frame[:ETH]).hex()


# --- what is not the mesh's, and what it refuses ---------------------------------------------------

UNTOUCHED = [
    ("TCP to a port that is not published", outside(TCP(sport=50100, dport=22, flags="S"))),
    ("UDP to a port published only for TCP", outside(UDP(sport=50101, dport=8080) / PAYLOAD)),
    ("a published port on another address", outside(TCP(sport=50102, dport=8080, flags="S"), dst=T.PEER_B)),
    ("ICMP to the node", outside(ICMP() / PAYLOAD)),
]


@pytest.mark.parametrize("case", UNTOUCHED, ids=[c[0] for c in UNTOUCHED])
def test_not_the_mesh_is_untouched(dp, case):
    _, frame = case
    r = run(dp, "prog_underlay_xdp", frame)
    assert (r.verdict, r.out, r.drops) == (XDP_PASS, frame, {})
    r = run(dp, "prog_underlay_tc", frame)
    assert (r.verdict, r.out, r.drops) == (TC_ACT_OK, frame, {})


REFUSED = [
    ("a published port from an overlay address", outside(TCP(sport=50200, dport=8080, flags="S"), src=T.API1.ip),
     "MESH_OVERLAY_SOURCE"),
    ("a published service without backends", outside(TCP(sport=50201, dport=8083, flags="S")), "LB_NO_BACKEND"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
@pytest.mark.parametrize("prog", ["prog_underlay_xdp", "prog_underlay_tc"])
def test_refused(dp, case, prog):
    _, frame, reason = case
    r = run(dp, prog, frame)
    assert r.verdict == (XDP_DROP if prog == "prog_underlay_xdp" else TC_ACT_SHOT)
    assert r.drops == {reason: (1, len(frame))}


@pytest.mark.parametrize("prog", ["prog_underlay_xdp", "prog_underlay_tc"])
def test_backend_nowhere_yet_is_unknown_destination(dp, prog):
    """The mesh, too, goes where the backend's entry says: a local backend not plumbed
    yet (its entry's copy of the endpoint all zeros) drops the request, counted."""
    nowhere = backend_entry(T.ONE, T.API1, 1, where=Endpoint())
    with entry_replaced(dp.maps["xo_lb_backends"], LbBackendKey(service=T.ONE.id, index=1), nowhere):
        frame = outside(TCP(sport=50210, dport=8080, flags="S"))
        r = run(dp, prog, frame)
        assert r.verdict == (XDP_DROP if prog == "prog_underlay_xdp" else TC_ACT_SHOT)
        assert r.drops == {"UNKNOWN_DESTINATION": (1, len(frame))}
    assert run(dp, "prog_underlay_xdp", outside(TCP(sport=50211, dport=8080, flags="S"))).verdict == XDP_TX


def test_too_big_once_encapsulated(dp):
    """1500 bytes of IP from the client do not fit a 1500-byte underlay with 50 more."""
    frame = outside(UDP(sport=50300, dport=5353) / (b"b" * (1500 - 28)))
    for prog, verdict in (("prog_underlay_xdp", XDP_DROP), ("prog_underlay_tc", TC_ACT_SHOT)):
        r = run(dp, prog, frame)
        assert r.verdict == verdict and r.drops == {"MESH_TOO_BIG": (1, len(frame))}
    fits = outside(UDP(sport=50301, dport=5353) / (b"b" * (1450 - 28)))
    assert run(dp, "prog_underlay_xdp", fits).verdict == XDP_TX


# --- the backend's node: a mesh request in, the reply back to the node it came through ------------

def test_backend_node_delivers_and_sends_replies_back_to_the_ingress_node(dp):
    """Here as the backend's node: B sends a mesh request for web2 (a service backend:
    only a backend's packets are looked up as mesh replies) from an outside client.
    web2 gets it with the client's own address; web2's reply goes back to B in VXLAN."""
    inner = bytes(IP(src=CLIENT, dst=T.WEB2.ip) / TCP(sport=50400, dport=80, flags="S", seq=9))
    request = vxlan(inner=Ether(src=GW_MAC, dst=T.WEB2.mac) / IP(inner), udp_kw={"sport": 50400},
                    flags=0x09)
    r = run(dp, "prog_underlay_tc", request)
    assert r.verdict == TC_ACT_REDIRECT and r.drops == {}
    assert r.out.hex() == (eth(T.WEB2.mac, GW_MAC) + inner).hex()
    entry = dp.maps["xo_lb_ct"].get(CtKey(saddr=ip_be(T.WEB2.ip), daddr=ip_be(CLIENT), sport=port_be(80),
                                          dport=port_be(50400), proto=6, dir=CT_MESH))
    assert entry is not None and entry.vip == ip_be(T.PEER_B)

    reply = bytes(Ether(src=T.WEB2.mac, dst=GW_MAC) / IP(src=T.WEB2.ip, dst=CLIENT) /
                  TCP(sport=80, dport=50400, flags="SA", seq=500, ack=10))
    r = run(dp, "prog_endpoint", reply, T.WEB2.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.drops == {}
    want = mesh_vxlan(reply[ETH:], T.PEER_B, GW_MAC, outer_eth=reply[:ETH], inner_src_mac=T.WEB2.mac)
    assert r.out.hex() == want.hex()


def test_client_port_reused_through_another_node_replies_through_that_node(dp):
    """client:50450 went through this node to web2 (a local backend: a reply entry here);
    later the client uses the same port towards node B, whose Maglev sends it to web2 as
    well: web2's replies must now go back to B, not leave from this node's address."""
    run(dp, "prog_underlay_tc", outside(TCP(sport=50450, dport=8081, flags="S")))
    inner = bytes(IP(src=CLIENT, dst=T.WEB2.ip) / TCP(sport=50450, dport=8080, flags="S", seq=9))
    run(dp, "prog_underlay_tc", vxlan(inner=Ether(src=GW_MAC, dst=T.WEB2.mac) / IP(inner), flags=0x09))
    reply = bytes(Ether(src=T.WEB2.mac, dst=GW_MAC) / IP(src=T.WEB2.ip, dst=CLIENT) /
                  TCP(sport=8080, dport=50450, flags="SA", seq=500, ack=10))
    r = run(dp, "prog_endpoint", reply, T.WEB2.ifindex)
    assert r.verdict == TC_ACT_REDIRECT
    assert r.out.hex() == mesh_vxlan(reply[ETH:], T.PEER_B, GW_MAC, outer_eth=reply[:ETH],
                                     inner_src_mac=T.WEB2.mac).hex()


def test_mesh_traffic_counts_in_the_slots_its_entries_name(dp):
    """Each mesh path counts where the entries it used say, and nowhere else: XDP's and
    tc's encap to B (B's slot, from the backend's endpoint entry), tc's delivery to a
    local backend (its own), a request from B (not proven by the endpoint lookups: B's
    slot from xo_peers) and web2's reply back to B (B's slot from xo_peers)."""
    from bpfrun import endpoint_slot, peer_slot
    from test_bpf_programs import _all_slots, _moved
    B, web2 = ("xo_peer_stats", peer_slot(T.PEER_B)), ("xo_endpoint_stats", endpoint_slot(T.WEB2))

    def counted(prog, frame, verdict, ifindex=None):
        before = _all_slots(dp)
        assert run(dp, prog, frame, ifindex).verdict == verdict
        return _moved(before, _all_slots(dp))
    to_b = outside(TCP(sport=50700, dport=8080, flags="S"))
    assert counted("prog_underlay_xdp", to_b, XDP_TX) == {B: (1, len(to_b) + ENCAP, 0, 0)}
    to_b = outside(TCP(sport=50701, dport=8080, flags="S"))
    assert counted("prog_underlay_tc", to_b, TC_ACT_REDIRECT) == {B: (1, len(to_b) + ENCAP, 0, 0)}
    to_web2 = outside(TCP(sport=50702, dport=8081, flags="S"))
    assert counted("prog_underlay_tc", to_web2, TC_ACT_REDIRECT) == {web2: (0, 0, 1, len(to_web2))}
    inner = bytes(IP(src=CLIENT, dst=T.WEB2.ip) / TCP(sport=50703, dport=80, flags="S"))
    request = vxlan(inner=Ether(src=GW_MAC, dst=T.WEB2.mac) / IP(inner), flags=0x09)
    assert counted("prog_underlay_tc", request, TC_ACT_REDIRECT) == {
        B: (0, 0, 1, len(request)), web2: (0, 0, 1, len(request) - ENCAP)}
    reply = bytes(Ether(src=T.WEB2.mac, dst=GW_MAC) / IP(src=T.WEB2.ip, dst=CLIENT) /
                  TCP(sport=80, dport=50703, flags="SA"))
    assert counted("prog_endpoint", reply, TC_ACT_REDIRECT, T.WEB2.ifindex) == {
        B: (1, len(reply) + ENCAP, 0, 0), web2: (1, len(reply), 0, 0)}


def test_mesh_request_with_an_overlay_source_is_spoofed(dp):
    inner = Ether(src=GW_MAC, dst=T.WEB1.mac) / IP(src=T.DB1.ip, dst=T.WEB1.ip) / TCP(sport=50410, dport=80)
    frame = vxlan(inner=inner, flags=0x09)
    r = run(dp, "prog_underlay_tc", frame)
    assert r.verdict == TC_ACT_SHOT and r.drops == {"INNER_SPOOFED": (1, len(frame))}


def test_reply_to_an_outside_address_without_a_connection_is_no_route(dp):
    reply = bytes(Ether(src=T.WEB1.mac, dst=GW_MAC) / IP(src=T.WEB1.ip, dst=CLIENT) /
                  TCP(sport=80, dport=50499, flags="SA"))
    r = run(dp, "prog_endpoint", reply, T.WEB1.ifindex)
    assert r.verdict == TC_ACT_SHOT and r.drops == {"NO_ROUTE": (1, len(reply))}


# --- the ingress node: replies get the address the client talked to ----------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_reply_through_the_tunnel_leaves_from_the_published_port(dp, proto):
    """client -> A:8080 went to api1 on B; api1's reply comes back from B in VXLAN with
    the mesh flag, and leaves A for the client from A's IP and port 8080 (5353)."""
    sport = 50500 if proto == "tcp" else 50501
    out = (TCP(sport=sport, dport=8080, flags="S") if proto == "tcp" else UDP(sport=sport, dport=5353) / PAYLOAD)
    assert run(dp, "prog_underlay_xdp", outside(out)).verdict == XDP_TX
    back = (TCP(sport=80, dport=sport, flags="SA", seq=100, ack=1) if proto == "tcp"
            else UDP(sport=53, dport=sport) / b"answer")
    inner = Ether(src=T.API1.mac, dst=GW_MAC) / IP(src=T.API1.ip, dst=CLIENT) / back
    frame = vxlan(inner=inner, flags=0x09)
    r = run(dp, "prog_underlay_tc", frame)
    assert r.verdict == TC_ACT_REDIRECT and r.drops == {}
    plain = eth("00:00:00:00:00:00", GW_MAC) + frame[ETH + ENCAP:]
    want = plain[:ETH] + rewritten(plain, src=T.NODE_IP, sport=8080 if proto == "tcp" else 5353)
    assert r.out.hex() == want.hex()
    assert_checksums_valid(r.out[ETH:])


def test_local_backend_reply_leaves_from_the_published_port(dp):
    """client -> A:8081 went to web2:8080 here; web2's reply leaves A from A's IP:8081."""
    run(dp, "prog_underlay_tc", outside(TCP(sport=50600, dport=8081, flags="S")))
    reply = bytes(Ether(src=T.WEB2.mac, dst=GW_MAC) / IP(src=T.WEB2.ip, dst=CLIENT) /
                  TCP(sport=8080, dport=50600, flags="SA", seq=3, ack=1))
    r = run(dp, "prog_endpoint", reply, T.WEB2.ifindex)
    assert r.verdict == TC_ACT_REDIRECT and r.drops == {}
    assert r.out.hex() == (reply[:ETH] + rewritten(reply, src=T.NODE_IP, sport=8081)).hex()
    assert_checksums_valid(r.out[ETH:])


def test_mesh_reply_for_an_unknown_connection_is_dropped(dp):
    inner = Ether(src=T.API1.mac, dst=GW_MAC) / IP(src=T.API1.ip, dst=CLIENT) / TCP(sport=80, dport=50699)
    frame = vxlan(inner=inner, flags=0x09)
    r = run(dp, "prog_underlay_tc", frame)
    assert r.verdict == TC_ACT_SHOT and r.drops == {"MESH_NO_CONNECTION": (1, len(frame))}


# --- the node itself as the client: lo's program and the replies into lo -----------------------------

LO_MAC = "00:00:00:00:00:00"
MARK_MESH_REPLY = 0x786F6D72        # bpf/lib/mesh.h XO_MARK_MESH_REPLY


def from_node(l4, src=T.NODE_IP, dst=T.NODE_IP) -> bytes:
    """A frame the node's own stack sends itself, as lo's tc ingress sees it."""
    return bytes(Ether(src=LO_MAC, dst=LO_MAC) / IP(src=src, dst=dst) / l4)


def run_marked(dp, prog: str, frame: bytes, mark: int, ingress_ifindex: int = 0):
    """One run with skb->mark set: (verdict, frame out, mark as the program left it)."""
    from bpfrun import SkbCtx
    out_ctx = ctypes.create_string_buffer(256)      # the whole struct __sk_buff, or ENOSPC
    with netns.entered(dp.netns):
        verdict, out, _ = bpf.prog_test_run(dp.progs.fds[prog], frame,
                                            bytes(SkbCtx(mark=mark, ingress_ifindex=ingress_ifindex)),
                                            ctx_out=out_ctx)
    return verdict, out, SkbCtx.from_buffer_copy(out_ctx.raw[:ctypes.sizeof(SkbCtx)]).mark


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_loopback_sends_the_nodes_own_connection_through_the_mesh(dp, proto):
    """The node asking its own IP:8080 (5353/udp): the same choice, DNAT and VXLAN to api1's
    node as for an outside client, the node's address kept as the client's."""
    l4 = (TCP(sport=50800, dport=8080, flags="S") if proto == "tcp" else UDP(sport=50801, dport=5353) / PAYLOAD)
    frame = from_node(l4)
    r = run(dp, "prog_loopback", frame)
    assert r.verdict == TC_ACT_REDIRECT and r.drops == {}
    inner = rewritten(frame, dst=T.API1.ip, dport=80 if proto == "tcp" else 53)
    assert r.out.hex() == mesh_vxlan(inner, T.PEER_B, T.API1.mac, outer_eth=frame[:ETH]).hex()
    assert IP(r.out[ETH + ENCAP:]).src == T.NODE_IP


def test_loopback_delivers_to_a_local_backend(dp):
    frame = from_node(TCP(sport=50810, dport=8081, flags="S", seq=7))
    r = run(dp, "prog_loopback", frame)
    assert r.verdict == TC_ACT_REDIRECT and r.drops == {}
    assert r.out.hex() == (eth(T.WEB2.mac, GW_MAC) + rewritten(frame, dst=T.WEB2.ip, dport=8080)).hex()


LOCAL_TRAFFIC = [
    ("a port that is not published", from_node(TCP(sport=50820, dport=22, flags="S"))),
    ("127.0.0.1 to a published port (nftables makes it the node's IP first)",
     from_node(TCP(sport=50821, dport=8080, flags="S"), src="127.0.0.1", dst="127.0.0.1")),
    ("a published port on another local address", from_node(TCP(sport=50822, dport=8080, flags="S"),
                                                             src="10.99.0.1", dst="10.99.0.1")),
    ("ICMP to the node", from_node(ICMP() / PAYLOAD)),
]


@pytest.mark.parametrize("case", LOCAL_TRAFFIC, ids=[c[0] for c in LOCAL_TRAFFIC])
def test_loopback_leaves_the_nodes_other_traffic_alone(dp, case):
    _, frame = case
    r = run(dp, "prog_loopback", frame)
    assert (r.verdict, r.out, r.drops) == (TC_ACT_OK, frame, {})


def test_loopback_lets_a_marked_reply_through_even_to_a_published_port(dp):
    """A reply of ours, node:8080 -> node:8081 (the node's client happened to use a port
    that is published too): marked, it passes untouched and the mark is taken off;
    unmarked, the same frame is a request for 8081."""
    frame = from_node(TCP(sport=8080, dport=8081, flags="SA"))
    assert run_marked(dp, "prog_loopback", frame, MARK_MESH_REPLY) == (TC_ACT_OK, frame, 0)
    assert run_marked(dp, "prog_loopback", frame, 0)[0] == TC_ACT_REDIRECT


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_loopback_refusals_are_counted(dp, case):
    _, frame, reason = case
    local = eth(LO_MAC, LO_MAC) + frame[ETH:]
    r = run(dp, "prog_loopback", local)
    assert r.verdict == TC_ACT_SHOT and r.drops == {reason: (1, len(local))}


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_reply_through_the_tunnel_to_the_node_itself_enters_lo(dp, proto):
    """The node asked its own 8080 and api1 on B answered: the reply, decapsulated with
    its source put back to node:8080, goes into the node's stack through lo (a frame for
    lo's address, marked for lo's program), not out of the underlay."""
    sport = 50830 if proto == "tcp" else 50831
    out = (TCP(sport=sport, dport=8080, flags="S") if proto == "tcp" else UDP(sport=sport, dport=5353) / PAYLOAD)
    assert run(dp, "prog_loopback", from_node(out)).verdict == TC_ACT_REDIRECT
    back = (TCP(sport=80, dport=sport, flags="SA", seq=100, ack=1) if proto == "tcp"
            else UDP(sport=53, dport=sport) / b"answer")
    frame = vxlan(inner=Ether(src=T.API1.mac, dst=GW_MAC) / IP(src=T.API1.ip, dst=T.NODE_IP) / back, flags=0x09)
    verdict, got, mark = run_marked(dp, "prog_underlay_tc", frame, 0)
    assert (verdict, mark) == (TC_ACT_REDIRECT, MARK_MESH_REPLY)
    plain = eth(LO_MAC, GW_MAC) + frame[ETH + ENCAP:]
    assert got.hex() == (plain[:ETH] + rewritten(plain, src=T.NODE_IP, sport=8080 if proto == "tcp" else 5353)).hex()
    assert_checksums_valid(got[ETH:])


def test_local_backend_reply_to_the_node_itself_enters_lo(dp):
    run(dp, "prog_loopback", from_node(TCP(sport=50840, dport=8081, flags="S")))
    reply = bytes(Ether(src=T.WEB2.mac, dst=GW_MAC) / IP(src=T.WEB2.ip, dst=T.NODE_IP) /
                  TCP(sport=8080, dport=50840, flags="SA", seq=3, ack=1))
    verdict, got, mark = run_marked(dp, "prog_endpoint", reply, 0, T.WEB2.ifindex)
    assert (verdict, mark) == (TC_ACT_REDIRECT, MARK_MESH_REPLY)
    assert got.hex() == (eth(LO_MAC, T.WEB2.mac) + rewritten(reply, src=T.NODE_IP, sport=8081)).hex()


def test_every_mesh_drop_reason_is_covered():
    from xoverlay.maps.drops import REASONS
    covered = {"MESH_OVERLAY_SOURCE", "MESH_TOO_BIG", "MESH_NO_CONNECTION"}
    assert {r.name for r in REASONS.values() if r.name.startswith("MESH_")} == covered


# --- per-packet cost (a measurement, not a test): python tests/test_bpf_mesh.py [repeat] ----------

def _bench(repeat: int) -> None:
    with mesh_underlay() as (path, ifindex), mesh_datapath(path, ifindex) as dp:
        # Established connections (connection table hits): a first packet made each entry.
        run(dp, "prog_underlay_xdp", outside(TCP(sport=60001, dport=8080, flags="S")))
        run(dp, "prog_underlay_tc", outside(TCP(sport=60002, dport=8081, flags="S")))
        remote = outside(TCP(sport=60001, dport=8080, flags="A") / (b"x" * 64))
        local = outside(TCP(sport=60002, dport=8081, flags="A") / (b"x" * 64))
        other = outside(TCP(sport=60003, dport=22, flags="A") / (b"x" * 64))
        rows = [("XDP: remote backend, DNAT + VXLAN + XDP_TX", "prog_underlay_xdp", remote),
                ("tc: remote backend (XDP off), DNAT + VXLAN", "prog_underlay_tc", remote),
                ("XDP: local backend, choose and pass", "prog_underlay_xdp", local),
                ("tc: local backend, DNAT + redirect_peer", "prog_underlay_tc", local),
                ("XDP: not a published port", "prog_underlay_xdp", other),
                ("tc: not a published port", "prog_underlay_tc", other),
                ("lo: the node's other local traffic", "prog_loopback",
                 from_node(TCP(sport=60004, dport=5432, flags="A") / (b"x" * 64), src="127.0.0.1", dst="127.0.0.1"))]
        # These programs rewrite the packet, and a repeated run works on its own output
        # (after the first encap, the rest would measure "not for us"): one run per call,
        # the median of many.
        import statistics
        print(f"{'routing mesh path':<48} {'ns/packet':>10}   (BPF_PROG_TEST_RUN, median of {repeat} single runs)")
        for name, prog, frame in rows:
            ns = statistics.median(run(dp, prog, frame).ns for _ in range(repeat))
            print(f"{name:<48} {ns:>10.0f}")


if __name__ == "__main__":
    _bench(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
