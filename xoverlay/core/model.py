"""The cluster's desired state and the pure rules that change it.

Every change is a function State -> State that validates first and raises XoError
without changing anything. The store runs these inside a transaction, so validation
and allocation (IPAM, VNIs) are atomic across processes."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace

from xoverlay.errors import XoError
from xoverlay.maps import layout

VNI_MIN, VNI_MAX = 1, (1 << 24) - 1
VNI_AUTO_START = 4096          # Docker's overlay driver starts here too
DEFAULT_SLICE_PREFIX = 24       # each node gets a /24 of a network's subnet
DEFAULT_VXLAN_PORT = 4789
GATEWAY_IP = "169.254.1.1"      # every container's next hop (link-local, in no subnet)
MAX_ENDPOINTS = layout.MAPS["xo_endpoints"].max_entries
MAX_LOCAL_ENDPOINTS = layout.MAPS["xo_local_endpoints"].max_entries    # on one node
MAX_NETWORKS = layout.MAPS["xo_subnets"].max_entries
MAX_NODES = layout.MAPS["xo_peers"].max_entries
_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Network:
    name: str
    subnet: str
    vni: int
    slice_prefix: int = DEFAULT_SLICE_PREFIX
    internal: bool = False      # Docker's --internal: its endpoints reach nothing outside the overlay
    mtu: int = 0                # its endpoints' MTU when below the cluster's (Docker's -o mtu=); 0: the cluster's


@dataclass(frozen=True)
class Node:
    name: str
    underlay_ip: str
    vxlan_port: int = DEFAULT_VXLAN_PORT
    underlay_mtu: int = 1500


@dataclass(frozen=True)
class Slice:
    network: str
    node: str
    subnet: str

    @property
    def key(self) -> str:
        return f"{self.network}/{self.subnet}"


@dataclass(frozen=True)
class Endpoint:
    name: str
    network: str
    node: str
    ip: str
    mac: str
    netns: str                  # a path: /run/netns/NAME or /proc/PID/ns/net
    owns_netns: bool = False    # we created it, we remove it
    ready: bool = False         # the node's agent has plumbed it
    removing: bool = False      # tombstone: the agent tears it down, then deletes it
    gone_since: float = 0.0     # when its node's agent found its netns gone (epoch s; 0: it is there)
    ifname: str = "eth0"        # its interface in the netns; "": the runtime names it (Docker)
    aliases: tuple = ()         # more DNS names in its network (a Docker container's name, --network-alias)

    @classmethod
    def from_dict(cls, d: dict) -> "Endpoint":
        return cls(**{**d, "aliases": tuple(d.get("aliases", ()))})


PROTOCOLS = ("tcp", "udp")
AFFINITIES = ("none", "client-ip")
MAX_SERVICES = layout.MAPS["xo_lb_maglev"].max_entries - 1     # service ids 1..N: slot 0 is never used
MAX_SERVICE_PORTS = layout.MAPS["xo_lb_services"].max_entries    # (VIP, port, protocol)
MAX_BACKENDS = 1000             # per service (the Maglev table holds 65537 slots at most)
MAX_WEIGHT = 100


@dataclass(frozen=True)
class Backend:
    endpoint: str
    index: int                  # the data path's id of this backend within its service; never reused
    port: int = 0               # target port; 0: the port the client asked for
    weight: int = 1
    draining: bool = False      # keeps its connections, gets no new ones


@dataclass(frozen=True)
class Service:
    name: str
    network: str
    vip: str                    # dotted IPv4, an address of the network's subnet
    id: int                     # the data path's service id (1..MAX_SERVICES)
    ports: tuple = ()           # "80/tcp", "53/udp"
    backends: tuple = ()        # Backend, in the order they were added
    publish: tuple = ()         # "8080:80/tcp": node port 8080 -> service port 80/tcp
    affinity: str = "none"      # or "client-ip": one client, one backend
    table_size: int = 0         # Maglev M: prime, >= 100 per active backend, only grows
    next_index: int = 1

    @classmethod
    def from_dict(cls, d: dict) -> "Service":
        d = dict(d)
        d["ports"] = tuple(d.get("ports", ()))
        d["publish"] = tuple(d.get("publish", ()))
        d["backends"] = tuple(Backend(**b) for b in d.get("backends", ()))
        return cls(**d)

    def backend(self, endpoint: str) -> Backend | None:
        return next((b for b in self.backends if b.endpoint == endpoint), None)

    @property
    def active(self) -> list[Backend]:
        return [b for b in self.backends if not b.draining]


KINDS = {"network": Network, "node": Node, "slice": Slice, "endpoint": Endpoint, "service": Service}


@dataclass(frozen=True)
class State:
    networks: dict = field(default_factory=dict)
    nodes: dict = field(default_factory=dict)
    slices: dict = field(default_factory=dict)
    endpoints: dict = field(default_factory=dict)
    services: dict = field(default_factory=dict)

    def table(self, kind: str) -> dict:
        return getattr(self, kind + "s")

    def with_(self, kind: str, name: str, obj) -> "State":
        table = dict(self.table(kind))
        if obj is None:
            table.pop(name, None)
        else:
            table[name] = obj
        return replace(self, **{kind + "s": table})


def check_name(kind: str, name: str) -> None:
    if not _NAME.match(name or ""):
        raise XoError(f"{kind} name {name!r} is not valid: use letters, digits, '.', '_' or '-', "
                      "starting with a letter, at most 63 characters")


def _network_of(state: State, name: str) -> Network:
    if name not in state.networks:
        raise XoError(f"network {name} does not exist")
    return state.networks[name]


def _node_of(state: State, name: str) -> Node:
    if name not in state.nodes:
        raise XoError(f"node {name} does not exist (run `xoverlay up --node {name}` there first)")
    return state.nodes[name]


def _endpoint_of(state: State, name: str) -> Endpoint:
    if name not in state.endpoints:
        raise XoError(f"endpoint {name} does not exist")
    return state.endpoints[name]


# --- networks -----------------------------------------------------------------------

MTU_MIN = 576                   # what every IPv4 host must take (RFC 791)


def create_network(state: State, name: str, subnet: str, vni: int | None = None,
                   slice_prefix: int = DEFAULT_SLICE_PREFIX, internal: bool = False, mtu: int = 0) -> State:
    check_name("network", name)
    if mtu and not MTU_MIN <= mtu <= 65535:
        raise XoError(f"MTU {mtu} is out of range: use {MTU_MIN}..65535 (or 0: the cluster's)")
    if name in state.networks:
        raise XoError(f"network {name} already exists")
    try:
        net = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as e:
        raise XoError(f"subnet {subnet!r} is not an IPv4 network: {e}") from None
    if net.prefixlen > 30:
        raise XoError(f"subnet {subnet} is too small: use a /30 or larger")
    if not slice_prefix or not net.prefixlen <= slice_prefix <= 30:
        raise XoError(f"slice prefix /{slice_prefix} must be between /{net.prefixlen} and /30")
    if net.overlaps(ipaddress.IPv4Network(GATEWAY_IP)):
        raise XoError(f"subnet {subnet} contains the gateway address {GATEWAY_IP}")
    for other in state.networks.values():
        if net.overlaps(ipaddress.IPv4Network(other.subnet)):
            raise XoError(f"subnet {subnet} overlaps network {other.name} ({other.subnet})")
    used = {n.vni for n in state.networks.values()}
    if vni is None:
        vni = next((v for v in range(VNI_AUTO_START, VNI_MAX + 1) if v not in used), None)
        if vni is None:
            raise XoError("no free VNI left")
    elif not VNI_MIN <= vni <= VNI_MAX:
        raise XoError(f"VNI {vni} is out of range: use {VNI_MIN}..{VNI_MAX}")
    elif vni in used:
        owner = next(n.name for n in state.networks.values() if n.vni == vni)
        raise XoError(f"VNI {vni} is already used by network {owner}")
    if len(state.networks) >= MAX_NETWORKS:
        raise XoError(f"map full: at most {MAX_NETWORKS} networks")
    return state.with_("network", name, Network(name, str(net), vni, slice_prefix, internal, mtu))


def remove_network(state: State, name: str) -> State:
    _network_of(state, name)
    users = sorted(e.name for e in state.endpoints.values() if e.network == name)
    if users:
        raise XoError(f"network {name} still has endpoints: {', '.join(users)}")
    services = sorted(s.name for s in state.services.values() if s.network == name)
    if services:
        raise XoError(f"network {name} still has services: {', '.join(services)}")
    for s in [s for s in state.slices.values() if s.network == name]:
        state = state.with_("slice", s.key, None)
    return state.with_("network", name, None)


# --- nodes --------------------------------------------------------------------------

def join_node(state: State, name: str, underlay_ip: str, vxlan_port: int = DEFAULT_VXLAN_PORT,
              underlay_mtu: int = 1500) -> State:
    check_name("node", name)
    try:
        ipaddress.IPv4Address(underlay_ip)
    except ValueError:
        raise XoError(f"underlay address {underlay_ip!r} is not an IPv4 address") from None
    if not 1 <= vxlan_port <= 65535:
        raise XoError(f"VXLAN port {vxlan_port} is out of range")
    for other in state.nodes.values():
        if other.name == name:
            continue
        if other.underlay_ip == underlay_ip:
            raise XoError(f"underlay address {underlay_ip} is already used by node {other.name}")
        if other.vxlan_port != vxlan_port:
            raise XoError(f"VXLAN port {vxlan_port} differs from node {other.name}'s {other.vxlan_port}: "
                          "every node must use the same port")
    if name not in state.nodes and len(state.nodes) >= MAX_NODES:
        raise XoError(f"map full: at most {MAX_NODES} nodes")
    return state.with_("node", name, Node(name, underlay_ip, vxlan_port, underlay_mtu))


def remove_node(state: State, name: str) -> State:
    _node_of(state, name)
    for e in [e for e in state.endpoints.values() if e.node == name]:
        state = _drop_backend_everywhere(state, e.name)
        state = state.with_("endpoint", e.name, None)
    for s in [s for s in state.slices.values() if s.node == name]:
        state = state.with_("slice", s.key, None)
    return state.with_("node", name, None)


# --- IPAM ---------------------------------------------------------------------------

def mac_for(ip: str) -> str:
    """02:58 ("X") + the IPv4 address: unique per address, stable, locally administered."""
    return "02:58:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(ip).packed)


def allocate_slice(state: State, network: Network, node: str, used=frozenset()) -> tuple[State, Slice, str]:
    """The first free slice of the network with an address not in `used` (fixed --ip
    addresses and VIPs may fill a slice nobody has), now the node's; and that address."""
    taken = {s.subnet for s in state.slices.values() if s.network == network.name}
    subnet = ipaddress.IPv4Network(network.subnet)
    for candidate in subnet.subnets(new_prefix=network.slice_prefix):
        if str(candidate) not in taken:
            ip = next((str(a) for a in _usable(subnet, candidate) if str(a) not in used), None)
            if ip:
                s = Slice(network.name, node, str(candidate))
                return state.with_("slice", s.key, s), s, ip
    raise XoError(f"network {network.name} has no free /{network.slice_prefix} slice for node {node}")


def node_slices(state: State, network: str, node: str) -> list[Slice]:
    return sorted((s for s in state.slices.values() if s.network == network and s.node == node),
                  key=lambda s: ipaddress.IPv4Network(s.subnet))


def _usable(net: ipaddress.IPv4Network, subnet: ipaddress.IPv4Network):
    """Addresses of a slice that are not the network's own network or broadcast address."""
    for ip in subnet:
        if subnet.prefixlen < 31 and ip in (subnet.network_address, subnet.broadcast_address):
            continue
        if ip in (net.network_address, net.broadcast_address):
            continue
        yield ip


def first_free_ifname(state: State, netns: str) -> str:
    """eth0 for a netns's first network, then eth1, eth2 ...: one interface per network."""
    taken = {e.ifname for e in state.endpoints.values() if e.netns == netns and endpoint_live(e)}
    return next(f"eth{i}" for i in range(len(taken) + 1) if f"eth{i}" not in taken)


def add_endpoint(state: State, name: str, network: str, node: str, netns: str,
                 owns_netns: bool, ip: str | None = None, ifname: str | None = None,
                 aliases: tuple = ()) -> State:
    """`ifname`: None picks the netns's first free ethN; "" leaves the name to the
    runtime that moves the interface in (Docker)."""
    check_name("endpoint", name)
    if name in state.endpoints:
        raise XoError(f"endpoint {name} already exists")
    _network_of(state, network)
    _node_of(state, node)
    for e in state.endpoints.values():
        if e.netns == netns and e.network == network and not (e.gone_since and not netns_may_return(e)):
            raise XoError(f"netns {netns} is already in network {network} as endpoint {e.name}")
    for alias in aliases:
        check_name("alias", alias)
    if len(state.endpoints) >= MAX_ENDPOINTS:
        raise XoError(f"map full: xo_endpoints holds at most {MAX_ENDPOINTS} endpoints")
    if sum(1 for e in state.endpoints.values() if e.node == node) >= MAX_LOCAL_ENDPOINTS:
        raise XoError(f"map full: node {node} holds at most {MAX_LOCAL_ENDPOINTS} endpoints")
    if ip is not None:
        check_address(state, network, ip)
    else:
        state, ip = allocate_address(state, network, node)
    if ifname is None:
        ifname = first_free_ifname(state, netns)
    ep = Endpoint(name, network, node, ip, mac_for(ip), netns, owns_netns, ifname=ifname, aliases=tuple(aliases))
    return state.with_("endpoint", name, ep)


def check_address(state: State, network: str, ip: str) -> None:
    """`ip` is a free address of the network, for an endpoint to have."""
    net = _network_of(state, network)
    subnet = ipaddress.IPv4Network(net.subnet)
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        raise XoError(f"{ip!r} is not an IPv4 address") from None
    if addr not in subnet or addr in (subnet.network_address, subnet.broadcast_address):
        raise XoError(f"{ip} is not a usable address of network {network} ({net.subnet})")
    used = next((e.name for e in state.endpoints.values() if e.network == network and e.ip == ip), None)
    if used:
        raise XoError(f"{ip} is already used by endpoint {used}")
    vip = next((s.name for s in state.services.values() if s.network == network and s.vip == ip), None)
    if vip:
        raise XoError(f"{ip} is the virtual IP of service {vip}")


def allocate_address(state: State, network: str, node: str, held=frozenset()) -> tuple[State, str]:
    """The first free address of the node's slices of the network, none of `held` (given
    out and not yet an endpoint's: Docker's IPAM asks before the endpoint exists); a new
    slice for the node when they are full. Never a VIP."""
    net = _network_of(state, network)
    subnet = ipaddress.IPv4Network(net.subnet)
    used = {e.ip for e in state.endpoints.values() if e.network == network}
    used |= {s.vip for s in state.services.values() if s.network == network} | set(held)
    for s in node_slices(state, network, node):
        ip = next((str(a) for a in _usable(subnet, ipaddress.IPv4Network(s.subnet)) if str(a) not in used), None)
        if ip:
            return state, ip
    state, _, ip = allocate_slice(state, net, node, used)
    return state, ip


# An endpoint whose netns went away (its container stopped or was removed) leaves every
# map, DNS and its services' balancing at once, but keeps its address this long: the
# flows and DNS answers that named it have died by then (our DNS answers live 10 s), so
# the next container given the address does not receive their stragglers. `endpoint rm`
# releases it at once.
GONE_GRACE_SECONDS = 60.0


def endpoint_live(ep: Endpoint) -> bool:
    """In the maps, DNS and the balancers: neither being removed nor gone."""
    return not ep.removing and not ep.gone_since


def endpoint_state(ep: Endpoint) -> str:
    """As `endpoint ls` and status show it."""
    if ep.removing:
        return "removing"
    if ep.gone_since:
        return "gone"
    return "ready" if ep.ready else "pending"


def netns_may_return(ep: Endpoint) -> bool:
    """A named netns (/run/netns/NAME) can be made again under its name; a process's
    (/proc/PID/ns/net) cannot: the PID may be another process's by then."""
    return not ep.netns.startswith("/proc/")


def mark_endpoint_gone(state: State, name: str, when: float) -> State:
    ep = state.endpoints.get(name)
    if ep is None or ep.removing or ep.gone_since:
        return state
    return state.with_("endpoint", name, replace(ep, gone_since=when, ready=False))


def mark_endpoint_back(state: State, name: str) -> State:
    ep = state.endpoints.get(name)
    if ep is None or not ep.gone_since:
        return state
    return state.with_("endpoint", name, replace(ep, gone_since=0.0))


def mark_endpoint_removing(state: State, name: str) -> State:
    """The endpoint goes, and with it its place in every service (its connections end)."""
    ep = _endpoint_of(state, name)
    state = _drop_backend_everywhere(state, name)
    return state.with_("endpoint", name, replace(ep, removing=True, ready=False))


def remove_endpoint(state: State, name: str) -> State:
    _endpoint_of(state, name)
    return state.with_("endpoint", name, None)


def set_endpoint_ready(state: State, name: str, ready: bool = True) -> State:
    ep = state.endpoints.get(name)
    if ep is None or ep.ready == ready:
        return state
    return state.with_("endpoint", name, replace(ep, ready=ready))


def peers_of(state: State, node: str) -> list[Node]:
    return sorted((n for n in state.nodes.values() if n.name != node), key=lambda n: n.name)


def endpoint_mtu(state: State, network: str | None = None) -> int:
    """VXLAN adds 50 bytes and we send DF: containers get the smallest underlay MTU of the
    cluster less 50, or full-size frames to some node would be dropped; less if their
    network asks for less."""
    cluster = min((n.underlay_mtu for n in state.nodes.values()), default=1500) - 50
    net = state.networks.get(network) if network else None
    return min(cluster, net.mtu) if net and net.mtu else cluster


# --- services -----------------------------------------------------------------------

def _service_of(state: State, name: str) -> Service:
    if name not in state.services:
        raise XoError(f"service {name} does not exist")
    return state.services[name]


def parse_port(spec: str) -> tuple[int, str]:
    """"80/tcp" -> (80, "tcp"); the protocol defaults to tcp."""
    number, _, proto = str(spec).strip().partition("/")
    proto = (proto or "tcp").lower()
    if proto not in PROTOCOLS:
        raise XoError(f"port {spec!r}: protocol must be tcp or udp")
    if not number.isdigit() or not 1 <= int(number) <= 65535:
        raise XoError(f"port {spec!r}: the port number must be 1..65535")
    return int(number), proto


def parse_backend(spec: str) -> tuple[str, int, int]:
    """"web2:8080@3" -> ("web2", 8080, 3): endpoint, target port (0: the service's), weight."""
    rest, _, weight = spec.partition("@")
    name, _, port = rest.partition(":")
    if weight and (not weight.isdigit() or not 1 <= int(weight) <= MAX_WEIGHT):
        raise XoError(f"backend {spec!r}: weight must be 1..{MAX_WEIGHT}")
    if port and (not port.isdigit() or not 1 <= int(port) <= 65535):
        raise XoError(f"backend {spec!r}: port must be 1..65535")
    return name, int(port or 0), int(weight or 1)


def _check_backend(state: State, svc: Service, name: str, port: int) -> None:
    ep = state.endpoints.get(name)
    if ep is None or ep.removing:
        raise XoError(f"backend {name}: endpoint {name} does not exist")
    if ep.network != svc.network:
        raise XoError(f"backend {name}: endpoint {name} is in network {ep.network}, service {svc.name} "
                      f"is in {svc.network}")
    if port and len(svc.ports) > 1:
        raise XoError(f"backend {name}:{port}: a target port needs a service with one port "
                      f"({svc.name} has {', '.join(svc.ports)})")


def _drop_backend_everywhere(state: State, endpoint: str) -> State:
    for svc in list(state.services.values()):
        if svc.backend(endpoint):
            state = state.with_("service", svc.name, _resized(replace(
                svc, backends=tuple(b for b in svc.backends if b.endpoint != endpoint))))
    return state


def _resized(svc: Service) -> Service:
    from xoverlay.core.maglev import size_for
    return replace(svc, table_size=size_for(len(svc.active), svc.table_size or None))


def _add_backends(state: State, svc: Service, specs: list[str]) -> Service:
    backends = list(svc.backends)
    for spec in specs:
        name, port, weight = parse_backend(spec)
        _check_backend(state, svc, name, port)
        old = next((i for i, b in enumerate(backends) if b.endpoint == name), None)
        if old is not None:
            if not backends[old].draining:
                raise XoError(f"{name} is already a backend of service {svc.name}")
            # Back from draining: same id, so its connections are still its own.
            backends[old] = replace(backends[old], draining=False, port=port, weight=weight)
            continue
        backends.append(Backend(name, svc.next_index, port, weight))
        svc = replace(svc, next_index=svc.next_index + 1)
    if len(backends) > MAX_BACKENDS:
        raise XoError(f"service {svc.name}: at most {MAX_BACKENDS} backends")
    return _resized(replace(svc, backends=tuple(backends)))


def _vip_owner(state: State, ip: str) -> str | None:
    for s in state.services.values():
        if s.vip == ip:
            return f"service {s.name}"
    for e in state.endpoints.values():
        if e.ip == ip:
            return f"endpoint {e.name}"
    return None


def allocate_vip(state: State, network: Network) -> str:
    """From the top of the subnet down (endpoint slices are handed out from the bottom):
    the highest address no endpoint and no service has."""
    net = ipaddress.IPv4Network(network.subnet)
    taken = {e.ip for e in state.endpoints.values()} | {s.vip for s in state.services.values()}
    addr = net.broadcast_address - 1
    while addr > net.network_address:
        if str(addr) not in taken:
            return str(addr)
        addr -= 1
    raise XoError(f"network {network.name} has no free address for a virtual IP")


def _check_vip(state: State, network: Network, vip: str) -> str:
    try:
        addr = ipaddress.IPv4Address(vip)
    except ValueError:
        raise XoError(f"VIP {vip!r} is not an IPv4 address") from None
    net = ipaddress.IPv4Network(network.subnet)
    if addr not in net or addr in (net.network_address, net.broadcast_address):
        raise XoError(f"VIP {vip} is not a usable address of network {network.name} ({network.subnet})")
    owner = _vip_owner(state, str(addr))
    if owner:
        raise XoError(f"VIP {vip} is already used by {owner}")
    return str(addr)


def _published(state: State, skip: str | None = None) -> dict[tuple[int, str], str]:
    out = {}
    for s in state.services.values():
        if s.name == skip:
            continue
        for p in s.publish:
            published, _, target = p.partition(":")
            out[(int(published), parse_port(target)[1])] = s.name
    return out


def create_service(state: State, name: str, network: str, ports: list[str], backends: list[str] = (),
                   vip: str | None = None, publish: list[str] = (), affinity: str = "none") -> State:
    check_name("service", name)
    if name in state.services:
        raise XoError(f"service {name} already exists")
    net = _network_of(state, network)
    if not ports:
        raise XoError(f"service {name} needs at least one --port")
    canon = []
    for spec in ports:
        number, proto = parse_port(spec)
        p = f"{number}/{proto}"
        if p in canon:
            raise XoError(f"port {p} is given twice")
        canon.append(p)
    if affinity not in AFFINITIES:
        raise XoError(f"affinity {affinity!r}: use {' or '.join(AFFINITIES)}")
    vip = allocate_vip(state, net) if vip in (None, "", "auto") else _check_vip(state, net, vip)
    if sum(len(s.ports) for s in state.services.values()) + len(canon) > MAX_SERVICE_PORTS:
        raise XoError(f"map full: at most {MAX_SERVICE_PORTS} service ports")
    used_ids = {s.id for s in state.services.values()}
    sid = next((i for i in range(1, MAX_SERVICES + 1) if i not in used_ids), None)
    if sid is None:
        raise XoError(f"map full: at most {MAX_SERVICES} services")
    taken = _published(state)
    pubs = []
    for spec in publish:
        published, sep, target = str(spec).partition(":")
        target = target if sep else published
        if not published.isdigit() or not 1 <= int(published) <= 65535:
            raise XoError(f"publish {spec!r}: the published port must be 1..65535")
        if not target.isdigit():
            raise XoError(f"publish {spec!r}: use PUBLISHED:SERVICE_PORT, e.g. 8080:80")
        matching = [p for p in canon if p.split("/")[0] == target]
        if not matching:
            raise XoError(f"publish {spec}: service {name} has no port {target}")
        for p in matching:
            proto = p.split("/")[1]
            vxlan = {n.vxlan_port for n in state.nodes.values()} | {DEFAULT_VXLAN_PORT}
            if proto == "udp" and int(published) in vxlan:
                raise XoError(f"published port {published}/udp is the nodes' VXLAN port")
            owner = taken.get((int(published), proto))
            if owner:
                raise XoError(f"published port {published}/{proto} is already used by service {owner}")
            taken[(int(published), proto)] = name
            pubs.append(f"{int(published)}:{p}")
    svc = Service(name, network, vip, sid, tuple(canon), publish=tuple(pubs), affinity=affinity)
    seen = set()
    for spec in backends:
        ep = parse_backend(spec)[0]
        if ep in seen:
            raise XoError(f"backend {ep} is given twice")
        seen.add(ep)
    svc = _add_backends(state, svc, list(backends))
    return state.with_("service", name, svc)


def update_service(state: State, name: str, add: list[str] = (), rm: list[str] = (),
                   drain: list[str] = ()) -> State:
    svc = _service_of(state, name)
    if not (add or rm or drain):
        raise XoError("nothing to do: give --add-backend, --rm-backend or --drain")
    for ep in rm:
        if not svc.backend(ep):
            raise XoError(f"{ep} is not a backend of service {name}")
    for ep in drain:
        if not svc.backend(ep):
            raise XoError(f"{ep} is not a backend of service {name}")
        if ep in rm:
            raise XoError(f"{ep} cannot be both drained and removed")
    svc = replace(svc, backends=tuple(b for b in svc.backends if b.endpoint not in rm))
    svc = replace(svc, backends=tuple(replace(b, draining=True) if b.endpoint in drain else b
                                      for b in svc.backends))
    svc = _add_backends(state, svc, list(add))
    return state.with_("service", name, _resized(svc))


def remove_service(state: State, name: str) -> State:
    _service_of(state, name)
    return state.with_("service", name, None)
