"""The DNS responder's sockets (xoverlay/agent/dns_responder.py) on real ones, without the lab: a namespace
plays the node (the gateway address on its loopback, as the agent puts it, plus an
endpoint address to ask from), another one the node's upstream resolver (a tiny dnslib
server), joined by a veth. The responder and the upstream run as threads of this
process, inside their namespaces (threads inherit the namespace of the thread that starts
them; sockets keep theirs)."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
import uuid

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from xoverlay.agent import dns_responder
from xoverlay.core import model
from xoverlay.core.model import GATEWAY_IP, State
from xoverlay.errors import XoError
from xoverlay.kernel import gateway, netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

NODE_IP, UPSTREAM_IP, NOBODY_IP = "198.51.100.1", "198.51.100.2", "198.51.100.3"


def cluster() -> State:
    s = State()
    s = model.join_node(s, "n1", "192.0.2.11")
    s = model.join_node(s, "n2", "192.0.2.12")
    s = model.create_network(s, "demo", "10.10.0.0/16")
    s = model.add_endpoint(s, "web1", "demo", "n1", "/run/netns/web1", True, ip="10.10.0.1")
    s = model.add_endpoint(s, "web2", "demo", "n2", "/run/netns/web2", True, ip="10.10.1.1")
    return s


class Upstream(BaseResolver):
    """example.com and below: 203.0.113.7; big.example.com: 60 addresses (too many for
    512 bytes of UDP). Remembers how each query came (udp/tcp)."""
    def __init__(self):
        self.seen = []

    def resolve(self, request, handler):
        self.seen.append((str(request.q.qname), handler.protocol))
        reply = request.reply()
        name = str(request.q.qname).lower()
        if name == "big.example.com.":
            for i in range(60):
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(f"203.0.113.{i + 1}"), ttl=60))
        elif name.endswith("example.com."):
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("203.0.113.7"), ttl=60))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class PlainUdpHandler(DNSHandler):
    udplen = 512            # truncate UDP replies as a resolver without EDNS must


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def net():
    """The node and upstream namespaces; removed at the end whatever happens."""
    tag = uuid.uuid4().hex[:6]
    node, up = f"xodns-{tag}-node", f"xodns-{tag}-up"
    servers = []
    try:
        _ip("netns", "add", node)
        _ip("netns", "add", up)
        _ip("-n", node, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", up)
        for ns, addr in ((node, NODE_IP), (up, UPSTREAM_IP)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        # The asking endpoints' addresses, local here so that a client can send from them.
        for addr in ("10.10.0.1", "10.10.1.1", "10.10.9.9"):
            _ip("-n", node, "addr", "add", f"{addr}/32", "dev", "lo")
        with netns.iproute(f"/run/netns/{node}") as ipr:
            gateway.ensure_gateway(ipr)
        resolver = Upstream()
        quiet = DNSLogger("-recv,-send,-request,-reply,-truncated,-error,-data", logf=lambda s: None)
        with netns.entered(f"/run/netns/{up}"):
            for tcp in (False, True):
                s = DNSServer(resolver, address=UPSTREAM_IP, port=53, tcp=tcp, logger=quiet,
                              handler=PlainUdpHandler)
                s.start_thread()
                servers.append(s)
        yield Net(f"/run/netns/{node}", resolver)
    finally:
        for s in servers:
            s.stop()
            s.server.server_close()
        for ns in (node, up):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


class Net:
    def __init__(self, node_path, upstream):
        self.node = node_path
        self.upstream = upstream
        self.responders = []

    def responder(self, port=53, **kw) -> dns_responder.DnsServer:
        kw.setdefault("upstreams", [(UPSTREAM_IP, 53)])
        kw.setdefault("timeout", 0.5)
        with netns.entered(self.node):
            r = dns_responder.DnsServer("n1", port=port, **kw)
            r.set_state(cluster())
            r.start()
        self.responders.append(r)
        return r

    def sock(self, kind, src):
        with netns.entered(self.node):
            s = socket.socket(socket.AF_INET, kind)
        s.settimeout(5)
        s.bind((src, 0))
        return s

    def ask(self, name, qtype="A", *, src="10.10.0.1", port=53) -> DNSRecord:
        q = DNSRecord.question(name, qtype)
        with self.sock(socket.SOCK_DGRAM, src) as s:
            s.sendto(q.pack(), (GATEWAY_IP, port))
            r = DNSRecord.parse(s.recv(65535))
        assert r.header.id == q.header.id
        return r

    def ask_tcp(self, *names, src="10.10.0.1", port=53) -> list[DNSRecord]:
        """All queries on one connection, written before any answer is read."""
        qs = [DNSRecord.question(n) for n in names]
        out = []
        with self.sock(socket.SOCK_STREAM, src) as s:
            s.connect((GATEWAY_IP, port))
            s.sendall(b"".join(struct.pack("!H", len(q.pack())) + q.pack() for q in qs))
            for q in qs:
                n = struct.unpack("!H", dns_responder.recv_exact(s, 2))[0]
                r = DNSRecord.parse(dns_responder.recv_exact(s, n))
                assert r.header.id == q.header.id
                out.append(r)
        return out


@pytest.fixture
def dnsnet(net):
    try:
        yield net
    finally:
        for r in net.responders:
            r.stop()


def addrs(r: DNSRecord) -> list[str]:
    assert r.header.rcode == RCODE.NOERROR, RCODE.get(r.header.rcode)
    return [str(rr.rdata) for rr in r.rr]


# --- names of the network -------------------------------------------------------------------

def test_udp_answers_the_network_names(dnsnet):
    dnsnet.responder()
    assert addrs(dnsnet.ask("web2")) == ["10.10.1.1"]
    assert addrs(dnsnet.ask("web2.demo.xoverlay")) == ["10.10.1.1"]
    assert dnsnet.ask("nosuch").header.rcode == RCODE.NXDOMAIN
    assert dnsnet.ask("web2", "AAAA").header.rcode == RCODE.NOERROR
    assert dnsnet.upstream.seen == []          # none of that went upstream


def test_tcp_answers_several_queries_on_one_connection(dnsnet):
    dnsnet.responder()
    a, b, c = dnsnet.ask_tcp("web1", "web2.demo", "nosuch.demo")
    assert addrs(a) == ["10.10.0.1"] and addrs(b) == ["10.10.1.1"]
    assert c.header.rcode == RCODE.NXDOMAIN


def test_only_endpoints_of_this_node_are_answered(dnsnet):
    dnsnet.responder()
    assert dnsnet.ask("web1", src="10.10.1.1").header.rcode == RCODE.REFUSED     # web2 is on n2
    assert dnsnet.ask("web1", src="10.10.9.9").header.rcode == RCODE.REFUSED


def test_a_new_store_view_is_used_at_once(dnsnet):
    r = dnsnet.responder()
    assert dnsnet.ask("web3").header.rcode == RCODE.NXDOMAIN
    s = model.add_endpoint(cluster(), "web3", "demo", "n2", "/run/netns/web3", True, ip="10.10.1.9")
    r.set_state(s, generation=7)
    assert addrs(dnsnet.ask("web3")) == ["10.10.1.9"]
    r.set_state(cluster(), generation=7)        # same generation: not rebuilt
    assert addrs(dnsnet.ask("web3")) == ["10.10.1.9"]


# --- forwarding ------------------------------------------------------------------------------

def test_external_names_are_forwarded_over_the_clients_transport(dnsnet):
    dnsnet.responder()
    assert addrs(dnsnet.ask("www.example.com")) == ["203.0.113.7"]
    (r,) = dnsnet.ask_tcp("mail.example.com")
    assert addrs(r) == ["203.0.113.7"]
    assert dnsnet.ask("nothing.invalid").header.rcode == RCODE.NXDOMAIN     # the upstream's answer
    assert dnsnet.upstream.seen == [("www.example.com.", "udp"), ("mail.example.com.", "tcp"),
                                     ("nothing.invalid.", "udp")]


def test_a_truncated_upstream_answer_passes_through_and_tcp_gets_it_all(dnsnet):
    dnsnet.responder()
    udp = dnsnet.ask("big.example.com")
    assert udp.header.tc == 1
    (tcp,) = dnsnet.ask_tcp("big.example.com")
    assert tcp.header.tc == 0 and len(addrs(tcp)) == 60


def test_refuse_mode_refuses_external_names_and_still_answers_ours(dnsnet):
    dnsnet.responder(forward=False)
    r = dnsnet.ask("www.example.com")
    assert r.header.rcode == RCODE.REFUSED and r.header.ra == 0
    assert addrs(dnsnet.ask("web2")) == ["10.10.1.1"]
    assert dnsnet.upstream.seen == []


def test_no_upstream_answering_gives_servfail_in_time(dnsnet):
    dnsnet.responder(upstreams=[(NOBODY_IP, 53), (NOBODY_IP, 5353)], timeout=0.3)
    t0 = time.monotonic()
    assert dnsnet.ask("www.example.com").header.rcode == RCODE.SERVFAIL
    assert time.monotonic() - t0 < 2
    (r,) = dnsnet.ask_tcp("www.example.com")
    assert r.header.rcode == RCODE.SERVFAIL


def test_second_upstream_is_tried_when_the_first_fails(dnsnet):
    dnsnet.responder(upstreams=[(NOBODY_IP, 53), (UPSTREAM_IP, 53)], timeout=0.3)
    assert addrs(dnsnet.ask("www.example.com")) == ["203.0.113.7"]


def test_upstreams_come_from_resolv_conf_and_follow_its_changes(dnsnet, tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"# a comment\nsearch example.org\nnameserver {GATEWAY_IP}\nnameserver {NOBODY_IP}\n")
    dnsnet.responder(upstreams=None, resolv_conf=str(conf), timeout=0.3)
    assert dnsnet.ask("www.example.com").header.rcode == RCODE.SERVFAIL
    conf.write_text(f"nameserver {UPSTREAM_IP}  # the new one\n")
    assert addrs(dnsnet.ask("www.example.com")) == ["203.0.113.7"]


# --- life ----------------------------------------------------------------------------------

def test_a_second_responder_on_the_same_address_is_refused_and_stop_frees_it(dnsnet):
    first = dnsnet.responder()
    with pytest.raises(XoError, match="cannot listen on 169.254.1.1:53"):
        dnsnet.responder()
    first.stop()
    dnsnet.responders.remove(first)
    dnsnet.responder()
    assert addrs(dnsnet.ask("web2")) == ["10.10.1.1"]


# --- pure helpers ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [("10.0.0.2", ("10.0.0.2", 53)), ("10.0.0.2:5353", ("10.0.0.2", 5353)),
                                       ("fd00::1", ("fd00::1", 53)), ("[fd00::1]:5353", ("fd00::1", 5353)),
                                       ("[fd00::1]", ("fd00::1", 53))])
def test_parse_upstream(text, want):
    assert dns_responder.parse_upstream(text) == want


@pytest.mark.parametrize("text", ["dns.example", "10.0.0.2:0", "10.0.0.2:x", "[fd00::1]5353", "10.0.0.256"])
def test_parse_upstream_refuses(text):
    with pytest.raises(XoError):
        dns_responder.parse_upstream(text)


def test_nameservers_of_a_resolv_conf():
    text = ("; comment\nnameserver 10.0.0.2\nnameserver  fe80::1%eth0 \nnameserver fd00::53\nnameserver bogus\n"
            f"nameserver {GATEWAY_IP}\noptions ndots:2\n#nameserver 10.9.9.9\n")
    assert dns_responder.nameservers(text) == [("10.0.0.2", 53), ("fd00::53", 53)]
