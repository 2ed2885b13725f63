"""Desired state -> desired map contents -> the operations that get the kernel there.
Pure functions: no kernel, no store, unit-tested in tests/test_reconcile.py."""
from __future__ import annotations

from dataclasses import dataclass

from xoverlay.core import maglev, model
from xoverlay.core.model import State, endpoint_live, parse_port
from xoverlay.maps.layout import (
    CFG_EGRESS,
    CFG_FIB_MAIN_ONLY,
    EP_NETWORK_HAS_SERVICES,
    EP_NETWORK_INTERNAL,
    EP_SERVICE_BACKEND,
    IPPROTO,
    LB_ACTIVE,
    LB_AFFINITY,
    LB_DRAINING,
    LB_MAX_BACKENDS,
    MAPS,
    MAX_LOCAL_ENDPOINTS,
    MAX_PEERS,
    NO_SLOT,
    U32,
    Config,
    Endpoint,
    EndpointKey,
    LbBackend,
    LbBackendKey,
    LbService,
    LbServiceKey,
    LocalEndpoint,
    Mesh,
    MeshKey,
    Peer,
    Subnet,
    Vni,
    ip_be,
    mac_bytes,
    port_be,
    subnet_key,
)

# Maps the agent owns entirely: every entry comes from the store. (The Maglev tables,
# xo_lb_maglev, too, but they are maps of maps: see desired_tables and plan.)
RECONCILED_MAPS = ("xo_config", "xo_peers", "xo_vnis", "xo_subnets", "xo_endpoints",
                   "xo_local_endpoints", "xo_lb_backends", "xo_lb_services", "xo_lb_mesh")
MAGLEV = "xo_lb_maglev"

# Maps whose entries name a counter slot (bpf/lib/maps.h): the counters' map, and what
# a slot stays with (from an entry's key and value).
SLOTTED = {
    "xo_peers": ("xo_peer_stats", lambda k, v: k.value),
    # By address, not by veth: a re-plumbed endpoint keeps its counters.
    "xo_local_endpoints": ("xo_endpoint_stats", lambda k, v: (v.vni, v.ip)),
    "xo_lb_backends": ("xo_lb_backend_stats", lambda k, v: (k.service, k.index)),
}


def encoded(maps: dict[str, dict]) -> dict[str, dict[bytes, bytes]]:
    """Desired maps as the kernel holds them (PinnedMap.raw_items): key and value bytes."""
    return {name: {bytes(k): bytes(v) for k, v in entries.items()} for name, entries in maps.items()}


def _mac(mac: str):
    return (type(Endpoint().mac)).from_buffer_copy(mac_bytes(mac))


def desired_maps(state: State, node: str, ifindexes: dict[str, int], underlay_ifindex: int,
                 build_id: int, gateway_ifindex: int = 0, actual: dict[str, dict] | None = None,
                 fib_main_only: bool = False, egress: bool = False) -> dict[str, dict]:
    """What every reconciled map should hold on `node`. `ifindexes` maps the names of the
    local endpoints that are plumbed to their host-side veth; the others are left out
    until they are (a map entry pointing at no veth would black-hole traffic). Peers, local
    endpoints and backends keep the counter slots they have in `actual` (the maps as they
    are): see assign_slots. `fib_main_only`: the node's routing rules let the data path
    look underlay routes up in the main table (kernel/gateway.py main_table_suffices).
    `egress`: the node's masquerade is in place (kernel/gateway.py ensure_egress), so
    endpoint.c may hand packets for the outside to xo-gw."""
    had = slots_in(actual or {})
    me = state.nodes[node]
    maps: dict[str, dict] = {name: {} for name in RECONCILED_MAPS}
    maps["xo_config"][U32(0)] = Config(node_ip=ip_be(me.underlay_ip), underlay_ifindex=underlay_ifindex,
                                       vxlan_port=int.from_bytes(me.vxlan_port.to_bytes(2, "big"), "little"),
                                       flags=(CFG_FIB_MAIN_ONLY if fib_main_only else 0)
                                       | (CFG_EGRESS if egress else 0),
                                       gateway_ifindex=gateway_ifindex, build_id=build_id)
    peers = sorted(ip_be(p.underlay_ip) for p in state.nodes.values() if p.name != node)
    peer_slot = assign_slots(had["xo_peers"], peers, MAX_PEERS)
    for ip, slot in peer_slot.items():
        maps["xo_peers"][U32(ip)] = Peer(slot=slot)
    for net in state.networks.values():
        maps["xo_subnets"][subnet_key(net.subnet)] = Subnet(vni=net.vni)
    flags_of = endpoint_flags(state)
    live = [ep for ep in state.endpoints.values()
            if endpoint_live(ep) and ep.network in state.networks and ep.node in state.nodes]
    # Sorted: the same endpoints get the same new slots whatever order the store gave.
    plumbed = sorted((state.networks[ep.network].vni, ip_be(ep.ip)) for ep in live
                     if ep.node == node and ifindexes.get(ep.name))
    endpoint_slot = assign_slots(had["xo_local_endpoints"], plumbed, MAX_LOCAL_ENDPOINTS)
    for ep in live:
        if ep.node == node and not ifindexes.get(ep.name):
            continue
        vni = state.networks[ep.network].vni
        key = EndpointKey(vni=vni, ip=ip_be(ep.ip))
        flags = flags_of[ep.name]
        if ep.node == node:
            ifindex, slot = ifindexes[ep.name], endpoint_slot[(vni, key.ip)]
            maps["xo_endpoints"][key] = Endpoint(node_ip=ip_be(me.underlay_ip), ifindex=ifindex,
                                                 mac=_mac(ep.mac), flags=flags, slot=slot)
            maps["xo_local_endpoints"][U32(ifindex)] = LocalEndpoint(vni=vni, ip=key.ip, mac=_mac(ep.mac),
                                                                     flags=flags, slot=slot)
            maps["xo_vnis"][U32(vni)] = Vni()
        else:
            node_ip = ip_be(state.nodes[ep.node].underlay_ip)
            maps["xo_endpoints"][key] = Endpoint(node_ip=node_ip, mac=_mac(ep.mac), flags=flags,
                                                 slot=peer_slot[node_ip])
    _services(state, maps, had["xo_lb_backends"])
    return maps


def slots_in(maps: dict[str, dict]) -> dict[str, dict]:
    """The counter slots held in `maps`, per SLOTTED map: {what it stays with: slot}."""
    return {name: {ident(k, v): v.slot for k, v in maps.get(name, {}).items()}
            for name, (_, ident) in SLOTTED.items()}


def assign_slots(had: dict, wanted: list, capacity: int) -> dict:
    """A counter slot (0..capacity-1) for each key of `wanted`: the one it has in `had`
    (key -> slot, as in the kernel now), else the lowest slot nobody in `had` holds: a
    leaving entry still counts into its slot until it is deleted, after the new ones are
    written (diff). Only when those run out, a slot of a leaving entry; past `capacity`,
    NO_SLOT (not counted; its map is full anyway). The same inputs give the same slots."""
    slots, taken = {}, set()
    for key in wanted:
        slot = had.get(key)
        if slot is not None and slot < capacity and slot not in taken:
            slots[key] = slot
            taken.add(slot)
    held = set(had.values())
    free = (s for s in range(capacity) if s not in held)
    leaving = (s for s in range(capacity) if s in held and s not in taken)
    for key in wanted:
        if key not in slots:
            slot = next(free, None)
            if slot is None:
                slot = next(leaving, NO_SLOT)
            slots[key] = slot
            taken.add(slot)
    return slots


def fresh_counters(desired: dict[str, dict], actual: dict[str, dict]) -> list[MapOp]:
    """Zero the counter slots that `desired` gives to an entry that did not hold them in
    `actual` (a slot keeps what its last holder counted), and those of service ids that
    are new (a service's counters are at its id). Applied before the entries that name
    them."""
    had = slots_in(actual)
    ops = []
    for name, (stats, ident) in SLOTTED.items():
        zero = MAPS[stats].value()
        ops += [MapOp(stats, U32(v.slot), zero) for k, v in desired[name].items()
                if v.slot != NO_SLOT and had[name].get(ident(k, v)) != v.slot]
    had_ids = {v.id for v in actual.get("xo_lb_services", {}).values()}
    new_ids = sorted({v.id for v in desired["xo_lb_services"].values()} - had_ids)
    return ops + [MapOp("xo_lb_service_stats", U32(sid), MAPS["xo_lb_service_stats"].value()) for sid in new_ids]


def endpoint_flags(state: State) -> dict[str, int]:
    """Per endpoint, which service lookups the data path must do for its packets (none at
    all in a network without services, so plain east-west traffic pays nothing for them),
    and whether its network keeps it in (--internal)."""
    networks = {s.network for s in state.services.values()}
    backends = {b.endpoint for s in state.services.values() for b in s.backends}
    internal = {n.name for n in state.networks.values() if n.internal}
    return {ep.name: (EP_NETWORK_HAS_SERVICES if ep.network in networks else 0) |
                     (EP_SERVICE_BACKEND if ep.name in backends else 0) |
                     (EP_NETWORK_INTERNAL if ep.network in internal else 0)
            for ep in state.endpoints.values()}


def _live_backends(state: State, svc):
    for b in svc.backends:
        ep = state.endpoints.get(b.endpoint)
        if ep is not None and endpoint_live(ep) and ep.network == svc.network:
            yield b, ep


def _services(state: State, maps: dict, had_slot: dict) -> None:
    """The same services on every node: a client anywhere may use any service of its
    network, and a published port answers on every node's underlay IP (xo_lb_mesh).
    Backends keep the counter slots of `had_slot` ((service id, index) -> slot) and carry
    a copy of their endpoint's entry on this node, from `maps` (which holds them already)."""
    live = [(svc, b, ep) for svc in state.services.values() if svc.network in state.networks
            for b, ep in _live_backends(state, svc)]
    slot = assign_slots(had_slot, sorted((svc.id, b.index) for svc, b, _ in live), LB_MAX_BACKENDS)
    for svc, b, ep in live:
        # Where the backend is, as its endpoint's entry says (none for a local endpoint
        # not plumbed yet: the data path drops its packets, as it would without a copy).
        where = maps["xo_endpoints"].get(EndpointKey(vni=state.networks[svc.network].vni, ip=ip_be(ep.ip)))
        maps["xo_lb_backends"][LbBackendKey(service=svc.id, index=b.index)] = LbBackend(
            ip=ip_be(ep.ip), port=port_be(b.port) if b.port else 0,
            state=LB_DRAINING if b.draining else LB_ACTIVE, slot=slot[(svc.id, b.index)],
            where=where if where is not None else Endpoint())
    for svc in state.services.values():
        net = state.networks.get(svc.network)
        if net is None:
            continue
        value = LbService(id=svc.id, flags=LB_AFFINITY if svc.affinity == "client-ip" else 0)
        for p in svc.ports:
            port, proto = parse_port(p)
            key = LbServiceKey(vni=net.vni, vip=ip_be(svc.vip), port=port_be(port), proto=IPPROTO[proto])
            maps["xo_lb_services"][key] = value
        for pub in svc.publish:
            published, _, target = pub.partition(":")
            port, proto = parse_port(target)
            maps["xo_lb_mesh"][MeshKey(port=port_be(int(published)), proto=IPPROTO[proto])] = Mesh(
                service=svc.id, flags=value.flags, vni=net.vni, port=port_be(port))


def _table(backends: tuple, m: int) -> tuple:
    """(M, index of slot 1, ..., index of slot M) for backends ((name, weight, index), ...)."""
    owners = maglev.build([maglev.Weighted(name, weight) for name, weight, _ in backends], m)
    return (m, *(backends[i][2] for i in owners))


def desired_tables(state: State, memo: dict | None = None) -> dict[int, tuple]:
    """The Maglev table of every service id with at least one active backend (as stored
    in the kernel: slot 0 = M). Draining backends are in none: no new connection goes
    to them. The result depends on `state` alone. `memo`, a dict the caller passes on
    every pass (the agent keeps one), holds per service id the last table and what it
    was built from: 10,000 unchanged services cost nothing. It is left holding this
    pass's services only, so it never outgrows the tables in the kernel (a global cache
    keyed by backends kept one table per backend change, forever: backend indexes are
    never reused)."""
    out, fresh = {}, {}
    for svc in state.services.values():
        if svc.network not in state.networks:
            continue
        active = tuple(sorted((ep.name, b.weight, b.index) for b, ep in _live_backends(state, svc)
                              if not b.draining))
        if not active:
            continue
        built_from = (active, svc.table_size or maglev.size_for(len(active)))
        last = memo.get(svc.id) if memo else None
        table = last[1] if last and last[0] == built_from else _table(*built_from)
        out[svc.id] = table
        fresh[svc.id] = (built_from, table)
    if memo is not None:
        memo.clear()
        memo.update(fresh)
    return out


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


def plan(desired: dict[str, dict], actual: dict[str, dict], want_tables: dict[int, tuple],
         have_tables: dict[int, tuple]) -> list[MapOp]:
    """diff(), with the Maglev tables (MapOp on MAGLEV: key service id, value the table)
    put where no packet can find a half-made service: backends before the tables that
    name them, tables before the services that use them; and on the way out the other
    way round: services, then tables, then backends."""
    ops = diff(desired, actual)
    sets = [o for o in ops if o.value is not None]
    deletes = [o for o in ops if o.value is None]
    table_sets = [MapOp(MAGLEV, sid, t) for sid, t in sorted(want_tables.items()) if have_tables.get(sid) != t]
    table_deletes = [MapOp(MAGLEV, sid, None) for sid in sorted(have_tables.keys() - want_tables.keys())]

    def first(ops, names):
        return [o for o in ops if o.map not in names], [o for o in ops if o.map in names]
    sets, service_sets = first(sets, {"xo_lb_services", "xo_lb_mesh"})
    deletes, backend_deletes = first(deletes, {"xo_lb_backends"})
    return sets + table_sets + service_sets + deletes + table_deletes + backend_deletes


# --- the way back from the gateway address (DNS replies) ---------------------------------

def return_paths(state: State, node: str, ifindexes: dict[str, int]) -> dict[str, tuple[int, str]]:
    """Endpoint IP -> (host-side veth ifindex, endpoint MAC) for this node's plumbed endpoints:
    where the node sends what leaves from the gateway address (xoverlay/kernel/gateway.py)."""
    out = {}
    for ep in state.endpoints.values():
        if ep.node == node and endpoint_live(ep) and ifindexes.get(ep.name):
            out[ep.ip] = (ifindexes[ep.name], ep.mac)
    return out


def published_ports(state: State) -> list[tuple[int, str]]:
    """Every (port, protocol) published in the cluster, in order: what the node's own
    connections on 127.0.0.1 are turned to its IP for (kernel/gateway.py egress_ruleset)."""
    return sorted(model._published(state))


def masquerade_ranges(state: State) -> dict[str, list[tuple[int, int]]]:
    """Per protocol with published ports, the ranges of source ports egress may give the
    node's address (kernel/gateway.py egress_ruleset): every port but the published ones.
    A reply to a published port would be taken for a routing-mesh request by the data
    path (XDP and tc see it before conntrack does), so no masqueraded connection may have
    one. The ranges are the gaps between published ports: a connection from a port of a
    gap is masqueraded into that gap (its own port kept where free, as plain masquerade
    does), one from a published port into the largest gap."""
    published: dict[str, set[int]] = {}
    for port, proto in model._published(state):
        published.setdefault(proto, set()).add(port)
    out = {}
    for proto, ports in sorted(published.items()):
        gaps, lo = [], 1
        for p in sorted(ports) + [65536]:
            if p > lo:
                gaps.append((lo, p - 1))
            lo = p + 1
        out[proto] = gaps
    return out


@dataclass(frozen=True)
class PathOp:
    kind: str                 # "route" (key: ip, value: oif) or "neigh" (key: (ip, ifindex), value: mac)
    key: object
    value: object | None      # None: delete

    def __str__(self):
        what = "return route" if self.kind == "route" else "permanent neighbour"
        if self.value is None:
            return f"delete {what} {self.key}"
        return f"set {what} {self.key} -> {self.value}"


def return_path_ops(want: dict[str, tuple[int, str]], routes: dict[str, int],
                    neighbours: dict[tuple[str, int], tuple[str, bool]]) -> list[PathOp]:
    """From the routes of the return table (ip -> oif) and the neighbour entries on our
    veths ((ip, ifindex) -> (mac, permanent)) to `want`: sets first, then deletes."""
    sets, deletes = [], []
    want_neigh = {(ip, ifindex): mac.lower() for ip, (ifindex, mac) in want.items()}
    for ip, (ifindex, _) in want.items():
        if routes.get(ip) != ifindex:
            sets.append(PathOp("route", ip, ifindex))
    for key, mac in want_neigh.items():
        have = neighbours.get(key)
        if have is None or (have[0] or "").lower() != mac or not have[1]:
            sets.append(PathOp("neigh", key, mac))
    for ip in routes.keys() - want.keys():
        deletes.append(PathOp("route", ip, None))
    for key in neighbours.keys() - want_neigh.keys():
        deletes.append(PathOp("neigh", key, None))
    return sets + deletes
