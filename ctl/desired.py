"""Desired state -> desired map contents -> the operations that get the kernel there.
Pure functions: no kernel, no store, unit-tested in tests/test_reconcile.py."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from maps.layout import (Config, Endpoint, EndpointKey, LocalEndpoint, Peer, U32, Vni,
                         ip_be, mac_bytes, subnet_key, Subnet)

from .model import State

# Maps the agent owns entirely: every entry comes from the store.
RECONCILED_MAPS = ("xo_config", "xo_peers", "xo_vnis", "xo_subnets", "xo_endpoints",
                   "xo_local_endpoints")


def _mac(mac: str):
    return (type(Endpoint().mac)).from_buffer_copy(mac_bytes(mac))


def desired_maps(state: State, node: str, ifindexes: dict[str, int], underlay_ifindex: int,
                 build_id: int) -> dict[str, dict]:
    """What every reconciled map should hold on `node`. `ifindexes` maps the names of the
    local endpoints that are plumbed to their host-side veth; the others are left out
    until they are (a map entry pointing at no veth would black-hole traffic)."""
    me = state.nodes[node]
    maps: dict[str, dict] = {name: {} for name in RECONCILED_MAPS}
    maps["xo_config"][U32(0)] = Config(node_ip=ip_be(me.underlay_ip), underlay_ifindex=underlay_ifindex,
                                       vxlan_port=int.from_bytes(me.vxlan_port.to_bytes(2, "big"), "little"),
                                       build_id=build_id)
    for peer in state.nodes.values():
        if peer.name != node:
            maps["xo_peers"][U32(ip_be(peer.underlay_ip))] = Peer()
    for net in state.networks.values():
        maps["xo_subnets"][subnet_key(net.subnet)] = Subnet(vni=net.vni)
    for ep in state.endpoints.values():
        if ep.removing or ep.network not in state.networks or ep.node not in state.nodes:
            continue
        vni = state.networks[ep.network].vni
        key = EndpointKey(vni=vni, ip=ip_be(ep.ip))
        if ep.node == node:
            ifindex = ifindexes.get(ep.name)
            if not ifindex:
                continue
            maps["xo_endpoints"][key] = Endpoint(node_ip=ip_be(me.underlay_ip), ifindex=ifindex,
                                                 mac=_mac(ep.mac))
            maps["xo_local_endpoints"][U32(ifindex)] = LocalEndpoint(vni=vni, ip=ip_be(ep.ip),
                                                                     mac=_mac(ep.mac))
            maps["xo_vnis"][U32(vni)] = Vni()
        else:
            maps["xo_endpoints"][key] = Endpoint(node_ip=ip_be(state.nodes[ep.node].underlay_ip),
                                                 mac=_mac(ep.mac))
    return maps


@dataclass(frozen=True)
class MapOp:
    map: str
    key: object
    value: object | None      # None: delete

    def __str__(self):
        verb = "delete" if self.value is None else "set"
        return f"{verb} {self.map}[{self.key!r}]" + ("" if self.value is None else f" = {self.value!r}")


def diff(desired: dict[str, dict], actual: dict[str, dict]) -> list[MapOp]:
    """The operations that turn `actual` into `desired`: every set before any delete, so
    that a moving entry never leaves a gap where traffic is dropped."""
    sets, deletes = [], []
    for name, want in desired.items():
        have = actual.get(name, {})
        for key, value in want.items():
            if have.get(key) != value:
                sets.append(MapOp(name, key, value))
        for key in have.keys() - want.keys():
            deletes.append(MapOp(name, key, None))
    return sets + deletes


def stale_counters(desired: dict[str, dict], peer_keys, endpoint_keys) -> list[MapOp]:
    """Counter entries of peers and endpoints that are gone (the data path creates them)."""
    peers = set(desired["xo_peers"])
    endpoints = set(desired["xo_endpoints"])
    return ([MapOp("xo_peer_stats", k, None) for k in peer_keys if k not in peers] +
            [MapOp("xo_endpoint_stats", k, None) for k in endpoint_keys if k not in endpoints])


def in_network(ip: str, subnet: str) -> bool:
    return ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(subnet)
