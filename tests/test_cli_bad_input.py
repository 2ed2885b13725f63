"""Every bad input: one line that names the problem, a non-zero exit, and the store and
the kernel exactly as they were."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from conftest import PY, run_xo

pytestmark = pytest.mark.lab


def snapshot(lab) -> tuple:
    from xoverlay.core.desired import RECONCILED_MAPS
    from xoverlay.kernel.datapath import open_maps
    gen, rows = lab.store().snapshot()      # either backend: the whole state and its generation
    kernel = {}
    for node in lab.nodes():
        maps = open_maps(node)
        kernel[node] = {m: sorted(bytes(k) + bytes(v) for k, v in maps[m].items().items()) for m in RECONCILED_MAPS}
        for m in maps.values():
            m.close()
    # Other labs (other test runs, benchmarks) may come and go meanwhile: ignore theirs.
    mine = lab.nodes()[0].split("-")[0] + "-"
    netns = sorted(n for n in os.listdir("/run/netns")
                   if mine in n or not re.match(r"(xo-)?(x[0-9a-f]{4}|xbench|pytest)-|xodns-", n))
    links = {n: subprocess.run(["ip", "-n", f"xo-{n}", "-o", "link"], capture_output=True, text=True).stdout
             for n in lab.nodes()}
    return rows, gen, kernel, netns, links


def one_line_error(r, *words):
    assert r.code != 0
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xoverlay: error: "), r.err
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"


CASES = [
    ("overlapping subnet", ["network", "create", "x", "--subnet", "10.10.128.0/17"], ["overlaps network demo"]),
    ("duplicate VNI", ["network", "create", "x", "--subnet", "10.50.0.0/16", "--vni", "4096"], ["VNI 4096", "demo"]),
    ("VNI too large", ["network", "create", "x", "--subnet", "10.50.0.0/16", "--vni", "16777216"], ["out of range"]),
    ("VNI zero", ["network", "create", "x", "--subnet", "10.50.0.0/16", "--vni", "0"], ["out of range"]),
    ("duplicate network", ["network", "create", "demo", "--subnet", "10.50.0.0/16"], ["already exists"]),
    ("bad subnet", ["network", "create", "x", "--subnet", "10.50.0.1/16"], ["not an IPv4 network"]),
    ("IP outside the network", ["endpoint", "add", "x", "--network", "demo", "--ip", "10.99.0.1", "--node", "{n1}"],
     ["10.99.0.1", "not a usable address"]),
    ("IP taken", ["endpoint", "add", "x", "--network", "demo", "--ip", "{ip_n1a}", "--node", "{n1}"],
     ["already used by endpoint {n1}-a"]),
    ("unknown network", ["endpoint", "add", "x", "--network", "nope", "--node", "{n1}"], ["network nope does not exist"]),
    ("unknown node", ["endpoint", "add", "x", "--network", "demo", "--node", "nope"], ["node nope does not exist"]),
    ("unknown endpoint", ["endpoint", "rm", "nope"], ["endpoint nope does not exist"]),
    ("duplicate endpoint", ["endpoint", "add", "{n1}-a", "--network", "demo", "--node", "{n1}", "--netns", "{n1}-b"],
     ["already exists"]),
    ("netns path missing", ["endpoint", "add", "x", "--network", "demo", "--node", "{n1}", "--netns",
                            "/proc/999999999/ns/net"], ["does not exist"]),
    ("netns name missing", ["endpoint", "add", "x", "--network", "demo", "--node", "{n1}", "--netns", "no-such-ns"],
     ["netns no-such-ns does not exist"]),
    ("network in use", ["network", "rm", "demo"], ["still has endpoints"]),
    ("unknown network rm", ["network", "rm", "nope"], ["network nope does not exist"]),
    ("--internal on a network that exists", ["network", "create", "demo", "--subnet", "10.10.0.0/16", "--internal"],
     ["network demo already exists"]),
    ("unknown network inspect", ["network", "inspect", "nope"], ["network nope does not exist"]),
    ("bad endpoint name", ["endpoint", "add", "-bad", "--network", "demo", "--node", "{n1}"], []),
    ("unknown node down", ["down", "--node", "nope"], ["node nope does not exist"]),
]


SVC = ["service", "create", "x", "--network", "demo"]
SERVICE_CASES = [
    ("service: unknown network", ["service", "create", "x", "--network", "nope", "--port", "80"],
     ["network nope does not exist"]),
    ("service: unknown backend", [*SVC, "--port", "80", "--backend", "ghost"],
     ["backend ghost: endpoint ghost does not exist"]),
    ("service: backend in another network", [*SVC, "--port", "80", "--backend", "{n1}-o"],
     ["endpoint {n1}-o is in network badother"]),
    ("service: VIP outside the subnet", [*SVC, "--port", "80", "--vip", "10.99.0.1"],
     ["VIP 10.99.0.1 is not a usable address of network demo"]),
    ("service: VIP taken by an endpoint", [*SVC, "--port", "80", "--vip", "{ip_n1a}"],
     ["VIP {ip_n1a} is already used by endpoint {n1}-a"]),
    ("service: VIP taken by a service", [*SVC, "--port", "80", "--vip", "{vip}"],
     ["VIP {vip} is already used by service badsvc"]),
    ("service: duplicate service", ["service", "create", "badsvc", "--network", "demo", "--port", "80"],
     ["service badsvc already exists"]),
    ("service: duplicate port", [*SVC, "--port", "80/tcp", "--port", "80"], ["port 80/tcp is given twice"]),
    ("service: publish port collision", [*SVC, "--port", "80", "--publish", "18080:80"],
     ["published port 18080/tcp is already used by service badsvc"]),
    ("service: invalid port", [*SVC, "--port", "65536/tcp"], ["must be 1..65535"]),
    ("service: invalid protocol", [*SVC, "--port", "80/icmp"], ["protocol must be tcp or udp"]),
    ("service: target port with two ports", [*SVC, "--port", "80", "--port", "81", "--backend", "{n1}-a:8080"],
     ["a target port needs a service with one port"]),
    ("service: update unknown service", ["service", "update", "nope", "--add-backend", "{n1}-a"],
     ["service nope does not exist"]),
    ("service: remove a backend it does not have", ["service", "update", "badsvc", "--rm-backend", "{n1}-b"],
     ["{n1}-b is not a backend of service badsvc"]),
    ("service: add a backend twice", ["service", "update", "badsvc", "--add-backend", "{n1}-a"],
     ["{n1}-a is already a backend of service badsvc"]),
    ("service: rm unknown", ["service", "rm", "nope"], ["service nope does not exist"]),
    ("service: inspect unknown", ["service", "inspect", "nope"], ["service nope does not exist"]),
    ("endpoint: fixed IP is a VIP", ["endpoint", "add", "x", "--network", "demo", "--ip", "{vip}", "--node", "{n1}"],
     ["{vip} is the virtual IP of service badsvc"]),
    ("network with a service", ["network", "rm", "badother"], ["still has"]),
]


@pytest.fixture(scope="module")
def service_setup(lab):
    """A service (badsvc) to collide with, and an endpoint of another network; removed
    afterwards (the lab is shared with other test modules)."""
    n1 = lab.nodes()[0]
    lab.xo("network", "create", "badother", "--subnet", "10.77.0.0/16")
    try:
        lab.xo("endpoint", "add", f"{n1}-o", "--network", "badother", "--node", n1)
        lab.xo("service", "create", "badsvc", "--network", "demo", "--port", "80", "--backend", f"{n1}-a",
               "--publish", "18080:80")
        lab.xo("service", "create", "othersvc", "--network", "badother", "--port", "80")
        yield json.loads(lab.xo("service", "inspect", "badsvc", "--json").out)["vip"]
    finally:
        lab.xo("service", "rm", "badsvc", check=False)
        lab.xo("service", "rm", "othersvc", check=False)
        lab.xo("endpoint", "rm", f"{n1}-o", check=False)
        lab.xo("network", "rm", "badother", check=False)


@pytest.mark.parametrize("case", SERVICE_CASES, ids=[c[0] for c in SERVICE_CASES])
def test_bad_service_input_changes_nothing(lab, service_setup, case):
    test_bad_input_changes_nothing(lab, case, vip=service_setup)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_changes_nothing(lab, case, vip=None):
    _, args, words = case
    n1 = lab.nodes()[0]
    fill = {"n1": n1, "ip_n1a": lab.ep(f"{n1}-a")["ip"], "vip": vip}
    args = [a.format(**fill) for a in args]
    words = [w.format(**fill) for w in words]
    before = snapshot(lab)
    r = lab.xo(*args, check=False)
    if case[0] == "bad endpoint name":   # click sees an option: its own usage error
        assert r.code != 0 and "Error" in r.err
    else:
        one_line_error(r, *words)
    assert snapshot(lab) == before


def test_second_agent_for_a_node_is_refused(lab):
    n1 = lab.nodes()[0]
    before = snapshot(lab)
    r = subprocess.run(["nsenter", f"--net=/run/netns/xo-{n1}", "--", PY, "-m", "xoverlay", "--state", lab.state,
                        "up", "--node", n1, "--underlay", "eth1"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        r.stderr.strip().splitlines()[0]] and "already running" in r.stderr
    assert snapshot(lab) == before


def test_missing_underlay_device(lab, tmp_path):
    before = snapshot(lab)
    r = lab.xo("up", "--node", "lonely", "--underlay", "nosuchdev0", check=False)
    one_line_error(r, "underlay device nosuchdev0 does not exist")
    assert snapshot(lab) == before
    assert not os.path.exists("/run/xoverlay/lonely.pid")


def test_without_bpffs(lab, tmp_path):
    """In a mount namespace of its own, bpffs unmounted: `up` refuses before doing anything."""
    n1 = lab.nodes()[0]
    before = snapshot(lab)
    script = (f"umount /sys/fs/bpf && nsenter --net=/run/netns/xo-{n1} -- {PY} -m xoverlay --state {lab.state} "
              f"up --node nobpffs --underlay eth1")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["xoverlay: error: bpffs is not mounted at /sys/fs/bpf: run "
                                             "`mount -t bpf bpf /sys/fs/bpf` (setup.sh does it)"]
    assert snapshot(lab) == before


def test_without_root(tmp_path):
    state = tmp_path / "state.db"
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PY, "-m", "xoverlay",
                        "--state", str(state), "network", "ls"], capture_output=True, text=True, timeout=30,
                       cwd="/")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["xoverlay: error: xoverlay must run as root (it loads BPF programs "
                                             "and changes network namespaces)"]
    assert not state.exists()


def test_corrupt_store_is_a_clear_error(tmp_path):
    state = tmp_path / "state.db"
    state.write_bytes(b"this is not a database" * 100)
    r = run_xo(str(state), "network", "ls", check=False)
    assert r.code != 0
    assert r.err.strip().startswith("xoverlay: error: state store") and len(r.err.strip().splitlines()) == 1


def test_bad_dns_upstream(lab):
    before = snapshot(lab)
    r = lab.xo("up", "--node", "dnsbad", "--underlay", "eth1", "--dns-upstream", "dns.example", check=False)
    one_line_error(r, "DNS upstream 'dns.example' is not an IP address")
    assert snapshot(lab) == before


def test_dns_port_taken_refuses_before_changing_anything(lab):
    """Something already listens on 169.254.1.1:53 in the node's netns: `up` says so and
    leaves the store, the pins and the node's addresses and rules as they were."""
    prefix = lab.nodes()[0][:-len("node1")]
    ns = f"xo-{prefix}dnsbusy"
    switch = lab.lab().underlay_netns       # on the lab's underlay, as a node: it reaches the store (etcd)
    blocker = None
    try:
        # No IPv6, as on the lab's nodes: a link-local address finishing DAD between the two
        # looks at the node would read as a change `up` made.
        for cmd in (["netns", "add", ns],
                    ["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                     "net.ipv6.conf.default.disable_ipv6=1"],
                    ["-n", ns, "link", "add", "eth1", "type", "veth", "peer", "name", "pdnsbusy",
                                           "netns", switch],
                    ["-n", switch, "link", "set", "pdnsbusy", "master", "br0", "up"],
                    ["-n", ns, "addr", "add", "192.0.2.240/24", "dev", "eth1"], ["-n", ns, "link", "set", "eth1", "up"],
                    ["-n", ns, "link", "set", "lo", "up"]):
            subprocess.run(["ip", *cmd], check=True, capture_output=True)
        blocker = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns}", "--", PY, "-c",
             "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
             "s.setsockopt(socket.SOL_IP, 15, 1); s.bind(('169.254.1.1', 53)); print('bound', flush=True); "
             "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        assert blocker.stdout.readline().strip() == "bound"
        before = snapshot(lab)
        node_before = [subprocess.run(["ip", "-n", ns, *what], capture_output=True, text=True).stdout
                       for what in (["addr"], ["rule"])]
        r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", PY, "-m", "xoverlay", "--state", lab.state,
                            "up", "--node", "dnsbusy", "--underlay", "eth1"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0
        assert r.stderr.strip().splitlines() == [
            "xoverlay: error: DNS responder: cannot listen on 169.254.1.1:53: Address already in use "
            "(another DNS server on this node? `up --no-dns` runs without ours)"]
        assert snapshot(lab) == before
        assert not os.path.exists("/sys/fs/bpf/xoverlay/dnsbusy")
        assert [subprocess.run(["ip", "-n", ns, *what], capture_output=True, text=True).stdout
                for what in (["addr"], ["rule"])] == node_before
    finally:
        if blocker:
            blocker.kill()
            blocker.wait()
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
