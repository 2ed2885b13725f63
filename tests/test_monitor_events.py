"""What the data path tells `xoverlay monitor`, through BPF_PROG_TEST_RUN on the real
programs (the cluster of bpfrun.Topology, see test_bpf_programs.py):

  - every drop of every fixture table writes exactly one event while the monitor flag
    is set, with the drop's reason, hook, interface and length, and none while it is
    clear (the programs' verdicts are the same either way);
  - the event's addresses, ports, protocol and VNI are those of the frame: the
    container's packet on an endpoint veth; outer header, VNI and inner packet on the
    underlay;
  - forwarded packets are told only when the monitor asked for them, one in N;
  - a full ring buffer loses events, counted in xo_monitor.lost."""
from __future__ import annotations

import os
import socket

import pytest
from bpfrun import TC_ACT_REDIRECT, Datapath, Topology as T
from test_bpf_programs import (
    ENDPOINT,
    UNDERLAY_TC,
    UNDERLAY_XDP,
    _from_c,
    _ok,
    _web1_to_api1,
    _web1_to_web2,
    container,
    vxlan,
)

from xoverlay.kernel import bpf
from xoverlay.maps.drops import BY_NAME
from xoverlay.maps.layout import (
    EVF_IP,
    EVF_OUTER,
    EVF_PORTS,
    EVF_VNI,
    MON_DROPS,
    MON_FORWARDS,
    U32,
    Event,
    Monitor,
    ip_str,
)
from xoverlay.ui import monitor

pytest.importorskip("scapy")
from scapy.layers.inet import ICMP, TCP, UDP  # noqa: E402
from scapy.layers.l2 import ARP, Ether  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root"),
    pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning"),
]

HOOK = {"prog_endpoint": 1, "prog_underlay_tc": 2, "prog_underlay_xdp": 3}
PROGRAMS = [("prog_endpoint", c) for c in ENDPOINT] + [("prog_underlay_tc", c) for c in UNDERLAY_TC] + \
           [("prog_underlay_xdp", c) for c in UNDERLAY_XDP]
DROPS = [(prog, c) for prog, c in PROGRAMS if c.drop]


@pytest.fixture(scope="module")
def dp():
    datapath = Datapath(f"pytest-mon-{os.getpid()}")
    try:
        datapath.ring = bpf.RingBuffer(datapath.maps["xo_events"].fd)
        yield datapath
    finally:
        if getattr(datapath, "ring", None):
            datapath.ring.close()
        datapath.close()


def set_flag(dp, events: int, sample: int = 0) -> None:
    dp.maps["xo_monitor"].set(U32(0), Monitor(events=events, sample=sample, pid=os.getpid()))


def events_of(dp, prog: str, frame: bytes, ifindex=None, flag: int = MON_DROPS, sample: int = 0):
    """Run one frame with the flag as given; return (verdict, decoded events)."""
    dp.ring.drain()
    set_flag(dp, flag, sample)
    try:
        r = dp.run(prog, frame, ifindex)
    finally:
        set_flag(dp, 0)
    return r.verdict, [Event.from_buffer_copy(raw[:monitor.EVENT_SIZE]) for raw in dp.ring.drain()]


def _id(item):
    prog, case = item
    return f"{prog[5:]}: {case.desc}"


@pytest.mark.parametrize("item", DROPS, ids=[_id(i) for i in DROPS])
def test_every_drop_writes_one_event_when_the_flag_is_set(dp, item):
    prog, case = item
    verdict, events = events_of(dp, prog, case.frame, case.ifindex)
    assert verdict == case.verdict
    assert len(events) == 1, f"{case.desc}: {len(events)} events"
    ev = events[0]
    assert (ev.type, ev.hook, ev.reason) == (1, HOOK[prog], BY_NAME[case.drop].code)
    assert ev.len == len(case.frame)
    # Test runs: tc gets the ingress_ifindex we give (none: 0); XDP runs on loopback.
    assert ev.ifindex == (case.ifindex or (1 if prog == "prog_underlay_xdp" else 0))
    assert ev.ts_ns > 0


@pytest.mark.parametrize("item", PROGRAMS, ids=[_id(i) for i in PROGRAMS])
def test_no_event_at_all_while_the_flag_is_clear(dp, item):
    prog, case = item
    verdict, events = events_of(dp, prog, case.frame, case.ifindex, flag=0)
    assert verdict == case.verdict
    assert events == []


def _ev(dp, prog, frame, ifindex=None, flag=MON_DROPS):
    _, events = events_of(dp, prog, frame, ifindex, flag)
    assert len(events) == 1, events
    return events[0]


def _ports(ev):
    return socket.ntohs(ev.sport), socket.ntohs(ev.dport)


def test_endpoint_drop_event_carries_the_containers_packet(dp):
    frame = container(T.WEB1, "10.10.9.9", l4=UDP(sport=40000, dport=8080) / b"x")
    ev = _ev(dp, "prog_endpoint", frame, T.WEB1.ifindex)
    assert ev.flags == EVF_VNI | EVF_IP | EVF_PORTS
    assert ev.vni == T.BLUE_VNI, "the sender's network, from its veth"
    assert (ip_str(ev.saddr), ip_str(ev.daddr), ev.protocol) == (T.WEB1.ip, "10.10.9.9", 17)
    assert _ports(ev) == (40000, 8080)
    assert socket.ntohs(ev.ethertype) == 0x0800


def test_spoofed_source_event_shows_the_forged_address(dp):
    frame = container(T.WEB1, T.WEB2.ip, src_ip="10.10.1.99", l4=TCP(sport=1234, dport=443, flags="S"))
    ev = _ev(dp, "prog_endpoint", frame, T.WEB1.ifindex)
    assert (ip_str(ev.saddr), ip_str(ev.daddr), ev.protocol, _ports(ev)) == ("10.10.1.99", T.WEB2.ip, 6, (1234, 443))


def test_icmp_event_carries_type_and_code(dp):
    frame = container(T.WEB1, T.RED1.ip, l4=ICMP(type=8, code=0) / b"ping")
    ev = _ev(dp, "prog_endpoint", frame, T.WEB1.ifindex)
    assert ev.reason == BY_NAME["OTHER_NETWORK"].code
    assert (ev.protocol, _ports(ev)) == (1, (8, 0))


def test_non_ipv4_event_has_the_ethertype_and_no_addresses(dp):
    frame = bytes(Ether(src=T.WEB1.mac, dst="ff:ff:ff:ff:ff:ff") /
                  ARP(op="is-at", hwsrc=T.WEB1.mac, psrc=T.WEB1.ip, pdst=T.WEB2.ip))
    ev = _ev(dp, "prog_endpoint", frame, T.WEB1.ifindex)
    assert ev.reason == BY_NAME["ARP_NOT_ANSWERED"].code
    assert socket.ntohs(ev.ethertype) == 0x0806
    assert ev.flags == EVF_VNI and ev.saddr == ev.daddr == 0


def test_unknown_interface_event_has_no_network(dp):
    ev = _ev(dp, "prog_endpoint", _web1_to_web2, T.UNKNOWN_IFINDEX)
    assert ev.ifindex == T.UNKNOWN_IFINDEX
    assert not ev.flags & EVF_VNI and ev.flags & EVF_IP


@pytest.mark.parametrize("prog", ["prog_underlay_xdp", "prog_underlay_tc"])
def test_tunnel_drop_event_has_outer_vni_and_inner(dp, prog):
    ev = _ev(dp, prog, vxlan(outer_src=T.STRANGER))
    assert ev.reason == BY_NAME["UNKNOWN_PEER"].code
    assert ev.flags == EVF_OUTER | EVF_VNI | EVF_IP | EVF_PORTS
    assert (ip_str(ev.outer_saddr), ip_str(ev.outer_daddr)) == (T.STRANGER, T.NODE_IP)
    assert ev.vni == T.BLUE_VNI
    assert (ip_str(ev.saddr), ip_str(ev.daddr), ev.protocol, _ports(ev)) == (T.API1.ip, T.WEB1.ip, 17, (8080, 40000))


def test_unknown_vni_event_names_the_vni(dp):
    ev = _ev(dp, "prog_underlay_xdp", vxlan(vni=T.UNUSED_VNI))
    assert ev.reason == BY_NAME["UNKNOWN_VNI"].code and ev.vni == T.UNUSED_VNI


def test_inner_spoofed_event_shows_the_inner_source(dp):
    ev = _ev(dp, "prog_underlay_tc", vxlan(inner_src=T.DB1.ip))
    assert ev.reason == BY_NAME["INNER_SPOOFED"].code
    assert ip_str(ev.outer_saddr) == T.PEER_B and ip_str(ev.saddr) == T.DB1.ip


def test_malformed_outer_header_event_has_only_the_ethertype(dp):
    ev = _ev(dp, "prog_underlay_xdp", _ok[:14 + 12])
    assert ev.reason == BY_NAME["MALFORMED_IP"].code
    assert ev.flags == 0 and socket.ntohs(ev.ethertype) == 0x0800


# --- forwarded packets ---------------------------------------------------------------------

FORWARDS = [
    # program, frame, ingress ifindex, action, expected (outer src, outer dst) or None, inner (src, dst)
    ("prog_endpoint", _web1_to_web2, T.WEB1.ifindex, 1, None, (T.WEB1.ip, T.WEB2.ip)),
    ("prog_endpoint", _web1_to_api1, T.WEB1.ifindex, 2, (T.NODE_IP, T.PEER_B), (T.WEB1.ip, T.API1.ip)),
    ("prog_underlay_tc", _from_c, None, 3, (T.PEER_C, T.NODE_IP), (T.DB1.ip, T.WEB2.ip)),
]


@pytest.mark.parametrize("prog, frame, ifindex, action, outer, inner", FORWARDS, ids=["local", "encap", "decap"])
def test_forwarded_packet_event(dp, prog, frame, ifindex, action, outer, inner):
    verdict, events = events_of(dp, prog, frame, ifindex, flag=MON_DROPS | MON_FORWARDS)
    assert verdict == TC_ACT_REDIRECT
    assert len(events) == 1
    ev = events[0]
    assert (ev.type, ev.hook, ev.reason) == (2, HOOK[prog], action)
    assert ev.vni == T.BLUE_VNI
    if outer:
        assert (ip_str(ev.outer_saddr), ip_str(ev.outer_daddr)) == outer
    else:
        assert not ev.flags & EVF_OUTER
    assert (ip_str(ev.saddr), ip_str(ev.daddr)) == inner


@pytest.mark.parametrize("prog, frame, ifindex, action, outer, inner", FORWARDS, ids=["local", "encap", "decap"])
def test_forwarded_packets_are_not_told_when_only_drops_are_asked_for(dp, prog, frame, ifindex, action, outer,
                                                                         inner):
    verdict, events = events_of(dp, prog, frame, ifindex, flag=MON_DROPS)
    assert verdict == TC_ACT_REDIRECT and events == []


def test_an_answered_arp_is_told_as_a_forward_of_its_own(dp):
    """The reply as it leaves: ARP's ethertype, the sender's network, no IPv4 fields."""
    from xoverlay.maps.events import FWD_ACTIONS
    frame = bytes(Ether(src=T.WEB1.mac, dst="ff:ff:ff:ff:ff:ff") /
                  ARP(hwsrc=T.WEB1.mac, psrc=T.WEB1.ip, pdst=T.WEB2.ip))
    verdict, events = events_of(dp, "prog_endpoint", frame, T.WEB1.ifindex, flag=MON_DROPS | MON_FORWARDS)
    assert verdict == TC_ACT_REDIRECT and len(events) == 1
    ev = events[0]
    assert (ev.type, ev.hook, FWD_ACTIONS[ev.reason].name) == (2, HOOK["prog_endpoint"], "ARP")
    assert (socket.ntohs(ev.ethertype), ev.flags, ev.vni) == (0x0806, EVF_VNI, T.BLUE_VNI)
    assert (ev.ifindex, ev.len) == (T.WEB1.ifindex, len(frame))
    assert events_of(dp, "prog_endpoint", frame, T.WEB1.ifindex, flag=MON_DROPS) == (TC_ACT_REDIRECT, [])


def test_sampling_tells_about_one_in_n(dp):
    dp.ring.drain()
    set_flag(dp, MON_DROPS | MON_FORWARDS, sample=4)
    try:
        for _ in range(400):
            assert dp.run("prog_endpoint", _web1_to_web2, T.WEB1.ifindex).verdict == TC_ACT_REDIRECT
    finally:
        set_flag(dp, 0)
    told = len(dp.ring.drain())
    # Binomial(400, 1/4): mean 100, sd 8.7; outside 60..140 happens with p < 1e-5.
    assert 60 <= told <= 140, told


def test_a_full_ring_buffer_loses_events_and_counts_them(dp):
    dp.ring.drain()
    frame = container(T.WEB1, "10.10.9.9")
    set_flag(dp, MON_DROPS)
    try:
        r = dp.run("prog_endpoint", frame, T.WEB1.ifindex, repeat=6000)   # 6000 x 64 bytes > 256 KiB
    finally:
        lost = dp.maps["xo_monitor"].get(U32(0)).lost
        set_flag(dp, 0)
    read = len(dp.ring.drain())
    assert r.verdict == 2
    assert lost > 0 and read + lost == 6000, (read, lost)


# --- service drops (the cluster of test_bpf_services) ------------------------------------------

def test_service_drop_events_show_the_packet_as_the_client_sent_it(dp):
    """A VIP with no backend, and a connection whose backend was removed (answered with a
    TCP reset built from the very packet): the event shows client -> VIP, not the reset."""
    from bpfrun import write_service
    from scapy.layers.inet import TCP
    from test_bpf_services import NOT_SERVED, _set_backends, predicted, syn
    _, frame, reason = next(c for c in NOT_SERVED if c[2] == "LB_NO_BACKEND")
    ev = _ev(dp, "prog_endpoint", frame, T.WEB1.ifindex)
    assert ev.reason == BY_NAME["LB_NO_BACKEND"].code
    assert (ip_str(ev.saddr), ip_str(ev.daddr), _ports(ev)) == (T.WEB1.ip, T.EMPTY.vip, (41105, 80))

    sport = next(p for p in range(45000, 45100) if predicted(T.MANY, T.WEB1, p) == T.API1)
    assert dp.run("prog_endpoint", container(T.WEB1, T.MANY.vip, l4=syn(sport)), T.WEB1.ifindex).verdict == \
        TC_ACT_REDIRECT
    _set_backends(dp, T.MANY, active=(T.WEB2, T.DB1), removed=(T.API1,))
    try:
        data = container(T.WEB1, T.MANY.vip, l4=TCP(sport=sport, dport=80, flags="PA", seq=1, ack=1) / b"x")
        verdict, events = events_of(dp, "prog_endpoint", data, T.WEB1.ifindex)
    finally:
        write_service(dp.maps, T.MANY)
    assert verdict == TC_ACT_REDIRECT, "the reset goes back to the client"
    [ev] = events
    assert ev.reason == BY_NAME["LB_BACKEND_GONE"].code and ev.len == len(data)
    assert (ip_str(ev.saddr), ip_str(ev.daddr), _ports(ev)) == (T.WEB1.ip, T.MANY.vip, (sport, 80))


def test_new_service_connection_event_names_client_vip_and_backend(dp):
    """A SYN to a VIP is told (when the monitor asks for service connections) as client ->
    VIP with the backend chosen; the next packet of the connection is not a new one."""
    from test_bpf_services import ack, predicted, syn

    from xoverlay.maps.layout import EVF_XLATE, MON_SERVICES
    sport = next(p for p in range(45200, 45300) if predicted(T.MANY, T.WEB1, p) == T.API1)
    verdict, events = events_of(dp, "prog_endpoint", container(T.WEB1, T.MANY.vip, l4=syn(sport)),
                                T.WEB1.ifindex, flag=MON_SERVICES)
    assert verdict == TC_ACT_REDIRECT
    [ev] = events
    assert ev.type == 3 and ev.reason == T.MANY.id and ev.flags & EVF_XLATE
    assert (ip_str(ev.saddr), ip_str(ev.daddr), _ports(ev)) == (T.WEB1.ip, T.MANY.vip, (sport, 80))
    assert (ip_str(ev.xlate_daddr), socket.ntohs(ev.xlate_dport)) == (T.API1.ip, 80)
    _, again = events_of(dp, "prog_endpoint", container(T.WEB1, T.MANY.vip, l4=ack(sport)), T.WEB1.ifindex,
                         flag=MON_SERVICES)
    assert again == []
    _, drops_only = events_of(dp, "prog_endpoint", container(T.WEB1, T.MANY.vip, l4=syn(sport + 1)),
                              T.WEB1.ifindex, flag=MON_DROPS)
    assert drops_only == []
