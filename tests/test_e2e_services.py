"""Services end to end on the 3-node namespace lab: a VIP load-balanced over a backend on
every node (xoverlay/lab/demo_server.py in node1-a, node2-a, node3-a), used from other endpoints
with tests/lb_client.py. Real veths, real programs, real TCP and UDP."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parent.parent
CLIENT = str(Path(__file__).resolve().parent / "lb_client.py")
PY = sys.executable
SERVICE = "e2esvc"


@dataclass
class Web:
    vip: str
    id: int
    backends: list          # endpoint names, one per node
    client: str             # an endpoint that is no backend (on node 1)
    far_client: str         # another, on node 2


def kernel_tables(lab, sid: int) -> dict[str, set]:
    """The backend indexes in each node's Maglev table of service `sid`."""
    from xoverlay.kernel.datapath import open_maps
    from xoverlay.kernel.maglev_maps import MaglevTables
    out = {}
    for node in lab.nodes():
        maps = open_maps(node)
        try:
            table = MaglevTables(maps["xo_lb_maglev"]).read().get(sid)
            out[node] = set(table[1:]) if table else set()
        finally:
            for m in maps.values():
                m.close()
    return out


def wait_tables(lab, web: Web, endpoints: list[str], timeout: float = 10) -> None:
    """Until every node's table holds exactly these backends (by their ids)."""
    info = json.loads(lab.xo("service", "inspect", SERVICE, "--json").out)
    want = {b["id"] for b in info["backends"] if b["endpoint"] in endpoints}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tables = kernel_tables(lab, web.id)
        if all(t == want for t in tables.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"tables {tables}, want {want} everywhere")


def client(lab, endpoint: str, *args, timeout: float = 120) -> dict:
    r = lab.run_in(endpoint, PY, CLIENT, *args, timeout=timeout)
    return json.loads(r.stdout.strip().splitlines()[-1])


def name_of(answer: str) -> str:
    return answer.split()[0]


@pytest.fixture(scope="module")
def web(lab):
    n1, n2, n3 = lab.nodes()
    backends = [f"{n}-a" for n in (n1, n2, n3)]
    servers = []
    try:
        for b in backends:
            p = subprocess.Popen(["nsenter", f"--net={lab.ep(b)['netns']}", "--", PY, "-m", "xoverlay.lab.demo_server", b],
                                 cwd=ROOT, stdout=subprocess.PIPE, text=True)
            servers.append(p)
            assert p.stdout.readline().strip() == "listening"
        lab.xo("service", "create", SERVICE, "--network", "demo", "--port", "80/tcp", "--port", "53/udp",
               "--port", "9000/tcp", *[f"--backend={b}" for b in backends])
        info = json.loads(lab.xo("service", "inspect", SERVICE, "--json").out)
        w = Web(info["vip"], info["id"], backends, f"{n1}-b", f"{n2}-b")
        wait_tables(lab, w, backends)
        yield w
    finally:
        lab.xo("service", "rm", SERVICE, check=False)
        for p in servers:
            p.kill()
            p.wait()


@pytest.fixture
def restore(lab, web):
    """Whatever a test does to the backends, they are all back afterwards."""
    yield
    info = json.loads(lab.xo("service", "inspect", SERVICE, "--json").out)
    have = {b["endpoint"]: b["state"] for b in info["backends"]}
    missing = [b for b in web.backends if have.get(b) != "active"]
    if missing:
        lab.xo("service", "update", SERVICE, *[f"--add-backend={b}" for b in missing])
    wait_tables(lab, web, web.backends)


def test_200_connections_spread_over_backends_on_every_node(lab, web):
    out = client(lab, web.client, "http", web.vip, "80", "200")
    assert out["errors"] == []
    counts = Counter(name_of(a) for a in out["answers"])
    assert set(counts) == set(web.backends), counts
    assert all(c >= 35 for c in counts.values()), counts        # 67 each expected
    # Every backend saw the client's own address: DNAT only, no SNAT.
    me = lab.ep(web.client)["ip"]
    assert {a.split()[2].split(":")[0] for a in out["answers"]} == {me}


def test_counters_count_connections(lab, web):
    before = json.loads(lab.xo("service", "inspect", SERVICE, "--json").out)
    out = client(lab, web.far_client, "http", web.vip, "80", "30")
    assert out["errors"] == []
    after = json.loads(lab.xo("service", "inspect", SERVICE, "--json").out)
    assert after["counters"]["connections"] - before["counters"]["connections"] == 30
    per_backend = sum(b["counters"]["connections"] for b in after["backends"]) - \
        sum(b["counters"]["connections"] for b in before["backends"])
    assert per_backend == 30
    assert after["counters"]["packets"] - before["counters"]["packets"] >= 30 * 4


@pytest.fixture
def software_checksums(lab):
    """Checksum offload off on every node's underlay device: the kernel then finishes each
    CHECKSUM_PARTIAL packet's checksum in software as it leaves the node, from what our
    rewrite left in the checksum field, and the receiving node verifies it. (Between
    veths alone a partial checksum is never finished nor checked, so a wrong update of
    it would go unnoticed.)"""
    def tx(state):
        for node in lab.nodes():
            subprocess.run(["nsenter", f"--net=/run/netns/xo-{node}", "--", "ethtool", "-K", "eth1", "tx", state],
                           check=True, capture_output=True)
    tx("off")
    try:
        yield
    finally:
        tx("on")


@pytest.mark.parametrize("offload", ["offload", "software"])
def test_bulk_transfer_through_the_vip_arrives_intact(lab, web, offload, request):
    """16 MiB each way through DNAT and reverse NAT, full-size (GSO) segments, container
    checksums left partial: a wrong checksum update stalls or corrupts it. From the far
    client (node 2) most connections cross nodes."""
    if offload == "software":
        request.getfixturevalue("software_checksums")
    for _ in range(3):
        out = client(lab, web.far_client, "bulk", web.vip, "9000", "16", timeout=120)
        assert out["intact"] and out["received"] == out["sent"] == 16 << 20, out


def test_udp_service(lab, web):
    out = client(lab, web.far_client, "udp", web.vip, "53", "40")
    assert out["errors"] == []
    # Replies come from the VIP (reverse NAT), backends saw the client's own address.
    assert {a["from"] for a in out["answers"]} == {f"{web.vip}:53"}
    me = lab.ep(web.far_client)["ip"]
    for a in out["answers"]:
        assert a["answer"].split()[2] == f"{me}:{a['port']}"
    assert len({name_of(a["answer"]) for a in out["answers"]}) >= 2


def _start_stream(lab, endpoint: str, web: Web, seconds: float):
    p = subprocess.Popen(["nsenter", f"--net={lab.ep(endpoint)['netns']}", "--", PY, CLIENT, "stream", web.vip,
                          "9000", str(seconds)], stdout=subprocess.PIPE, text=True)
    first = p.stdout.readline().split()
    assert first[0] == "backend", first
    return p, first[1]


def test_stream_keeps_flowing_while_other_backends_go_and_come(lab, web, restore):
    p, mine = _start_stream(lab, web.client, web, 8)
    try:
        other = next(b for b in web.backends if b != mine)
        time.sleep(1.5)
        lab.xo("service", "update", SERVICE, f"--rm-backend={other}")
        wait_tables(lab, web, [b for b in web.backends if b != other])
        # New connections never go to the removed backend.
        out = client(lab, web.far_client, "http", web.vip, "80", "30")
        assert out["errors"] == [] and other not in {name_of(a) for a in out["answers"]}
        lab.xo("service", "update", SERVICE, f"--add-backend={other}")
        wait_tables(lab, web, web.backends)
        result = json.loads(p.communicate(timeout=30)[0].strip().splitlines()[-1])
    finally:
        p.kill()
    assert result["ended"] == "done", result
    assert result["backend"] == mine and result["peer"] == f"{web.vip}:9000"
    assert result["max_gap"] < 1.0 and result["rounds"] > 100, result


def test_stream_survives_draining_its_backend(lab, web, restore):
    p, mine = _start_stream(lab, web.client, web, 5)
    try:
        time.sleep(1)
        lab.xo("service", "update", SERVICE, f"--drain={mine}")
        wait_tables(lab, web, [b for b in web.backends if b != mine])
        out = client(lab, web.far_client, "http", web.vip, "80", "30")
        assert out["errors"] == [] and mine not in {name_of(a) for a in out["answers"]}
        result = json.loads(p.communicate(timeout=30)[0].strip().splitlines()[-1])
    finally:
        p.kill()
    assert result["ended"] == "done" and result["max_gap"] < 1.0, result


def test_removing_its_own_backend_ends_the_stream_at_once(lab, web, restore):
    n1 = lab.nodes()[0]
    before = lab.drops(n1).get("LB_BACKEND_GONE", 0)
    p, mine = _start_stream(lab, web.client, web, 60)
    try:
        time.sleep(1)
        removed_at = time.monotonic()
        lab.xo("service", "update", SERVICE, f"--rm-backend={mine}")
        out = p.communicate(timeout=15)[0]
        took = time.monotonic() - removed_at
    finally:
        p.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ended"] == "ConnectionResetError", result
    assert took < 5, f"the client noticed after {took:.1f} s"
    assert lab.drops(n1).get("LB_BACKEND_GONE", 0) > before


def test_another_network_cannot_reach_the_vip(lab, web):
    n1 = lab.nodes()[0]
    lab.xo("network", "create", "e2eother", "--subnet", "10.78.0.0/16")
    try:
        lab.xo("endpoint", "add", "e2e-outsider", "--network", "e2eother", "--node", n1)
        before = lab.drops(n1).get("OTHER_NETWORK", 0)
        r = lab.run_in("e2e-outsider", PY, CLIENT, "http", web.vip, "80", "1", timeout=30)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["answers"] == [] and out["errors"]
        assert lab.drops(n1).get("OTHER_NETWORK", 0) > before
    finally:
        lab.xo("endpoint", "rm", "e2e-outsider", check=False)
        lab.xo("network", "rm", "e2eother", check=False)
