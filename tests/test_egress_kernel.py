"""The agent's egress state in a netns of the test's own (xoverlay/kernel/gateway.py
ensure_egress): made, repaired after each kind of drift, said to be impossible without
nft, and removed with the gateway (what `xoverlay down` calls)."""
from __future__ import annotations

import os
import subprocess

import pytest
from conftest import inside_netns_with_veth

from xoverlay.kernel import gateway, netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, nftables)")

SUBNETS = ["10.10.0.0/16", "10.20.0.0/16"]


def here(*cmd: str) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=True).stdout


def egress_rules() -> set[str]:
    return {line.split(":", 1)[1].strip() for line in here("ip", "rule").splitlines()
            if line.startswith(f"{gateway.EGRESS_RULE_PRIORITY}:")}


def forwarding() -> str:
    with open(f"/proc/sys/net/ipv4/conf/{gateway.GATEWAY_DEV}/forwarding") as f:
        return f.read().strip()


@pytest.fixture
def node():
    """A throwaway netns with the gateway made, this thread inside it; an IPRoute there."""
    with inside_netns_with_veth(f"xo-egress-test-{os.getpid()}"):
        with netns.iproute() as ipr:
            gateway.ensure_gateway(ipr)
            yield ipr


def test_made_then_left_alone(node):
    problem, changes = gateway.ensure_egress(node, SUBNETS)
    assert problem is None
    assert f"set net.ipv4.conf.{gateway.GATEWAY_DEV}.forwarding=1" in changes
    assert any("nftables table ip xoverlay" in c for c in changes)
    assert here("nft", "list", "table", "ip", "xoverlay") == gateway.EGRESS_RULESET
    assert egress_rules() == {f"from all to {s} lookup {gateway.RETURN_TABLE}" for s in SUBNETS}
    assert forwarding() == "1"
    assert gateway.ensure_egress(node, SUBNETS) == (None, [])      # nothing to do: nothing done


def test_published_ports_are_never_given_to_a_masqueraded_connection(node):
    """With ports published (tcp 8080, 30000; udp 53), the table maps each gap of the
    port space onto itself and a published source port into the largest gap: nft prints
    it exactly as the agent compares it, so an unchanged state changes nothing."""
    from xoverlay.core import desired, model
    s = model.State()
    s = model.create_network(s, "n", "10.10.0.0/16")
    s = model.create_service(s, "a", "n", ["80/tcp", "53/udp"], publish=["8080:80", "30000:80", "53:53"])
    ranges = desired.masquerade_ranges(s)
    assert ranges == {"tcp": [(1, 8079), (8081, 29999), (30001, 65535)], "udp": [(1, 52), (54, 65535)]}
    assert gateway.ensure_egress(node, SUBNETS, ranges)[0] is None
    listed = here("nft", "list", "table", "ip", "xoverlay")
    assert listed == gateway.egress_ruleset(ranges)
    assert 'iifname "xo-gw" meta l4proto tcp masquerade to :30001-65535' in listed
    assert gateway.ensure_egress(node, SUBNETS, ranges) == (None, [])
    assert gateway.ensure_egress(node, SUBNETS)[1] == [           # the service gone: plain masquerade again
        f"repaired nftables table ip xoverlay (masquerade what enters {gateway.GATEWAY_DEV})"]


def test_every_drift_is_repaired(node):
    gateway.ensure_egress(node, SUBNETS)
    here("nft", "add", "rule", "ip", "xoverlay", "egress", "accept")          # a rule slipped in
    here("sysctl", "-qw", f"net.ipv4.conf.{gateway.GATEWAY_DEV}.forwarding=0")
    here("ip", "rule", "del", "to", SUBNETS[0], "lookup", str(gateway.RETURN_TABLE))
    here("ip", "rule", "add", "to", "10.99.0.0/16", "lookup", str(gateway.RETURN_TABLE),
         "priority", str(gateway.EGRESS_RULE_PRIORITY))                          # a network gone
    problem, changes = gateway.ensure_egress(node, SUBNETS)
    assert problem is None
    assert sorted(changes) == sorted([
        f"set net.ipv4.conf.{gateway.GATEWAY_DEV}.forwarding=1",
        f"added rule to 10.10.0.0/16 lookup {gateway.RETURN_TABLE}",
        f"deleted rule to 10.99.0.0/16 lookup {gateway.RETURN_TABLE}",
        f"repaired nftables table ip xoverlay (masquerade what enters {gateway.GATEWAY_DEV})"])
    assert here("nft", "list", "table", "ip", "xoverlay") == gateway.EGRESS_RULESET
    here("nft", "delete", "table", "ip", "xoverlay")
    assert gateway.ensure_egress(node, SUBNETS)[1] == [
        f"set nftables table ip xoverlay (masquerade what enters {gateway.GATEWAY_DEV})"]


def test_without_nft_egress_says_why(node, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))       # an empty PATH: no nft to be found
    problem, _ = gateway.ensure_egress(node, SUBNETS)
    assert problem == "nft (nftables) is not installed: nothing masquerades"


def test_removed_with_the_gateway(node):
    gateway.ensure_egress(node, SUBNETS)
    gateway.remove_gateway(node)
    assert here("nft", "list", "tables").strip() == ""
    assert egress_rules() == set()
    assert str(gateway.RETURN_TABLE) not in here("ip", "rule")
    assert not node.link_lookup(ifname=gateway.GATEWAY_DEV)


def test_the_nodes_own_published_ports_on_localhost_become_its_address(node):
    """With the node's IP and its published ports, 127.0.0.1:PORT is turned into
    NODE_IP:PORT from NODE_IP (what lo's program then takes into the routing mesh):
    here a listener on the node's IP stands for the mesh. The client still talks to
    127.0.0.1; a port not published is left alone."""
    import socket
    import threading
    node_ip = "192.0.2.11"
    here("ip", "link", "set", "lo", "up")
    here("ip", "addr", "add", f"{node_ip}/24", "dev", "v0")
    here("ip", "link", "set", "v0", "up")
    published = [(8080, "tcp"), (5353, "udp")]
    assert gateway.ensure_egress(node, SUBNETS, None, node_ip, published)[0] is None
    listed = here("nft", "list", "table", "ip", "xoverlay")
    assert listed == gateway.egress_ruleset(None, node_ip, published)
    assert f"ip daddr 127.0.0.0/8 tcp dport 8080 dnat to {node_ip}" in listed
    assert gateway.ensure_egress(node, SUBNETS, None, node_ip, published) == (None, [])

    servers = []
    for port in (8080, 8090):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((node_ip, port))
        s.listen()
        servers.append(s)
    seen = []

    def serve(s):
        c, addr = s.accept()
        seen.append(addr[0])
        c.close()
    threading.Thread(target=serve, args=(servers[0],), daemon=True).start()
    try:
        with socket.create_connection(("127.0.0.1", 8080), timeout=3) as c:
            assert c.getpeername() == ("127.0.0.1", 8080)
            c.recv(1)
        assert seen == [node_ip]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", 8090), timeout=3)
    finally:
        for s in servers:
            s.close()


def test_lo_takes_the_meshs_replies_to_the_node_and_down_sets_it_back(node):
    """The two sysctls that let a reply entering lo from BPF pass the input route (a
    source of the node's own, a loopback destination), set once, and back to 0."""
    def lo(name):
        with open(f"/proc/sys/net/ipv4/conf/lo/{name}") as f:
            return f.read().strip()
    assert [lo(n) for n in gateway.LOOPBACK_SYSCTLS] == ["0", "0"]
    assert gateway.ensure_loopback() == [
        "set net.ipv4.conf.lo.accept_local=1 (the routing mesh's replies to this node)",
        "set net.ipv4.conf.lo.route_localnet=1 (the routing mesh's replies to this node)"]
    assert [lo(n) for n in gateway.LOOPBACK_SYSCTLS] == ["1", "1"]
    assert gateway.ensure_loopback() == []
    gateway.remove_loopback()
    assert [lo(n) for n in gateway.LOOPBACK_SYSCTLS] == ["0", "0"]
