"""status: drift is a pure function of store and kernel maps; on a live lab the counters
move in the right rows and drift made behind the agent's back is seen, then repaired."""
from __future__ import annotations

import json

import pytest

from xoverlay.core import desired, model
from xoverlay.core.model import State
from xoverlay.kernel import counters
from xoverlay.maps.layout import U32, Endpoint, EndpointKey, ip_be
from xoverlay.ui import status


def cluster():
    s = State()
    s = model.join_node(s, "n1", "192.0.2.1")
    s = model.join_node(s, "n2", "192.0.2.2")
    s = model.create_network(s, "app", "10.10.0.0/16")
    s = model.add_endpoint(s, "a", "app", "n1", "/run/netns/a", True)
    return model.add_endpoint(s, "b", "app", "n2", "/run/netns/b", True)


def kernel_as_agent_left_it(s):
    return desired.desired_maps(s, "n1", {"a": 7}, 2, 5, gateway_ifindex=9)   # xo-gw is 9


def test_no_drift_when_kernel_matches():
    s = cluster()
    assert status.drift(s, "n1", kernel_as_agent_left_it(s)) == []


def test_missing_unexpected_and_different_entries():
    s = cluster()
    actual = {k: dict(v) for k, v in kernel_as_agent_left_it(s).items()}
    b_key = EndpointKey(vni=4096, ip=ip_be(s.endpoints["b"].ip))
    del actual["xo_endpoints"][b_key]
    actual["xo_peers"][U32(ip_be("192.0.2.99"))] = next(iter(actual["xo_peers"].values()))
    a_key = EndpointKey(vni=4096, ip=ip_be(s.endpoints["a"].ip))
    actual["xo_endpoints"][a_key] = Endpoint(node_ip=ip_be("192.0.2.1"), ifindex=99)
    kinds = sorted((d["map"], d["kind"]) for d in status.drift(s, "n1", actual))
    assert kinds == [("xo_endpoints", "different"), ("xo_endpoints", "missing"), ("xo_peers", "unexpected")]


def test_unplumbed_local_endpoint_is_not_drift():
    s = cluster()
    actual = desired.desired_maps(s, "n1", {}, 2, 5)      # a not plumbed yet
    assert status.drift(s, "n1", actual) == []


def test_services_section_lists_backends_with_weight_and_state():
    s = cluster()
    s = model.add_endpoint(s, "c", "app", "n2", "/run/netns/c", True)
    s = model.create_service(s, "web", "app", ["80/tcp"], ["a@3", "b", "c:8080"], publish=["8080:80"])
    s = model.update_service(s, "web", drain=["b"])
    rows = counters.service_rows(s, "no-such-node")       # no pins here: zero counters
    assert [r["name"] for r in rows] == ["web"]
    web = rows[0]
    assert (web["vip"], web["ports"], web["publish"]) == (s.services["web"].vip, ["80/tcp"], ["8080:80/tcp"])
    assert [(b["endpoint"], b["weight"], b["state"], b["port"], b["node"]) for b in web["backends"]] == [
        ("a", 3, "active", None, "n1"), ("b", 1, "draining", None, "n2"), ("c", 1, "active", 8080, "n2")]
    assert all(b["connections"] == b["packets"] == 0 for b in web["backends"])


def test_seconds_since_a_data_path_time():
    assert counters.seconds_since(0, 5_000_000_000) is None                 # never
    assert counters.seconds_since(1_500_000_000, 4_000_000_000) == 2.5
    assert counters.seconds_since(4_001_000_000, 4_000_000_000) == 0.0      # the coarse clock is not ahead


def test_per_cpu_counters_add_up_but_times_take_the_latest():
    from xoverlay.maps.layout import Traffic, sum_percpu
    total = sum_percpu([Traffic(rx_packets=2, rx_bytes=100, last_rx_ns=70), Traffic(rx_packets=3, last_rx_ns=90),
                        Traffic()])
    assert (total.rx_packets, total.rx_bytes, total.last_rx_ns) == (5, 100, 90)


FACTS = {"program_ids": {"prog_underlay_xdp": 11, "prog_underlay_tc": 12, "prog_endpoint": 13, "prog_loopback": 14,
                         "prog_tunnel_device": 15},
         "underlay": {"name": "eth1", "xdp_mode": "native", "xdp_id": 11, "tc_id": 12},
         "endpoint_tc_ids": {7: 13, 8: 13}, "loopback_tc_id": 14, "tunnel_tc_id": 15}


def test_programs_are_shown_where_they_run():
    rows = status.program_rows(FACTS)
    assert [(r["program"], r["id"], r["where"], r["mode"], r["attached"], r["places"]) for r in rows] == [
        ("prog_underlay_xdp", 11, "eth1", "native", 1, 1), ("prog_underlay_tc", 12, "eth1", None, 1, 1),
        ("prog_endpoint", 13, "endpoint veths", None, 2, 2), ("prog_loopback", 14, "lo", None, 1, 1),
        ("prog_tunnel_device", 15, "xo-gro", None, 1, 1)]
    assert [status.program_summary(r) for r in rows] == [
        ("xdp #11 native on eth1", True), ("tc ingress #12 on eth1", True),
        ("tc ingress #13 on 2/2 endpoint veths", True), ("tc ingress #14 on lo", True),
        ("tc ingress #15 on xo-gro", True)]
    # A node without xo-gro (datapath.choose_gro said no): nothing is missing.
    none = status.program_rows(dict(FACTS, tunnel_tc_id=None))[-1]
    assert (none["places"], status.program_summary(none)) == (0, ("no xo-gro", True))


def test_the_tc_programs_say_how_they_are_attached():
    for kind in ("tcx", "cls_bpf"):
        rows = status.program_rows(dict(FACTS, tc_attach=kind))
        assert [r["mode"] for r in rows] == ["native", kind, kind, kind, kind]
        assert [status.program_summary(r)[0] for r in rows[1:]] == [
            f"tc ingress #12 {kind} on eth1", f"tc ingress #13 {kind} on 2/2 endpoint veths",
            f"tc ingress #14 {kind} on lo", f"tc ingress #15 {kind} on xo-gro"]


def test_a_detached_or_foreign_program_is_a_fault_but_xdp_off_is_a_choice():
    facts = dict(FACTS, underlay=dict(FACTS["underlay"], xdp_id=99, tc_id=0), endpoint_tc_ids={7: 13, 8: 0},
                 loopback_tc_id=0, tunnel_tc_id=0)
    assert [status.program_summary(r) for r in status.program_rows(facts)] == [
        ("xdp #11 native NOT on eth1", False), ("tc ingress #12 NOT on eth1", False),
        ("tc ingress #13 on 1/2 endpoint veths", False), ("tc ingress #14 NOT on lo", False),
        ("tc ingress #15 NOT on xo-gro", False)]
    off = dict(FACTS, underlay=dict(FACTS["underlay"], xdp_mode="off", xdp_id=0))
    assert status.program_summary(status.program_rows(off)[0]) == ("xdp off on eth1", True)


def test_programs_seen_from_outside_the_node_or_not_pinned():
    rows = status.program_rows({"program_ids": {"prog_underlay_xdp": 11, "prog_underlay_tc": None}})
    assert [r["attached"] for r in rows] == [None, None, None, None, None]
    assert status.program_summary(rows[0]) == ("xdp #11 (? not visible from here)", True)
    assert status.program_summary(rows[1]) == ("tc ingress not pinned", False)


@pytest.mark.lab
def test_status_json_counts_traffic_and_sees_drift(lab):
    from xoverlay.kernel.datapath import open_maps
    n1, n2, _ = lab.nodes()
    snap = json.loads(lab.xo("status", "--node", n1, "--json").out)
    assert snap["node"]["agent_alive"] and snap["node"]["build_current"] and snap["drift"] == []
    local = [e for e in lab.endpoints().values() if e["node"] == n1]
    assert snap["node"]["underlay_device"] == "eth1"
    assert [(p["program"], p["hook"], p["where"], p["attached"], p["places"]) for p in snap["node"]["programs"]] == [
        ("prog_underlay_xdp", "xdp", "eth1", 1, 1), ("prog_underlay_tc", "tc ingress", "eth1", 1, 1),
        ("prog_endpoint", "tc ingress", "endpoint veths", len(local), len(local)),
        ("prog_loopback", "tc ingress", "lo", 1, 1), ("prog_tunnel_device", "tc ingress", "xo-gro", 1, 1)]
    assert snap["node"]["programs"][0]["mode"] == "native" and all(p["id"] for p in snap["node"]["programs"])
    from xoverlay.kernel.bpf import tc_attach_kind
    assert [p["mode"] for p in snap["node"]["programs"][1:]] == [tc_attach_kind()] * 4
    assert snap["node"]["gro"].startswith("on: xo-gro's socket on UDP 4789"), snap["node"]["gro"]
    peer_before = {p["node"]: p for p in snap["peers"]}[n2]
    ep_before = {e["name"]: e for e in snap["endpoints"]}[f"{n1}-a"]
    assert lab.ping(f"{n1}-a", lab.ep(f"{n2}-b")["ip"], count=5)
    snap = json.loads(lab.xo("status", "--node", n1, "--json").out)
    peer = {p["node"]: p for p in snap["peers"]}[n2]
    ep = {e["name"]: e for e in snap["endpoints"]}[f"{n1}-a"]
    assert peer["tx_packets"] - peer_before["tx_packets"] >= 5
    assert peer["last_rx_ago"] is not None and peer["last_rx_ago"] < 5, peer
    assert peer["rx_packets"] - peer_before["rx_packets"] >= 5
    assert ep["tx_packets"] - ep_before["tx_packets"] >= 5 and ep["rx_packets"] - ep_before["rx_packets"] >= 5
    assert {m["name"]: m["entries"] for m in snap["maps"]}["xo_peers"] == 2

    # Behind a stopped agent's back: status shows it; the agent, back, repairs it.
    from xoverlay.kernel.processes import stop_agent
    stop_agent(n1)
    endpoints = open_maps(n1)["xo_endpoints"]
    key = EndpointKey(vni=4096, ip=ip_be(lab.ep(f"{n2}-b")["ip"]))
    assert endpoints.delete(key)
    snap = json.loads(lab.xo("status", "--node", n1, "--json").out)
    assert not snap["node"]["agent_alive"]
    assert [(d["map"], d["kind"]) for d in snap["drift"]] == [("xo_endpoints", "missing")]
    assert not lab.ping(f"{n1}-a", lab.ep(f"{n2}-b")["ip"], count=1)
    lab.xo("lab", "up", "--nodes", "3", timeout=120)
    assert endpoints.get(key) is not None, "the agent did not repair the deleted entry"
    assert json.loads(lab.xo("status", "--node", n1, "--json").out)["drift"] == []
    assert lab.ping(f"{n1}-a", lab.ep(f"{n2}-b")["ip"], count=1)


@pytest.mark.lab
def test_status_once_prints_tables(lab):
    out = lab.xo("status", "--node", lab.nodes()[0], "--once").out
    for title in ("peers", "endpoints", "services", "drops", "maps", "drift"):
        assert title in out
