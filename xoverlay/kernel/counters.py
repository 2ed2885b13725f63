"""The data path's counters, read from a node's pinned maps (no agent, no compiler) and
laid out per peer, endpoint, service and drop reason: what status, its TUI and the
Prometheus metrics show."""
from __future__ import annotations

import time

from xoverlay.core import desired
from xoverlay.core.model import State, peers_of
from xoverlay.kernel.pinned import PinnedMap
from xoverlay.maps.drops import REASONS
from xoverlay.maps.layout import MAPS, U32, ip_be, pin_dir, sum_percpu


def read_counters(node: str, map_name: str) -> dict:
    """Per-CPU counters of one map, summed; empty if the node has no pins here."""
    try:
        with PinnedMap(pin_dir(node), MAPS[map_name]) as m:
            return {k: sum_percpu(v) for k, v in m.items().items()}
    except OSError:
        return {}


def seconds_since(then_ns: int, now_ns: int) -> float | None:
    """Seconds from a data-path time (CLOCK_MONOTONIC, coarse: up to a tick behind) to
    now; None for 0, which means never."""
    return max(0.0, (now_ns - then_ns) / 1e9) if then_ns else None


def _traffic(t) -> dict:
    return {"tx_packets": t.tx_packets if t else 0, "tx_bytes": t.tx_bytes if t else 0,
            "rx_packets": t.rx_packets if t else 0, "rx_bytes": t.rx_bytes if t else 0}


def _peer_traffic(t) -> dict:
    """A peer's counters and when it was last heard from (only peers' are stamped)."""
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    return {**_traffic(t), "last_rx_ago": seconds_since(t.last_rx_ns, now) if t else None}


def liveness(alive: dict | None, node: str) -> str:
    """'up' (its agent holds a live registration), 'down', or 'unknown' (store unread)."""
    return "unknown" if alive is None else ("up" if node in alive else "down")


def slotted_counters(node: str, name: str) -> dict:
    """The counters of the entries of a slotted map (desired.SLOTTED: xo_peers,
    xo_local_endpoints, xo_lb_backends), summed over CPUs, by what each entry is (an
    underlay IP, (vni, ip), (service id, index)), through the slot it names. Only those
    slots are read: the arrays are mostly unused."""
    stats, ident = desired.SLOTTED[name]
    try:
        with PinnedMap(pin_dir(node), MAPS[name]) as entries, PinnedMap(pin_dir(node), MAPS[stats]) as counters:
            out = {}
            for k, v in entries.items().items():
                values = counters.get(U32(v.slot))
                out[ident(k, v)] = sum_percpu(values) if values else None
            return out
    except OSError:
        return {}


def service_counters(node: str, ids) -> dict:
    """{service id: its counters on `node`} for the ids given (their slots only: the
    array has one for every possible id)."""
    try:
        with PinnedMap(pin_dir(node), MAPS["xo_lb_service_stats"]) as counters:
            return {sid: sum_percpu(v) for sid in ids if (v := counters.get(U32(sid)))}
    except OSError:
        return {}


def peer_rows(state: State, node: str, alive: dict | None = None) -> list[dict]:
    stats = slotted_counters(node, "xo_peers")
    return [{"node": peer.name, "underlay_ip": peer.underlay_ip, "liveness": liveness(alive, peer.name),
             "subnets": sorted(s.subnet for s in state.slices.values() if s.node == peer.name),
             **_peer_traffic(stats.get(ip_be(peer.underlay_ip)))}
            for peer in peers_of(state, node)]


def endpoint_rows(state: State, node: str) -> list[dict]:
    stats = slotted_counters(node, "xo_local_endpoints")
    rows = []
    for ep in sorted(state.endpoints.values(), key=lambda e: e.name):
        if ep.node != node or ep.network not in state.networks:
            continue
        key = (state.networks[ep.network].vni, ip_be(ep.ip))
        rows.append({"name": ep.name, "network": ep.network, "ip": ep.ip, "netns": ep.netns,
                     "state": "removing" if ep.removing else ("ready" if ep.ready else "pending"),
                     **_traffic(stats.get(key))})
    return rows


def service_rows(state: State, node: str) -> list[dict]:
    """Every service, with this node's counters: those of connections that started here
    (a client on this node, or an outside client through this node's published ports)."""
    svc_stats = service_counters(node, [s.id for s in state.services.values()])
    be_stats = slotted_counters(node, "xo_lb_backends")

    def counts(s):
        return {"packets": s.packets if s else 0, "bytes": s.bytes if s else 0,
                "connections": s.connections if s else 0}
    rows = []
    for svc in sorted(state.services.values(), key=lambda s: s.name):
        backends = []
        for b in svc.backends:
            ep = state.endpoints.get(b.endpoint)
            st = "gone" if ep is None or ep.removing else ("draining" if b.draining else "active")
            backends.append({"endpoint": b.endpoint, "id": b.index, "ip": ep.ip if ep else None,
                             "node": ep.node if ep else None, "port": b.port or None, "weight": b.weight,
                             "state": st, **counts(be_stats.get((svc.id, b.index)))})
        rows.append({"name": svc.name, "id": svc.id, "network": svc.network, "vip": svc.vip,
                     "ports": list(svc.ports), "publish": list(svc.publish), "affinity": svc.affinity,
                     **counts(svc_stats.get(svc.id)), "backends": backends})
    return rows


def drop_counts(node: str) -> dict[int, tuple[int, int]]:
    """reason code -> (packets, bytes), only the non-zero ones."""
    return {key.value: (c.packets, c.bytes) for key, c in read_counters(node, "xo_drops").items() if c.packets}


def drop_rows(node: str) -> list[dict]:
    return [{"reason": REASONS[code].name if code in REASONS else str(code), "code": code,
             "text": REASONS[code].text if code in REASONS else "unknown reason",
             "packets": packets, "bytes": nbytes}
            for code, (packets, nbytes) in sorted(drop_counts(node).items())]
