"""Desired maps from the store, and the diff that gets the kernel there (pure)."""
from ctl import desired, model
from ctl.model import State
from maps.layout import EndpointKey, U32, ip_be, ip_str, mac_str, subnet_key


def state():
    s = State()
    s = model.join_node(s, "n1", "192.0.2.1")
    s = model.join_node(s, "n2", "192.0.2.2")
    s = model.create_network(s, "app", "10.10.0.0/16")
    s = model.create_network(s, "db", "10.20.0.0/16")
    s = model.add_endpoint(s, "a", "app", "n1", "/run/netns/a", True)
    s = model.add_endpoint(s, "b", "app", "n2", "/run/netns/b", True)
    s = model.add_endpoint(s, "c", "db", "n2", "/run/netns/c", True)
    return s


def test_local_and_remote_endpoints():
    s = state()
    m = desired.desired_maps(s, "n1", {"a": 7}, underlay_ifindex=2, build_id=1)
    a, b = s.endpoints["a"], s.endpoints["b"]
    local = m["xo_endpoints"][EndpointKey(vni=4096, ip=ip_be(a.ip))]
    assert local.ifindex == 7 and ip_str(local.node_ip) == "192.0.2.1" and mac_str(local.mac) == a.mac
    remote = m["xo_endpoints"][EndpointKey(vni=4096, ip=ip_be(b.ip))]
    assert remote.ifindex == 0 and ip_str(remote.node_ip) == "192.0.2.2"
    assert m["xo_local_endpoints"][U32(7)].ip == ip_be(a.ip)
    # Only VNIs with a local endpoint are accepted from the tunnel.
    assert set(m["xo_vnis"]) == {U32(4096)}
    assert set(m["xo_peers"]) == {U32(ip_be("192.0.2.2"))}
    assert m["xo_subnets"][subnet_key("10.20.0.0/16")].vni == 4097


def test_unplumbed_local_endpoint_is_left_out():
    m = desired.desired_maps(state(), "n1", {}, 2, 1)
    assert not m["xo_local_endpoints"] and not m["xo_vnis"]
    assert len(m["xo_endpoints"]) == 2     # b and c are remote


def test_removing_endpoint_is_left_out_everywhere():
    s = model.mark_endpoint_removing(state(), "b")
    m = desired.desired_maps(s, "n1", {"a": 7}, 2, 1)
    assert EndpointKey(vni=4096, ip=ip_be(s.endpoints["b"].ip)) not in m["xo_endpoints"]


def test_config_in_network_byte_order():
    cfg = desired.desired_maps(state(), "n1", {}, 5, 99)["xo_config"][U32(0)]
    assert bytes(cfg)[:4] == bytes([192, 0, 2, 1])
    assert bytes(cfg)[8:10] == (4789).to_bytes(2, "big")
    assert cfg.underlay_ifindex == 5 and cfg.build_id == 99


def test_diff_sets_before_deletes_and_nothing_when_equal():
    s = state()
    want = desired.desired_maps(s, "n1", {"a": 7}, 2, 1)
    assert desired.diff(want, want) == []
    actual = {k: dict(v) for k, v in want.items()}
    stale = EndpointKey(vni=4096, ip=ip_be("10.10.9.9"))
    actual["xo_endpoints"][stale] = next(iter(want["xo_endpoints"].values()))
    moved = EndpointKey(vni=4096, ip=ip_be(s.endpoints["b"].ip))
    del actual["xo_endpoints"][moved]
    ops = desired.diff(want, actual)
    assert [(o.map, o.key, o.value is None) for o in ops] == [
        ("xo_endpoints", moved, False), ("xo_endpoints", stale, True)]


def test_diff_changed_value_is_one_set():
    s = state()
    want = desired.desired_maps(s, "n1", {"a": 7}, 2, 1)
    actual = desired.desired_maps(s, "n1", {"a": 8}, 2, 1)
    ops = desired.diff(want, actual)
    assert {o.map for o in ops} == {"xo_endpoints", "xo_local_endpoints"}
    assert sum(o.value is None for o in ops) == 1     # local_endpoints[8] goes, [7] comes


def test_stale_counters_pruned():
    want = desired.desired_maps(state(), "n1", {"a": 7}, 2, 1)
    gone_peer, gone_ep = U32(ip_be("192.0.2.77")), EndpointKey(vni=1, ip=1)
    live_peer = next(iter(want["xo_peers"]))
    ops = desired.stale_counters(want, [gone_peer, live_peer], [gone_ep])
    assert [(o.map, o.key) for o in ops] == [("xo_peer_stats", gone_peer), ("xo_endpoint_stats", gone_ep)]
