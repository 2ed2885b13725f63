"""The routing mesh end to end on the 3-node lab: the lab's demo service `web` (a backend
NODE-web on every node, published on 8080) used from the lab's outside `client` netns
(192.0.2.250, a port of the underlay bridge) through every node's underlay IP. Real
veths, native XDP on the nodes' underlay, real TCP and UDP."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import in_netns

pytestmark = pytest.mark.lab

CLIENT = str(Path(__file__).resolve().parent / "lb_client.py")
PY = sys.executable
PUBLISHED = 8080


def lab_obj(lab):
    return lab.lab()


def node_ips(lab) -> dict[str, str]:
    state = lab_obj(lab).store.read()
    return {n: state.nodes[n].underlay_ip for n in lab.nodes()}


def from_client(lab, *args, timeout: float = 120) -> dict:
    r = in_netns(f"/run/netns/{lab_obj(lab).client_netns}", PY, CLIENT, *args, timeout=timeout)
    return json.loads(r.stdout.strip().splitlines()[-1])


def xdp_tx(lab, node: str) -> int:
    r = in_netns(lab.node_netns(node), "ethtool", "-S", "eth1")
    return sum(int(line.split(":")[1]) for line in r.stdout.splitlines() if line.strip().startswith("rx_queue_")
               and line.split(":")[0].endswith("_xdp_tx"))


def test_tcp_through_every_node_keeps_the_client_ip(lab):
    """30 connections to each node's IP:8080: all answered, by backends on every node,
    each of which saw the client's own address; remote backends were reached by XDP_TX."""
    client_ip = lab_obj(lab).client_ip
    for node, ip in node_ips(lab).items():
        before = xdp_tx(lab, node)
        out = from_client(lab, "http", ip, str(PUBLISHED), "30")
        assert out["errors"] == [], (node, out["errors"], {n: lab.drops(n) for n in lab.nodes()})
        names = Counter(a.split()[0] for a in out["answers"])
        assert set(names) == {f"{n}-web" for n in lab.nodes()}, (node, names)
        assert {a.split()[2].split(":")[0] for a in out["answers"]} == {client_ip}
        remote = sum(c for name, c in names.items() if not name.startswith(f"{node}-"))
        # Every packet of a remote connection from the client went out again by XDP_TX.
        assert xdp_tx(lab, node) - before >= remote * 3, node


def test_every_node_reaches_every_other_nodes_published_port(lab):
    """A cluster node is a client too: 50 connections from each node to each other node's
    IP:8080, all answered, by backends on every node (the asking node's own included),
    each seeing the asking node's address. Its checksums are left to offload across the
    veths (CHECKSUM_PARTIAL): XDP hands those to tc (bpf/lib/mesh.h)."""
    ips = node_ips(lab)
    for src in lab.nodes():
        for dst, ip in ips.items():
            if dst == src:
                continue
            r = in_netns(lab.node_netns(src), PY, CLIENT, "http", ip, str(PUBLISHED), "50", timeout=120)
            out = json.loads(r.stdout.strip().splitlines()[-1])
            assert out["errors"] == [] and len(out["answers"]) == 50, \
                (src, dst, out["errors"], {n: lab.drops(n) for n in lab.nodes()})
            assert {a.split()[0] for a in out["answers"]} == {f"{n}-web" for n in lab.nodes()}, (src, dst)
            assert {a.split()[2].split(":")[0] for a in out["answers"]} == {ips[src]}


@pytest.mark.parametrize("where", ["its own address", "127.0.0.1"])
def test_every_node_reaches_its_own_published_port(lab, where):
    """The node itself is a client too, as in Swarm: 50 TCP connections and 20 UDP
    datagrams from each node to its own IP:8080 (and to 127.0.0.1:8080, which the agent's
    nftables table turns into that), all answered by backends on every node, each seeing
    the node's address; the UDP replies come from the address asked. Nothing of it crosses
    the underlay's hooks: lo's program takes the requests (bpf/loopback.c), the replies
    come back into the stack through lo."""
    ips = node_ips(lab)
    for node in lab.nodes():
        ip = ips[node] if where == "its own address" else "127.0.0.1"
        r = in_netns(lab.node_netns(node), PY, CLIENT, "http", ip, str(PUBLISHED), "50", timeout=120)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["errors"] == [] and len(out["answers"]) == 50, (node, out["errors"], lab.drops(node))
        assert {a.split()[0] for a in out["answers"]} == {f"{n}-web" for n in lab.nodes()}, node
        assert {a.split()[2].split(":")[0] for a in out["answers"]} == {ips[node]}
        r = in_netns(lab.node_netns(node), PY, CLIENT, "udp", ip, str(PUBLISHED), "20", timeout=120)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["errors"] == [] and len(out["answers"]) == 20, (node, out["errors"], lab.drops(node))
        assert {a["from"] for a in out["answers"]} == {f"{ip}:{PUBLISHED}"}
        assert {a["answer"].split()[2].split(":")[0] for a in out["answers"]} == {ips[node]}


def test_udp_through_every_node_keeps_the_client_ip(lab):
    client_ip = lab_obj(lab).client_ip
    for node, ip in node_ips(lab).items():
        out = from_client(lab, "udp", ip, str(PUBLISHED), "20")
        assert out["errors"] == [], (node, out["errors"])
        # Replies come from the address the client talked to.
        assert {a["from"] for a in out["answers"]} == {f"{ip}:{PUBLISHED}"}
        for a in out["answers"]:
            assert a["answer"].split()[2] == f"{client_ip}:{a['port']}"
        assert len({a["answer"].split()[0] for a in out["answers"]}) >= 2


def test_mesh_counters(lab):
    """New connections through the mesh are counted on the node they came in through."""
    n1 = lab.nodes()[0]
    before = json.loads(lab.xo("status", "--node", n1, "--json").out)["services"]
    from_client(lab, "http", node_ips(lab)[n1], str(PUBLISHED), "10")
    after = json.loads(lab.xo("status", "--node", n1, "--json").out)["services"]

    def conns(snap):
        web = next(s for s in snap if s["name"] == "web")
        return sum(b["connections"] for b in web["backends"])
    assert conns(after) - conns(before) == 10


def test_without_xdp_tc_serves_the_mesh(lab):
    """XDP off on node 3's underlay (as with `up --no-xdp`): tc does the whole forward
    path; then the agent, restarted, attaches XDP again."""
    from xoverlay.kernel.processes import stop_agent
    n3 = lab.nodes()[2]
    ip = node_ips(lab)[n3]
    stop_agent(n3)
    try:
        in_netns(lab.node_netns(n3), "ip", "link", "set", "dev", "eth1", "xdp", "off")
        before = xdp_tx(lab, n3)
        out = from_client(lab, "http", ip, str(PUBLISHED), "20")
        assert out["errors"] == []
        assert len({a.split()[0] for a in out["answers"]}) == 3
        assert xdp_tx(lab, n3) == before
    finally:
        lab.xo("lab", "up", "--nodes", "3", timeout=180)
    assert "xdp" in in_netns(lab.node_netns(n3), "ip", "link", "show", "eth1").stdout


def test_demo_server_is_supervised(lab):
    """Its server killed: the supervisor starts another. The supervisor killed (SIGKILL):
    the server goes with it, and `lab up` starts them again."""
    from xoverlay.kernel.processes import cmdline, pids_with
    lo = lab_obj(lab)
    ip = node_ips(lab)[lab.nodes()[0]]

    def pids():
        return {p: cmdline(p) for p in pids_with(["xoverlay.lab.demo_server", f"--tag={lo.demo_tag}"])}

    def serving(timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = from_client(lab, "http", ip, str(PUBLISHED), "3")
            if not out["errors"]:
                return True
            time.sleep(0.3)
        return False

    child = next(p for p, argv in pids().items() if "--child" in argv)
    os.kill(child, signal.SIGKILL)
    time.sleep(1.5)
    assert serving(), "the supervisor did not restart the server"
    supervisor = next(p for p, argv in pids().items() if "--supervise" in argv)
    os.kill(supervisor, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pids(), "the server outlived its supervisor"
    lab.xo("lab", "up", "--nodes", "3", timeout=180)
    assert serving()


def test_lab_demo_shows_spread_and_client_ip(lab):
    out = lab.xo("lab", "demo", timeout=180).out
    assert "http://" in out and "web" in out
    assert lab_obj(lab).client_ip in out
    assert "saw" in out
