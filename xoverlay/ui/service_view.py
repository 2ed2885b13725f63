"""What `xoverlay service ls/inspect` show: services from the store, joined with their
endpoints and, where this machine has a node's pinned maps, the data path's counters."""
from __future__ import annotations

from xoverlay.core.model import Service, State, endpoint_live
from xoverlay.errors import XoError


def _backend_state(state: State, b) -> str:
    ep = state.endpoints.get(b.endpoint)
    if ep is None or not endpoint_live(ep):
        return "gone"
    return "draining" if b.draining else "active"


def summary(state: State, svc: Service) -> dict:
    return {"name": svc.name, "network": svc.network, "vip": svc.vip, "ports": list(svc.ports),
            "publish": list(svc.publish), "affinity": svc.affinity,
            "backends": len(svc.backends), "active": len(svc.active), "id": svc.id}


def rows(state: State) -> list[dict]:
    return [summary(state, s) for s in sorted(state.services.values(), key=lambda s: s.name)]


def inspect(state: State, name: str, counters: dict | None = None) -> dict:
    """One service in full. `counters`: what counters.service_counters() read, if any."""
    svc = state.services.get(name)
    if svc is None:
        raise XoError(f"service {name} does not exist")
    counters = counters or {}
    out = summary(state, svc)
    out["table_size"] = svc.table_size
    out["counters"] = counters.get("service", {"packets": 0, "bytes": 0, "connections": 0})
    out["backends"] = []
    for b in svc.backends:
        ep = state.endpoints.get(b.endpoint)
        out["backends"].append({
            "endpoint": b.endpoint, "id": b.index, "ip": ep.ip if ep else None, "node": ep.node if ep else None,
            "port": b.port or None, "weight": b.weight, "state": _backend_state(state, b),
            "counters": counters.get("backends", {}).get(b.index, {"packets": 0, "bytes": 0, "connections": 0}),
        })
    return out


def read_counters(state: State, name: str) -> dict:
    """Per-service and per-backend counters, summed over every node whose pinned maps
    this machine has (all of them in the namespace lab, the local one on a real node):
    {"service": {...}, "backends": {index: {...}}}. Zeros until anything was counted."""
    import os

    from xoverlay.kernel.counters import service_counters, slotted_counters
    from xoverlay.maps.layout import pin_dir

    svc = state.services.get(name)
    if svc is None:
        return {}

    def empty():
        return {"packets": 0, "bytes": 0, "connections": 0}

    def add(total, s):
        total["packets"] += s.packets
        total["bytes"] += s.bytes
        total["connections"] += s.connections

    out = {"service": empty(), "backends": {b.index: empty() for b in svc.backends}}
    for node in state.nodes:
        if not os.path.isdir(pin_dir(node)):
            continue
        counts = service_counters(node, [svc.id]).get(svc.id)
        if counts:
            add(out["service"], counts)
        for (sid, index), counts in slotted_counters(node, "xo_lb_backends").items():
            if sid == svc.id and counts and index in out["backends"]:
                add(out["backends"][index], counts)
    return out
