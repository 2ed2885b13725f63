"""What a node's data path is doing, read from its pinned maps (no agent, no compiler):
counters, drops by reason, map fill, and drift between the store and the kernel, as one
snapshot (`status --json`, the TUI) or printed once (`status --once`)."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from xoverlay.core import desired
from xoverlay.core.model import State, endpoint_state, peers_of
from xoverlay.core.rates import ago
from xoverlay.kernel import monitor_flag, processes
from xoverlay.kernel.gateway import TUNNEL_DEV
from xoverlay.kernel.maglev_maps import outer_slots
from xoverlay.kernel.counters import drop_rows, endpoint_rows, liveness, peer_rows, service_rows
from xoverlay.kernel.pinned import PinnedMap
from xoverlay.maps.layout import CFG_EGRESS, CFG_FIB_MAIN_ONLY, MAPS, U32, ip_be, pin_dir


def read_maps(node: str, service_ids=()) -> dict[str, dict]:
    """Every map of the node as the kernel holds it. `service_ids`: the services that
    exist, the Maglev slots that are read where each lookup waits (maglev_maps)."""
    out = {}
    for name in MAPS:
        if MAPS[name].ringbuf:
            continue
        try:
            with PinnedMap(pin_dir(node), MAPS[name]) as m:
                if name == desired.MAGLEV:
                    # An array of maps: only the slots that hold a table count.
                    out[name] = {U32(sid): map_id for sid, map_id in outer_slots(m.fd, service_ids)}
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
                                bool(cfg and cfg.flags & CFG_FIB_MAIN_ONLY), bool(cfg and cfg.flags & CFG_EGRESS))
    rows = []
    for op in desired.diff(want, {m: actual.get(m, {}) for m in desired.RECONCILED_MAPS}):
        kind = "unexpected" if op.value is None else (
            "different" if op.key in actual.get(op.map, {}) else "missing")
        rows.append({"map": op.map, "kind": kind, "key": repr(op.key)})
    return rows


def program_rows(facts: dict) -> list[dict]:
    """Where each pinned program of the node runs, from the facts the lints read
    (xoverlay/ui/lints.py gather): its id, its hook, how it is attached (XDP mode; tcx or
    cls_bpf), the devices it belongs on and how many of them run it now. `attached` is None
    where the node's devices cannot be seen from here."""
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
         "where": u["name"] if u else None, "mode": facts.get("tc_attach"),
         "attached": count(ids.get("prog_underlay_tc"), [u["tc_id"]] if u else None), "places": 1},
        {"program": "prog_endpoint", "id": ids.get("prog_endpoint"), "hook": "tc ingress",
         "where": "endpoint veths", "mode": facts.get("tc_attach"),
         "attached": count(ids.get("prog_endpoint"), None if veths is None else list(veths.values())),
         "places": len(veths) if veths is not None else None},
        {"program": "prog_loopback", "id": ids.get("prog_loopback"), "hook": "tc ingress", "where": "lo",
         "mode": facts.get("tc_attach"),
         "attached": count(ids.get("prog_loopback"), [facts["loopback_tc_id"]] if "loopback_tc_id" in facts else None),
         "places": 1},
        # xo-gro, where the node has one (datapath.choose_gro); tunnel_tc_id None: it has none.
        {"program": "prog_tunnel_device", "id": ids.get("prog_tunnel_device"), "hook": "tc ingress",
         "where": TUNNEL_DEV, "mode": facts.get("tc_attach"),
         "attached": None if "tunnel_tc_id" not in facts else count(
             ids.get("prog_tunnel_device"), [] if facts["tunnel_tc_id"] is None else [facts["tunnel_tc_id"]]),
         "places": 0 if "tunnel_tc_id" in facts and facts["tunnel_tc_id"] is None else 1},
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
    if row["places"] == 0:
        return f"no {where}", True
    if row["places"] == 1:
        ok = row["attached"] == 1
        return f"{row['hook']} #{row['id']}{mode} {'on' if ok else 'NOT on'} {where}", ok
    return (f"{row['hook']} #{row['id']}{mode} on {row['attached']}/{row['places']} {where}",
            row["attached"] == row["places"])


def store_view(store) -> tuple[State | None, dict | None, dict]:
    """(state, live registrations, the "store" part of a snapshot); state and registrations
    are None when the store cannot be read (the maps can still be shown)."""
    from xoverlay.errors import XoError
    try:
        state = store.read()
        alive = store.alive()
        return state, alive, {"where": store.where, "reachable": True, "error": None}
    except XoError as e:
        return None, None, {"where": store.where, "reachable": False, "error": str(e)}


def snapshot(state: State, node: str, alive: dict | None = None, store: dict | None = None) -> dict:
    """Everything `status` shows for a node, as plain data (the --json schema)."""
    maps = read_maps(node, [s.id for s in state.services.values()])
    me = state.nodes.get(node)
    pid = processes.running_pid(node)
    cfg = maps["xo_config"].get(U32(0))
    from xoverlay.kernel.datapath import build_id
    from xoverlay.ui import lints
    flag = monitor_flag.read_flag(node)
    facts = lints.gather(state, node)
    return {
        "node": {"name": node, "underlay_ip": me.underlay_ip if me else None,
                 "underlay_device": (facts.get("underlay") or {}).get("name"),
                 "vxlan_port": me.vxlan_port if me else None, "agent_pid": pid, "agent_alive": pid is not None,
                 "pinned": bool(cfg), "build": f"{cfg.build_id:x}" if cfg else None,
                 "build_current": bool(cfg) and cfg.build_id == build_id(),
                 "programs": program_rows(facts), "liveness": liveness(alive, node),
                 "xdp": ((alive or {}).get(node) or {}).get("xdp"),      # why XDP is on or off, as up chose
                 "gro": ((alive or {}).get(node) or {}).get("gro")},     # whether xo-gro is there, and why
        "store": store,
        "peers": peer_rows(state, node, alive),
        "endpoints": endpoint_rows(state, node),
        "services": service_rows(state, node),
        "drops": drop_rows(node),
        "maps": [{"name": name, "entries": len(maps[name]), "max_entries": spec.max_entries}
                 for name, spec in MAPS.items() if not spec.ringbuf],
        "drift": drift(state, node, maps) if cfg else [],
        # Egress is the node's stack (DESIGN.md "Egress"): what its conntrack holds and refused.
        "egress": {"on": bool(cfg.flags & CFG_EGRESS), "conntrack": facts.get("conntrack")} if cfg else None,
        "monitor": {"state": monitor_flag.flag_state(flag), "pid": flag.pid if flag and flag.events else None,
                    "lost": flag.lost if flag else 0} if flag else None,
        "lints": lints.evaluate(facts),
    }


# --- extras for the live dashboard (not in the --json schema) -------------------------

def endpoints_by_peer(state: State, node: str) -> dict[str, list[dict]]:
    """The endpoints each peer of `node` hosts, as the store has them: what the dashboard
    shows when you drill into a peer."""
    ep_state = endpoint_state
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
    from xoverlay.kernel import bpf
    names = []
    for name, spec in MAPS.items():
        try:
            with PinnedMap(pin_dir(node), spec) as m:
                if bpf.map_info(m.fd).type in _ARRAY_TYPES:
                    names.append(name)
        except OSError:
            pass
    return names


# --- as `status --once` prints it ------------------------------------------------------

def service_table_rows(services: list[dict]) -> list[list]:
    """One row per backend (the service's own columns on its first row only); a service
    without backends gets a row of its own. Counters: this node's."""
    rows = []
    for s in services:
        head = [s["name"], " ".join(f"{s['vip']}:{p}" for p in s["ports"]),
                " ".join(p.split(":")[0] + "/" + p.rsplit("/", 1)[1] for p in s["publish"]) or "-"]
        if not s["backends"]:
            rows.append(head + ["-", "-", "-", "no backend", s["connections"], s["packets"]])
        for i, b in enumerate(s["backends"]):
            rows.append((head if i == 0 else ["", "", ""]) +
                        [f"{b['endpoint']} ({b['ip']}{':' + str(b['port']) if b['port'] else ''})", b["node"] or "-",
                         b["weight"], b["state"], b["connections"], b["packets"]])
    return rows or [["none", "", "", "", "", "", "", "", ""]]


def render(snap: dict):
    """The snapshot as `status --once` prints it (rich renderables)."""
    n = snap["node"]
    agent = f"agent pid {n['agent_pid']}" if n["agent_alive"] else "agent not running (data path keeps forwarding)"
    build = "no pinned programs" if not n["pinned"] else (
        f"build {n['build']}" + ("" if n["build_current"] else " (older than this checkout)"))
    head = Text(f"node {n['name']}  underlay {n['underlay_device'] or '?'} {n['underlay_ip']}:{n['vxlan_port']}  "
                f"{agent}  {build}", style="bold")
    if n["pinned"]:
        head.append("\nprograms: " + " · ".join(program_summary(r)[0] for r in n["programs"]), style="")
        if n.get("xdp"):
            head.append(f"\nXDP {n['xdp']}", style="")
        if n.get("gro"):
            head.append(f"\nGRO for tunnel frames {n['gro']}", style="")
    store = snap.get("store")
    if store:
        head.append(f"\nstore {store['where']}: " + ("reachable" if store["reachable"] else
                    f"UNREACHABLE ({store['error']}); the data path keeps forwarding as it is"),
                    style="" if store["reachable"] else "red")
        head.append(f"; this node {n.get('liveness', 'unknown')}")

    def table(title, cols, rows):
        t = Table(title=title, title_justify="left")
        for c in cols:
            t.add_column(c)
        for r in rows:
            t.add_row(*[str(x) for x in r])
        return t
    traffic = ["TX PKTS", "TX BYTES", "RX PKTS", "RX BYTES"]

    def counts(r):
        return [r["tx_packets"], r["tx_bytes"], r["rx_packets"], r["rx_bytes"]]
    parts = [head,
             table("peers", ["NODE", "STATE", "UNDERLAY IP", "SUBNETS", *traffic, "LAST RX"],
                   [[p["node"], p.get("liveness", "unknown"), p["underlay_ip"], " ".join(p["subnets"]) or "-",
                     *counts(p), ago(p["last_rx_ago"])] for p in snap["peers"]]),
             table("endpoints", ["NAME", "NETWORK", "IP", "STATE", *traffic],
                   [[e["name"], e["network"], e["ip"], e["state"], *counts(e)] for e in snap["endpoints"]]),
             table("services", ["SERVICE", "VIP:PORT", "PUBLISHED", "BACKEND", "NODE", "WEIGHT", "STATE", "NEW CONNS",
                                "PKTS"], service_table_rows(snap.get("services", []))),
             table("drops", ["REASON", "PACKETS", "BYTES", "WHAT HAPPENED"],
                   [[d["reason"], d["packets"], d["bytes"], d["text"]] for d in snap["drops"]] or [["none", "", "", ""]]),
             table("maps", ["MAP", "ENTRIES", "MAX"],
                   [[m["name"], m["entries"], m["max_entries"]] for m in snap["maps"]])]
    drift = snap["drift"]
    parts.append(Text(f"drift: {len(drift)} entries differ between store and kernel" if drift
                      else "drift: none (the kernel holds exactly what the store wants)",
                      style="red" if drift else "green"))
    for d in drift[:10]:
        parts.append(Text(f"  {d['kind']:10} {d['map']} {d['key']}"))
    eg = snap.get("egress")
    if eg:
        ct = eg.get("conntrack")
        parts.append(Text(("egress: on (the node masquerades)" if eg["on"] else "egress: OFF (see lints)") +
                          (f"; conntrack {ct['entries']}/{ct['max']} entries, {ct['insert_failed']} refused "
                           f"(no free port or a clash), {ct['drop']} packets dropped by it" if ct else ""),
                          style="" if eg["on"] else "yellow"))
    mon = snap.get("monitor") or {"state": "off"}
    parts.append(Text({"off": "monitor: none running (the data path writes no events)",
                       "running": f"monitor: running, pid {mon.get('pid')}",
                       "stale": f"monitor: flag stale (pid {mon.get('pid')} is gone)"}[mon["state"]],
                      style={"off": "", "running": "green", "stale": "yellow"}[mon["state"]]))
    lints = snap.get("lints", [])
    parts.append(table("lints", ["SEVERITY", "LINT", "ON", "WHAT", "FIX"],
                       [[x["severity"], x["id"], x["subject"], x["message"], x["fix"]] for x in lints]
                       or [["none", "", "", "nothing known to break or slow this node", ""]]))
    return Group(*parts)
