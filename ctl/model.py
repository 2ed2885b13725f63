"""The cluster's desired state and the pure rules that change it.

Every change is a function State -> State that validates first and raises XoError
without changing anything. The store runs these inside a transaction, so validation
and allocation (IPAM, VNIs) are atomic across processes."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace

from .errors import XoError

VNI_MIN, VNI_MAX = 1, (1 << 24) - 1
VNI_AUTO_START = 4096          # Docker's overlay driver starts here too
DEFAULT_SLICE_PREFIX = 24       # each node gets a /24 of a network's subnet
DEFAULT_VXLAN_PORT = 4789
GATEWAY_IP = "169.254.1.1"      # every container's next hop (link-local, in no subnet)
MAX_ENDPOINTS = 65536           # size of the xo_endpoints map
MAX_LOCAL_ENDPOINTS = 4096      # size of the xo_local_endpoints map
MAX_NETWORKS = 1024             # size of the xo_subnets map
MAX_NODES = 1024                # size of the xo_peers map
_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Network:
    name: str
    subnet: str
    vni: int
    slice_prefix: int = DEFAULT_SLICE_PREFIX


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


KINDS = {"network": Network, "node": Node, "slice": Slice, "endpoint": Endpoint}


@dataclass(frozen=True)
class State:
    networks: dict = field(default_factory=dict)
    nodes: dict = field(default_factory=dict)
    slices: dict = field(default_factory=dict)
    endpoints: dict = field(default_factory=dict)

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

def create_network(state: State, name: str, subnet: str, vni: int | None = None,
                   slice_prefix: int = DEFAULT_SLICE_PREFIX) -> State:
    check_name("network", name)
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
    return state.with_("network", name, Network(name, str(net), vni, slice_prefix))


def remove_network(state: State, name: str) -> State:
    _network_of(state, name)
    users = sorted(e.name for e in state.endpoints.values() if e.network == name)
    if users:
        raise XoError(f"network {name} still has endpoints: {', '.join(users)}")
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
        state = state.with_("endpoint", e.name, None)
    for s in [s for s in state.slices.values() if s.node == name]:
        state = state.with_("slice", s.key, None)
    return state.with_("node", name, None)


# --- IPAM ---------------------------------------------------------------------------

def mac_for(ip: str) -> str:
    """02:58 ("X") + the IPv4 address: unique per address, stable, locally administered."""
    return "02:58:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(ip).packed)


def allocate_slice(state: State, network: Network, node: str) -> tuple[State, Slice]:
    """The first free slice of the network, now the node's."""
    taken = {s.subnet for s in state.slices.values() if s.network == network.name}
    for candidate in ipaddress.IPv4Network(network.subnet).subnets(new_prefix=network.slice_prefix):
        if str(candidate) not in taken:
            s = Slice(network.name, node, str(candidate))
            return state.with_("slice", s.key, s), s
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


def add_endpoint(state: State, name: str, network: str, node: str, netns: str,
                 owns_netns: bool, ip: str | None = None) -> State:
    check_name("endpoint", name)
    if name in state.endpoints:
        raise XoError(f"endpoint {name} already exists")
    net = _network_of(state, network)
    _node_of(state, node)
    for e in state.endpoints.values():
        if e.netns == netns:
            raise XoError(f"netns {netns} is already used by endpoint {e.name}")
    if len(state.endpoints) >= MAX_ENDPOINTS:
        raise XoError(f"map full: xo_endpoints holds at most {MAX_ENDPOINTS} endpoints")
    if sum(1 for e in state.endpoints.values() if e.node == node) >= MAX_LOCAL_ENDPOINTS:
        raise XoError(f"map full: node {node} holds at most {MAX_LOCAL_ENDPOINTS} endpoints")
    subnet = ipaddress.IPv4Network(net.subnet)
    used = {e.ip: e.name for e in state.endpoints.values() if e.network == network}
    if ip is not None:
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            raise XoError(f"{ip!r} is not an IPv4 address") from None
        if addr not in subnet or addr in (subnet.network_address, subnet.broadcast_address):
            raise XoError(f"{ip} is not a usable address of network {network} ({net.subnet})")
        if ip in used:
            raise XoError(f"{ip} is already used by endpoint {used[ip]}")
    else:
        ip = None
        for s in node_slices(state, network, node):
            ip = next((str(a) for a in _usable(subnet, ipaddress.IPv4Network(s.subnet))
                       if str(a) not in used), None)
            if ip:
                break
        else:
            # No slice yet, or all full: the node gets another one.
            state, s = allocate_slice(state, net, node)
            ip = next((str(a) for a in _usable(subnet, ipaddress.IPv4Network(s.subnet))), None)
            if ip is None:
                raise XoError(f"slice {s.subnet} of network {network} has no usable address")
    ep = Endpoint(name, network, node, ip, mac_for(ip), netns, owns_netns)
    return state.with_("endpoint", name, ep)


def mark_endpoint_removing(state: State, name: str) -> State:
    ep = _endpoint_of(state, name)
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


def endpoint_mtu(state: State) -> int:
    """VXLAN adds 50 bytes and we send DF: containers get the smallest underlay MTU of the
    cluster less 50, or full-size frames to some node would be dropped."""
    return min((n.underlay_mtu for n in state.nodes.values()), default=1500) - 50
