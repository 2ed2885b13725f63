"""Services in the data path, through BPF_PROG_TEST_RUN on the real programs (compiled,
pinned and filled as the agent does it; the Maglev tables built by xoverlay.core.maglev and pushed
by xoverlay.kernel.maglev_maps): DNAT, reverse NAT on both delivery paths, the connection table, draining,
removal, affinity and counters. Output frames are compared with what scapy builds, so
every IP, TCP and UDP checksum in them is checked independently of the kernel.

The services (bpfrun.Topology): ONE 10.10.255.254 (api1 on B; 80/tcp, 53/udp), LOCAL
10.10.255.253 (web2 here, target port 8080), MANY 10.10.255.252 and STICKY
10.10.255.251 (web2, api1, db1; STICKY with client-IP affinity), EMPTY 10.10.255.250.

The connection table persists through the module: every test uses its own source ports."""
from __future__ import annotations

import os
import struct

import pytest
from bpfrun import (
    GW_MAC,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    Datapath,
    Topology as T,
    backend_entry,
    backend_slot,
    checksum_problems,
    drop_delta,
    entry_replaced,
    service_table,
    write_service,
)

from xoverlay.core.maglev import flow_hash, slot_of
from xoverlay.kernel.maglev_maps import MaglevTables
from xoverlay.maps.layout import (
    CT_REPLY,
    CT_SERVICE,
    IPPROTO,
    U32,
    CtKey,
    Endpoint,
    EndpointKey,
    LbBackendKey,
    ip_be,
    port_be,
    sum_percpu,
)

pytest.importorskip("scapy")
from scapy.layers.inet import ICMP, IP, TCP, UDP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from test_bpf_programs import ENCAP, ETH, PAYLOAD, container, decapsulated, delivered, encapsulated, vxlan  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root"),
    pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning"),
]

EPS = {ep.ip: ep for ep in T.ENDPOINTS}


@pytest.fixture(scope="module")
def dp():
    with Datapath(f"pytest-lb-{os.getpid()}") as datapath:
        yield datapath


# --- expected packets, built by scapy ---------------------------------------------------------

def rewritten(frame: bytes, *, dst=None, dport=None, src=None, sport=None) -> bytes:
    """The IP packet of `frame` with addresses/ports changed and every checksum computed
    afresh by scapy (a UDP checksum of 0, "none", stays 0)."""
    ip = Ether(frame)[IP]
    l4 = ip.payload
    if dst:
        ip.dst = dst
    if src:
        ip.src = src
    if dport:
        l4.dport = dport
    if sport:
        l4.sport = sport
    del ip.chksum
    if not (isinstance(l4, UDP) and l4.chksum == 0):
        del l4.chksum
    return bytes(ip)


def assert_checksums_valid(ip_bytes: bytes) -> None:
    """scapy recomputes the IP and L4 checksums of the packet: they must be what it has."""
    problems = checksum_problems(ip_bytes)
    assert not problems, f"wrong checksums: {problems}"


def inner_ip(out: bytes) -> bytes:
    """The IP packet a frame carries: after the VXLAN headers if it is encapsulated."""
    ip = IP(out[ETH:])
    if ip.proto == 17 and ip.payload.dport == 4789:
        return out[ETH + ENCAP:]
    return out[ETH:]


def backend_of(r) -> object:
    assert r.verdict == TC_ACT_REDIRECT, f"verdict {r.verdict}"
    return EPS[IP(inner_ip(r.out)).dst]


def predicted(svc, src_ep, sport: int, dport: int = 80, proto: str = "tcp", table=None):
    h = flow_hash(ip_be(src_ep.ip), ip_be(svc.vip), port_be(sport), port_be(dport), IPPROTO[proto], svc.affinity)
    table = table or service_table(svc)
    index = table[slot_of(h, table[0])]
    return next(ep for ep, i, _ in svc.backends if i == index)


def syn(sport, dport=80, **kw):
    return TCP(sport=sport, dport=dport, flags="S", seq=1000, **kw)


def ack(sport, dport=80, data=PAYLOAD):
    return TCP(sport=sport, dport=dport, flags="PA", seq=1001, ack=5001) / data


def run(dp, frame, ep=T.WEB1, prog="prog_endpoint"):
    before = dp.drops()
    r = dp.run(prog, frame, ep.ifindex if prog == "prog_endpoint" else None)
    r.drops = drop_delta(before, dp.drops())
    return r


# --- DNAT: one flow in, the exact frame out ------------------------------------------------------

_syn_one = container(T.WEB1, T.ONE.vip, l4=syn(41001))
_udp_one = container(T.WEB1, T.ONE.vip, l4=UDP(sport=41002, dport=53) / PAYLOAD)
_udp_nocsum = container(T.WEB1, T.ONE.vip, l4=UDP(sport=41003, dport=53, chksum=0) / PAYLOAD)
_syn_local = container(T.WEB1, T.LOCAL.vip, l4=syn(41004))
_data_one = container(T.WEB1, T.ONE.vip, l4=TCP(sport=41005, dport=80, flags="PA", seq=7, ack=9) / PAYLOAD)

DNAT = [
    ("TCP SYN to a VIP: to the one backend on node B, VXLAN", _syn_one,
     encapsulated(T.WEB1, T.API1, T.BLUE_VNI, inner=rewritten(_syn_one, dst=T.API1.ip))),
    ("TCP data without a SYN starts a connection too (the table has none)", _data_one,
     encapsulated(T.WEB1, T.API1, T.BLUE_VNI, inner=rewritten(_data_one, dst=T.API1.ip))),
    ("UDP to a VIP", _udp_one,
     encapsulated(T.WEB1, T.API1, T.BLUE_VNI, inner=rewritten(_udp_one, dst=T.API1.ip))),
    ("UDP without a checksum keeps none", _udp_nocsum,
     encapsulated(T.WEB1, T.API1, T.BLUE_VNI, inner=rewritten(_udp_nocsum, dst=T.API1.ip))),
    ("TCP to a VIP with a local backend and a target port: delivered here", _syn_local,
     delivered(b"\0" * ETH + rewritten(_syn_local, dst=T.WEB2.ip, dport=8080), T.WEB2)),
]


@pytest.mark.parametrize("case", DNAT, ids=[c[0] for c in DNAT])
def test_dnat(dp, case):
    _, frame, expected = case
    r = run(dp, frame)
    assert r.verdict == TC_ACT_REDIRECT and r.drops == {}
    if callable(expected):
        expected(r.out, frame)
    else:
        assert r.out.hex() == expected.hex()
    assert_checksums_valid(inner_ip(r.out))


# --- what is not a service, and services that cannot serve ----------------------------------------

NOT_SERVED = [
    ("a VIP on a port the service does not have", container(T.WEB1, T.ONE.vip, l4=syn(41101, dport=81)),
     "UNKNOWN_DESTINATION"),
    ("a VIP's TCP port over UDP", container(T.WEB1, T.LOCAL.vip, l4=UDP(sport=41102, dport=80) / PAYLOAD),
     "UNKNOWN_DESTINATION"),
    ("ICMP to a VIP", container(T.WEB1, T.ONE.vip, l4=ICMP() / PAYLOAD), "UNKNOWN_DESTINATION"),
    ("a fragment to a VIP (no ports to balance on)",
     bytes(Ether(src=T.WEB1.mac, dst=GW_MAC) / IP(src=T.WEB1.ip, dst=T.ONE.vip, flags="MF") / syn(41103)),
     "UNKNOWN_DESTINATION"),
    ("a VIP of another network", container(T.RED1, T.ONE.vip, l4=syn(41104)), "OTHER_NETWORK"),
    ("a service without backends", container(T.WEB1, T.EMPTY.vip, l4=syn(41105)), "LB_NO_BACKEND"),
]


@pytest.mark.parametrize("case", NOT_SERVED, ids=[c[0] for c in NOT_SERVED])
def test_not_served(dp, case):
    _, frame, reason = case
    src = T.RED1 if IP(frame[ETH:]).src == T.RED1.ip else T.WEB1
    r = run(dp, frame, src)
    assert r.verdict == TC_ACT_SHOT
    assert r.drops == {reason: (1, len(frame))}


def test_non_service_traffic_is_untouched(dp):
    """Traffic between endpoints, also to a backend's own address and port, and replies
    with no connection behind them, pass byte for byte as before services existed."""
    direct = container(T.WEB1, T.WEB2.ip, l4=syn(41201, dport=8080))
    r = run(dp, direct)
    assert r.out == delivered(direct, T.WEB2) and r.drops == {}
    to_api = container(T.WEB1, T.API1.ip, l4=syn(41202))
    r = run(dp, to_api)
    encapsulated(T.WEB1, T.API1, T.BLUE_VNI)(r.out, to_api)
    stray = vxlan(inner=Ether(src=T.API1.mac, dst=T.WEB1.mac) / IP(src=T.API1.ip, dst=T.WEB1.ip) /
                  TCP(sport=80, dport=41203, flags="SA"))
    r = run(dp, stray, prog="prog_underlay_tc")
    assert r.out == decapsulated(stray, T.WEB1)


# --- reverse NAT, where replies are handed to the client ----------------------------------------

def test_reverse_nat_on_local_delivery(dp):
    """web1 -> LOCAL:80 goes to web2:8080; web2's reply reaches web1 from LOCAL:80."""
    run(dp, container(T.WEB1, T.LOCAL.vip, l4=syn(42001)))
    reply = container(T.WEB2, T.WEB1.ip, l4=TCP(sport=8080, dport=42001, flags="SA", seq=5000, ack=1001))
    r = run(dp, reply, T.WEB2)
    assert r.verdict == TC_ACT_REDIRECT and r.drops == {}
    want = delivered(b"\0" * ETH + rewritten(reply, src=T.LOCAL.vip, sport=80), T.WEB1)
    assert r.out.hex() == want.hex()
    assert_checksums_valid(r.out[ETH:])


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_reverse_nat_on_decap(dp, proto):
    """web1 -> ONE goes to api1 on B; api1's reply comes back through the tunnel and
    reaches web1 from ONE's VIP and port."""
    if proto == "tcp":
        out, back = syn(42002), TCP(sport=80, dport=42002, flags="SA", seq=5000, ack=1001)
    else:
        out, back = UDP(sport=42003, dport=53) / PAYLOAD, UDP(sport=53, dport=42003) / b"answer"
    assert backend_of(run(dp, container(T.WEB1, T.ONE.vip, l4=out))) == T.API1
    reply = vxlan(inner=Ether(src=T.API1.mac, dst=T.WEB1.mac) / IP(src=T.API1.ip, dst=T.WEB1.ip) / back)
    r = run(dp, reply, prog="prog_underlay_tc")
    assert r.verdict == TC_ACT_REDIRECT and r.drops == {}
    plain = decapsulated(reply, T.WEB1)
    want = plain[:ETH] + rewritten(plain, src=T.ONE.vip)
    assert r.out.hex() == want.hex()
    assert_checksums_valid(r.out[ETH:])


def _with_flags(dp, map_name: str, key, flags: int):
    """One endpoint entry with other flags, for the with-block."""
    entry = dp.maps[map_name].get(key)
    changed = type(entry).from_buffer_copy(entry)
    changed.flags = flags
    return entry_replaced(dp.maps[map_name], key, changed)


def test_service_lookups_only_where_the_flags_ask_for_them(dp):
    """Plain east-west traffic pays nothing for services: a client whose entry says its
    network has none is not balanced (the VIP is just an unknown address), and a reply
    from an endpoint not marked as a backend is not looked up for reverse NAT."""
    with _with_flags(dp, "xo_local_endpoints", U32(T.WEB1.ifindex), 0):
        frame = container(T.WEB1, T.ONE.vip, l4=syn(42201))
        r = run(dp, frame)
        assert r.verdict == TC_ACT_SHOT and r.drops == {"UNKNOWN_DESTINATION": (1, len(frame))}

    assert backend_of(run(dp, container(T.WEB1, T.ONE.vip, l4=syn(42202)))) == T.API1
    reply = vxlan(inner=Ether(src=T.API1.mac, dst=T.WEB1.mac) / IP(src=T.API1.ip, dst=T.WEB1.ip) /
                  TCP(sport=80, dport=42202, flags="SA"))
    with _with_flags(dp, "xo_endpoints", EndpointKey(vni=T.BLUE_VNI, ip=ip_be(T.API1.ip)), 0):
        assert run(dp, reply, prog="prog_underlay_tc").out == decapsulated(reply, T.WEB1)
    assert Ether(run(dp, reply, prog="prog_underlay_tc").out)[IP].src == T.ONE.vip


def test_backend_is_where_its_entry_says(dp):
    """A service packet goes where the backend's own entry says (the agent's copy of its
    endpoint's), with no second endpoint lookup: to the node it names, and nowhere (a
    local endpoint not plumbed yet) drops it, though xo_endpoints knows the address."""
    key = LbBackendKey(service=T.ONE.id, index=1)
    other = T.PEER_C if T.API1.node_ip == T.PEER_B else T.PEER_B
    moved = backend_entry(T.ONE, T.API1, 1)
    moved.where.node_ip = ip_be(other)
    with entry_replaced(dp.maps["xo_lb_backends"], key, moved):
        assert IP(run(dp, container(T.WEB1, T.ONE.vip, l4=syn(42301))).out[ETH:]).dst == other
    with entry_replaced(dp.maps["xo_lb_backends"], key, backend_entry(T.ONE, T.API1, 1, where=Endpoint())):
        frame = container(T.WEB1, T.ONE.vip, l4=syn(42302))
        r = run(dp, frame)
        assert r.verdict == TC_ACT_SHOT and r.drops == {"UNKNOWN_DESTINATION": (1, len(frame))}
    r = run(dp, container(T.WEB1, T.ONE.vip, l4=syn(42303)))
    assert backend_of(r) == T.API1 and IP(r.out[ETH:]).dst == T.API1.node_ip


def test_direct_connection_clears_an_old_reply_entry(dp):
    """A connection to the backend itself, from a source port an old service connection
    used, must not have its replies rewritten to the VIP."""
    run(dp, container(T.WEB1, T.LOCAL.vip, l4=syn(42101)))
    run(dp, container(T.WEB1, T.WEB2.ip, l4=syn(42101, dport=8080)))
    reply = container(T.WEB2, T.WEB1.ip, l4=TCP(sport=8080, dport=42101, flags="SA"))
    assert run(dp, reply, T.WEB2).out == delivered(reply, T.WEB1)


# --- Maglev: the data path picks what the table says ----------------------------------------------

def test_backend_choice_follows_the_table_and_spreads(dp):
    chosen = []
    for sport in range(43000, 43090):
        ep = backend_of(run(dp, container(T.WEB1, T.MANY.vip, l4=syn(sport))))
        assert ep == predicted(T.MANY, T.WEB1, sport)
        chosen.append(ep.name)
    counts = {name: chosen.count(name) for name in ("web2", "api1", "db1")}
    assert all(c >= 15 for c in counts.values()), counts     # 30 each expected


def test_udp_choice_follows_the_table(dp):
    for sport in range(43100, 43120):
        r = run(dp, container(T.WEB1, T.MANY.vip, l4=UDP(sport=sport, dport=53) / PAYLOAD))
        assert backend_of(r) == predicted(T.MANY, T.WEB1, sport, 53, "udp")
        assert_checksums_valid(inner_ip(r.out))


def test_a_client_that_is_a_backend_gets_another(dp):
    """web2 is one of MANY's backends: its own connections to MANY go to the others (it
    cannot talk to itself through a VIP), still spread, still as the table says for
    flows that do not hash to web2."""
    chosen = []
    for sport in range(43300, 43360):
        ep = backend_of(run(dp, container(T.WEB2, T.MANY.vip, l4=syn(sport)), T.WEB2))
        if predicted(T.MANY, T.WEB2, sport) != T.WEB2:
            assert ep == predicted(T.MANY, T.WEB2, sport)
        chosen.append(ep)
    assert T.WEB2 not in chosen and {T.API1, T.DB1} <= set(chosen)
    # Its own service, with itself as the only backend: nobody to serve it.
    frame = container(T.WEB2, T.LOCAL.vip, l4=syn(43400))
    r = run(dp, frame, T.WEB2)
    assert r.verdict == TC_ACT_SHOT and r.drops == {"LB_NO_BACKEND": (1, len(frame))}


def test_affinity_one_client_one_backend(dp):
    for client in (T.WEB1, T.WEB2):
        seen = {backend_of(run(dp, container(client, T.STICKY.vip, l4=syn(sport)), client))
                for sport in range(43200, 43230)}
        assert len(seen) == 1
        if predicted(T.STICKY, client, 0) != client:
            assert seen == {predicted(T.STICKY, client, 0)}
    # Without affinity the same 30 connections would not all land on one backend.
    assert len({predicted(T.MANY, T.WEB1, sport) for sport in range(43200, 43230)}) > 1


# --- the connection table across backend changes ---------------------------------------------------

def _ct(dp, src_ep, svc, sport, dport=80, proto="tcp"):
    return dp.maps["xo_lb_ct"].get(CtKey(saddr=ip_be(src_ep.ip), daddr=ip_be(svc.vip), sport=port_be(sport),
                                         dport=port_be(dport), proto=IPPROTO[proto], dir=CT_SERVICE))


def _set_backends(dp, svc, active, draining=(), removed=()):
    """What the agent does on `service update`: backend entries, then the new table."""
    for ep, index, _ in svc.backends:
        key = LbBackendKey(service=svc.id, index=index)
        if ep in removed:
            dp.maps["xo_lb_backends"].delete(key)
        elif ep in draining:
            dp.maps["xo_lb_backends"].set(key, backend_entry(svc, ep, index, draining=True))
    backends = tuple(b for b in svc.backends if b[0] in active)
    table = service_table(svc, backends)
    MaglevTables(dp.maps["xo_lb_maglev"]).set(svc.id, table)
    return table


@pytest.fixture
def many(dp):
    """MANY as bpfrun wrote it, again after the test (which changes its backends)."""
    yield T.MANY
    write_service(dp.maps, T.MANY)


def test_connection_stays_on_a_draining_backend_new_ones_do_not(dp, many):
    sport = next(p for p in range(44000, 44100) if predicted(T.MANY, T.WEB1, p) == T.DB1)
    first = run(dp, container(T.WEB1, T.MANY.vip, l4=syn(sport)))
    assert backend_of(first) == T.DB1
    assert _ct(dp, T.WEB1, T.MANY, sport).backend == 3

    table = _set_backends(dp, T.MANY, active=(T.WEB2, T.API1), draining=(T.DB1,))
    # The established connection: still db1 (the table no longer has it).
    assert backend_of(run(dp, container(T.WEB1, T.MANY.vip, l4=ack(sport)))) == T.DB1
    # New connections, including ones that used to hash to db1: never db1.
    moved = [p for p in range(44100, 44200) if predicted(T.MANY, T.WEB1, p) == T.DB1]
    assert moved
    for p in moved[:10] + list(range(44200, 44220)):
        ep = backend_of(run(dp, container(T.WEB1, T.MANY.vip, l4=syn(p))))
        assert ep != T.DB1 and ep == predicted(T.MANY, T.WEB1, p, table=table)
    # A SYN on the drained connection's own 5-tuple is a new connection: not db1 either.
    assert backend_of(run(dp, container(T.WEB1, T.MANY.vip, l4=syn(sport)))) != T.DB1


def test_connection_table_hit_after_a_backend_is_added(dp, many):
    """Flows keep their backend when a new one takes over some of the table."""
    _set_backends(dp, T.MANY, active=(T.WEB2, T.API1))
    flows = {p: backend_of(run(dp, container(T.WEB1, T.MANY.vip, l4=syn(p)))) for p in range(44300, 44360)}
    table = _set_backends(dp, T.MANY, active=(T.WEB2, T.API1, T.DB1))
    changed = [p for p in flows if predicted(T.MANY, T.WEB1, p, table=table) != flows[p]]
    assert changed, "the new table must move some of these flows"
    for p, ep in flows.items():
        assert backend_of(run(dp, container(T.WEB1, T.MANY.vip, l4=ack(p)))) == ep


def test_removed_backend_tcp_connection_is_reset(dp, many):
    sport = next(p for p in range(44400, 44500) if predicted(T.MANY, T.WEB1, p) == T.API1)
    assert backend_of(run(dp, container(T.WEB1, T.MANY.vip, l4=syn(sport)))) == T.API1
    _set_backends(dp, T.MANY, active=(T.WEB2, T.DB1), removed=(T.API1,))

    data = container(T.WEB1, T.MANY.vip, l4=TCP(sport=sport, dport=80, flags="PA", seq=1001, ack=5001) / PAYLOAD)
    r = run(dp, data)
    assert r.drops == {"LB_BACKEND_GONE": (1, len(data))}
    # The packet comes back to the client as a reset from the VIP.
    assert r.verdict == TC_ACT_REDIRECT
    eth, ip = Ether(r.out), Ether(r.out)[IP]
    assert (eth.dst, eth.src) == (T.WEB1.mac, GW_MAC)
    assert (ip.src, ip.dst, ip.ttl, ip.len, len(r.out)) == (T.MANY.vip, T.WEB1.ip, 64, 40, ETH + 40)
    tcp = ip[TCP]
    assert (tcp.sport, tcp.dport, str(tcp.flags), tcp.seq) == (80, sport, "R", 5001)
    assert_checksums_valid(r.out[ETH:])
    assert _ct(dp, T.WEB1, T.MANY, sport) is None

    # Without an ACK to echo, RFC 793's other form: RST|ACK acknowledging what was sent.
    sport2 = next(p for p in range(44500, 44600) if predicted(T.MANY, T.WEB1, p) == T.WEB2)
    run(dp, container(T.WEB1, T.MANY.vip, l4=syn(sport2)))
    _set_backends(dp, T.MANY, active=(T.DB1,), removed=(T.API1, T.WEB2))
    fin = container(T.WEB1, T.MANY.vip, l4=TCP(sport=sport2, dport=80, flags="F", seq=2000) / b"abc")
    r = run(dp, fin)
    tcp = Ether(r.out)[TCP]
    assert (str(tcp.flags), tcp.ack) == ("RA", 2000 + 3 + 1)
    assert_checksums_valid(r.out[ETH:])


def test_removed_backend_reset_from_the_client_is_not_answered(dp, many):
    sport = next(p for p in range(44700, 44800) if predicted(T.MANY, T.WEB1, p) == T.API1)
    run(dp, container(T.WEB1, T.MANY.vip, l4=syn(sport)))
    _set_backends(dp, T.MANY, active=(T.WEB2, T.DB1), removed=(T.API1,))
    rst = container(T.WEB1, T.MANY.vip, l4=TCP(sport=sport, dport=80, flags="R", seq=1001))
    r = run(dp, rst)
    assert r.verdict == TC_ACT_SHOT and r.drops == {"LB_BACKEND_GONE": (1, len(rst))}


def test_removed_backend_udp_flow_is_dropped_then_starts_over(dp, many):
    sport = next(p for p in range(44600, 44700) if predicted(T.MANY, T.WEB1, p, 53, "udp") == T.API1)
    pkt = container(T.WEB1, T.MANY.vip, l4=UDP(sport=sport, dport=53) / PAYLOAD)
    assert backend_of(run(dp, pkt)) == T.API1
    table = _set_backends(dp, T.MANY, active=(T.WEB2, T.DB1), removed=(T.API1,))
    r = run(dp, pkt)
    assert r.verdict == TC_ACT_SHOT and r.drops == {"LB_BACKEND_GONE": (1, len(pkt))}
    ep = backend_of(run(dp, pkt))
    assert ep != T.API1 and ep == predicted(T.MANY, T.WEB1, sport, 53, "udp", table=table)


def test_every_service_drop_reason_is_covered():
    from xoverlay.maps.drops import REASONS
    lb = {r.name for r in REASONS.values() if r.name.startswith("LB_")}
    covered = {reason for _, _, reason in NOT_SERVED} | {"LB_BACKEND_GONE"}
    assert lb - covered == {"LB_NAT_FAILED"}     # a kernel refusal: not provokable by a frame


# --- counters -------------------------------------------------------------------------------------

def test_counters_per_service_and_backend(dp):
    """At the service's id and its backend's slot; and no other slot moves (the sums over
    every slot move by as much)."""
    def total(name):
        every = [sum_percpu(v) for v in dp.maps[name].items().values()]
        return sum(x.packets for x in every), sum(x.bytes for x in every), sum(x.connections for x in every)

    def snap():
        s = dp.maps["xo_lb_service_stats"].get(U32(T.ONE.id))
        b = dp.maps["xo_lb_backend_stats"].get(U32(backend_slot(T.ONE.id, 1)))
        s, b = (sum_percpu(v) if v else None for v in (s, b))
        return ([(x.packets, x.bytes, x.connections) if x else (0, 0, 0) for x in (s, b)] +
                [total("xo_lb_service_stats"), total("xo_lb_backend_stats")])

    before = snap()
    first = container(T.WEB1, T.ONE.vip, l4=syn(45001))
    second = container(T.WEB1, T.ONE.vip, l4=ack(45001))
    run(dp, first)
    run(dp, second)
    after = snap()
    for b, a in zip(before, after):
        assert (a[0] - b[0], a[1] - b[1], a[2] - b[2]) == (2, len(first) + len(second), 1)


def test_reply_entry_written_for_the_backend_side(dp):
    run(dp, container(T.WEB1, T.LOCAL.vip, l4=syn(45101)))
    rev = dp.maps["xo_lb_ct"].get(CtKey(saddr=ip_be(T.WEB2.ip), daddr=ip_be(T.WEB1.ip), sport=port_be(8080),
                                        dport=port_be(45101), proto=6, dir=CT_REPLY))
    assert rev is not None and rev.vip == ip_be(T.LOCAL.vip) and rev.vport == port_be(80)
    assert struct.pack("<H", rev.vport) == (80).to_bytes(2, "big")
