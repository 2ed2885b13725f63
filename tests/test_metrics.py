"""Prometheus metrics (`xoverlay up --metrics IP:PORT`): the address rules; the collector
on a throwaway node's real maps while BPF_PROG_TEST_RUN moves its counters; and a lab
agent with --metrics scraped over HTTP inside its netns, while traffic runs. A bad
address or a port in use is one line, before anything changes."""
from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from conftest import PY, in_netns

from xoverlay.agent import metrics
from xoverlay.core import model
from xoverlay.errors import XoError

# --- the address (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize("addr, want", [
    ("127.0.0.1:9469", ("127.0.0.1", 9469)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[::1]:9469", ("::1", 9469)),
    ("[::]:65535", ("::", 65535)),
])
def test_listen_addresses(addr, want):
    assert metrics.parse_listen(addr) == want


@pytest.mark.parametrize("addr, why", [
    ("9469", "no host"),
    (":9469", "no host"),
    ("localhost:9469", "localhost is not an IP address"),
    ("127.0.0.1", "no host"),
    ("127.0.0.1:", "port (none)"),
    ("127.0.0.1:0", "port 0"),
    ("127.0.0.1:65536", "port 65536"),
    ("127.0.0.1:http", "port http"),
    ("::1:9469", "::1 is not an IP address"),
    ("[127.0.0.1]:9469", "not an IPv6 address in brackets"),
    ("300.1.1.1:9469", "300.1.1.1 is not an IP address"),
])
def test_bad_listen_addresses(addr, why):
    with pytest.raises(XoError) as e:
        metrics.parse_listen(addr)
    assert why in str(e.value) and "expected IP:PORT" in str(e.value)


def test_bind_refuses_a_port_in_use():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(XoError, match=f"--metrics 127.0.0.1:{port}: cannot listen there: Address already in use"):
            metrics.bind(f"127.0.0.1:{port}")
    finally:
        taken.close()


# --- the collector on real maps ----------------------------------------------------------------

def samples(text: str) -> dict[str, float]:
    """'name{labels} value' lines of the text format -> {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def series(all_samples: dict, name: str, **labels) -> float:
    """The one sample of `name` whose labels include these."""
    found = [v for k, v in all_samples.items()
             if k.split("{")[0] == name and all(f'{lk}="{lv}"' in k for lk, lv in labels.items())]
    assert len(found) == 1, f"{name} {labels}: {len(found)} samples"
    return found[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs")
@pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")
def test_collector_reads_the_pinned_maps_at_scrape_time():
    from bpfrun import TC_ACT_REDIRECT, TC_ACT_SHOT, Datapath, Topology as T
    from prometheus_client import CollectorRegistry, generate_latest
    from test_bpf_programs import _web1_to_api1, container

    with Datapath(f"pytest-metrics-{os.getpid()}") as dp:
        s = model.State()       # the store's view of bpfrun.Topology: this node is dp.node
        for name, ip in ((dp.node, T.NODE_IP), ("B", T.PEER_B), ("C", T.PEER_C)):
            s = model.join_node(s, name, ip)
        s = model.create_network(s, "blue", T.BLUE_SUBNET, vni=T.BLUE_VNI)
        s = model.add_endpoint(s, "web1", "blue", dp.node, "/run/netns/web1", True, T.WEB1.ip)
        registry = CollectorRegistry()
        registry.register(metrics.NodeCollector(dp.node, lambda: s))
        agent = metrics.AgentMetrics(registry, dp.node)

        def scrape():
            return samples(generate_latest(registry).decode())
        before = scrape()
        assert dp.run("prog_endpoint", _web1_to_api1, T.WEB1.ifindex).verdict == TC_ACT_REDIRECT
        assert dp.run("prog_endpoint", container(T.WEB1, "10.10.9.9"), T.WEB1.ifindex).verdict == TC_ACT_SHOT
        agent.observe(0.003, ok=True)
        agent.observe(0.2, ok=False)
        after = scrape()

    node = dp.node
    peer = dict(node=node, peer="B", peer_ip=T.PEER_B, direction="tx")
    assert series(after, "xoverlay_peer_packets_total", **peer) - series(before, "xoverlay_peer_packets_total",
                                                                         **peer) == 1
    assert series(after, "xoverlay_peer_bytes_total", **peer) == len(_web1_to_api1) + 50
    ep = dict(node=node, endpoint="web1", network="blue", ip=T.WEB1.ip, direction="tx")
    assert series(after, "xoverlay_endpoint_packets_total", **ep) == 1
    assert series(before, "xoverlay_drops_total", node=node, reason="NO_ROUTE") == 0, "every reason, zeros too"
    assert series(after, "xoverlay_drops_total", node=node, reason="UNKNOWN_DESTINATION") == 1
    assert series(after, "xoverlay_map_entries", node=node, map="xo_peers") == 2
    assert series(after, "xoverlay_map_max_entries", node=node, map="xo_endpoints") == 65536
    assert not any("xo_events" in k for k in after), "the ring buffer has no entries to count"
    assert series(after, "xoverlay_reconcile_duration_seconds_count", node=node) == 2
    assert series(after, "xoverlay_reconcile_duration_seconds_bucket", node=node, le="0.005") == 1
    assert series(after, "xoverlay_reconcile_errors_total", node=node) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs")
@pytest.mark.filterwarnings("ignore:not a bytes object:DeprecationWarning")
def test_service_and_backend_counters_are_series():
    import dataclasses

    from bpfrun import TC_ACT_REDIRECT, Datapath, Topology as T
    from prometheus_client import CollectorRegistry, generate_latest
    from test_bpf_programs import container
    from test_bpf_services import syn

    with Datapath(f"pytest-metrics-lb-{os.getpid()}") as dp:
        s = model.State()
        for name, ip in ((dp.node, T.NODE_IP), ("B", T.PEER_B)):
            s = model.join_node(s, name, ip)
        s = model.create_network(s, "blue", T.BLUE_SUBNET, vni=T.BLUE_VNI)
        s = model.add_endpoint(s, "api1", "blue", "B", "/run/netns/api1", True, T.API1.ip)
        one = model.Service(name="one", network="blue", vip=T.ONE.vip, id=T.ONE.id, ports=("80/tcp", "53/udp"),
                            backends=(model.Backend("api1", 1),))
        s = dataclasses.replace(s, services={"one": one})
        registry = CollectorRegistry()
        registry.register(metrics.NodeCollector(dp.node, lambda: s))
        frame = container(T.WEB1, T.ONE.vip, l4=syn(46001))
        assert dp.run("prog_endpoint", frame, T.WEB1.ifindex).verdict == TC_ACT_REDIRECT
        after = samples(generate_latest(registry).decode())

    svc = dict(node=dp.node, service="one", vip=T.ONE.vip)
    assert series(after, "xoverlay_service_connections_total", **svc) == 1
    assert series(after, "xoverlay_service_packets_total", **svc) == 1
    be = dict(node=dp.node, service="one", backend="api1", backend_ip=T.API1.ip, state="active")
    assert series(after, "xoverlay_backend_connections_total", **be) == 1
    assert series(after, "xoverlay_backend_bytes_total", **be) == len(frame)


# --- a lab agent with --metrics ----------------------------------------------------------------

def scrape_in(netns: str, addr: str) -> dict[str, float]:
    r = in_netns(netns, "curl", "-sf", "--max-time", "5", f"http://{addr}/metrics")
    return samples(r.stdout)


def start_agent(lab, node: str, *extra: str, where: str | None = None) -> subprocess.CompletedProcess:
    """`up --node NODE` in the netns of lab node `where` (default: NODE's own)."""
    return subprocess.run(["nsenter", f"--net=/run/netns/xo-{where or node}", "--", PY, "-m", "xoverlay", "--state", lab.state,
                           "up", "--node", node, "--underlay", "eth1", "--xdp", *extra], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.lab
def test_lab_agent_serves_metrics_that_follow_traffic(lab):
    from conftest import Result
    from test_cli_bad_input import one_line_error, snapshot

    from xoverlay.kernel.processes import stop_agent
    n1, n2, _ = lab.nodes()
    netns = f"/run/netns/xo-{n1}"
    stop_agent(n1)
    try:
        r = start_agent(lab, n1, "--detach", "--metrics", "127.0.0.1:9469")
        assert r.returncode == 0, r.stderr
        before = scrape_in(netns, "127.0.0.1:9469")
        assert lab.ping(f"{n1}-a", lab.ep(f"{n2}-b")["ip"], count=5)
        assert not lab.ping(f"{n1}-a", "10.10.250.9", count=2)
        deadline = time.monotonic() + 10      # reconcile passes: at least one every 2 s
        while True:
            after = scrape_in(netns, "127.0.0.1:9469")
            if series(after, "xoverlay_reconcile_duration_seconds_count", node=n1) >= 2 or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.5)

        def grew(name, **labels):
            return series(after, name, **labels) - series(before, name, **labels)
        peer = dict(node=n1, peer=n2, direction="tx")
        assert grew("xoverlay_peer_packets_total", **peer) >= 5
        assert grew("xoverlay_peer_packets_total", **dict(peer, direction="rx")) >= 5
        assert grew("xoverlay_peer_bytes_total", **peer) >= 5 * (84 + 14 + 50)
        ep = dict(node=n1, endpoint=f"{n1}-a", network="demo", ip=lab.ep(f"{n1}-a")["ip"], direction="tx")
        assert grew("xoverlay_endpoint_packets_total", **ep) >= 5      # forwarded only: drops are not tx
        assert grew("xoverlay_drops_total", node=n1, reason="UNKNOWN_DESTINATION") == 2
        assert series(after, "xoverlay_map_entries", node=n1, map="xo_peers") == 2
        assert series(after, "xoverlay_reconcile_duration_seconds_count", node=n1) >= 2
        assert series(after, "xoverlay_reconcile_errors_total", node=n1) == 0

        # The port is taken now: another agent (a new node in the same netns) is refused
        # before it joins the store or pins anything, and so is an unparsable address.
        prefix = n1.rsplit("node", 1)[0]

        def ours():
            # /run/netns is shared with other labs on this machine: compare only this one's.
            rows, gen, kernel, names, links = snapshot(lab)
            return rows, gen, kernel, [n for n in names if prefix in n or "busy" in n], links
        state_before = ours()
        for addr, words in (("127.0.0.1:9469", ["--metrics 127.0.0.1:9469", "Address already in use"]),
                            ("127.0.0.1:port", ["--metrics '127.0.0.1:port'", "not a number"])):
            r = start_agent(lab, "busy", "--metrics", addr, where=n1)
            one_line_error(Result(r.returncode, r.stdout, r.stderr), *words)
            assert ours() == state_before
            assert not os.path.exists("/sys/fs/bpf/xoverlay/busy") and not os.path.exists("/run/xoverlay/busy.pid")
    finally:
        stop_agent(n1)
        lab.xo("lab", "up", "--nodes", "3", timeout=120)       # its usual agent, without metrics
