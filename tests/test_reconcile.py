"""Desired maps from the store, and the diff that gets the kernel there (pure)."""
from xoverlay.core import desired, model
from xoverlay.core.model import State
from xoverlay.maps.layout import NO_SLOT, U32, Endpoint, EndpointKey, Traffic, ip_be, ip_str, mac_str, subnet_key


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


def test_a_gone_endpoint_is_left_out_everywhere_and_back_in_when_it_returns():
    s = model.mark_endpoint_gone(state(), "b", 1000.0)
    key = EndpointKey(vni=4096, ip=ip_be(s.endpoints["b"].ip))
    assert key not in desired.desired_maps(s, "n1", {"a": 7}, 2, 1)["xo_endpoints"]
    assert key not in desired.desired_maps(s, "n2", {"b": 9, "c": 8}, 2, 1)["xo_endpoints"]
    s = model.mark_endpoint_back(s, "b")
    assert key in desired.desired_maps(s, "n1", {"a": 7}, 2, 1)["xo_endpoints"]


def test_a_gone_backend_takes_no_new_connections():
    s = model.create_service(state(), "web", "app", ["80/tcp"], ["a", "b"])
    both = desired.desired_maps(s, "n1", {"a": 7}, 2, 1)
    gone = desired.desired_maps(model.mark_endpoint_gone(s, "b", 1000.0), "n1", {"a": 7}, 2, 1)
    assert len(gone["xo_lb_backends"]) == len(both["xo_lb_backends"]) - 1


def test_config_in_network_byte_order():
    cfg = desired.desired_maps(state(), "n1", {}, 5, 99)["xo_config"][U32(0)]
    assert bytes(cfg)[:4] == bytes([192, 0, 2, 1])
    assert bytes(cfg)[8:10] == (4789).to_bytes(2, "big")
    assert cfg.underlay_ifindex == 5 and cfg.build_id == 99 and cfg.gateway_ifindex == 0
    cfg = desired.desired_maps(state(), "n1", {}, 5, 99, gateway_ifindex=12)["xo_config"][U32(0)]
    assert bytes(cfg)[12:16] == (12).to_bytes(4, "little")    # the DNS redirect target, xo-gw


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


# --- counter slots ------------------------------------------------------------------------

def test_slots_kept_then_lowest_free_then_leaving():
    assert desired.assign_slots({}, ["a", "b", "c"], 8) == {"a": 0, "b": 1, "c": 2}
    # Kept; a newcomer takes the lowest slot nobody holds, not the one of leaving "b".
    assert desired.assign_slots({"a": 0, "b": 1, "c": 2}, ["c", "a", "d"], 8) == {"c": 2, "a": 0, "d": 3}
    # Full but for leaving entries: their slots, lowest first; then none.
    assert desired.assign_slots({"a": 0, "b": 1, "c": 2}, ["a", "d"], 3) == {"a": 0, "d": 1}
    assert desired.assign_slots({"a": 0, "b": 1}, ["a", "b", "d"], 2) == {"a": 0, "b": 1, "d": NO_SLOT}
    # Two holders of one slot (drift) or one out of range: the first keeps it, the other moves.
    assert desired.assign_slots({"a": 1, "b": 1, "c": 9}, ["a", "b", "c"], 4) == {"a": 1, "b": 0, "c": 2}


def test_every_peer_and_local_endpoint_has_its_own_slot_and_remote_ones_their_nodes():
    s = model.join_node(state(), "n3", "192.0.2.3")
    s = model.add_endpoint(s, "e", "app", "n3", "/run/netns/e", True)
    s = model.add_endpoint(s, "f", "app", "n1", "/run/netns/f", True)
    m = desired.desired_maps(s, "n1", {"a": 7, "f": 8}, 2, 1)
    peer = {ip_str(k.value): v.slot for k, v in m["xo_peers"].items()}
    assert sorted(peer.values()) == [0, 1]
    local = [v.slot for v in m["xo_local_endpoints"].values()]
    assert sorted(local) == [0, 1]
    for name, ep in s.endpoints.items():
        entry = m["xo_endpoints"][EndpointKey(vni=s.networks[ep.network].vni, ip=ip_be(ep.ip))]
        if ep.node == "n1":
            ifindex = {"a": 7, "f": 8}[name]
            assert entry.slot == m["xo_local_endpoints"][U32(ifindex)].slot, name
        else:
            assert entry.slot == peer[s.nodes[ep.node].underlay_ip], name


def test_slots_survive_changes_and_new_ones_are_zeroed_first():
    """Slots come from the maps as they are: a peer leaving, an endpoint re-plumbed on a
    new veth, another added: the others keep theirs (their counters go on), the new
    holders' slots are zeroed (a slot keeps what its last holder counted)."""
    s = model.join_node(state(), "n3", "192.0.2.3")
    s = model.add_endpoint(s, "f", "app", "n1", "/run/netns/f", True)
    before = desired.desired_maps(s, "n1", {"a": 7, "f": 8}, 2, 1)
    assert desired.fresh_counters(before, before) == []
    fresh = desired.fresh_counters(before, {})
    assert sorted((o.map, o.key.value) for o in fresh) == [
        ("xo_endpoint_stats", 0), ("xo_endpoint_stats", 1), ("xo_peer_stats", 0), ("xo_peer_stats", 1)]
    assert all(o.value == Traffic() for o in fresh)

    n2 = before["xo_peers"][U32(ip_be("192.0.2.2"))].slot
    s2 = model.join_node(model.remove_node(s, "n3"), "n4", "192.0.2.4")
    s2 = model.add_endpoint(s2, "g", "app", "n1", "/run/netns/g", True)
    after = desired.desired_maps(s2, "n1", {"a": 17, "f": 8, "g": 9}, 2, 1, actual=before)
    assert after["xo_peers"][U32(ip_be("192.0.2.2"))].slot == n2
    by_ip = {(v.vni, v.ip): v.slot for v in after["xo_local_endpoints"].values()}
    was = {(v.vni, v.ip): v.slot for v in before["xo_local_endpoints"].values()}
    assert {k: by_ip[k] for k in was} == was            # "a" on veth 17 now: same slot
    fresh = desired.fresh_counters(after, before)
    n4 = after["xo_peers"][U32(ip_be("192.0.2.4"))].slot
    g = next(v.slot for v in after["xo_local_endpoints"].values() if v.ip == ip_be(s2.endpoints["g"].ip))
    assert [(o.map, o.key.value) for o in fresh] == [("xo_peer_stats", n4), ("xo_endpoint_stats", g)]
    assert n4 == 2 and g == 2


def test_drift_check_and_agent_agree_on_slots():
    """Without the maps as they are, slots are given afresh: the same inputs, the same slots."""
    assert desired.desired_maps(state(), "n1", {"a": 7}, 2, 1) == desired.desired_maps(state(), "n1", {"a": 7}, 2, 1)


# --- services ----------------------------------------------------------------------------

from xoverlay.core import maglev  # noqa: E402
from xoverlay.core.desired import MAGLEV  # noqa: E402
from xoverlay.maps.layout import IPPROTO, LB_ACTIVE, LB_AFFINITY, LB_DRAINING, LbBackendKey, LbServiceKey, port_be  # noqa: E402


def with_service(**kw):
    s = state()
    s = model.add_endpoint(s, "d", "app", "n2", "/run/netns/d", True)
    args = dict(ports=["80/tcp", "53/udp"], backends=["a", "b:8080@2"] if "ports" in kw else ["a", "b@2"])
    args.update(kw)
    return model.create_service(s, "web", "app", **args)


def test_service_entries_same_on_every_node():
    s = with_service(affinity="client-ip")
    svc = s.services["web"]
    for node in ("n1", "n2"):
        m = desired.desired_maps(s, node, {}, 2, 1)
        key = LbServiceKey(vni=4096, vip=ip_be(svc.vip), port=port_be(53), proto=IPPROTO["udp"])
        assert m["xo_lb_services"][key].id == svc.id and m["xo_lb_services"][key].flags == LB_AFFINITY
        assert len(m["xo_lb_services"]) == 2
        b = m["xo_lb_backends"][LbBackendKey(service=svc.id, index=2)]
        assert ip_str(b.ip) == s.endpoints["b"].ip and b.port == 0 and b.state == LB_ACTIVE


def test_backends_carry_their_endpoints_entry():
    """Each node's backend entries hold a copy of the backend's endpoint entry there (the
    data path looks no further); a local backend not plumbed yet is nowhere (zeros), and
    once it is, its entry has the veth."""
    s = with_service()
    svc = s.services["web"]
    a, b = (LbBackendKey(service=svc.id, index=i) for i in (1, 2))
    for node, ifindexes in (("n1", {}), ("n1", {"a": 7}), ("n2", {"b": 9})):
        m = desired.desired_maps(s, node, ifindexes, 2, 1)
        for key, name in ((a, "a"), (b, "b")):
            ep = m["xo_endpoints"].get(EndpointKey(vni=4096, ip=ip_be(s.endpoints[name].ip)))
            assert bytes(m["xo_lb_backends"][key].where) == bytes(ep if ep is not None else Endpoint())
    n1 = desired.desired_maps(s, "n1", {}, 2, 1)["xo_lb_backends"]
    assert n1[a].where.node_ip == 0 and ip_str(n1[b].where.node_ip) == "192.0.2.2"
    plumbed = desired.desired_maps(s, "n1", {"a": 7}, 2, 1)["xo_lb_backends"][a].where
    assert plumbed.ifindex == 7 and ip_str(plumbed.node_ip) == "192.0.2.1"


def test_backend_target_port_in_network_order():
    s = with_service(ports=["80/tcp"])
    m = desired.desired_maps(s, "n1", {}, 2, 1)
    b = m["xo_lb_backends"][LbBackendKey(service=1, index=2)]
    assert bytes(b)[4:6] == (8080).to_bytes(2, "big")


def test_table_holds_active_backends_by_weight():
    s = with_service()
    t = desired.desired_tables(s)[1]
    m = s.services["web"].table_size
    assert t[0] == m and len(t) == m + 1
    assert abs(t[1:].count(2) - 2 * m / 3) <= 2 and abs(t[1:].count(1) - m / 3) <= 2


def test_draining_backend_keeps_its_entry_but_leaves_the_table():
    s = model.update_service(with_service(), "web", drain=["a"])
    m = desired.desired_maps(s, "n1", {}, 2, 1)
    assert m["xo_lb_backends"][LbBackendKey(service=1, index=1)].state == LB_DRAINING
    assert set(desired.desired_tables(s)[1][1:]) == {2}


def test_removed_backend_leaves_everything_and_table_changes_little():
    s = with_service(backends=["a", "b", "d"])
    before = desired.desired_tables(s)[1]
    s2 = model.update_service(s, "web", rm=["b"])
    after = desired.desired_tables(s2)[1]
    assert before[0] == after[0], "M stays when a backend goes"
    assert LbBackendKey(service=1, index=2) not in desired.desired_maps(s2, "n1", {}, 2, 1)["xo_lb_backends"]
    moved = sum(x != y for x, y in zip(before[1:], after[1:]))
    assert moved <= 1.25 * before[1:].count(2)


def test_no_active_backend_no_table():
    s = model.update_service(with_service(backends=["a"]), "web", drain=["a"])
    assert desired.desired_tables(s) == {}
    s = model.mark_endpoint_removing(with_service(backends=["a"]), "a")
    assert desired.desired_tables(s) == {}


def test_table_memo_reuses_unchanged_tables_and_holds_only_current_services():
    memo = {}
    s = with_service(backends=["a", "b"])
    first = desired.desired_tables(s, memo)
    assert desired.desired_tables(s, memo)[1] is first[1], "an unchanged service is not rebuilt"
    # Backends churn (a new index each time): the memo keeps one table per service, not
    # one per backend set ever seen.
    for change in [{"add": ["d"]}, {"rm": ["d"]}] * 5:
        s = model.update_service(s, "web", **change)
        assert desired.desired_tables(s, memo) == desired.desired_tables(s)
    assert list(memo) == [1] and memo[1][1] == first[1]
    s = model.remove_service(s, "web")
    assert desired.desired_tables(s, memo) == {} and memo == {}


def test_plan_orders_backends_tables_services_then_the_reverse():
    s = with_service()
    want = desired.desired_maps(s, "n1", {"a": 7}, 2, 1)
    empty = {k: {} for k in want}
    ops = desired.plan(want, empty, desired.desired_tables(s), {})
    order = [o.map for o in ops]
    assert order.index(MAGLEV) > max(i for i, m in enumerate(order) if m == "xo_lb_backends")
    assert order.index(MAGLEV) < min(i for i, m in enumerate(order) if m == "xo_lb_services")
    # And out: services, table, backends.
    gone = desired.desired_maps(model.remove_service(s, "web"), "n1", {"a": 7}, 2, 1)
    ops = [o for o in desired.plan(gone, want, {}, desired.desired_tables(s)) if o.map.startswith("xo_lb")]
    assert [o.map for o in ops] == ["xo_lb_services"] * 2 + [MAGLEV] + ["xo_lb_backends"] * 2
    assert all(o.value is None for o in ops)
    # Nothing to do when the kernel has it all.
    assert desired.plan(want, want, desired.desired_tables(s), desired.desired_tables(s)) == []


def test_plan_replaces_a_changed_table():
    s = with_service()
    have = desired.desired_tables(s)
    s2 = model.update_service(s, "web", add=["d"])
    ops = desired.plan({}, {}, desired.desired_tables(s2), have)
    assert [(o.map, o.key) for o in ops] == [(MAGLEV, 1)] and o_table_ok(ops[0].value, s2)


def o_table_ok(table, s):
    return table[0] == s.services["web"].table_size and set(table[1:]) == {1, 2, 3}


def test_backends_keep_their_slots_and_new_services_and_backends_are_zeroed():
    s = with_service()
    want = desired.desired_maps(s, "n1", {}, 2, 1)
    slots = {k: v.slot for k, v in want["xo_lb_backends"].items()}
    assert sorted(slots.values()) == list(range(len(slots)))
    fresh = desired.fresh_counters(want, {})
    assert [(o.map, o.key.value) for o in fresh if o.map.startswith("xo_lb")] == (
        [("xo_lb_backend_stats", x) for x in sorted(slots.values())] + [("xo_lb_service_stats", 1)])
    # Backend 1 leaves, one comes, a second service: the others keep their slots; the new
    # backend takes a slot nobody holds, and only it and the new service are zeroed.
    s2 = model.update_service(s, "web", add=["d"], rm=["a"])
    s2 = model.create_service(s2, "db", "app", ports=["5432/tcp"], backends=["b"])
    after = desired.desired_maps(s2, "n1", {}, 2, 1, actual=want)
    kept = {k: v.slot for k, v in after["xo_lb_backends"].items() if k in slots}
    assert kept == {k: v for k, v in slots.items() if k in kept} and len(kept) == len(slots) - 1
    new = {k: v.slot for k, v in after["xo_lb_backends"].items() if k not in slots}
    assert sorted(new.values()) == [len(slots), len(slots) + 1]
    fresh = desired.fresh_counters(after, want)
    db = s2.services["db"].id
    assert sorted((o.map, o.key.value) for o in fresh) == sorted(
        [("xo_lb_backend_stats", x) for x in new.values()] + [("xo_lb_service_stats", db)])


def test_tables_are_what_maglev_builds():
    s = with_service(backends=["a", "b", "d"])
    t = desired.desired_tables(s)[1]
    names = ["a", "b", "d"]
    owners = maglev.build(names, t[0])
    assert t[1:] == tuple(s.services["web"].backend(names[i]).index for i in owners)


# --- the way back from the gateway address (DNS replies) ------------------------------------

def test_return_paths_are_the_plumbed_local_endpoints():
    s = model.add_endpoint(state(), "d", "db", "n1", "/run/netns/d", True)
    s = model.add_endpoint(s, "e", "app", "n1", "/run/netns/e", True)
    s = model.mark_endpoint_removing(s, "e")
    a, d = s.endpoints["a"], s.endpoints["d"]
    # a and d are plumbed here; e is being removed; b and c live on n2.
    assert desired.return_paths(s, "n1", {"a": 7, "d": 9, "e": 11}) == {a.ip: (7, a.mac), d.ip: (9, d.mac)}
    assert desired.return_paths(s, "n1", {"a": 7}) == {a.ip: (7, a.mac)}


def _ops(want, routes, neigh):
    return {(op.kind, op.key, op.value) for op in desired.return_path_ops(want, routes, neigh)}


def test_return_path_ops():
    want = {"10.10.0.1": (7, "02:58:0a:0a:00:01"), "10.10.0.2": (8, "02:58:0a:0a:00:02")}
    # Nothing yet: a route and a permanent neighbour entry each.
    assert _ops(want, {}, {}) == {("route", "10.10.0.1", 7), ("route", "10.10.0.2", 8),
                                  ("neigh", ("10.10.0.1", 7), "02:58:0a:0a:00:01"),
                                  ("neigh", ("10.10.0.2", 8), "02:58:0a:0a:00:02")}
    # All in place (MACs compared case-blind): nothing to do.
    routes = {"10.10.0.1": 7, "10.10.0.2": 8}
    neigh = {("10.10.0.1", 7): ("02:58:0A:0A:00:01", True), ("10.10.0.2", 8): ("02:58:0a:0a:00:02", True)}
    assert _ops(want, routes, neigh) == set()
    # A route through the wrong veth, a learnt (not permanent) entry, a stale route and a
    # stale entry: fixed, sets before deletes.
    routes = {"10.10.0.1": 99, "10.10.0.2": 8, "10.10.0.3": 9}
    neigh = {("10.10.0.1", 7): ("02:58:0a:0a:00:01", True), ("10.10.0.2", 8): ("02:58:0a:0a:00:02", False),
             ("10.10.0.3", 9): ("02:58:0a:0a:00:03", True)}
    ops = desired.return_path_ops(want, routes, neigh)
    assert [(op.kind, op.key, op.value) for op in ops] == [
        ("route", "10.10.0.1", 7), ("neigh", ("10.10.0.2", 8), "02:58:0a:0a:00:02"),
        ("route", "10.10.0.3", None), ("neigh", ("10.10.0.3", 9), None)]


def test_endpoint_flags_ask_for_service_lookups_only_where_services_are():
    from xoverlay.maps.layout import EP_NETWORK_HAS_SERVICES as NET, EP_SERVICE_BACKEND as BACKEND
    assert set(desired.endpoint_flags(state()).values()) == {0}
    s = with_service()             # web in app, backends a and b; d in app; c in db
    assert desired.endpoint_flags(s) == {"a": NET | BACKEND, "b": NET | BACKEND, "d": NET, "c": 0}
    m = desired.desired_maps(s, "n1", {"a": 7}, 2, 1)
    assert m["xo_local_endpoints"][U32(7)].flags == NET | BACKEND
    c = s.endpoints["c"]
    assert m["xo_endpoints"][EndpointKey(vni=4097, ip=ip_be(c.ip))].flags == 0


# --- the routing mesh: published ports ----------------------------------------------------

def test_published_ports_on_every_node():
    """8080:80 publishes 80/tcp on every node as (8080, tcp) -> service, its network, and
    the service port (a backend's default target: not the published port)."""
    from xoverlay.maps.layout import MeshKey
    s = with_service(ports=["80/tcp", "80/udp"], backends=["a", "b"], publish=["8080:80"], affinity="client-ip")
    svc = s.services["web"]
    for node in ("n1", "n2"):
        mesh = desired.desired_maps(s, node, {}, 2, 1)["xo_lb_mesh"]
        assert set(mesh) == {MeshKey(port=port_be(8080), proto=IPPROTO["tcp"]),
                             MeshKey(port=port_be(8080), proto=IPPROTO["udp"])}
        for v in mesh.values():
            assert (v.service, v.vni, v.flags) == (svc.id, 4096, LB_AFFINITY)
            assert bytes(v)[12:14] == (80).to_bytes(2, "big")


def test_plan_puts_published_ports_after_tables_and_removes_them_first():
    s = with_service(publish=["8080:80"])
    want = desired.desired_maps(s, "n1", {"a": 7}, 2, 1)
    ops = desired.plan(want, {k: {} for k in want}, desired.desired_tables(s), {})
    order = [o.map for o in ops]
    assert order.index("xo_lb_mesh") > order.index(MAGLEV)
    gone = desired.desired_maps(model.remove_service(s, "web"), "n1", {"a": 7}, 2, 1)
    order = [o.map for o in desired.plan(gone, want, {}, desired.desired_tables(s))]
    assert order.index("xo_lb_mesh") < order.index(MAGLEV)
