"""The store as the lab's nodes live with it (both backends; the outage tests on etcd):
changes reach every agent's maps fast, a node whose agent is gone is shown down and still
forwarded to, and an etcd outage stops no packet."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import PY, in_netns, ping_loss
from test_e2e_lab import names

pytestmark = pytest.mark.lab
PROPAGATION_SECONDS = 0.3


def _seen_everywhere(nodes, map_name, key, started, timeout=5.0) -> dict[str, float]:
    """Seconds after `started` at which each node's pinned map held `key`."""
    from xoverlay.kernel.datapath import open_maps
    maps = {n: open_maps(n) for n in nodes}
    seen = {}
    deadline = started + timeout
    while len(seen) < len(nodes) and time.monotonic() < deadline:
        for n in nodes:
            if n not in seen and maps[n][map_name].get(key) is not None:
                seen[n] = time.monotonic() - started
        time.sleep(0.002)
    for m in maps.values():
        for one in m.values():
            one.close()
    return seen


def test_a_change_reaches_every_agents_maps_within_300ms(lab):
    from xoverlay.core import model
    from xoverlay.core.desired import subnet_key
    from xoverlay.kernel import netns
    from xoverlay.maps.layout import EndpointKey, ip_be
    n1, n2, n3 = names(lab)
    store = lab.store()
    try:
        started = time.monotonic()
        store.update(lambda s: model.create_network(s, "fast-net", "10.77.0.0/16"))
        seen = _seen_everywhere([n1, n2, n3], "xo_subnets", subnet_key("10.77.0.0/16"), started)
        print(f"network seen after {seen}")
        assert len(seen) == 3 and max(seen.values()) < PROPAGATION_SECONDS, f"network seen after {seen}"
        started = time.monotonic()
        st = store.update(lambda s: model.add_endpoint(s, "fast-ep2", "demo", n2, netns.resolve("fast-ep2"), True))
        key = EndpointKey(vni=st.networks["demo"].vni, ip=ip_be(st.endpoints["fast-ep2"].ip))
        seen = _seen_everywhere([n1, n3], "xo_endpoints", key, started)
        print(f"endpoint seen after {seen}")
        assert len(seen) == 2 and max(seen.values()) < PROPAGATION_SECONDS, f"endpoint seen after {seen}"
    finally:
        lab.xo("endpoint", "rm", "fast-ep2", check=False)
        lab.xo("network", "rm", "fast-net", check=False)


def _liveness(lab, node, peer):
    snap = json.loads(lab.xo("status", "--node", node, "--json").out)
    return {p["node"]: p["liveness"] for p in snap["peers"]}[peer]


def test_node_whose_agent_is_gone_is_shown_down_and_still_forwarded_to(lab):
    """SIGKILL (no goodbye): the node's registration expires after its TTL (10 s) and
    status says down; its data path and its peers' keep forwarding to it meanwhile."""
    from xoverlay.agent.loop import LEASE_TTL
    from xoverlay.kernel.processes import running_pid
    n1, _, n3 = names(lab)
    assert _liveness(lab, n1, n3) == "up"
    try:
        os.kill(running_pid(n3), signal.SIGKILL)
        killed = time.monotonic()
        assert _liveness(lab, n1, n3) == "up"         # an agent restart within the TTL is no event
        while _liveness(lab, n1, n3) == "up" and time.monotonic() - killed < LEASE_TTL + 10:
            time.sleep(0.5)
        gone = time.monotonic() - killed
        assert _liveness(lab, n1, n3) == "down", f"still up {gone:.1f} s after its agent died"
        assert gone > LEASE_TTL - 4, f"down after only {gone:.1f} s"
        peers = json.loads(lab.xo("peer", "ls", "--node", n1, "--json").out)
        assert {p["node"]: p["liveness"] for p in peers}[n3] == "down"
        assert lab.ping(f"{n1}-a", lab.ep(f"{n3}-a")["ip"])
    finally:
        lab.xo("lab", "up", "--nodes", "3", timeout=120)
    assert _liveness(lab, n1, n3) == "up"


# --- etcd outages -----------------------------------------------------------------------

def _etcd_only(lab):
    if lab.backend != "etcd":
        pytest.skip("an outage of etcd")


def _stop_etcd(lab):
    from xoverlay.store import etcd_server
    pids = lab.lab()._etcd_pids()
    assert pids, "the lab's etcd is not running"
    for pid in pids:
        etcd_server.stop(pid)


def _scrape(node, port) -> str:
    r = in_netns(f"/run/netns/xo-{node}", PY, "-c",
                 f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', "
                 "timeout=5).read().decode())")
    return r.stdout


def _gauge(text, name, node) -> float:
    line = next(l for l in text.splitlines() if l.startswith(f'{name}{{node="{node}"}}'))
    return float(line.split()[-1])


def test_etcd_restarted_mid_traffic_loses_nothing(lab):
    _etcd_only(lab)
    n1, n2, _ = names(lab)
    ping = lab.ping_stream(f"{n1}-a", lab.ep(f"{n2}-a")["ip"], 6)
    time.sleep(1)
    _stop_etcd(lab)
    time.sleep(2)
    lab.xo("lab", "up", "--nodes", "3", timeout=120)      # restarts etcd on its data
    sent, received = ping_loss(ping, finish=True)
    assert sent >= 250 and received == sent, f"lost {sent - received} of {sent}"
    assert "demo" in lab.store().read().networks


def test_agent_restarted_while_etcd_is_down_keeps_forwarding_and_resyncs(lab):
    from xoverlay.kernel.processes import running_pid
    from xoverlay.kernel.processes import stop_agent
    from xoverlay.store.etcd_server import free_port
    _etcd_only(lab)
    n1, n2, _ = names(lab)
    node_url = json.load(open(lab.lab().registry))["etcd"]["node_url"]
    port = free_port()
    ping = lab.ping_stream(f"{n1}-a", lab.ep(f"{n2}-a")["ip"], 10)
    try:
        time.sleep(0.5)
        _stop_etcd(lab)
        stop_agent(n1)
        r = in_netns(f"/run/netns/xo-{n1}", PY, "-m", "xoverlay", "--store", node_url, "up", "--node", n1,
                     "--underlay", "eth1", "--detach", "--xdp", "--metrics", f"127.0.0.1:{port}", timeout=60)
        assert running_pid(n1), r.stderr
        status = json.loads(lab.xo("status", "--node", n1, "--json").out)
        assert status["store"]["reachable"] is False and "unreachable" in status["store"]["error"]
        assert _gauge(_scrape(n1, port), "xoverlay_store_reachable", n1) == 0
        time.sleep(2)
        lab.xo("lab", "up", "--nodes", "3", timeout=120)
        lab.xo("endpoint", "add", "late-ep", "--network", "demo", "--node", n2)   # a change after the outage
        assert lab.ping(f"{n1}-a", lab.ep("late-ep")["ip"]), "the restarted agent did not resync"
        deadline = time.monotonic() + 5
        while _gauge(_scrape(n1, port), "xoverlay_store_reachable", n1) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gauge(_scrape(n1, port), "xoverlay_store_reachable", n1) == 1
        assert _liveness(lab, n2, n1) == "up"
    finally:
        sent, received = ping_loss(ping, finish=True)
        lab.xo("endpoint", "rm", "late-ep", check=False)
    assert sent >= 400 and received == sent, f"lost {sent - received} of {sent}"
