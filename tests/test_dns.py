"""The DNS responder's policy (xoverlay/core/dns.py), as pure functions over a State: names, types,
suffixes, who may ask, what stays invisible, and the message-level rules."""
from __future__ import annotations

import ipaddress
import pathlib
import re
from dataclasses import dataclass, replace

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSHeader, DNSRecord
from hypothesis import given, settings, strategies as st

from xoverlay.core import dns, model
from xoverlay.core.model import State

# --- the cluster ----------------------------------------------------------------------


@dataclass(frozen=True)
class Svc:
    """Stand-in for model.Service: only what DNS reads (name, network, vip)."""
    name: str
    network: str
    vip: str


def cluster(with_red: bool = True) -> State:
    s = State()
    s = model.join_node(s, "n1", "192.0.2.11")
    s = model.join_node(s, "n2", "192.0.2.12")
    s = model.create_network(s, "demo", "10.10.0.0/16")
    s = model.add_endpoint(s, "web1", "demo", "n1", "/run/netns/web1", True)
    s = model.add_endpoint(s, "web2", "demo", "n2", "/run/netns/web2", True)
    s = model.add_endpoint(s, "Api.v2", "demo", "n2", "/run/netns/api", True)
    s = model.create_service(s, "websvc", "demo", ["80/tcp"], ["web2"])
    if with_red:
        s = model.create_network(s, "red", "10.20.0.0/16")
        s = model.add_endpoint(s, "red1", "red", "n1", "/run/netns/red1", True)
        s = model.add_endpoint(s, "red2", "red", "n2", "/run/netns/red2", True)
        s = model.create_service(s, "redsvc", "red", ["80/tcp"], ["red1"])
    return s


STATE = cluster()
VIEW = dns.build_view(STATE, "n1")
WEB1, WEB2 = STATE.endpoints["web1"].ip, STATE.endpoints["web2"].ip
RED1 = STATE.endpoints["red1"].ip


def query(name: str, qtype: str = "A", *, asker: str = WEB1, view=VIEW, forward: bool = True,
          tcp: bool = False, edns: int | None = None) -> dns.Decision:
    q = DNSRecord.question(name, qtype)
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    return dns.answer(view, asker, q.pack(), forward, tcp)


def reply(decision: dns.Decision) -> DNSRecord:
    assert decision.action == "answer", decision
    return DNSRecord.parse(decision.reply)


def addresses(decision: dns.Decision) -> list[str]:
    r = reply(decision)
    assert r.header.rcode == RCODE.NOERROR, RCODE.get(r.header.rcode)
    return [str(rr.rdata) for rr in r.rr if rr.rtype == QTYPE.A]


def rcode(decision: dns.Decision) -> str:
    return RCODE.get(reply(decision).header.rcode)


# --- endpoint names -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["web2", "web2.", "web2.demo", "web2.demo.", "web2.xoverlay",
                                  "web2.demo.xoverlay", "WEB2", "Web2.DeMo", "web2.DEMO.XOverlay."])
def test_endpoint_name_resolves_with_or_without_suffixes(name):
    assert addresses(query(name)) == [WEB2]


def test_a_reply_is_authoritative_short_lived_and_echoes_the_question():
    d = query("WeB2.demo")
    r = reply(d)
    assert r.header.aa == 1 and r.header.qr == 1 and r.header.ra == 1
    assert len(r.rr) == 1
    rr = r.rr[0]
    assert str(rr.rname) == "WeB2.demo." and rr.ttl == dns.TTL
    assert str(r.q.qname) == "WeB2.demo."


def test_an_endpoint_resolves_its_own_name_and_one_on_another_node():
    assert addresses(query("web1")) == [WEB1]
    assert addresses(query("web2")) == [WEB2]     # web2 lives on n2: the name is cluster-wide


def test_names_with_dots_and_capitals():
    ip = STATE.endpoints["Api.v2"].ip
    assert addresses(query("api.v2")) == [ip]
    assert addresses(query("API.V2.demo.xoverlay")) == [ip]


@pytest.mark.parametrize("qtype", ["AAAA", "MX", "TXT", "SRV", "CNAME"])
def test_other_types_of_a_name_that_exists_are_empty_noerror(qtype):
    """Not NXDOMAIN: a resolver asking AAAA first must not conclude the name is missing."""
    d = query("web2", qtype)
    r = reply(d)
    assert r.header.rcode == RCODE.NOERROR and r.rr == []


def test_any_gets_the_address():
    assert addresses(query("web2", "ANY")) == [WEB2]


@pytest.mark.parametrize("name", ["nosuch", "nosuch.demo", "nosuch.xoverlay", "nosuch.demo.xoverlay",
                                  "web2.nosuch.demo", "a.b.c.xoverlay"])
@pytest.mark.parametrize("qtype", ["A", "AAAA"])
def test_unknown_names_under_our_suffixes_are_nxdomain(name, qtype):
    assert rcode(query(name, qtype)) == "NXDOMAIN"


@pytest.mark.parametrize("name", ["demo", "xoverlay", "demo.xoverlay"])
def test_zone_apexes_exist_without_address(name):
    assert addresses(query(name)) == []


# --- services (the model gains them on the services branch) ---------------------------------

def test_service_name_resolves_to_its_vip_and_wins_over_an_endpoint_of_that_name():
    s = replace(STATE, services={
        "api": Svc("api", "demo", "10.10.255.10"),
        "web2": Svc("web2", "demo", "10.10.255.11"),
        "redsvc": Svc("redsvc", "red", "10.20.255.10"),
    })
    view = dns.build_view(s, "n1")
    assert addresses(query("api", view=view)) == ["10.10.255.10"]
    assert addresses(query("api.demo.xoverlay", view=view)) == ["10.10.255.10"]
    assert addresses(query("web2", view=view)) == ["10.10.255.11"]
    assert rcode(query("redsvc", view=view)) == "NXDOMAIN"
    assert addresses(query("redsvc", view=view, asker=RED1)) == ["10.20.255.10"]


def test_a_state_without_services_attribute_is_fine():
    from types import SimpleNamespace
    bare = SimpleNamespace(networks=STATE.networks, endpoints=STATE.endpoints)
    assert addresses(query("web2", view=dns.build_view(bare, "n1"))) == [WEB2]


def test_services_of_the_model():
    s = model.create_service(STATE, "api", "demo", ["80/tcp"], ["web2"])
    s = model.create_service(s, "redapi", "red", ["53/udp"], ["red2"])
    vip = s.services["api"].vip
    view = dns.build_view(s, "n1")
    assert addresses(query("api.demo.xoverlay", view=view)) == [vip]
    assert rcode(query("redapi", view=view)) == "NXDOMAIN"
    assert addresses(query("redapi.red", view=view, asker=RED1)) == [s.services["redapi"].vip]
    assert rcode(query("api", view=dns.build_view(model.remove_service(s, "api"), "n1"))) == "NXDOMAIN"


# --- other networks -------------------------------------------------------------------

def test_names_of_another_network_are_not_visible():
    assert rcode(query("red1")) == "NXDOMAIN"
    assert rcode(query("red1.red.xoverlay")) == "NXDOMAIN"
    assert query("red1.red").action == "forward"          # like any external name
    assert rcode(query("red1.red", forward=False)) == "REFUSED"
    # ... while red's own endpoints see them, and not demo's.
    assert addresses(query("red2", asker=RED1)) == [STATE.endpoints["red2"].ip]
    assert rcode(query("web1", asker=RED1)) == "NXDOMAIN"


_fragments = st.sampled_from(["red", "red1", "red2", "redsvc", "websvc", "demo", "web1", "web2", "xoverlay", "api", "v2",
                              "nosuch", "com", "", "RED1", "Red"])
_labels = st.one_of(_fragments, st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1,
                                         max_size=10))
_names = st.lists(_labels, min_size=1, max_size=5).map(".".join)


@given(name=_names, qtype=st.sampled_from(["A", "AAAA", "MX", "ANY"]), forward=st.booleans(),
       trailing=st.booleans())
@settings(max_examples=400, deadline=None)
def test_whether_another_network_exists_changes_no_answer(name, qtype, forward, trailing):
    """The strongest form of "not visible": a cluster with network red (its endpoints, its
    service) and one without it give demo's endpoints byte-identical answers for any name."""
    name = name + ("." if trailing else "")
    try:
        q = DNSRecord.question(name, qtype)
        wire = q.pack()
    except Exception:
        return              # not a name dnslib can encode: nothing to ask
    without = dns.build_view(cluster(with_red=False), "n1")
    a = dns.answer(VIEW, WEB1, wire, forward)
    b = dns.answer(without, WEB1, wire, forward)
    assert (a.action, a.reply) == (b.action, b.reply)


@given(name=_names)
@settings(max_examples=300, deadline=None)
def test_an_answer_never_carries_an_address_outside_the_asker_network(name):
    found = dns.lookup(VIEW, "demo", name)
    demo = ipaddress.IPv4Network(STATE.networks["demo"].subnet)
    assert all(ipaddress.IPv4Address(ip) in demo for ip in found.addresses)


# --- who may ask ------------------------------------------------------------------------

def test_only_endpoints_of_this_node_may_ask():
    assert rcode(query("web1", asker=WEB2)) == "REFUSED"         # an endpoint of n2
    assert rcode(query("web1", asker="192.0.2.11")) == "REFUSED"  # the node itself
    assert rcode(query("web1", asker="10.10.9.9")) == "REFUSED"
    assert addresses(query("web1", asker=WEB2, view=dns.build_view(STATE, "n2"))) == [WEB1]


def test_before_the_store_was_read_every_question_is_a_server_failure():
    """An agent that started while the store was unreachable has no view: it cannot tell
    its endpoints from strangers, so it fails (a resolver retries) rather than refuse."""
    blind = dns.View(loaded=False)
    for name in ("web1", "www.example.com"):
        assert rcode(query(name, view=blind)) == "SERVFAIL"
        assert rcode(query(name, view=blind, forward=False)) == "SERVFAIL"
    assert addresses(query("web2", view=VIEW)) != [] and rcode(query("web1", asker="10.10.9.9")) == "REFUSED"


def test_an_endpoint_being_removed_neither_resolves_nor_asks():
    s = model.mark_endpoint_removing(STATE, "web2")
    view = dns.build_view(s, "n2")
    assert rcode(query("web2", view=dns.build_view(s, "n1"))) == "NXDOMAIN"
    assert rcode(query("web1", asker=WEB2, view=view)) == "REFUSED"


def test_a_gone_endpoint_neither_resolves_nor_asks():
    s = model.mark_endpoint_gone(STATE, "web2", 1000.0)
    assert rcode(query("web2", view=dns.build_view(s, "n1"))) == "NXDOMAIN"
    assert rcode(query("web1", asker=WEB2, view=dns.build_view(s, "n2"))) == "REFUSED"


def test_endpoint_names_that_are_no_dns_names_are_skipped():
    s = model.add_endpoint(STATE, "odd.", "demo", "n1", "/run/netns/odd", True)
    s = model.add_endpoint(s, "a..b", "demo", "n1", "/run/netns/ab", True)
    view = dns.build_view(s, "n1")
    assert rcode(query("odd", view=view)) == "NXDOMAIN"
    assert query("a.b", view=view).action == "forward"      # not ours: a.b is no name of demo


# --- external names -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["example.com", "www.example.com.", "web2.example", "red1.red",
                                  "1.1.10.10.in-addr.arpa"])
def test_external_names_are_forwarded_or_refused(name):
    assert query(name).action == "forward"
    r = reply(query(name, forward=False))
    assert r.header.rcode == RCODE.REFUSED and r.header.ra == 0 and r.rr == []


def test_other_classes_are_not_ours():
    q = DNSRecord.question("web2", "TXT", "CH")
    assert dns.answer(VIEW, WEB1, q.pack(), True).action == "forward"


# --- messages -------------------------------------------------------------------------------

def test_responses_are_never_answered():
    r = DNSRecord.question("web2").reply()
    assert dns.answer(VIEW, WEB1, r.pack(), True).action == "drop"


def test_garbage_gets_formerr_or_nothing():
    assert dns.answer(VIEW, WEB1, b"\x12\x34", True).action == "drop"
    bad = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ab"    # question cut short
    d = dns.answer(VIEW, WEB1, bad, True)
    assert d.action == "answer"
    h = DNSHeader.parse(__import__("dnslib").buffer.Buffer(d.reply[:12]))
    assert h.id == 0x1234 and h.qr == 1 and h.rcode == RCODE.FORMERR


def test_notify_is_not_implemented_and_two_questions_are_formerr():
    q = DNSRecord.question("web2")
    q.header.opcode = 4
    assert rcode(dns.answer(VIEW, WEB1, q.pack(), True)) == "NOTIMP"
    q = DNSRecord.question("web2")
    q.add_question(DNSRecord.question("web1").q)
    assert rcode(dns.answer(VIEW, WEB1, q.pack(), True)) == "FORMERR"


def test_edns_is_answered_with_edns_and_unknown_versions_get_badvers():
    r = reply(query("web2", edns=4096))
    opt = [rr for rr in r.ar if rr.rtype == QTYPE.OPT]
    assert len(opt) == 1 and opt[0].rclass == dns.EDNS_PAYLOAD
    q = DNSRecord.question("web2")
    q.add_ar(EDNS0(udp_len=4096, version=1))
    r = DNSRecord.parse(dns.answer(VIEW, WEB1, q.pack(), True).reply)
    ext = [rr for rr in r.ar if rr.rtype == QTYPE.OPT][0].ttl >> 24
    assert (ext << 4) | r.header.rcode == dns.BADVERS and r.rr == []


def test_large_answers_are_truncated_over_udp_but_not_over_tcp():
    s = STATE
    name = "abcdefghij"
    variants = [
        "".join(c.upper() if (i >> k) & 1 else c for k, c in enumerate(name)) for i in range(40)]
    for i, v in enumerate(variants):
        s = model.add_endpoint(s, v, "demo", "n1", f"/run/netns/v{i}", True)
    view = dns.build_view(s, "n1")
    udp = reply(query(name, view=view))
    assert udp.header.tc == 1 and udp.rr == []
    big = reply(query(name, view=view, edns=4096))             # 1232 is enough for 40
    assert big.header.tc == 0 and len(big.rr) == 40
    tcp = reply(query(name, view=view, tcp=True))
    assert tcp.header.tc == 0 and len(tcp.rr) == 40


@given(st.binary(max_size=300))
@settings(max_examples=500, deadline=None)
def test_any_bytes_give_a_valid_reply_or_nothing(data):
    d = dns.answer(VIEW, WEB1, data, True)
    assert d.action in ("answer", "forward", "drop")
    if d.action == "answer":
        r = DNSRecord.parse(d.reply)
        assert r.header.qr == 1 and d.reply[:2] == data[:2]


@given(name=st.text(min_size=1, max_size=80))
@settings(max_examples=300, deadline=None)
def test_any_text_name_is_answered_or_forwarded(name):
    try:
        wire = DNSRecord.question(name).pack()
    except Exception:
        return
    d = dns.answer(VIEW, WEB1, wire, True)
    assert d.action in ("answer", "forward")
    if d.action == "answer":
        assert DNSRecord.parse(d.reply).header.rcode in (RCODE.NOERROR, RCODE.NXDOMAIN)


# --- the gateway address: one definition on each side --------------------------------------

def test_c_and_python_agree_on_the_gateway_address():
    common = (pathlib.Path(__file__).parent.parent / "bpf/lib/common.h").read_text()
    value = int(re.search(r"#define XO_GW_IP (0x[0-9a-f]+)", common).group(1), 16)
    assert str(ipaddress.IPv4Address(value)) == model.GATEWAY_IP


# --- the endpoint's resolv.conf ---------------------------------------------------------------

def test_resolv_conf_for_a_named_netns_written_and_removed(tmp_path):
    from xoverlay.kernel import resolvconf
    ep = STATE.endpoints["web1"]
    assert resolvconf.write(ep, str(tmp_path)) is True
    path = tmp_path / "web1" / "resolv.conf"
    text = path.read_text()
    assert text.startswith(resolvconf.MARKER) and f"nameserver {model.GATEWAY_IP}\n" in text
    assert [l for l in text.splitlines() if not l.startswith("#")] == [f"nameserver {model.GATEWAY_IP}"]
    assert resolvconf.write(ep, str(tmp_path)) is True          # ours: rewritten
    resolvconf.remove(ep, str(tmp_path))
    assert not (tmp_path / "web1").exists()


def test_resolv_conf_of_someone_else_is_left_alone(tmp_path):
    from xoverlay.kernel import resolvconf
    ep = STATE.endpoints["web1"]
    (tmp_path / "web1").mkdir()
    theirs = tmp_path / "web1" / "resolv.conf"
    theirs.write_text("nameserver 10.0.0.2\n")
    (tmp_path / "web1" / "hosts").write_text("")
    assert resolvconf.write(ep, str(tmp_path)) is False
    resolvconf.remove(ep, str(tmp_path))
    assert theirs.read_text() == "nameserver 10.0.0.2\n"
    # ... and a directory holding other files survives the removal of ours.
    theirs.unlink()
    resolvconf.write(ep, str(tmp_path))
    resolvconf.remove(ep, str(tmp_path))
    assert not theirs.exists() and (tmp_path / "web1" / "hosts").exists()


def test_resolv_conf_needs_a_netns_name(tmp_path):
    from xoverlay.kernel import resolvconf
    ep = replace(STATE.endpoints["web1"], netns="/proc/4242/ns/net")
    assert resolvconf.netns_name(ep.netns) is None
    assert resolvconf.write(ep, str(tmp_path)) is False and list(tmp_path.iterdir()) == []
    assert resolvconf.netns_name("/run/netns/web1") == "web1"


def test_resolv_conf_that_cannot_be_written_is_an_error(tmp_path):
    from xoverlay.errors import XoError
    from xoverlay.kernel import resolvconf
    (tmp_path / "blocked").write_text("a file where a directory should be")
    with pytest.raises(XoError, match="endpoint web1: cannot write"):
        resolvconf.write(STATE.endpoints["web1"], str(tmp_path / "blocked"))
