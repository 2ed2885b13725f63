"""Docker's own containers on xoverlay: a 2-node namespace lab with a real dockerd
(Debian's 20.10) in each node, xoverlay as its network and IPAM plugin, and no xoverlay
command typed after `docker network create`."""
from __future__ import annotations

import json
import subprocess
import time

import pytest
from conftest import LabHandle, in_netns, leftovers, run_xo

pytestmark = pytest.mark.lab     # setup.sh installs docker.io: a missing dockerd fails `lab up --docker`

NET, SUBNET = "appnet", "10.30.0.0/16"
BACK, BACK_SUBNET = "backnet", "10.31.0.0/16"
IMAGE = "xoverlay/busybox:lab"


@pytest.fixture(scope="module")
def dlab(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("docker-lab") / "state.db")
    handle = LabHandle(state)
    try:
        handle.xo("lab", "up", "--nodes", "2", "--docker", timeout=240)
        yield handle
    finally:
        prefix = handle.lab().prefix
        run_xo(state, "lab", "down", check=False, timeout=240)
    assert not leftovers(prefix)
    assert not subprocess.run(["pgrep", "-f", f"xoverlay/docker/{prefix}node"], capture_output=True).stdout


def docker(lab, node, *args, check=True, timeout=60):
    r = run_xo(lab.state, "lab", "docker", node, "--", *args, check=False, timeout=timeout)
    if check:
        assert r.code == 0, f"docker {' '.join(args)} on {node}: {r.err or r.out}"
    return r


def docker_eps(lab):
    return {n: e for n, e in lab.endpoints().items() if n.startswith("docker-")}


def http_get(lab, node, container, host, path="/hostname"):
    """busybox's wget crashes (static 1.35): HTTP by hand over nc."""
    r = docker(lab, node, "exec", container, "sh", "-c",
               f'printf "GET {path} HTTP/1.0\\r\\n\\r\\n" | nc -w 3 {host} 80', check=False)
    return r.out


def wait_for(what, check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.fixture(scope="module")
def running(dlab):
    """appnet on both nodes' Docker, web1 (an HTTP server) on node1 and c2 on node2."""
    n1, n2 = dlab.nodes()
    for node in (n1, n2):
        docker(dlab, node, "network", "create", "-d", "xoverlay", "--ipam-driver", "xoverlay", "--subnet", SUBNET, NET)
    docker(dlab, n1, "run", "-d", "--name", "web1", "--network", NET, IMAGE, "httpd", "-f", "-p", "80", "-h", "/etc")
    docker(dlab, n2, "run", "-d", "--name", "c2", "--network", NET, IMAGE, "sleep", "3600")
    return n1, n2


def test_one_network_on_both_daemons_is_one_xoverlay_network(dlab, running):
    nets = {n["name"]: n for n in json.loads(dlab.xo("network", "ls", "--json").out)}
    assert nets[NET]["subnet"] == SUBNET
    eps = docker_eps(dlab)
    assert sorted(e["node"] for e in eps.values()) == sorted(running)
    assert all(e["state"] == "ready" and e["network"] == NET for e in eps.values()), eps


def test_containers_reach_each_other_by_address_and_by_name_across_nodes(dlab, running):
    n1, n2 = running
    web1 = next(e for e in docker_eps(dlab).values() if e["node"] == n1)
    assert docker(dlab, n2, "exec", "c2", "ping", "-c", "2", "-W", "2", web1["ip"], check=False).code == 0
    # The name of a container on the other node: Docker's DNS forwards it to our responder.
    wait_for("web1's name in the store", lambda: "web1" in next(
        e for e in docker_eps(dlab).values() if e["node"] == n1).get("aliases", []))
    r = docker(dlab, n2, "exec", "c2", "ping", "-c", "1", "-W", "2", "web1", check=False)
    assert r.code == 0 and web1["ip"] in r.out, r.out + r.err
    inspect = json.loads(docker(dlab, n1, "inspect", "web1").out)[0]
    assert inspect["NetworkSettings"]["Networks"][NET]["IPAddress"] == web1["ip"]
    assert "200 OK" in http_get(dlab, n2, "c2", "web1")


def test_a_service_vip_from_a_container(dlab, running):
    n1, n2 = running
    web1 = next(n for n, e in docker_eps(dlab).items() if e["node"] == n1)
    dlab.xo("service", "create", "appweb", "--network", NET, "--port", "80/tcp", "--backend", web1)
    try:
        out = http_get(dlab, n2, "c2", "appweb")
        hostname = docker(dlab, n1, "exec", "web1", "hostname").out.strip()
        assert "200 OK" in out and hostname in out, out
    finally:
        dlab.xo("service", "rm", "appweb")


def test_a_second_network_is_eth1_and_stays_apart(dlab, running):
    n1, n2 = running
    docker(dlab, n1, "network", "create", "-d", "xoverlay", "--ipam-driver", "xoverlay", "--subnet", BACK_SUBNET, BACK)
    docker(dlab, n1, "network", "connect", BACK, "web1")
    addrs = docker(dlab, n1, "exec", "web1", "ip", "-4", "-o", "addr").out
    assert " eth0 " in addrs and " eth1 " in addrs and "10.31." in addrs, addrs
    # A container only on backnet reaches web1's backnet address, not appnet's.
    web1_app = next(e for e in docker_eps(dlab).values() if e["node"] == n1 and e["network"] == NET)["ip"]
    web1_back = next(e for e in docker_eps(dlab).values() if e["node"] == n1 and e["network"] == BACK)["ip"]
    r = docker(dlab, n1, "run", "--rm", "--network", BACK, IMAGE, "sh", "-c",
               f"ping -c1 -W2 {web1_back} && ! ping -c1 -W1 {web1_app}", check=False)
    assert r.code == 0, r.out + r.err
    assert dlab.drops(n1).get("OTHER_NETWORK", 0) >= 1
    docker(dlab, n1, "network", "disconnect", BACK, "web1")
    assert not [e for e in docker_eps(dlab).values() if e["network"] == BACK]


def test_bad_input_is_one_clear_line(dlab, running):
    n1, _ = running
    cases = [
        (["--ipam-driver", "xoverlay", "--subnet", "10.30.128.0/17"], "overlaps xoverlay network appnet"),
        (["--subnet", "10.40.0.0/16"], "--ipam-driver xoverlay"),
        (["--ipam-driver", "xoverlay"], "give the network a --subnet"),
        (["--ipam-driver", "xoverlay", "--subnet", "10.41.0.0/16", "-o", "colour=blue"], "-o colour: unknown option"),
        (["--ipam-driver", "xoverlay", "--subnet", "10.42.0.0/16", "-o", "encrypted"], "no encrypted networks yet"),
    ]
    before = {n["name"] for n in json.loads(dlab.xo("network", "ls", "--json").out)}
    for i, (args, why) in enumerate(cases):
        r = docker(dlab, n1, "network", "create", "-d", "xoverlay", *args, f"bad{i}", check=False)
        assert r.code != 0 and why in r.err and len(r.err.strip().splitlines()) == 1, (args, r.err)
    time.sleep(1.5)      # what the names' sync would have taken in
    assert {n["name"] for n in json.loads(dlab.xo("network", "ls", "--json").out)} == before
    assert "bad" not in docker(dlab, n1, "network", "ls").out
    r = docker(dlab, n1, "run", "--rm", "--network", NET, "-p", "8081:80", IMAGE, "true", check=False)
    assert r.code != 0 and "xoverlay service create --publish" in r.err, r.err


def test_docker_rm_leaves_nothing_behind(dlab, running):
    from xoverlay.kernel.veth import host_ifname
    n1, _ = running
    before = set(docker_eps(dlab))
    docker(dlab, n1, "run", "-d", "--name", "brief", "--network", NET, IMAGE, "sleep", "600")
    (brief,) = set(docker_eps(dlab)) - before
    ip = dlab.ep(brief)["ip"]
    veth = host_ifname(brief)
    assert in_netns(dlab.node_netns(n1), "ip", "link", "show", veth, check=False).returncode == 0
    docker(dlab, n1, "rm", "-f", "brief")
    assert brief not in dlab.endpoints(), "gone when docker rm returns"
    assert in_netns(dlab.node_netns(n1), "ip", "link", "show", veth, check=False).returncode != 0
    assert ip not in {e["ip"] for e in dlab.endpoints().values()}
    dlab.wait_converged()
    assert not dlab.drift(n1)
    # Its address is free at once: the next container may have it.
    docker(dlab, n1, "run", "-d", "--name", "next", "--network", NET, IMAGE, "sleep", "600")
    assert ip in {e["ip"] for e in docker_eps(dlab).values()}
    docker(dlab, n1, "rm", "-f", "next")


def test_containers_keep_their_connectivity_across_a_dockerd_restart(dlab, running):
    from xoverlay.lab.docker_lab import NodeDocker
    n1, n2 = running
    web1 = next(e for e in docker_eps(dlab).values() if e["node"] == n1 and e["network"] == NET)["ip"]
    pid = json.loads(docker(dlab, n2, "inspect", "c2").out)[0]["State"]["Pid"]
    d = NodeDocker(dlab.lab(), n2)
    subprocess.run(["kill", str(d.pid())], check=True)
    wait_for("dockerd to exit", lambda: d.pid() is None, timeout=20)

    def c2_reaches_web1():
        return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "ping", "-c", "2", "-W", "2", web1],
                              capture_output=True, text=True).returncode == 0
    assert c2_reaches_web1(), "while its dockerd is down"
    d.start()
    assert c2_reaches_web1(), "after its dockerd is back"
    # The plugin keeps no table: the restarted daemon's Leave finds the endpoint.
    docker(dlab, n2, "rm", "-f", "c2")
    assert not [e for e in docker_eps(dlab).values() if e["node"] == n2]
