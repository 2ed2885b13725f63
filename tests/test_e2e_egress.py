"""Egress end to end on the namespace lab (both stores): endpoints reach the outside client
(xo-<prefix>client, 192.0.2.200) and their own node, the outside sees the node's underlay
address, TCP, UDP and ICMP (ping, port unreachable, path MTU) come back; an --internal
network gets nothing out, counted by reason; 30,000 concurrent connections to one outside
port; the agent's egress state is repaired after drift."""
from __future__ import annotations

import contextlib
import json
import subprocess
import time

import pytest
from conftest import in_netns

pytestmark = pytest.mark.lab

PORT = 18181
# An outside server: TCP answers each connection with the address it came from (one line)
# or, given "sink", reads to the end and answers with the byte count and sha256; UDP
# echoes with the sender's address.
SERVER = r"""
import hashlib, socket, sys, threading
port = int(sys.argv[1])
def tcp():
    s = socket.create_server(("0.0.0.0", port), backlog=128)
    while True:
        c, a = s.accept()
        threading.Thread(target=serve, args=(c, a), daemon=True).start()
def serve(c, a):
    with c:
        first = c.recv(4)
        if first != b"sink":
            c.sendall(f"{a[0]}:{a[1]}\n".encode()); return
        h, n = hashlib.sha256(), 0
        while chunk := c.recv(1 << 16):
            h.update(chunk); n += len(chunk)
        c.sendall(f"{n} {h.hexdigest()}\n".encode())
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
    while True:
        d, a = u.recvfrom(2048); u.sendto(d + f" {a[0]}".encode(), a)
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
print("listening", flush=True)
sys.stdin.read()
"""
ASK = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(b"who?"); print(c.makefile().readline().strip())
"""
SINK = r"""
import hashlib, os, socket, sys
data = os.urandom(1 << 20) * int(sys.argv[3])
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(b"sink" + data); c.shutdown(socket.SHUT_WR)
print(len(data), hashlib.sha256(data).hexdigest(), c.makefile().readline().strip())
"""
UDP_ASK = r"""
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.connect((sys.argv[1], int(sys.argv[2]))); u.send(b"hello")
try:
    print(u.recv(2048).decode())
except ConnectionRefusedError:
    print("refused")      # the ICMP port unreachable, brought back to this socket
"""


def lab_of(lab):
    return lab.lab()


@contextlib.contextmanager
def outside_server(lab):
    """SERVER in the lab's outside client for the with-block; yields its address."""
    lab_ = lab_of(lab)
    p = subprocess.Popen(["nsenter", f"--net=/run/netns/{lab_.client_netns}", "--", "python3", "-c", SERVER,
                          str(PORT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "listening"
        yield lab_.client_ip
    finally:
        p.kill()
        p.wait()


def node_ip(lab, i: int) -> str:
    return lab_of(lab).node_ip(i)


def test_endpoint_fetches_from_outside_and_the_server_sees_its_node(lab):
    """HTTP-like request/answer from an endpoint of each node: the outside sees that
    endpoint's own node's underlay address, never the endpoint's."""
    with outside_server(lab) as ip:
        for i, node in enumerate(lab.nodes(), start=1):
            seen = lab.run_in(f"{node}-a", "python3", "-c", ASK, ip, str(PORT)).stdout.strip()
            assert seen.split(":")[0] == node_ip(lab, i), f"{node}-a seen as {seen}"


def test_http_with_curl_from_an_endpoint(lab):
    """A real HTTP client and server: the server's log names the node."""
    lab_ = lab_of(lab)
    n1 = lab.nodes()[0]
    srv = subprocess.Popen(["nsenter", f"--net=/run/netns/{lab_.client_netns}", "--", "python3", "-m", "http.server",
                            str(PORT + 1), "--bind", "0.0.0.0", "--directory", "/usr/share/doc/python3"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            r = lab.run_in(f"{n1}-a", "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                           f"http://{lab_.client_ip}:{PORT + 1}/", check=False)
            if r.stdout == "200" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert r.stdout == "200", r.stderr
    finally:
        srv.terminate()
        log = srv.communicate(timeout=10)[1]
    assert f"{node_ip(lab, 1)} - - " in log and '"GET / HTTP/1.1" 200' in log, log


def test_ping_outside_its_own_node_and_another_node(lab):
    n1 = lab.nodes()[0]
    for dst in (lab_of(lab).client_ip, node_ip(lab, 1), node_ip(lab, 2)):
        assert lab.ping(f"{n1}-a", dst), f"{n1}-a cannot ping {dst}"


def test_udp_out_and_back_and_the_port_unreachable_too(lab):
    n1 = lab.nodes()[0]
    with outside_server(lab) as ip:
        out = lab.run_in(f"{n1}-b", "python3", "-c", UDP_ASK, ip, str(PORT)).stdout.split()
        assert out == ["hello", node_ip(lab, 1)]
        # Nothing listens on PORT + 7: the client's ICMP error reaches the endpoint's socket.
        assert lab.run_in(f"{n1}-b", "python3", "-c", UDP_ASK, ip, str(PORT + 7)).stdout.strip() == "refused"


def test_tcp_transfer_outside_arrives_intact(lab):
    """32 MiB from an endpoint to the outside, full-size segments with offloaded checksums."""
    n2 = lab.nodes()[1]
    with outside_server(lab) as ip:
        t0 = time.monotonic()
        out = lab.run_in(f"{n2}-a", "python3", "-c", SINK, ip, str(PORT), "32", timeout=120).stdout.split()
        took = time.monotonic() - t0
    assert out[0] == out[2] == str(32 << 20) and out[1] == out[3], out
    print(f"32 MiB out in {took:.2f} s")


def test_path_mtu_discovery_through_the_node(lab):
    """A smaller MTU on the node's way out: the node's ICMP frag-needed reaches the
    endpoint, whose TCP lowers its segments and gets everything through."""
    n1 = lab.nodes()[0]
    node_ns = lab.node_netns(n1)
    client_ip = lab_of(lab).client_ip
    in_netns(node_ns, "ip", "route", "add", f"{client_ip}/32", "dev", "eth1", "mtu", "1200")
    try:
        with outside_server(lab) as ip:
            out = lab.run_in(f"{n1}-a", "python3", "-c", SINK, ip, str(PORT), "4", timeout=120).stdout.split()
        assert out[0] == out[2] and out[1] == out[3], out
        cached = lab.run_in(f"{n1}-a", "ip", "route", "get", client_ip).stdout
        assert "mtu 1200" in cached, cached
    finally:
        in_netns(node_ns, "ip", "route", "del", f"{client_ip}/32", "dev", "eth1", check=False)
        lab.run_in(f"{n1}-a", "ip", "route", "flush", "cache", check=False)


@pytest.fixture
def internal_net(lab):
    """An --internal network with an endpoint on node 1 and one on node 2."""
    n1, n2, _ = lab.nodes()
    lab.xo("network", "create", "inside", "--subnet", "10.66.0.0/16", "--internal")
    try:
        lab.xo("endpoint", "add", "inside-x", "--network", "inside", "--node", n1)
        lab.xo("endpoint", "add", "inside-y", "--network", "inside", "--node", n2)
        yield "inside"
    finally:
        lab.xo("endpoint", "rm", "inside-x", check=False)
        lab.xo("endpoint", "rm", "inside-y", check=False)
        lab.xo("network", "rm", "inside", check=False)


def test_internal_network_gets_nothing_out_and_the_drops_are_counted(lab, internal_net):
    n1 = lab.nodes()[0]
    nets = {n["name"]: n for n in json.loads(lab.xo("network", "ls", "--json").out)}
    assert nets["inside"]["internal"] is True and nets["demo"]["internal"] is False
    assert "internal" in lab.xo("network", "ls").out
    info = json.loads(lab.xo("network", "inspect", "inside", "--json").out)
    assert info["internal"] is True and info["endpoints"] == ["inside-x", "inside-y"]
    assert "egress: none (internal)" in lab.xo("network", "inspect", "inside").out
    before = lab.drops(n1)
    for dst in (lab_of(lab).client_ip, node_ip(lab, 1)):
        assert not lab.ping("inside-x", dst, count=2)
    with outside_server(lab) as ip:
        r = lab.run_in("inside-x", "python3", "-c", ASK, ip, str(PORT), check=False)
        assert r.returncode != 0
    after = lab.drops(n1)
    assert after.get("EGRESS_INTERNAL", 0) - before.get("EGRESS_INTERNAL", 0) >= 5   # 4 pings + SYN(s)
    assert after.get("NO_ROUTE", 0) == before.get("NO_ROUTE", 0)
    # Inside the overlay it is a network like any other.
    assert lab.ping("inside-x", lab.ep("inside-y")["ip"])


def test_overlay_and_service_traffic_are_not_masqueraded(lab):
    """Endpoint to endpoint (across nodes) and to a service VIP: the peer sees the
    endpoint's own address."""
    n1, n2, _ = lab.nodes()
    listener = ("import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 5556));"
                "s.settimeout(5); d, a = s.recvfrom(100); print(a[0])")
    p = subprocess.Popen(["nsenter", f"--net={lab.ep(f'{n2}-b')['netns']}", "--", "python3", "-c", listener],
                         stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    lab.run_in(f"{n1}-a", "python3", "-c", "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
               f".sendto(b'x', ('{lab.ep(f'{n2}-b')['ip']}', 5556))")
    assert p.communicate(timeout=10)[0].strip() == lab.ep(f"{n1}-a")["ip"]
    # The demo service answers with the client address it saw.
    answer = lab.run_in(f"{n1}-a", "curl", "-sS", "--max-time", "5", "http://10.10.255.254/").stdout
    assert lab.ep(f"{n1}-a")["ip"] in answer, answer


def test_egress_state_is_repaired_after_drift(lab):
    """The nftables table, xo-gw's forwarding and the replies' rule, undone behind the
    agent's back, are back within a few passes, and egress works again."""
    n1 = lab.nodes()[0]
    ns = lab.node_netns(n1)
    subnet = "10.10.0.0/16"
    with lab.agent_paused(n1):
        in_netns(ns, "nft", "delete", "table", "ip", "xoverlay")
        in_netns(ns, "sysctl", "-qw", "net.ipv4.conf.xo-gw.forwarding=0")
        in_netns(ns, "ip", "rule", "del", "to", subnet, "lookup", "30831")
        assert not lab.ping(f"{n1}-a", lab_of(lab).client_ip, count=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        tables = in_netns(ns, "nft", "list", "tables").stdout
        fwd = in_netns(ns, "sysctl", "-n", "net.ipv4.conf.xo-gw.forwarding").stdout.strip()
        rules = in_netns(ns, "ip", "rule").stdout
        if "xoverlay" in tables and fwd == "1" and f"to {subnet} lookup 30831" in rules:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"not repaired: {tables!r} forwarding={fwd} rules={rules!r}")
    assert lab.ping(f"{n1}-a", lab_of(lab).client_ip)
    assert "repaired nftables table ip xoverlay" in open(f"/run/xoverlay/{n1}.log").read() or \
        "set nftables table ip xoverlay" in open(f"/run/xoverlay/{n1}.log").read()


def test_egress_off_is_linted_and_dropped_as_no_route(lab):
    """A node whose agent could not set egress up (config flag off): status says so, its
    endpoints' packets for outside are counted as NO_ROUTE; the agent puts it back."""
    from xoverlay.kernel.datapath import open_maps
    from xoverlay.maps.layout import CFG_EGRESS, U32
    n3 = lab.nodes()[2]

    def status():
        return json.loads(lab.xo("status", "--node", n3, "--json").out)

    def lints():
        return {x["id"]: x for x in status()["lints"]}
    assert "egress-off" not in lints()
    egress = status()["egress"]
    assert egress["on"] is True and egress["conntrack"]["max"] > 0, egress
    assert "egress: on (the node masquerades); conntrack " in lab.xo("status", "--node", n3, "--once").out
    with lab.agent_paused(n3):
        cfg_map = open_maps(n3)["xo_config"]
        cfg = cfg_map.get(U32(0))
        cfg.flags &= ~CFG_EGRESS
        cfg_map.set(U32(0), cfg)
        assert "could not set its nftables table up" in lints()["egress-off"]["message"]
        assert status()["egress"]["on"] is False
        before = lab.drops(n3).get("NO_ROUTE", 0)
        assert not lab.ping(f"{n3}-a", lab_of(lab).client_ip, count=2)
        assert lab.drops(n3).get("NO_ROUTE", 0) - before == 2
    deadline = time.monotonic() + 10
    while "egress-off" in lints() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "egress-off" not in lints()
    assert lab.ping(f"{n3}-a", lab_of(lab).client_ip)


BOUND = r"""
import socket, sys
c = socket.socket(); c.settimeout(10); c.bind(("0.0.0.0", int(sys.argv[3])))
c.connect((sys.argv[1], int(sys.argv[2]))); c.sendall(b"who?"); print(c.makefile().readline().strip())
"""


def test_a_connection_from_a_published_port_number_still_comes_back(lab):
    """An endpoint connecting out from source port 8080, the lab's published port: its
    masqueraded port is another (a reply to node:8080 would be a routing-mesh request)."""
    n1 = lab.nodes()[0]
    with outside_server(lab) as ip:
        seen = lab.run_in(f"{n1}-a", "python3", "-c", BOUND, ip, str(PORT), "8080").stdout.strip()
    addr, port = seen.split(":")
    assert addr == node_ip(lab, 1) and port != "8080", seen


# --- many connections to one outside port -----------------------------------------------

CONNS = 30_000
PROCS = 3               # this machine's hard limit is 20,000 open files a process
MANY_SERVER = r"""
import json, os, select, socket, sys
port = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("0.0.0.0", port)); s.listen(4096); s.setblocking(False)
print("listening", flush=True)
held = []
while True:
    ready = select.select([s, sys.stdin], [], [], 1)[0]
    if s in ready:
        try:
            while True:
                c, a = s.accept(); held.append((c, a))
        except BlockingIOError:
            pass
    if sys.stdin in ready:
        sys.stdin.readline()
        print(json.dumps([f"{a[0]}:{a[1]}" for _, a in held]), flush=True)
        sys.stdin.read()
        break
"""
MANY_CLIENT = r"""
import errno, json, select, socket, sys, time
want, ip, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
    f.write("1024 65000")        # one client address: it needs 30,000 source ports of its own
ep = select.epoll(); pending, done, failed = {}, [], 0
deadline = time.monotonic() + float(sys.argv[4])
opened = 0
while (opened < want or pending) and time.monotonic() < deadline:
    while opened < want and len(pending) < 500:        # at most 500 handshakes in flight
        c = socket.socket(); c.setblocking(False)
        e = c.connect_ex((ip, port)); opened += 1
        if e not in (0, errno.EINPROGRESS):
            failed += 1; c.close(); continue
        pending[c.fileno()] = c; ep.register(c.fileno(), select.EPOLLOUT)
    for fd, _ in ep.poll(1):
        c = pending.pop(fd); ep.unregister(fd)
        if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            failed += 1; c.close()
        else:
            done.append(c)
print(json.dumps({"connected": len(done), "failed": failed, "pending": len(pending)}), flush=True)
sys.stdin.read()
"""


def test_30000_concurrent_connections_to_one_outside_port(lab):
    """30,000 connections at once from one endpoint to one outside address:port: each
    gets a port of its own on the node's address (masquerade keeps the endpoint's source
    port where it is free; the limit is the node's ports: DESIGN.md, "Egress")."""
    lab_ = lab_of(lab)
    n3 = lab.nodes()[2]
    port = PORT + 2
    procs = []

    def start(netns, script, *args):
        p = subprocess.Popen(["nsenter", f"--net={netns}", "--", "python3", "-c", script, *map(str, args)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        return p
    try:
        servers = [start(f"/run/netns/{lab_.client_netns}", MANY_SERVER, port) for _ in range(PROCS)]
        assert all(p.stdout.readline().strip() == "listening" for p in servers)
        t0 = time.monotonic()
        clients = [start(lab.ep(f"{n3}-b")["netns"], MANY_CLIENT, CONNS // PROCS, lab_.client_ip, port, 150)
                   for _ in range(PROCS)]
        results = [json.loads(p.stdout.readline()) for p in clients]
        took = time.monotonic() - t0
        time.sleep(1)                 # the last accepts
        accepted = []
        for p in servers:
            p.stdin.write("report\n")
            p.stdin.flush()
            accepted += json.loads(p.stdout.readline())
        # status shows what the node's conntrack holds (the masquerade's connections).
        tracked = json.loads(lab.xo("status", "--node", n3, "--json").out)["egress"]["conntrack"]["entries"]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    print(f"{CONNS} connections in {took:.1f} s; conntrack entries on the node: {tracked}")
    assert results == [{"connected": CONNS // PROCS, "failed": 0, "pending": 0}] * PROCS, results
    assert len(accepted) == len(set(accepted)) == CONNS
    assert {a.split(":")[0] for a in accepted} == {node_ip(lab, 3)}
    assert tracked >= CONNS
