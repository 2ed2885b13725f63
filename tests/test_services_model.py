"""Services in the cluster state (pure): VIP allocation, backends, ports, publish, and
every way to get them wrong."""
from __future__ import annotations

import pytest

from xoverlay.core import model
from xoverlay.core.model import State
from xoverlay.errors import XoError
from xoverlay.store.sqlite import SqliteStore


def cluster() -> State:
    s = State()
    s = model.join_node(s, "n1", "192.0.2.1")
    s = model.join_node(s, "n2", "192.0.2.2")
    s = model.create_network(s, "app", "10.10.0.0/16")
    s = model.create_network(s, "db", "10.20.0.0/16")
    for name, node in (("web1", "n1"), ("web2", "n2"), ("web3", "n1")):
        s = model.add_endpoint(s, name, "app", node, f"/run/netns/{name}", True)
    s = model.add_endpoint(s, "pg1", "db", "n2", "/run/netns/pg1", True)
    return s


def web(s=None, **kw) -> State:
    args = dict(ports=["80/tcp"], backends=["web1", "web2"])
    args.update(kw)
    return model.create_service(s or cluster(), "web", "app", **args)


def test_create_allocates_vip_from_the_top_and_ids():
    s = web()
    svc = s.services["web"]
    assert svc.vip == "10.10.255.254" and svc.id == 1 and svc.network == "app"
    assert svc.ports == ("80/tcp",)
    assert [(b.endpoint, b.index, b.port, b.weight) for b in svc.backends] == [("web1", 1, 0, 1), ("web2", 2, 0, 1)]
    assert svc.table_size == 401
    s = model.create_service(s, "api", "app", ["8080"])
    assert s.services["api"].vip == "10.10.255.253" and s.services["api"].id == 2
    assert s.services["api"].ports == ("8080/tcp",) and s.services["api"].backends == ()


def test_ids_are_reused_after_removal():
    s = web()
    s = model.create_service(s, "api", "app", ["81"])
    s = model.remove_service(s, "web")
    assert model.create_service(s, "x", "app", ["82"]).services["x"].id == 1


def test_explicit_vip_and_backend_port_and_weight():
    s = web(vip="10.10.200.1", backends=["web1:8080@3", "web2"], affinity="client-ip")
    svc = s.services["web"]
    assert svc.vip == "10.10.200.1" and svc.affinity == "client-ip"
    assert (svc.backends[0].port, svc.backends[0].weight) == (8080, 3)


def test_ipam_never_hands_out_a_vip():
    s = cluster()
    slice_net = "10.10.0.0/24"
    nxt = model.add_endpoint(s, "probe", "app", "n1", "/run/netns/probe", True).endpoints["probe"].ip
    s = web(s, vip=nxt)
    s = model.add_endpoint(s, "after", "app", "n1", "/run/netns/after", True)
    assert s.endpoints["after"].ip != nxt and s.endpoints["after"].ip.startswith(slice_net[:8])
    with pytest.raises(XoError, match="is the virtual IP of service web"):
        model.add_endpoint(s, "fixed", "app", "n2", "/run/netns/fixed", True, ip=nxt)


def test_vip_never_an_endpoint_address():
    s = cluster()
    s = model.add_endpoint(s, "top", "app", "n1", "/run/netns/top", True, ip="10.10.255.254")
    assert web(s).services["web"].vip == "10.10.255.253"


def test_publish():
    s = web(ports=["80/tcp", "53/udp", "53/tcp"], backends=["web1"], publish=["8080:80", "5353:53"])
    assert s.services["web"].publish == ("8080:80/tcp", "5353:53/udp", "5353:53/tcp")
    s = model.create_service(s, "other", "app", ["53/udp"], publish=["8080:53"])   # 8080/udp is free
    with pytest.raises(XoError, match="published port 8080/tcp is already used by service web"):
        model.create_service(s, "x", "app", ["80"], publish=["8080:80"])


def test_update_add_rm_drain():
    s = web()
    s = model.update_service(s, "web", add=["web3"])
    assert [b.index for b in s.services["web"].backends] == [1, 2, 3]
    s = model.update_service(s, "web", drain=["web1"])
    assert s.services["web"].backend("web1").draining
    assert [b.endpoint for b in s.services["web"].active] == ["web2", "web3"]
    s = model.update_service(s, "web", rm=["web2"])
    assert [b.endpoint for b in s.services["web"].backends] == ["web1", "web3"]
    # Added back after removal: a new id (its old connections are not its own any more).
    s = model.update_service(s, "web", add=["web2"])
    assert s.services["web"].backend("web2").index == 4
    # Back from draining: the same id (its connections still are).
    s = model.update_service(s, "web", add=["web1"])
    assert s.services["web"].backend("web1") == model.Backend("web1", 1)


def test_table_size_only_grows():
    s = web()
    m = s.services["web"].table_size
    s = model.update_service(s, "web", rm=["web1"])
    assert s.services["web"].table_size == m
    for i in range(6):
        s = model.add_endpoint(s, f"x{i}", "app", "n2", f"/run/netns/x{i}", True)
    s = model.update_service(s, "web", add=[f"x{i}" for i in range(6)])
    assert s.services["web"].table_size >= 700 and s.services["web"].table_size > m


def test_endpoint_removal_leaves_its_services():
    s = model.mark_endpoint_removing(web(), "web1")
    assert [b.endpoint for b in s.services["web"].backends] == ["web2"]
    s = model.remove_node(web(), "n2")
    assert [b.endpoint for b in s.services["web"].backends] == ["web1"]


def test_network_with_services_cannot_go():
    s = web()
    for e in list(s.endpoints):
        s = model.remove_endpoint(s, e)
    with pytest.raises(XoError, match="still has services: web"):
        model.remove_network(s, "app")


BAD = [
    ("unknown network", dict(network="nope"), "network nope does not exist"),
    ("unknown backend", dict(backends=["ghost"]), "backend ghost: endpoint ghost does not exist"),
    ("backend in another network", dict(backends=["pg1"]), "endpoint pg1 is in network db"),
    ("VIP outside the subnet", dict(vip="10.20.0.9"), "not a usable address of network app"),
    ("VIP is the broadcast address", dict(vip="10.10.255.255"), "not a usable address"),
    ("VIP not an address", dict(vip="banana"), "is not an IPv4 address"),
    ("VIP taken by an endpoint", dict(vip="{web1}"), "already used by endpoint web1"),
    ("duplicate port", dict(ports=["80/tcp", "80"]), "port 80/tcp is given twice"),
    ("port out of range", dict(ports=["70000/tcp"]), "1..65535"),
    ("port zero", dict(ports=["0/udp"]), "1..65535"),
    ("port not a number", dict(ports=["http"]), "1..65535"),
    ("bad protocol", dict(ports=["80/sctp"]), "protocol must be tcp or udp"),
    ("no port", dict(ports=[]), "needs at least one --port"),
    ("duplicate backend", dict(backends=["web1", "web1:81"]), "backend web1 is given twice"),
    ("backend port with several service ports", dict(ports=["80", "443"], backends=["web1:8080"]),
     "a target port needs a service with one port"),
    ("bad backend port", dict(backends=["web1:99999"]), "port must be 1..65535"),
    ("bad weight", dict(backends=["web1@0"]), "weight must be"),
    ("publish an unknown port", dict(publish=["8080:81"]), "has no port 81"),
    ("publish a bad port", dict(publish=["0:80"]), "published port must be 1..65535"),
    ("publish on the VXLAN port", dict(ports=["53/udp"], publish=["4789:53"]), "4789/udp is the nodes' VXLAN port"),
    ("bad affinity", dict(affinity="sticky"), "affinity 'sticky'"),
    ("bad name", dict(name="-x"), "not valid"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_service(case):
    _, kw, msg = case
    s = cluster()
    msg = msg.format(web1=s.endpoints["web1"].ip)
    kw = {k: (v.format(web1=s.endpoints["web1"].ip) if isinstance(v, str) else v) for k, v in kw.items()}
    name = kw.pop("name", "web")
    network = kw.pop("network", "app")
    args = dict(ports=["80/tcp"], backends=["web1"])
    args.update(kw)
    with pytest.raises(XoError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        model.create_service(s, name, network, **args)


def test_duplicate_service_and_taken_vip():
    s = web()
    with pytest.raises(XoError, match="service web already exists"):
        web(s)
    with pytest.raises(XoError, match="VIP 10.10.255.254 is already used by service web"):
        model.create_service(s, "api", "app", ["80"], vip="10.10.255.254")


@pytest.mark.parametrize("kw,msg", [
    (dict(add=["web1"]), "web1 is already a backend of service web"),
    (dict(add=["pg1"]), "endpoint pg1 is in network db"),
    (dict(rm=["web3"]), "web3 is not a backend of service web"),
    (dict(drain=["web3"]), "web3 is not a backend of service web"),
    (dict(drain=["web1"], rm=["web1"]), "cannot be both drained and removed"),
    ({}, "nothing to do"),
])
def test_bad_update(kw, msg):
    with pytest.raises(XoError, match=msg):
        model.update_service(web(), "web", **kw)
    with pytest.raises(XoError, match="service nope does not exist"):
        model.update_service(web(), "nope", add=["web3"])


def test_store_round_trip(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"))
    store.update(lambda s: web(cluster(), backends=["web1:8080@2", "web2"], publish=["8080:80"]))
    store.update(lambda s: model.update_service(s, "web", drain=["web2"]))
    back = store.read().services["web"]
    want = model.update_service(web(cluster(), backends=["web1:8080@2", "web2"], publish=["8080:80"]),
                                "web", drain=["web2"]).services["web"]
    assert back == want
    assert isinstance(back.backends, tuple) and back.backends[1].draining and back.backends[0].weight == 2
    assert back.publish == ("8080:80/tcp",)
    # Reading twice gives equal objects: an unchanged service is not rewritten.
    gen = store.generation()
    store.update(lambda s: s)
    assert store.generation() == gen
