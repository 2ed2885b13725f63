"""`xoverlay monitor`: the data path's events, live, from the node's pinned ring buffer.

While a monitor runs, its flag in the pinned xo_monitor map tells the programs to write
an event for every drop (and for one forwarded packet in N with --sample N); with no
monitor the flag is 0 and the programs write nothing. The flag records the monitor's pid
and start time: a monitor that died without clearing it (SIGKILL) leaves a *stale* flag,
which `status` lints and the agent or the next monitor clears.

Pure (unit-tested): decoding a record to the --json object, naming what its numbers
mean, the filters, the text line, and whether a flag is stale. Thin: the flag and the
ring buffer reader (`Listener`) and the loop (`run`)."""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

from xoverlay.core.model import State
from xoverlay.errors import XoError
from xoverlay.kernel import bpf
from xoverlay.kernel.monitor_flag import flag_state
from xoverlay.kernel.pinned import PinnedMap
from xoverlay.kernel.processes import proc_start
from xoverlay.maps.drops import BY_NAME as DROPS_BY_NAME, REASONS
from xoverlay.maps.events import EVENT_TYPES, FWD_ACTIONS, HOOK_ENDPOINT, HOOKS
from xoverlay.maps.layout import (
    EVF_IP,
    EVF_OUTER,
    EVF_PORTS,
    EVF_VNI,
    EVF_XLATE,
    MAPS,
    MON_DROPS,
    MON_FORWARDS,
    MON_SERVICES,
    U32,
    Event,
    Monitor,
    ip_str,
    pin_dir,
)

ETHERTYPES = {0x0800: "IPv4", 0x0806: "ARP", 0x86DD: "IPv6", 0x8100: "802.1Q", 0x88CC: "LLDP"}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 132: "sctp"}
POLL_MS = 200
EVENT_SIZE = ctypes.sizeof(Event)


# --- the flag (pure) ----------------------------------------------------------------

# --- what the numbers mean (pure) ---------------------------------------------------------

@dataclass
class Names:
    """Names for an event's numbers, as this node knows them."""
    ifnames: dict[int, str] = field(default_factory=dict)        # ifindex -> device, node's netns
    local: dict[int, str] = field(default_factory=dict)          # host veth ifindex -> endpoint
    endpoints: dict[tuple[int, str], str] = field(default_factory=dict)   # (vni, ip) -> endpoint
    networks: dict[int, str] = field(default_factory=dict)       # vni -> network
    nodes: dict[str, str] = field(default_factory=dict)          # underlay ip -> node
    services: dict[int, str] = field(default_factory=dict)       # service id -> service

    def endpoint(self, vni: int | None, ip: str | None) -> str | None:
        """The endpoint with this address in this network; if the VNI is not known or that
        network has no such endpoint, the only endpoint with this address in any network
        (an OTHER_NETWORK drop names whom it was meant for). None for a VNI that is no
        network of ours."""
        if ip is None or (vni is not None and vni not in self.networks):
            return None                  # a VNI of no network of ours: nobody's address
        if vni is not None and (vni, ip) in self.endpoints:
            return self.endpoints[(vni, ip)]
        found = [name for (_, addr), name in self.endpoints.items() if addr == ip]
        return found[0] if len(found) == 1 else None


def names_from(state: State, local: dict[int, tuple[int, str]], ifnames: dict[int, str]) -> Names:
    """local: host veth ifindex -> (vni, ip), from the node's xo_local_endpoints."""
    vni_of = {n.name: n.vni for n in state.networks.values()}
    endpoints = {(vni_of[e.network], e.ip): e.name for e in state.endpoints.values() if e.network in vni_of}
    return Names(ifnames=dict(ifnames),
                 local={ifindex: endpoints.get(key) for ifindex, key in local.items() if key in endpoints},
                 endpoints=endpoints,
                 networks={n.vni: n.name for n in state.networks.values()},
                 nodes={n.underlay_ip: n.name for n in state.nodes.values()},
                 services={s.id: s.name for s in state.services.values()})


def decode(raw: bytes, names: Names, wall_offset_ns: int = 0) -> dict:
    """One ring buffer record as the --json object (the schema is in docs/STATUS.md).
    wall_offset_ns: add to the event's CLOCK_MONOTONIC time to get the wall clock."""
    ev = Event.from_buffer_copy(raw[:EVENT_SIZE])
    etype = EVENT_TYPES.get(ev.type)
    hook = HOOKS.get(ev.hook)
    out: dict = {
        "time": _iso(ev.ts_ns + wall_offset_ns),
        "ts_ns": ev.ts_ns,
        "type": etype.name.lower() if etype else f"type {ev.type}",
        "hook": hook.name.lower() if hook else f"hook {ev.hook}",
        "reason": None, "action": None, "text": None,
        "ifindex": ev.ifindex,
        "interface": names.ifnames.get(ev.ifindex),
        "endpoint": names.local.get(ev.ifindex) if ev.hook == HOOK_ENDPOINT else None,
        "len": ev.len,
        "ethertype": f"0x{socket.ntohs(ev.ethertype):04x}" if ev.ethertype else None,
        "vni": ev.vni if ev.flags & EVF_VNI else None,
        "network": None,
        "outer": None,
        "src": None, "dst": None, "src_endpoint": None, "dst_endpoint": None,
        "protocol": None, "sport": None, "dport": None,
        "xlate": None, "service": None,
    }
    if etype and etype.name == "DROP":
        reason = REASONS.get(ev.reason)
        out["reason"] = reason.name if reason else f"code {ev.reason}"
        out["text"] = reason.text if reason else "unknown drop reason"
    elif etype and etype.name == "FORWARD":
        action = FWD_ACTIONS.get(ev.reason)
        out["action"] = action.name.lower() if action else f"action {ev.reason}"
        out["text"] = action.text if action else None
    elif etype and etype.name == "SERVICE_CONN":
        out["service"] = names.services.get(ev.reason, f"service {ev.reason}")
        out["text"] = etype.text
    elif etype:
        out["text"] = etype.text
    if out["vni"] is not None:
        out["network"] = names.networks.get(out["vni"])
    if ev.flags & EVF_OUTER:
        src, dst = ip_str(ev.outer_saddr), ip_str(ev.outer_daddr)
        out["outer"] = {"src": src, "dst": dst, "src_node": names.nodes.get(src), "dst_node": names.nodes.get(dst)}
        if not ev.flags & EVF_IP:
            out["protocol"] = _proto(ev.protocol)
    if ev.flags & EVF_IP:
        out["src"], out["dst"] = ip_str(ev.saddr), ip_str(ev.daddr)
        out["src_endpoint"] = names.endpoint(out["vni"], out["src"])
        out["dst_endpoint"] = names.endpoint(out["vni"], out["dst"])
        out["protocol"] = _proto(ev.protocol)
    if ev.flags & EVF_PORTS:
        out["sport"], out["dport"] = socket.ntohs(ev.sport), socket.ntohs(ev.dport)
    if ev.flags & EVF_XLATE:
        out["xlate"] = {"dst": ip_str(ev.xlate_daddr), "dport": socket.ntohs(ev.xlate_dport)}
    return out


def _proto(p: int) -> str:
    return PROTOCOLS.get(p, f"proto {p}")


def _iso(wall_ns: int) -> str:
    t = datetime.datetime.fromtimestamp(wall_ns / 1e9).astimezone()
    return t.isoformat(timespec="microseconds")


# --- filters (pure) -------------------------------------------------------------------------

@dataclass(frozen=True)
class Filter:
    reasons: frozenset[str] = frozenset()    # drop reason names; empty: every event
    endpoint: str | None = None              # events of this endpoint only
    service: str | None = None               # new connections to this service only

    def wants(self, ev: dict) -> bool:
        if self.reasons and ev["reason"] not in self.reasons:
            return False
        if self.service and ev["service"] != self.service:
            return False
        if self.endpoint and self.endpoint not in (ev["endpoint"], ev["src_endpoint"], ev["dst_endpoint"]):
            return False
        return True


def parse_reasons(given: tuple[str, ...] | list[str]) -> frozenset[str]:
    """Drop reason names as the user typed them (any case, with or without XO_DROP_)."""
    out = set()
    for r in given:
        name = r.strip().upper().removeprefix("XO_DROP_").replace("-", "_")
        if name not in DROPS_BY_NAME:
            raise XoError(f"unknown drop reason {r!r} (one of: {', '.join(sorted(DROPS_BY_NAME))})")
        out.add(name)
    return frozenset(out)


# --- the text line (pure) -------------------------------------------------------------------

def _addr(ip: str | None, port: int | None, proto: str | None) -> str:
    if ip is None:
        return "?"
    return f"{ip}:{port}" if port is not None and proto in ("tcp", "udp") else ip


def _who(name: str | None) -> str:
    return f" ({name})" if name else ""


def line(ev: dict) -> str:
    """One human line: time, what, where, network, the packet, length, and for drops the
    reason in words. Forwarded packets' action is its own explanation."""
    parts = [ev["time"][11:23], ev["type"].upper(), ev["reason"] or ev["action"] or ev["service"] or ""]
    iface = ev["interface"] or f"if{ev['ifindex']}"
    parts.append(f"on {iface}{_who(ev['endpoint'])} [{ev['hook']}]")
    if ev["vni"] is not None:
        parts.append(f"vni {ev['vni']}" + (f" {ev['network']}" if ev["network"] else ""))
    if ev["outer"]:
        o = ev["outer"]
        parts.append(f"outer {o['src']}{_who(o['src_node'])} -> {o['dst']}{_who(o['dst_node'])}")
    if ev["src"] is not None:
        pkt = (f"{_addr(ev['src'], ev['sport'], ev['protocol'])}{_who(ev['src_endpoint'])} -> "
               f"{_addr(ev['dst'], ev['dport'], ev['protocol'])}{_who(ev['dst_endpoint'])} {ev['protocol']}")
        if ev["protocol"] == "icmp" and ev["sport"] is not None:
            pkt += f" {ev['sport']}/{ev['dport']}"
        parts.append(pkt)
    elif ev["ethertype"] and ev["ethertype"] != "0x0800":
        code = int(ev["ethertype"], 16)
        parts.append(f"ethertype {ev['ethertype']} ({ETHERTYPES.get(code, 'not IPv4')})")
    if ev["xlate"]:
        parts.append(f"-> {ev['xlate']['dst']}:{ev['xlate']['dport']}")
    parts.append(f"{ev['len']} B")
    if ev["text"] and ev["type"] != "forward":
        parts.append(f"· {ev['text']}")
    return "  ".join(parts)


# --- the side effects -----------------------------------------------------------------------

class Listener:
    """Owns the node's monitor flag and reads its ring buffer. Refuses (before changing
    anything) if the node has no monitor maps or another live monitor has the flag; a
    stale flag is taken over. Use as a context manager: the flag is cleared on exit."""

    def __init__(self, node: str, events: int, sample: int = 0):
        self.node = node
        self.events = events
        self.sample = sample
        self.took_over: Monitor | None = None
        pin = pin_dir(node)
        try:
            self._flag = PinnedMap(pin, MAPS["xo_monitor"])
        except OSError as e:
            raise XoError(f"node {node} has no monitor map under {pin} ({e.strerror}): is `xoverlay up` running "
                          "there, with programs of this version?") from None
        try:
            self._ring = PinnedMap(pin, MAPS["xo_events"])
        except OSError as e:
            self._flag.close()
            raise XoError(f"node {node} has no event ring buffer under {pin} ({e.strerror})") from None
        current = self._flag.get(U32(0))
        state = flag_state(current)
        if state == "running":
            self.close()
            raise XoError(f"a monitor for node {node} is already running (pid {current.pid}): the ring buffer "
                          "has one reader")
        if state == "stale":
            self.took_over = current
        self._reader = None
        self.started_ns = 0

    def __enter__(self) -> "Listener":
        try:
            self._reader = bpf.RingBuffer(self._ring.fd)
            self._reader.drain()                   # whatever a dead monitor left unread
            self.started_ns = time.monotonic_ns()
            me = os.getpid()
            self._flag.set(U32(0), Monitor(events=self.events, sample=self.sample, pid=me,
                                           pid_start=proc_start(me) or 0))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def poll(self, timeout_ms: int = POLL_MS) -> list[bytes]:
        """Records that arrived since the flag was set, oldest first."""
        out = []
        for raw in self._reader.poll(timeout_ms):
            if len(raw) >= EVENT_SIZE and Event.from_buffer_copy(raw[:EVENT_SIZE]).ts_ns >= self.started_ns:
                out.append(raw)
        return out

    def lost(self) -> int:
        mon = self._flag.get(U32(0))
        return mon.lost if mon else 0

    def __exit__(self, *exc) -> None:
        try:
            mon = self._flag.get(U32(0)) if self._flag.fd >= 0 else None
            if mon is not None and mon.pid == os.getpid():
                self._flag.set(U32(0), Monitor())
        finally:
            self.close()

    def close(self) -> None:
        if getattr(self, "_reader", None) is not None:
            self._reader.close()
            self._reader = None
        self._flag.close()
        if hasattr(self, "_ring"):
            self._ring.close()


class _Stop(Exception):
    pass


def _local_endpoints(node: str) -> dict[int, tuple[int, str]]:
    try:
        with PinnedMap(pin_dir(node), MAPS["xo_local_endpoints"]) as m:
            return {k.value: (v.vni, ip_str(v.ip)) for k, v in m.items().items()}
    except OSError:
        return {}


def _names(state: State, node: str) -> Names:
    from xoverlay.kernel import netns
    ifnames = {i: link["name"] for i, link in netns.devices(netns.node_netns(node)).items()}
    return names_from(state, _local_endpoints(node), ifnames)


def check_endpoint(state: State, name: str | None) -> None:
    if name is not None and name not in state.endpoints:
        raise XoError(f"endpoint {name} does not exist")


def run(state_reader: Callable[[], State], node: str, *, reasons=(), endpoint: str | None = None,
        service: str | None = None, sample: int | None = None, as_json: bool = False, count: int | None = None,
        echo: Callable[[str], None] = print, note: Callable[[str], None] = print) -> int:
    """Print events of `node` until Ctrl-C, SIGTERM or `count` events; returns how many
    were printed. Every check comes before the flag is set."""
    state = state_reader()
    filt = Filter(parse_reasons(reasons), endpoint, service)
    check_endpoint(state, endpoint)
    if service is not None and service not in state.services:
        raise XoError(f"service {service} does not exist")
    events = MON_DROPS | MON_SERVICES | (MON_FORWARDS if sample else 0)
    names = _names(state, node)
    wall_offset = time.time_ns() - time.monotonic_ns()
    shown = 0
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def stop(*_):
        raise _Stop()
    lost = 0
    for sig in previous:
        signal.signal(sig, stop)         # before the flag is set: every way out clears it
    try:
        with Listener(node, events, sample or 0) as listener:
            try:
                if listener.took_over is not None:
                    note(f"took over a stale monitor flag (pid {listener.took_over.pid} is gone)")
                note(f"monitoring node {node}: {_describe(filt, sample)}; Ctrl-C stops")
                last_refresh = time.monotonic()
                while count is None or shown < count:
                    records = listener.poll()
                    if records and time.monotonic() - last_refresh > 1.0 and _unknown(records, names):
                        names = _names(state_reader(), node)
                        last_refresh = time.monotonic()
                    for raw in records:
                        ev = decode(raw, names, wall_offset)
                        if not filt.wants(ev):
                            continue
                        echo(json.dumps(ev) if as_json else line(ev))
                        shown += 1
                        if count is not None and shown >= count:
                            break
            finally:
                lost = listener.lost()
    except (KeyboardInterrupt, _Stop):
        pass
    except BrokenPipeError:
        # Whoever read our output went away (| head): stop quietly, flag cleared.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        except OSError:
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if lost:
        note(f"{lost} events were lost: the ring buffer was full (drops are still counted in status)")
    return shown


def _describe(filt: Filter, sample: int | None) -> str:
    what = "drops, new service connections" + (f" and 1 in {sample} forwarded packets" if sample else "")
    if filt.reasons:
        what += f", reasons {', '.join(sorted(filt.reasons))}"
    if filt.endpoint:
        what += f", endpoint {filt.endpoint}"
    if filt.service:
        what += f", service {filt.service}"
    return what


def _unknown(records: list[bytes], names: Names) -> bool:
    """Does any record name an interface or VNI we have no name for (a new endpoint)?"""
    for raw in records:
        ev = Event.from_buffer_copy(raw[:EVENT_SIZE])
        if ev.ifindex not in names.ifnames or (ev.flags & EVF_VNI and ev.vni not in names.networks):
            return True
    return False
