"""How tunnel packets leave a node (bpf/lib/route.h): the next hop comes from the node's
routing, policy rules included, and the main table is consulted directly only while no
rule of the operator's could route them elsewhere."""
from __future__ import annotations

import time

import pytest
from conftest import in_netns

pytestmark = pytest.mark.lab

RULE_PRIORITY = "100"
RULE_TABLE = "100"


def node_ips(lab) -> dict[str, str]:
    store = lab.store()
    try:
        state = store.read()
    finally:
        store.close()
    return {n: state.nodes[n].underlay_ip for n in lab.nodes()}


def config_flags(node: str) -> int:
    from xoverlay.kernel.pinned import PinnedMap
    from xoverlay.maps.layout import MAPS, U32, pin_dir
    with PinnedMap(pin_dir(node), MAPS["xo_config"]) as cfg:
        return cfg.get(U32(0)).flags


def wait_main_only(node: str, want: bool, timeout: float = 15) -> None:
    """Until the node's agent has read its rules again (every pass, 2 s apart)."""
    from xoverlay.maps.layout import CFG_FIB_MAIN_ONLY
    deadline = time.monotonic() + timeout
    while bool(config_flags(node) & CFG_FIB_MAIN_ONLY) != want:
        assert time.monotonic() < deadline, f"{node}: XO_CFG_FIB_MAIN_ONLY still {not want}"
        time.sleep(0.2)


def test_policy_rules_route_tunnel_packets_and_main_alone_without_them(lab):
    """A rule of the operator's that blackholes the way to node 2 stops the tunnel to it,
    as it would stop the kernel's own vxlan device: the agent sees the rule and the data
    path consults the whole policy. Without the rule it goes back to the main table."""
    n1, n2, _ = lab.nodes()
    ns, peer = lab.node_netns(n1), node_ips(lab)[n2]
    dst = lab.ep(f"{n2}-a")["ip"]
    wait_main_only(n1, True)              # a lab node has the kernel's rules and ours
    assert lab.ping(f"{n1}-a", dst)
    try:
        in_netns(ns, "ip", "route", "add", "blackhole", f"{peer}/32", "table", RULE_TABLE)
        in_netns(ns, "ip", "rule", "add", "to", f"{peer}/32", "lookup", RULE_TABLE, "pref", RULE_PRIORITY)
        wait_main_only(n1, False)
        assert not lab.ping(f"{n1}-a", dst, count=2)
        assert lab.ping(f"{n1}-a", lab.ep(f"{n1}-b")["ip"])          # local delivery is no route
    finally:
        in_netns(ns, "ip", "rule", "del", "pref", RULE_PRIORITY, check=False)
        in_netns(ns, "ip", "route", "del", "blackhole", f"{peer}/32", "table", RULE_TABLE, check=False)
    wait_main_only(n1, True)
    assert lab.ping(f"{n1}-a", dst)


def forwarded(netns: str) -> int:
    """IP datagrams the node has forwarded (Ip: ForwDatagrams)."""
    lines = in_netns(netns, "cat", "/proc/net/snmp").stdout.splitlines()
    names, values = [line.split() for line in lines if line.startswith("Ip:")][:2]
    return int(values[names.index("ForwDatagrams")])


def test_a_routed_underlay_sends_tunnel_packets_to_the_gateway(lab):
    """Node 1 reaches node 2's underlay address through a gateway (node 3, forwarding):
    the tunnel packets go to the gateway's MAC, not to a neighbour entry for node 2's
    address, and arrive. (Taking the destination for the next hop would still work on
    this one-segment underlay, so the test counts what the gateway forwards.)"""
    n1, n2, n3 = lab.nodes()
    ips = node_ips(lab)
    ns1, ns3 = lab.node_netns(n1), lab.node_netns(n3)
    dst = lab.ep(f"{n2}-a")["ip"]
    # The lab's eth1 forwards already (per device, which is what routes a packet). Not
    # net.ipv4.ip_forward: restoring it to 0 would turn off every device's forwarding,
    # the underlay's included, and with it the data path's FIB lookups on this node.
    assert in_netns(ns3, "sysctl", "-n", "net.ipv4.conf.eth1.forwarding").stdout.strip() == "1"
    sysctls = ("net.ipv4.conf.all.send_redirects", "net.ipv4.conf.eth1.send_redirects")
    saved = {k: in_netns(ns3, "sysctl", "-n", k).stdout.strip() for k in sysctls}
    try:
        for k, v in zip(sysctls, ("0", "0")):
            in_netns(ns3, "sysctl", "-qw", f"{k}={v}")
        in_netns(ns1, "ip", "route", "add", f"{ips[n2]}/32", "via", ips[n3], "dev", "eth1")
        before = forwarded(ns3)
        assert lab.ping(f"{n1}-a", dst, count=5)
        assert forwarded(ns3) - before >= 5, "the tunnel packets did not go through the gateway"
    finally:
        in_netns(ns1, "ip", "route", "del", f"{ips[n2]}/32", check=False)
        for k, v in saved.items():
            in_netns(ns3, "sysctl", "-qw", f"{k}={v}", check=False)
    before = forwarded(ns3)
    assert lab.ping(f"{n1}-a", dst, count=3)
    assert forwarded(ns3) == before
    assert in_netns(ns3, "sysctl", "-n", "net.ipv4.conf.eth1.forwarding").stdout.strip() == "1"
