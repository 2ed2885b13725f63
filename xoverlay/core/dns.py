"""Service discovery: what a node's DNS responder answers. Pure: the cluster State and a
query in, the reply (or "forward it") out. The sockets are in xoverlay/agent/dns_responder.py; the rules are
explained for users in docs/DNS.md.

Who asks: an endpoint of this node, known by its source address (the data path has
already checked that a container sends only from its own address). Anyone else is
refused. What it may see: the names of its own network, nothing else.

A name N of the asker's network NET (an endpoint, or a service once they exist)
resolves, case-insensitively, as any of

    N    N.NET    N.xoverlay    N.NET.xoverlay

to the endpoint's address or the service's VIP (a service wins over an endpoint of the
same name). Only A records: any other type of a name that exists gets an empty NOERROR
answer (NODATA), so that a resolver asking AAAA first does not conclude the name is
missing. A name that does not exist but is ours (a single label, under .NET, or under
.xoverlay) is NXDOMAIN. Everything else is forwarded to the node's resolvers, or
REFUSED when the responder runs with forwarding off.

Names of other networks are never visible: they are not in the asker's table, and a
query for `web.OTHER` is an external name like any other, forwarded or refused exactly as
if OTHER did not exist, so the answer does not even tell that another network exists.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSError, DNSHeader, DNSRecord
from dnslib.buffer import Buffer

from xoverlay.core.model import endpoint_live

CLUSTER_DOMAIN = "xoverlay"
TTL = 10                     # seconds: endpoints come and go; containers rarely cache
EDNS_PAYLOAD = 1232          # the UDP size we advertise (DNS flag day 2020)
PLAIN_UDP_PAYLOAD = 512      # without EDNS
CLASS_IN, CLASS_ANY = 1, 255
OPCODE_QUERY = 0
BADVERS = 16                 # an extended RCODE (RFC 6891): low 4 bits in the header, the rest in OPT

Labels = tuple  # of lowercase bytes


def labels_of(name: str) -> Labels | None:
    """A store name as DNS labels, or None if it cannot be a DNS name (an empty label,
    as in 'a..b' or 'a.'; a label over 63 bytes)."""
    parts = tuple(name.encode().lower().split(b"."))
    if any(not p or len(p) > 63 for p in parts):
        return None
    return parts


@dataclass(frozen=True)
class View:
    """What one node's responder answers from: built once per store change."""
    askers: dict = field(default_factory=dict)     # local endpoint IP -> its network
    names: dict = field(default_factory=dict)      # network -> {labels: (address, ...)}
    suffixes: dict = field(default_factory=dict)   # network -> its name as labels
    domain: Labels = (CLUSTER_DOMAIN.encode(),)
    loaded: bool = True        # False until the store was read: nobody is known to ask yet


def build_view(state, node: str | None, domain: str = CLUSTER_DOMAIN) -> View:
    """The names of every network, and which network each endpoint of `node` is in.
    Services come from `state.services` (name, network, vip) when the model has them."""
    askers, names, suffixes = {}, {}, {}
    for net in state.networks:
        names[net] = {}
        suffixes[net] = labels_of(net)
    # Endpoints first, services after: a service overwrites an endpoint of its name.
    records = [(name, e.network, e.ip) for e in state.endpoints.values() if endpoint_live(e)
               for name in (e.name, *e.aliases)]
    records.sort()
    endpoints = {}
    for name, network, ip in records:
        key = labels_of(name)
        if network in names and key:
            # An alias may be several endpoints' (a container name on two nodes), and DNS is
            # case-insensitive ("Web" and "web"): a name answers with every address it has.
            endpoints.setdefault((network, key), []).append(ip)
    for (network, key), ips in endpoints.items():
        names[network][key] = tuple(sorted(set(ips), key=ipaddress.IPv4Address))
    for svc in sorted(getattr(state, "services", {}).values(), key=lambda s: s.name):
        key = labels_of(svc.name)
        if svc.network in names and key and svc.vip:
            names[svc.network][key] = (str(svc.vip),)
    for e in state.endpoints.values():
        if e.node == node and endpoint_live(e) and e.network in names:
            askers[e.ip] = e.network
    dom = labels_of(domain) if domain else ()
    return View(askers, names, suffixes, dom or ())


# --- one name -------------------------------------------------------------------------

@dataclass(frozen=True)
class Lookup:
    kind: str                 # "found", "nxdomain" or "external"
    addresses: tuple = ()     # for "found" (empty: the name exists but has no address)


def _ends(labels: Labels, suffix: Labels) -> bool:
    return bool(suffix) and len(labels) >= len(suffix) and labels[len(labels) - len(suffix):] == suffix


def _stems(labels: Labels, net: Labels, domain: Labels):
    """The names a query may mean, most literal first: as asked, without .NET, without
    .xoverlay, without .NET.xoverlay."""
    yield labels
    if _ends(labels, net):
        yield labels[:len(labels) - len(net)]
    if _ends(labels, domain):
        rest = labels[:len(labels) - len(domain)]
        yield rest
        if _ends(rest, net):
            yield rest[:len(rest) - len(net)]


def lookup_labels(view: View, network: str, labels: Labels) -> Lookup:
    labels = tuple(bytes(l).lower() for l in labels)
    table = view.names.get(network, {})
    net = view.suffixes.get(network) or ()
    for stem in _stems(labels, net, view.domain):
        if not stem:
            return Lookup("found")            # a zone apex: NET, xoverlay, NET.xoverlay
        if stem in table:
            return Lookup("found", table[stem])
    if len(labels) == 1 or _ends(labels, view.domain) or _ends(labels, net):
        return Lookup("nxdomain")
    return Lookup("external")


def lookup(view: View, network: str, qname: str) -> Lookup:
    """`qname` as text ('web', 'web.demo.', 'WEB.demo.xoverlay')."""
    name = qname.rstrip(".")
    return lookup_labels(view, network, tuple(name.encode().split(b".")) if name else ())


# --- one message ----------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    action: str               # "answer", "forward" or "drop"
    reply: bytes | None = None
    why: str = ""             # for the log


def _error(request_or_header, rcode: int, ra: int) -> bytes:
    if isinstance(request_or_header, DNSRecord):
        r = request_or_header.reply(ra=ra, aa=0)
    else:
        h = request_or_header
        r = DNSRecord(DNSHeader(id=h.id, qr=1, opcode=h.opcode, rd=h.rd, ra=ra))
    r.header.rcode = rcode
    return r.pack()


def _edns(request: DNSRecord):
    """The request's OPT record, if any."""
    return next((rr for rr in request.ar if rr.rtype == QTYPE.OPT), None)


def answer(view: View, client_ip: str, data: bytes, forward: bool, tcp: bool = False) -> Decision:
    """The responder's whole policy for one message from `client_ip`."""
    ra = 1 if forward else 0
    try:
        request = DNSRecord.parse(data)
    except Exception:         # dnslib raises DNSError, but also others on odd input
        if len(data) < 12:
            return Decision("drop", why="shorter than a DNS header")
        try:
            header = DNSHeader.parse(Buffer(data[:12]))
        except (DNSError, Exception):
            return Decision("drop", why="unparseable header")
        if header.qr:
            return Decision("drop", why="a response, not a query")
        return Decision("answer", _error(header, RCODE.FORMERR, ra), "malformed")
    if request.header.qr:
        return Decision("drop", why="a response, not a query")
    if request.header.opcode != OPCODE_QUERY:
        return Decision("answer", _error(request, RCODE.NOTIMP, ra), "not a QUERY")
    if len(request.questions) != 1:
        return Decision("answer", _error(request, RCODE.FORMERR, ra), "not one question")
    if not view.loaded:
        # An agent that could not read the store yet (started during an outage) does not
        # know its endpoints: a server failure, which a resolver retries, not a refusal.
        return Decision("answer", _error(request, RCODE.SERVFAIL, ra), "no view of the store yet")
    network = view.askers.get(client_ip)
    if network is None:
        return Decision("answer", _error(request, RCODE.REFUSED, ra), f"{client_ip} is no endpoint of this node")
    opt = _edns(request)
    if opt is not None and (opt.ttl >> 16) & 0xff != 0:
        reply = request.reply(ra=ra, aa=0)
        reply.header.rcode = BADVERS & 0xf
        reply.add_ar(EDNS0(udp_len=EDNS_PAYLOAD, ext_rcode=BADVERS >> 4))
        return Decision("answer", reply.pack(), "EDNS version not 0")

    q = request.q
    found = Lookup("external")
    if q.qclass in (CLASS_IN, CLASS_ANY):
        found = lookup_labels(view, network, q.qname.label)
    if found.kind == "external":
        if forward:
            return Decision("forward", why=f"{q.qname} is not ours")
        return Decision("answer", _error(request, RCODE.REFUSED, ra), f"{q.qname} is not ours, forwarding is off")

    reply = request.reply(ra=ra, aa=1)
    if found.kind == "nxdomain":
        reply.header.rcode = RCODE.NXDOMAIN
    elif q.qtype in (QTYPE.A, QTYPE.ANY):
        for ip in found.addresses:
            reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(ip), ttl=TTL))
    if opt is not None:
        reply.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
    wire = reply.pack()
    limit = 65535 if tcp else (max(PLAIN_UDP_PAYLOAD, min(opt.rclass, EDNS_PAYLOAD)) if opt is not None
                               else PLAIN_UDP_PAYLOAD)
    if len(wire) > limit:
        reply.rr = []
        reply.header.tc = 1
        wire = reply.pack()
    return Decision("answer", wire, f"{found.kind} in {network}")
