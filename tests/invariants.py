"""The store's invariants, written from the spec (docs/DESIGN.md, docs/SERVICES.md) and
not with xoverlay/core/model.py's helpers, so that a rule the model forgets is caught here. Used by
the stateful property tests and the concurrency test (tests/test_state.py)."""
from __future__ import annotations

import ipaddress
from collections import Counter

from xoverlay.core.model import GATEWAY_IP, MAX_SERVICES, VNI_MAX, VNI_MIN, endpoint_live, mac_for


def _dups(values) -> list:
    return sorted(v for v, n in Counter(values).items() if n > 1)


def violations(state) -> list[str]:
    """Every broken rule of `state`, one line each; [] when it is consistent."""
    bad = []
    nets = {name: ipaddress.IPv4Network(n.subnet) for name, n in state.networks.items()}
    gateway = ipaddress.IPv4Address(GATEWAY_IP)

    # Networks: disjoint subnets, unique VNIs in range, never the gateway's address.
    names = sorted(nets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if nets[a].overlaps(nets[b]):
                bad.append(f"networks {a} ({nets[a]}) and {b} ({nets[b]}) overlap")
    for v in _dups(n.vni for n in state.networks.values()):
        bad.append(f"VNI {v} is used by more than one network")
    for n in state.networks.values():
        if not VNI_MIN <= n.vni <= VNI_MAX:
            bad.append(f"network {n.name}: VNI {n.vni} out of range")
        if gateway in nets[n.name]:
            bad.append(f"network {n.name} contains the gateway address")

    # Slices: of a known network and node, inside the network, disjoint per network.
    by_net: dict[str, list] = {}
    for key, s in state.slices.items():
        if s.network not in nets or s.node not in state.nodes:
            bad.append(f"slice {key} of unknown network {s.network} or node {s.node}")
            continue
        sub = ipaddress.IPv4Network(s.subnet)
        if not sub.subnet_of(nets[s.network]) or sub.prefixlen != state.networks[s.network].slice_prefix:
            bad.append(f"slice {key} is not a /{state.networks[s.network].slice_prefix} of {nets[s.network]}")
        by_net.setdefault(s.network, []).append((sub, s.node))
    for net, subs in by_net.items():
        for i, (a, na) in enumerate(subs):
            for b, nb in subs[i + 1:]:
                if a.overlaps(b):
                    bad.append(f"network {net}: slices {a} ({na}) and {b} ({nb}) overlap")

    # Endpoints: known network and node, a usable address of the network, unique IP,
    # MAC and netns, and never a service's VIP.
    for e in state.endpoints.values():
        if e.network not in nets or e.node not in state.nodes:
            bad.append(f"endpoint {e.name}: unknown network {e.network} or node {e.node}")
            continue
        ip, net = ipaddress.IPv4Address(e.ip), nets[e.network]
        if ip not in net or ip in (net.network_address, net.broadcast_address):
            bad.append(f"endpoint {e.name}: {e.ip} is not a usable address of {net}")
        if e.mac != mac_for(e.ip):
            bad.append(f"endpoint {e.name}: MAC {e.mac} is not the one of {e.ip}")
    for ip in _dups(e.ip for e in state.endpoints.values()):
        bad.append(f"IP {ip} is held by endpoints " +
                   ", ".join(sorted(e.name for e in state.endpoints.values() if e.ip == ip)))
    live = [e for e in state.endpoints.values() if endpoint_live(e)]
    for ns, network in _dups((e.netns, e.network) for e in live):
        bad.append(f"netns {ns} is in network {network} more than once")
    for ns, ifname in _dups((e.netns, e.ifname) for e in live if e.ifname):
        bad.append(f"netns {ns} has two endpoints named {ifname}")

    # Services: known network, unique ids and VIPs, a VIP no endpoint has; backends are
    # live endpoints of the service's network (none dangling), each id once and below
    # next_index; a published (port, protocol) belongs to one service.
    ips = {e.ip for e in state.endpoints.values()}
    for ident in _dups(s.id for s in state.services.values()):
        bad.append(f"service id {ident} is used by more than one service")
    for vip in _dups(s.vip for s in state.services.values()):
        bad.append(f"VIP {vip} is used by more than one service")
    published = []
    for s in state.services.values():
        if not 1 <= s.id <= MAX_SERVICES:
            bad.append(f"service {s.name}: id {s.id} out of range")
        if s.network not in nets:
            bad.append(f"service {s.name}: unknown network {s.network}")
            continue
        vip, net = ipaddress.IPv4Address(s.vip), nets[s.network]
        if vip not in net or vip in (net.network_address, net.broadcast_address):
            bad.append(f"service {s.name}: VIP {s.vip} is not a usable address of {net}")
        if s.vip in ips:
            bad.append(f"service {s.name}: VIP {s.vip} is also an endpoint's IP")
        if not s.ports or _dups(s.ports):
            bad.append(f"service {s.name}: ports {s.ports}")
        for ident in _dups(b.index for b in s.backends):
            bad.append(f"service {s.name}: backend id {ident} twice")
        for name in _dups(b.endpoint for b in s.backends):
            bad.append(f"service {s.name}: backend {name} twice")
        for b in s.backends:
            ep = state.endpoints.get(b.endpoint)
            if ep is None or ep.removing:
                bad.append(f"service {s.name}: backend {b.endpoint} is dangling")
            elif ep.network != s.network:
                bad.append(f"service {s.name}: backend {b.endpoint} is in network {ep.network}")
            if not 1 <= b.index < s.next_index:
                bad.append(f"service {s.name}: backend {b.endpoint} has id {b.index} >= next {s.next_index}")
        for p in s.publish:
            published_port, _, target = p.partition(":")
            published.append((int(published_port), target.split("/")[1]))
    for port, proto in _dups(published):
        bad.append(f"published port {port}/{proto} belongs to more than one service")
    return bad
