"""What a node's data path is doing, read from its pinned maps (no agent, no compiler):
counters, drops by reason, map fill, and drift between the store and the kernel."""
from __future__ import annotations

import time

from maps.drops import REASONS
from maps.layout import CFG_FIB_MAIN_ONLY, MAPS, PinnedMap, ip_be, pin_dir, sum_percpu, U32

from . import agent, desired
from .model import State, peers_of


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


def read_maps(node: str) -> dict[str, dict]:
    from maps import bpf
    out = {}
    for name in MAPS:
        if MAPS[name].ringbuf:
            continue
        try:
            with PinnedMap(pin_dir(node), MAPS[name]) as m:
                if name == desired.MAGLEV:
                    # An array of maps: only the slots that hold a table count.
                    out[name] = {U32(int.from_bytes(k, "little")): int.from_bytes(v, "little")
                                 for k, v in bpf.lookup_batch(m.fd, 4, 4, MAPS[name].max_entries)}
                    continue
                out[name] = m.items() if name in desired.RECONCILED_MAPS else dict.fromkeys(m.keys())
        except OSError:
            out[name] = {}
    return out


def drift(state: State, node: str, actual: dict[str, dict]) -> list[dict]:
    """Entries the store wants and the kernel lacks (or holds differently), and entries
    the kernel has that the store does not want. Local endpoints are matched to their
    veth through the kernel's own xo_local_endpoints, so an endpoint not yet plumbed is
    not drift."""
    ifindex_of = {(v.vni, v.ip): k.value for k, v in actual.get("xo_local_endpoints", {}).items()}
    ifindexes = {}
    for ep in state.endpoints.values():
        if ep.node == node and ep.network in state.networks:
            found = ifindex_of.get((state.networks[ep.network].vni, ip_be(ep.ip)))
            if found:
                ifindexes[ep.name] = found
    cfg = actual.get("xo_config", {}).get(U32(0))
    if node not in state.nodes:
        return []
    want = desired.desired_maps(state, node, ifindexes, cfg.underlay_ifindex if cfg else 0,
                                cfg.build_id if cfg else 0, cfg.gateway_ifindex if cfg else 0, actual,
                                bool(cfg and cfg.flags & CFG_FIB_MAIN_ONLY))
    rows = []
    for op in desired.diff(want, {m: actual.get(m, {}) for m in desired.RECONCILED_MAPS}):
        kind = "unexpected" if op.value is None else (
            "different" if op.key in actual.get(op.map, {}) else "missing")
        rows.append({"map": op.map, "kind": kind, "key": repr(op.key)})
    return rows


def program_rows(facts: dict) -> list[dict]:
    """Where each pinned program of the node runs, from the facts the lints read
    (ctl/lints.gather): its id, its hook, the devices it belongs on and how many of them
    run it now. `attached` is None where the node's devices cannot be seen from here."""
    ids = facts.get("program_ids") or {}
    u = facts.get("underlay")
    veths = facts.get("endpoint_tc_ids")

    def count(want, found):
        return None if found is None else sum(1 for f in found if want and f == want)
    xdp_id = ids.get("prog_underlay_xdp")
    return [
        {"program": "prog_underlay_xdp", "id": xdp_id, "hook": "xdp", "where": u["name"] if u else None,
         "mode": u["xdp_mode"] if u else None, "attached": count(xdp_id, [u["xdp_id"]] if u else None),
         "places": 1},
        {"program": "prog_underlay_tc", "id": ids.get("prog_underlay_tc"), "hook": "tc ingress",
         "where": u["name"] if u else None, "mode": None,
         "attached": count(ids.get("prog_underlay_tc"), [u["tc_id"]] if u else None), "places": 1},
        {"program": "prog_endpoint", "id": ids.get("prog_endpoint"), "hook": "tc ingress",
         "where": "endpoint veths", "mode": None,
         "attached": count(ids.get("prog_endpoint"), None if veths is None else list(veths.values())),
         "places": len(veths) if veths is not None else None},
    ]


def program_summary(row: dict) -> tuple[str, bool]:
    """One program row as the header shows it, and whether all is as it should be
    (XDP off is a choice, `up --no-xdp`, not a fault)."""
    where = row["where"] or "?"
    if row["id"] is None:
        return f"{row['hook']} not pinned", False
    if row["mode"] == "off":
        return f"xdp off on {where}", True
    mode = f" {row['mode']}" if row["mode"] else ""
    if row["attached"] is None:
        return f"{row['hook']} #{row['id']}{mode} ({where} not visible from here)", True
    if row["places"] == 1:
        ok = row["attached"] == 1
        return f"{row['hook']} #{row['id']}{mode} {'on' if ok else 'NOT on'} {where}", ok
    return (f"{row['hook']} #{row['id']} on {row['attached']}/{row['places']} {where}",
            row["attached"] == row["places"])


def store_view(store) -> tuple[State | None, dict | None, dict]:
    """(state, live registrations, the "store" part of a snapshot); state and registrations
    are None when the store cannot be read (the maps can still be shown)."""
    from .errors import XoError
    try:
        state = store.read()
        alive = store.alive()
        return state, alive, {"where": store.where, "reachable": True, "error": None}
    except XoError as e:
        return None, None, {"where": store.where, "reachable": False, "error": str(e)}


def snapshot(state: State, node: str, alive: dict | None = None, store: dict | None = None) -> dict:
    """Everything `status` shows for a node, as plain data (the --json schema)."""
    maps = read_maps(node)
    me = state.nodes.get(node)
    pid = agent.running_pid(node)
    cfg = maps["xo_config"].get(U32(0))
    from . import lints, monitor
    from .datapath import build_id
    flag = monitor.read_flag(node)
    facts = lints.gather(state, node)
    return {
        "node": {"name": node, "underlay_ip": me.underlay_ip if me else None,
                 "underlay_device": (facts.get("underlay") or {}).get("name"),
                 "vxlan_port": me.vxlan_port if me else None, "agent_pid": pid, "agent_alive": pid is not None,
                 "pinned": bool(cfg), "build": f"{cfg.build_id:x}" if cfg else None,
                 "build_current": bool(cfg) and cfg.build_id == build_id(),
                 "programs": program_rows(facts), "liveness": liveness(alive, node)},
        "store": store,
        "peers": peer_rows(state, node, alive),
        "endpoints": endpoint_rows(state, node),
        "services": service_rows(state, node),
        "drops": drop_rows(node),
        "maps": [{"name": name, "entries": len(maps[name]), "max_entries": spec.max_entries}
                 for name, spec in MAPS.items() if not spec.ringbuf],
        "drift": drift(state, node, maps) if cfg else [],
        "monitor": {"state": monitor.flag_state(flag), "pid": flag.pid if flag and flag.events else None,
                    "lost": flag.lost if flag else 0} if flag else None,
        "lints": lints.evaluate(facts),
    }


# --- extras for the live dashboard (not in the --json schema) -------------------------

def endpoints_by_peer(state: State, node: str) -> dict[str, list[dict]]:
    """The endpoints each peer of `node` hosts, as the store has them: what the dashboard
    shows when you drill into a peer."""
    def ep_state(ep):
        return "removing" if ep.removing else ("ready" if ep.ready else "pending")
    out = {peer.name: [] for peer in peers_of(state, node)}
    for ep in sorted(state.endpoints.values(), key=lambda e: e.name):
        if ep.node in out:
            out[ep.node].append({"name": ep.name, "network": ep.network, "ip": ep.ip, "state": ep_state(ep)})
    return out


# Kernel map types whose every slot always exists (linux/bpf.h: ARRAY, PERCPU_ARRAY).
_ARRAY_TYPES = {2: "array", 6: "percpu_array"}


def array_maps(node: str) -> list[str]:
    """Pinned maps of `node` that are arrays, asked of the kernel: they always hold
    max_entries entries, so a full one is not under pressure."""
    from maps import bpf
    names = []
    for name, spec in MAPS.items():
        try:
            with PinnedMap(pin_dir(node), spec) as m:
                if bpf.map_info(m.fd).type in _ARRAY_TYPES:
                    names.append(name)
        except OSError:
            pass
    return names
