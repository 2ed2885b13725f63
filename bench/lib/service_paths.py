"""The paths of bench/services: the plain routed path with kube-proxy-style nftables DNAT
on the client's node, and an xoverlay lab with a measured service and N-1 others, both
with a set_services(n) that puts n services in place and says how long that took."""
from __future__ import annotations

import ipaddress
import json
import os
import time
from dataclasses import replace

from bench.lib.kube_proxy import kube_proxy_nft
from bench.lib.shell import STATE_ROOT, BenchError, in_ns, ns_path, sh
from bench.lib.topologies import PlainRouting, XoverlayLab
from bench.lib.traffic import CONN_PORT, PAIR_PORT, UDP_PORT

SVC_PORTS = (f"{UDP_PORT}/tcp", f"{UDP_PORT}/udp", f"{CONN_PORT}/tcp",   # iperf3's control + data, connrate,
             f"{PAIR_PORT}/udp")                                          # pairrate
FILLER_PORT = "80/tcp"                   # every other service's port


def vips_from_top(subnet: str):
    """The addresses of `subnet` from the top down (the model hands out VIPs that way)."""
    net = ipaddress.IPv4Network(subnet)
    addr = net.broadcast_address - 1
    while addr > net.network_address:
        yield str(addr)
        addr -= 1


def with_fillers(state, names: list[str], network: str, backends: list[str]):
    """`state` with the services `names` added to `network`, each on FILLER_PORT with
    `backends`: the first through the model (every check), the rest copies of it with
    their own name, id and VIP (create_service is O(services): 10,000 calls would take
    minutes of validation)."""
    from xoverlay.core import model
    if not names:
        return state
    s = model.create_service(state, names[0], network, [FILLER_PORT], backends)
    tpl = s.services[names[0]]
    taken_ids = {x.id for x in s.services.values()}
    taken_ips = {x.vip for x in s.services.values()} | {e.ip for e in s.endpoints.values()}
    ids = (i for i in range(1, model.MAX_SERVICES + 1) if i not in taken_ids)
    vips = (v for v in vips_from_top(s.networks[network].subnet) if v not in taken_ips)
    services = dict(s.services)
    for name in names[1:]:
        services[name] = replace(tpl, name=name, id=next(ids), vip=next(vips))
    return replace(s, services=services)


class PlainServices(PlainRouting):
    """The plain routed path with kube-proxy-style nftables DNAT on the client's node
    (node 1, where kube-proxy would run it for a pod's traffic): N services, the measured
    one last, with the server container as its only backend."""
    TABLE = "xbench_kp"

    def __init__(self):
        super().__init__()
        self.key, self.label = "nft", "plain routing + nftables DNAT, kube-proxy layout"
        self.vip = ""
        self.services = 0

    @staticmethod
    def _vip(i: int) -> str:
        return f"10.96.{i // 250}.{i % 250 + 1}"      # kube's default service range

    def set_services(self, n: int) -> float:
        """Replace the ruleset by one with n services; returns seconds nft took."""
        filler = [{"name": f"f{i}", "vip": self._vip(i), "ports": [FILLER_PORT],
                   "backends": [(f"10.201.2.{10 + i % 200}", 0), (f"10.201.2.{11 + i % 200}", 0)]}
                  for i in range(n - 1)]
        self.vip = self._vip(n - 1)
        measured = {"name": "measured", "vip": self.vip, "ports": list(SVC_PORTS),
                    "backends": [(self.server_ip, 0)]}
        text = kube_proxy_nft(self.TABLE, filler + [measured])
        node = ns_path(self.u.node_ns(1))
        # One transaction: the old table goes and the new one comes at once.
        exists = sh(*in_ns(node, "nft", "list", "tables"), check=False)
        prefix = f"delete table ip {self.TABLE}\n" if f"table ip {self.TABLE}" in exists else ""
        start = time.monotonic()
        sh(*in_ns(node, "nft", "-f", "-"), input=prefix + text, timeout=600)
        took = time.monotonic() - start
        rules = sh(*in_ns(node, "nft", "-a", "list", "chain", "ip", self.TABLE, "services"), timeout=120)
        if rules.count(" jump svc-") != (n - 1) + len(SVC_PORTS):
            raise BenchError(f"nft: services chain has {rules.count(' jump svc-')} rules, expected "
                             f"{n - 1 + len(SVC_PORTS)}")
        self.services = n
        return took

    def conntrack_count(self) -> int | None:
        try:
            out = sh(*in_ns(ns_path(self.u.node_ns(1)), "cat", "/proc/sys/net/netfilter/nf_conntrack_count"))
            return int(out.strip())
        except (BenchError, ValueError):
            return None


class XoverlayServices(XoverlayLab):
    """An xoverlay lab (2 nodes, --no-xdp unless asked) with a measured service whose only
    backend is node2-a (created with `xoverlay service create`), and n-1 other services
    with their own VIPs and two backends each (node1-b, node2-b), written to the store in
    one update and pushed by the agents like any others."""
    FILLER_PREFIX = "xbsvc-"

    def __init__(self, xdp: bool = False):
        super().__init__(xdp)
        self.key = "xoverlay-svc" + ("-xdp" if xdp else "")
        self.label = "xoverlay" + (" (XDP on the underlay)" if xdp else " --no-xdp")
        self.state = os.path.join(STATE_ROOT, self.key, "state.db")
        self.vip = ""
        self.sid = 0
        self.services = 0

    def up(self) -> None:
        super().up()
        # The lab's demo service is not one of ours: the counts of pushed services
        # (_wait_pushed) and of services in the maps are the bench's alone.
        self.cli("service", "rm", "web")
        self.cli("service", "create", "measured", "--network", "demo",
                 *[a for p in SVC_PORTS for a in ("--port", p)], "--backend", f"{self.nodes[1]}-a")
        svc = json.loads(self.cli("service", "inspect", "measured", "--json"))
        self.vip, self.sid = svc["vip"], svc["id"]
        self.info.update({"vip": self.vip, "backend": f"{self.nodes[1]}-a"})
        self.services = 1
        self._wait_pushed(1)

    def set_services(self, n: int) -> float:
        """n services in all (the measured one + n-1 others); returns the seconds from the
        store update until both agents' maps hold exactly them."""
        from xoverlay.core import model
        from xoverlay.store import open_store
        store = open_store(self.state)
        try:
            def change(s):
                names = [f"{self.FILLER_PREFIX}{i}" for i in range(n - 1)]
                wanted = set(names)
                for name in [k for k in s.services if k.startswith(self.FILLER_PREFIX) and k not in wanted]:
                    s = model.remove_service(s, name)
                return with_fillers(s, [k for k in names if k not in s.services], "demo",
                                    [f"{self.nodes[0]}-b", f"{self.nodes[1]}-b"])
            start = time.monotonic()
            store.update(change)
        finally:
            store.close()
        self._wait_pushed(n)
        self.services = n
        return time.monotonic() - start

    def _wait_pushed(self, n: int, timeout: float = 300) -> None:
        from xoverlay.kernel import bpf
        from xoverlay.kernel.pinned import PinnedMap
        from xoverlay.maps.layout import MAPS, pin_dir
        want_ports = n - 1 + len(SVC_PORTS)
        want_backends = 2 * (n - 1) + 1
        deadline = time.monotonic() + timeout
        while True:
            counts = []
            for node in self.nodes:
                with PinnedMap(pin_dir(node), MAPS["xo_lb_services"]) as s, \
                        PinnedMap(pin_dir(node), MAPS["xo_lb_backends"]) as b:
                    counts.append((len(bpf.map_keys(s.fd, s._ksize)), len(bpf.map_keys(b.fd, b._ksize))))
            if all(c == (want_ports, want_backends) for c in counts):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.key}: agents did not push {n} services in {timeout:g} s "
                                 f"((service ports, backends) per node: {counts})")
            time.sleep(0.5)
