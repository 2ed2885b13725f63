"""Prometheus metrics of a node, served by its agent: `xoverlay up --metrics HOST:PORT`.

A custom collector reads the node's pinned maps when Prometheus scrapes (no polling
thread, nothing cached): traffic per peer and per endpoint, drops by reason, map fill.
The agent itself adds how long its reconcile passes take and how many failed. Names and
labels are listed in docs/STATUS.md.

`parse_listen` is pure; `bind` opens the listening socket (before the agent changes
anything, so that a bad address or a port in use is refused cleanly) and `serve` starts
answering on it from a daemon thread."""
from __future__ import annotations

import ipaddress
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from xoverlay.core.model import State
from xoverlay.errors import XoError
from xoverlay.kernel import counters
from xoverlay.kernel.pinned import PinnedMap
from xoverlay.maps.drops import REASONS
from xoverlay.maps.layout import MAPS, pin_dir

RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# --- the address (pure) ----------------------------------------------------------------

def parse_listen(addr: str) -> tuple[str, int]:
    """'127.0.0.1:9469' or '[::1]:9469' -> (host, port). The host must be an IP address:
    a name would be resolved at bind time, and may not mean what the user thinks."""
    def bad(why: str) -> XoError:
        return XoError(f"--metrics {addr!r}: {why} (expected IP:PORT, e.g. 127.0.0.1:9469 or [::1]:9469)")
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise bad("no host")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not isinstance(_ip(host), ipaddress.IPv6Address):
            raise bad("not an IPv6 address in brackets")
    elif _ip(host) is None or ":" in host:
        raise bad(f"{host} is not an IP address")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise bad(f"port {port or '(none)'} is not a number from 1 to 65535")
    return host, int(port)


def _ip(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


# --- what is scraped ----------------------------------------------------------------

class NodeCollector:
    """Everything the pinned maps of `node` say, read at scrape time. `state()` returns
    the store's state as the agent last read it (names and labels come from there)."""

    def __init__(self, node: str, state: Callable[[], State | None]):
        self.node = node
        self.state = state

    def collect(self):
        node = self.node
        state = self.state() or State()

        peer_pkts = CounterMetricFamily("xoverlay_peer_packets", "VXLAN packets to/from a peer node "
                                        "(tx: sent by this node; rx: passed every check)",
                                        labels=["node", "peer", "peer_ip", "direction"])
        peer_bytes = CounterMetricFamily("xoverlay_peer_bytes", "Bytes of those packets, outer headers "
                                         "included", labels=["node", "peer", "peer_ip", "direction"])
        for p in counters.peer_rows(state, node):
            for d in ("tx", "rx"):
                peer_pkts.add_metric([node, p["node"], p["underlay_ip"], d], p[f"{d}_packets"])
                peer_bytes.add_metric([node, p["node"], p["underlay_ip"], d], p[f"{d}_bytes"])
        yield peer_pkts
        yield peer_bytes

        labels = ["node", "endpoint", "network", "ip", "direction"]
        ep_pkts = CounterMetricFamily("xoverlay_endpoint_packets", "Frames a local endpoint sent (tx) that "
                                      "were forwarded, and frames delivered to it (rx)", labels=labels)
        ep_bytes = CounterMetricFamily("xoverlay_endpoint_bytes", "Bytes of those frames, Ethernet header "
                                       "included", labels=labels)
        for e in counters.endpoint_rows(state, node):
            for d in ("tx", "rx"):
                ep_pkts.add_metric([node, e["name"], e["network"], e["ip"], d], e[f"{d}_packets"])
                ep_bytes.add_metric([node, e["name"], e["network"], e["ip"], d], e[f"{d}_bytes"])
        yield ep_pkts
        yield ep_bytes

        # Services: counted on the node where a connection started (its client's, or the
        # node an outside client reached through a published port).
        svc_metrics = {
            kind: CounterMetricFamily(f"xoverlay_service_{kind}", f"{what} of a service's connections "
                                      "that started on this node", labels=["node", "service", "vip"])
            for kind, what in (("packets", "Packets"), ("bytes", "Bytes"), ("connections", "New connections"))}
        be_metrics = {
            kind: CounterMetricFamily(f"xoverlay_backend_{kind}", f"{what} sent to a service backend from "
                                      "this node", labels=["node", "service", "backend", "backend_ip", "state"])
            for kind, what in (("packets", "Packets"), ("bytes", "Bytes"), ("connections", "New connections"))}
        for svc in counters.service_rows(state, node):
            for kind, family in svc_metrics.items():
                family.add_metric([node, svc["name"], svc["vip"]], svc[kind])
            for b in svc["backends"]:
                for kind, family in be_metrics.items():
                    family.add_metric([node, svc["name"], b["endpoint"], b["ip"] or "", b["state"]], b[kind])
        yield from svc_metrics.values()
        yield from be_metrics.values()

        # Every reason, zeros included: rate() needs the series before the first drop.
        counts = counters.drop_counts(node)
        drops = CounterMetricFamily("xoverlay_drops", "Packets dropped by the data path, by reason "
                                    "(bpf/lib/drop.h)", labels=["node", "reason"])
        drop_bytes = CounterMetricFamily("xoverlay_drop_bytes", "Bytes dropped, by reason",
                                         labels=["node", "reason"])
        for code, reason in sorted(REASONS.items()):
            packets, nbytes = counts.get(code, (0, 0))
            drops.add_metric([node, reason.name], packets)
            drop_bytes.add_metric([node, reason.name], nbytes)
        yield drops
        yield drop_bytes

        entries = GaugeMetricFamily("xoverlay_map_entries", "Entries in a pinned map now",
                                    labels=["node", "map"])
        capacity = GaugeMetricFamily("xoverlay_map_max_entries", "Capacity of a pinned map (max_entries)",
                                     labels=["node", "map"])
        for name, spec in MAPS.items():
            if spec.ringbuf:
                continue
            try:
                with PinnedMap(pin_dir(node), spec) as m:
                    n = len(m.keys())
            except OSError:
                continue
            entries.add_metric([node, name], n)
            capacity.add_metric([node, name], spec.max_entries)
        yield entries
        yield capacity


class StoreCollector:
    """What the agent knows of the store: reachable or not, and which nodes hold a live
    registration (as of the agent's last renewal; docs/STORE.md)."""

    def __init__(self, node: str, state: Callable[[], State | None], store: Callable[[], tuple]):
        self.node, self.state, self.store = node, state, store

    def collect(self):
        error, alive = self.store()
        reachable = GaugeMetricFamily("xoverlay_store_reachable", "1 if the agent's last request to the store "
                                      "was answered, 0 while it is unreachable (the data path keeps forwarding)",
                                      labels=["node"])
        reachable.add_metric([self.node], 0 if error else 1)
        yield reachable
        up = GaugeMetricFamily("xoverlay_node_up", "1 if the node's agent holds a live registration in the store "
                               "(lease), 0 if it is down", labels=["node", "peer"])
        if alive is not None:
            for name in sorted((self.state() or State()).nodes):
                up.add_metric([self.node, name], 1 if name in alive else 0)
        yield up


class AgentMetrics:
    """The agent's own: reconcile latency and errors, and repairs (whether it reaches the store:
    StoreCollector)."""

    def __init__(self, registry: CollectorRegistry, node: str):
        self.reconcile_seconds = Histogram("xoverlay_reconcile_duration_seconds",
                                           "Time of one reconcile pass of the agent (store -> maps)",
                                           ["node"], buckets=RECONCILE_BUCKETS, registry=registry).labels(node)
        self.reconcile_errors = Counter("xoverlay_reconcile_errors", "Reconcile passes that failed",
                                        ["node"], registry=registry).labels(node)
        self.repairs = Counter("xoverlay_repairs", "Things undone behind the agent's back that it put back "
                               "(kind: pin, tc, xdp, endpoint)", ["node", "kind"], registry=registry)
        self.node = node

    def repaired(self, repairs) -> None:
        for r in repairs:
            self.repairs.labels(self.node, r.kind).inc()

    def observe(self, seconds: float, ok: bool) -> None:
        self.reconcile_seconds.observe(seconds)
        if not ok:
            self.reconcile_errors.inc()


# --- serving ------------------------------------------------------------------------

class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def bind(addr: str) -> WSGIServer:
    """Listen on addr, or refuse with one line. Nothing is served until serve()."""
    host, port = parse_listen(addr)
    cls = _Server6 if ":" in host else _Server
    try:
        server = cls((host, port), _Quiet)
    except OSError as e:
        raise XoError(f"--metrics {addr}: cannot listen there: {e.strerror or e}") from None
    server.set_app(lambda environ, start: start("503 Service Unavailable", []) or [b""])
    return server


def serve(server: WSGIServer, node: str, state: Callable[[], State | None],
          store: Callable[[], tuple] | None = None) -> AgentMetrics:
    """Answer scrapes on the bound server from a daemon thread; return the agent's own
    metrics to observe its reconcile passes into. `store()` returns (why the store is
    unreachable or None, the live registrations or None)."""
    registry = CollectorRegistry()
    registry.register(NodeCollector(node, state))
    if store is not None:
        registry.register(StoreCollector(node, state, store))
    agent_metrics = AgentMetrics(registry, node)
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="xo-metrics", daemon=True).start()
    return agent_metrics
