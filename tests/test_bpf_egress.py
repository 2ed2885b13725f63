"""Egress in the endpoint program, as fixtures (the table style of test_bpf_programs.py,
on its cluster): with the node's masquerade in place (XO_CFG_EGRESS), a packet for
outside every overlay network goes, unchanged, into xo-gw's ingress (the node's stack
routes and masquerades it: docs/DESIGN.md, "Egress"); from an endpoint of an --internal
network it is dropped as EGRESS_INTERNAL; what is not a unicast address stays NO_ROUTE;
every overlay destination is decided as before, flag or no flag."""
from __future__ import annotations

import contextlib
import os

import pytest
from bpfrun import TC_ACT_REDIRECT, TC_ACT_SHOT, Topology as T, endpoint_entry, entry_replaced
from test_bpf_programs import (  # noqa: F401  (dp is the fixture)
    ENDPOINT,
    GW_IP,
    PAYLOAD,
    container,
    dp,
    endpoint_case,
    run_case,
)

from xoverlay.maps.layout import CFG_EGRESS, EP_NETWORK_INTERNAL, U32, LocalEndpoint, ip_be

pytest.importorskip("scapy")
from scapy.layers.inet import ICMP, IP, TCP, UDP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root"),
    pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning"),
]

CLIENT = "192.0.2.200"          # an outside host on the underlay
NODE = T.NODE_IP                # this node's own address: the stack delivers it locally


@pytest.fixture
def egress_on(dp):
    """The config's XO_CFG_EGRESS set for the test, as the agent sets it once its
    masquerade is in place."""
    cfg = dp.maps["xo_config"].get(U32(0))
    saved = cfg.flags
    cfg.flags |= CFG_EGRESS
    dp.maps["xo_config"].set(U32(0), cfg)
    try:
        yield dp
    finally:
        cfg.flags = saved
        dp.maps["xo_config"].set(U32(0), cfg)


@contextlib.contextmanager
def internal(dp, ep=T.WEB1):
    """`ep`'s network --internal for the with-block (its local entry's flag, as the agent
    writes it)."""
    entry = endpoint_entry(ep)
    value = LocalEndpoint(vni=ep.vni, ip=ip_be(ep.ip), mac=entry.mac, flags=entry.flags | EP_NETWORK_INTERNAL,
                          slot=entry.slot)
    with entry_replaced(dp.maps["xo_local_endpoints"], U32(ep.ifindex), value):
        yield


def to(dst, l4=None, ep=T.WEB1):
    return container(ep, dst, l4=l4)


_syn = TCP(sport=40000, dport=80, flags="S")
OUT = [
    # To the node's stack, unchanged: it routes, masquerades and de-NATs the replies.
    endpoint_case("egress: TCP SYN to an outside host", to(CLIENT, _syn), TC_ACT_REDIRECT),
    endpoint_case("egress: UDP to the internet", to("8.8.8.8", UDP(sport=40000, dport=53) / PAYLOAD),
                  TC_ACT_REDIRECT),
    endpoint_case("egress: ping to an outside host", to(CLIENT, ICMP() / PAYLOAD), TC_ACT_REDIRECT),
    endpoint_case("egress: ping to this node's own underlay address", to(NODE, ICMP() / PAYLOAD), TC_ACT_REDIRECT),
    endpoint_case("egress: to a peer node's underlay address", to(T.PEER_B, _syn), TC_ACT_REDIRECT),
    endpoint_case("egress: ICMP frag-needed the endpoint sends (path MTU of a connection from outside)",
                  to(CLIENT, ICMP(type=3, code=4, nexthopmtu=1400) / IP(src=CLIENT, dst=T.WEB1.ip) /
                     TCP(sport=80, dport=40000)), TC_ACT_REDIRECT),
    endpoint_case("egress: a fragment", bytes(Ether(src=T.WEB1.mac, dst="ee:ee:ee:ee:ee:ee") /
                                              IP(src=T.WEB1.ip, dst=CLIENT, flags="MF") / UDP() / PAYLOAD),
                  TC_ACT_REDIRECT),
    endpoint_case("egress: from another network's endpoint", to(CLIENT, _syn, ep=T.RED1), TC_ACT_REDIRECT,
                  ep=T.RED1),
    # Nowhere to go, with egress on: still NO_ROUTE.
    endpoint_case("drop: the gateway address, not DNS", to(GW_IP, ICMP() / PAYLOAD), TC_ACT_SHOT, drop="NO_ROUTE"),
    endpoint_case("drop: another link-local address", to("169.254.7.7", _syn), TC_ACT_SHOT, drop="NO_ROUTE"),
    endpoint_case("drop: loopback", to("127.0.0.1", _syn), TC_ACT_SHOT, drop="NO_ROUTE"),
    endpoint_case("drop: 0.0.0.0/8", to("0.1.2.3", _syn), TC_ACT_SHOT, drop="NO_ROUTE"),
    endpoint_case("drop: multicast", to("224.0.0.251", UDP(sport=5353, dport=5353) / PAYLOAD), TC_ACT_SHOT,
                  drop="NO_ROUTE"),
    endpoint_case("drop: limited broadcast", to("255.255.255.255", UDP(sport=68, dport=67) / PAYLOAD),
                  TC_ACT_SHOT, drop="NO_ROUTE"),
    endpoint_case("drop: reserved 240/4", to("240.0.0.1", _syn), TC_ACT_SHOT, drop="NO_ROUTE"),
]
# The overlay's own verdicts do not move with egress on: every row of the endpoint table
# but NO_ROUTE's (outside destinations, now above; the gateway's, above too).
OVERLAY = [c for c in ENDPOINT if c.drop != "NO_ROUTE"]


def _ids(cases):
    return [c.desc for c in cases]


@pytest.mark.parametrize("case", OUT, ids=_ids(OUT))
def test_egress(egress_on, case):
    run_case(egress_on, "prog_endpoint", case)


def test_egress_counts_what_the_endpoint_sent(egress_on):
    before = egress_on.endpoint_traffic(T.WEB1)
    frame = to(CLIENT, _syn)
    run_case(egress_on, "prog_endpoint", endpoint_case("egress", frame, TC_ACT_REDIRECT))
    after = egress_on.endpoint_traffic(T.WEB1)
    assert (after.tx_packets - before.tx_packets, after.tx_bytes - before.tx_bytes) == (1, len(frame))


@pytest.mark.parametrize("case", [c for c in OUT if c.verdict == TC_ACT_REDIRECT and c.ifindex == T.WEB1.ifindex],
                         ids=_ids([c for c in OUT if c.verdict == TC_ACT_REDIRECT and c.ifindex == T.WEB1.ifindex]))
def test_internal_network_gets_nothing_out(egress_on, case):
    """Everything that would leave, from an --internal network's endpoint: dropped and
    counted as EGRESS_INTERNAL."""
    with internal(egress_on):
        run_case(egress_on, "prog_endpoint",
                 endpoint_case(case.desc, case.frame, TC_ACT_SHOT, drop="EGRESS_INTERNAL"))


def test_internal_network_keeps_the_overlay_and_dns(egress_on):
    """--internal shuts the way out only: the network's own endpoints, local and remote,
    and DNS at the gateway are as before."""
    cases = [c for c in ENDPOINT if c.ifindex == T.WEB1.ifindex and c.verdict == TC_ACT_REDIRECT][:6]
    assert len(cases) >= 4
    with internal(egress_on):
        for case in cases:
            run_case(egress_on, "prog_endpoint", case)


def test_internal_without_egress_is_still_internal(dp):
    """With egress off the reason stays the network's: it would not leave anyway."""
    with internal(dp):
        run_case(dp, "prog_endpoint", endpoint_case("internal", to(CLIENT, _syn), TC_ACT_SHOT,
                                                    drop="EGRESS_INTERNAL"))


@pytest.mark.parametrize("case", OUT[:4], ids=_ids(OUT[:4]))
def test_without_egress_outside_is_no_route(dp, case):
    """No masquerade on the node (nftables missing, or the agent not there yet): dropped
    as before, NO_ROUTE (and the lint egress-off says why)."""
    run_case(dp, "prog_endpoint", endpoint_case(case.desc, case.frame, TC_ACT_SHOT, drop="NO_ROUTE"))


def test_without_xo_gw_outside_is_no_route(egress_on):
    cfg = egress_on.maps["xo_config"].get(U32(0))
    saved = cfg.gateway_ifindex
    cfg.gateway_ifindex = 0
    egress_on.maps["xo_config"].set(U32(0), cfg)
    try:
        run_case(egress_on, "prog_endpoint", endpoint_case("no xo-gw", to(CLIENT, _syn), TC_ACT_SHOT, drop="NO_ROUTE"))
    finally:
        cfg.gateway_ifindex = saved
        egress_on.maps["xo_config"].set(U32(0), cfg)


@pytest.mark.parametrize("case", OVERLAY, ids=_ids(OVERLAY))
def test_overlay_verdicts_unchanged_with_egress_on(egress_on, case):
    run_case(egress_on, "prog_endpoint", case)
