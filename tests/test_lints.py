"""Lints: every decision is a pure function of facts, tested here one by one; then on
the lab, a node with its XDP detached, a socket on its VXLAN port, a lowered underlay
MTU and a stale monitor flag shows all four in `status --json` and `--once`, and none
once they are undone; and status without bpffs says so."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from conftest import PY, in_netns

from xoverlay.kernel import monitor_flag
from xoverlay.ui import lints


def ids(found):
    return [x["id"] for x in found]


def test_bpffs():
    assert lints.lint_bpffs(True) == []
    [x] = lints.lint_bpffs(False)
    assert (x["id"], x["severity"], x["fix"]) == ("bpffs-not-mounted", "error", "mount -t bpf bpf /sys/fs/bpf")


@pytest.mark.parametrize("mode, attached, ours, want", [
    ("native", 7, 7, []),
    ("off", 0, 7, ["xdp-off"]),
    ("generic", 7, 7, ["xdp-generic"]),
    ("native", 9, 7, ["xdp-foreign"]),
    ("generic", 9, 7, ["xdp-foreign", "xdp-generic"]),
    ("native", 9, None, []),              # our program not pinned: nothing to compare with
])
def test_xdp(mode, attached, ours, want):
    assert ids(lints.lint_xdp("eth1", mode, attached, ours)) == want


@pytest.mark.parametrize("driver, want", [("veth", ["xdp-costs-offloads"]), ("virtio_net", ["xdp-costs-offloads"]),
                                          ("ixgbe", []), (None, [])])
def test_xdp_attached_where_it_costs_offloads_is_a_warning(driver, want):
    found = lints.lint_xdp("eth1", "native", 7, 7, driver)
    assert ids(found) == want and all(x["severity"] == "warning" for x in found)
    assert ids(lints.lint_xdp("eth1", "off", 0, 7, driver)) == ["xdp-off"]


def test_xdp_severities():
    assert lints.lint_xdp("eth1", "off", 0, 1)[0]["severity"] == "info"
    assert lints.lint_xdp("eth1", "generic", 1, 1)[0]["severity"] == "warning"


def test_vmxnet3_offloads():
    on = {"tx-checksum-ip-generic": True, "tx-udp_tnl-segmentation": True, "tx-udp_tnl-csum-segmentation": False,
          "tx-tcp-segmentation": True}
    [x] = lints.lint_offloads("ens192", "vmxnet3", on)
    assert x["id"] == "offload-vmxnet3-vxlan" and x["severity"] == "warning"
    assert x["fix"] == "ethtool -K ens192 tx-checksum-ip-generic off tx-udp_tnl-segmentation off"
    assert lints.lint_offloads("ens192", "vmxnet3", dict.fromkeys(on, False)) == []
    assert lints.lint_offloads("eth1", "veth", on) == [], "other drivers do these right"
    assert lints.lint_offloads("eth1", None, {}) == []


def test_mtu_headroom():
    assert lints.lint_mtu("eth1", 1500, 1500, {"a": 1450, "b": 1400}) == []
    [x] = lints.lint_mtu("eth1", 1480, 1500, {"a": 1450, "b": 1400})
    assert x["id"] == "mtu-headroom" and x["severity"] == "error"
    assert "a (1450)" in x["message"] and "b (" not in x["message"]
    assert "at most 1430" in x["fix"] and "raise the underlay MTU to 1500" in x["fix"]
    [x] = lints.lint_mtu("eth1", 9000, 1480, {"a": 1450})     # a peer's smaller underlay counts too
    assert "smallest peer underlay 1480" in x["message"]
    assert lints.lint_mtu("eth1", 1500, None, {}) == []


PROC_UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  412: 00000000:12B5 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 81234 2 0000000000000000 0
  413: 0B0200C0:12B5 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 0 2 0000000000000000 0
  414: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 555 2 0000000000000000 0
"""


def test_proc_net_udp_is_parsed():
    assert lints.parse_proc_udp(PROC_UDP) == [{"ip": "0.0.0.0", "port": 4789, "inode": 81234},
                                              {"ip": "192.0.2.11", "port": 4789, "inode": 0},
                                              {"ip": "127.0.0.1", "port": 53, "inode": 555}]


def test_vxlan_port():
    socks = lints.parse_proc_udp(PROC_UDP)
    assert lints.lint_vxlan_port(4790, "192.0.2.11", socks) == []
    assert lints.lint_vxlan_port(53, "192.0.2.11", socks) == [], "127.0.0.1 is not where VXLAN arrives"
    [x] = lints.lint_vxlan_port(4789, "192.0.2.11", [dict(s, owner="pid 7 (dockerd)" if s["inode"] else None)
                                                      for s in socks])
    assert x["id"] == "vxlan-port-in-use" and x["severity"] == "error"
    assert "pid 7 (dockerd)" in x["message"] and "a kernel socket (a vxlan device" in x["message"]
    [x] = lints.lint_vxlan_port(4789, "192.0.2.12", socks[1:2] + socks[:1])
    assert "a kernel socket" not in x["message"], "only sockets on our address or on all addresses"
    # xo-gro's own socket (0.0.0.0, no process holds it) is not a clash; another one still is.
    ours = {"ip": "0.0.0.0", "port": 4789, "inode": 9001}
    assert lints.lint_vxlan_port(4789, "192.0.2.11", [ours], tunnel_device=True) == []
    assert lints.lint_vxlan_port(4789, "192.0.2.11", [ours], tunnel_device=False) != []
    [x] = lints.lint_vxlan_port(4789, "192.0.2.11", [ours, dict(socks[0], owner="pid 7 (dockerd)")],
                                tunnel_device=True)
    assert "pid 7 (dockerd)" in x["message"] and "inode 9001" not in x["message"]


def test_underlay_not_forwarding():
    assert lints.lint_forwarding("eth1", True) == []
    assert lints.lint_forwarding("eth1", None) == []           # could not read it: say nothing
    [x] = lints.lint_forwarding("eth1", False)
    assert (x["id"], x["severity"], x["subject"]) == ("underlay-not-forwarding", "warning", "eth1")
    assert "net.ipv4.conf.eth1.forwarding=1" in x["fix"]


def test_egress_off():
    assert lints.lint_egress("n1", True, True) == [] and lints.lint_egress("n1", None, False) == []
    [x] = lints.lint_egress("n1", False, False)
    assert (x["id"], x["severity"], x["subject"]) == ("egress-off", "warning", "n1")
    assert "nft (nftables) is not installed" in x["message"] and "NO_ROUTE" in x["message"]
    assert "apt-get install nftables" in x["fix"]
    [x] = lints.lint_egress("n1", False, True)
    assert "could not set its nftables table up" in x["message"] and "/run/xoverlay/n1.log" in x["fix"]


def test_monitor_flag():
    assert lints.lint_monitor("off", 0) == [] and lints.lint_monitor("running", 5) == []
    [x] = lints.lint_monitor("stale", 5)
    assert x["id"] == "monitor-flag-stale" and "monitor flag stale: pid 5" in x["message"]


def test_evaluate_orders_by_severity_and_skips_what_it_cannot_see():
    facts = {"node": "n1", "bpffs": True, "pinned": True, "node_ip": "192.0.2.11", "vxlan_port": 4789,
             "monitor": {"state": "stale", "pid": 5}, "our_xdp_id": 7, "smallest_peer_mtu": 1500,
             "endpoint_mtus": {"a": 1450},
             "underlay": {"name": "eth1", "mtu": 1480, "xdp_mode": "off", "xdp_id": 0, "driver": "veth",
                          "features": {}, "forwarding": False},
             "udp_sockets": lints.parse_proc_udp(PROC_UDP)}
    assert ids(lints.evaluate(facts)) == ["mtu-headroom", "vxlan-port-in-use", "underlay-not-forwarding",
                                          "monitor-flag-stale", "xdp-off"]
    blind = {k: v for k, v in facts.items() if k not in ("underlay", "udp_sockets")}
    assert ids(lints.evaluate(blind)) == ["monitor-flag-stale", "underlay-not-found"]
    assert ids(lints.evaluate({"node": "n1", "bpffs": False, "pinned": False})) == ["bpffs-not-mounted"]


# --- on the lab ---------------------------------------------------------------------------

HOLD_PORT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 4789)); print("bound", flush=True)
time.sleep(120)
"""


@pytest.mark.lab
def test_lints_on_a_misconfigured_lab_node(lab):
    from xoverlay.kernel.datapath import detach_xdp, open_maps
    from xoverlay.kernel.netns import entered
    from xoverlay.kernel.processes import stop_agent
    from xoverlay.maps.layout import U32, Monitor
    n3 = lab.nodes()[2]
    node_ns = f"/run/netns/xo-{n3}"

    def status_lints():
        return {x["id"]: x for x in json.loads(lab.xo("status", "--node", n3, "--json").out)["lints"]}
    # The lab attaches XDP to its veths (to run the program end to end): what that costs
    # TCP is said; nothing else is wrong.
    assert sorted(status_lints()) == ["xdp-costs-offloads"]
    stop_agent(n3)                       # it would clear the stale flag at once
    in_netns(node_ns, "ip", "link", "del", "xo-gro")     # its socket holds 4789: another user cannot bind it
    holder = subprocess.Popen(["nsenter", f"--net={node_ns}", "--", PY, "-c", HOLD_PORT], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "bound"
        with entered(node_ns):
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                eth1 = ipr.link_lookup(ifname="eth1")[0]
            detach_xdp(eth1)
        in_netns(node_ns, "ip", "link", "set", "eth1", "mtu", "1480")
        in_netns(node_ns, "sysctl", "-qw", "net.ipv4.conf.eth1.forwarding=0")
        dead = subprocess.Popen(["true"])
        dead.wait()
        flag = open_maps(n3)["xo_monitor"]
        flag.set(U32(0), Monitor(events=1, pid=dead.pid, pid_start=1))

        found = status_lints()
        assert sorted(found) == ["monitor-flag-stale", "mtu-headroom", "underlay-not-forwarding",
                                 "vxlan-port-in-use", "xdp-off"]
        assert found["vxlan-port-in-use"]["message"].count(f"pid {holder.pid} (python") == 1
        assert f"{n3}-a (1450)" in found["mtu-headroom"]["message"]
        assert found["xdp-off"]["subject"] == "eth1"
        once = lab.xo("status", "--node", n3, "--once").out
        assert "lints" in once and "vxlan-port-in-use" in once and "monitor: flag stale" in once
    finally:
        holder.kill()
        holder.wait()
        in_netns(node_ns, "ip", "link", "set", "eth1", "mtu", "1500")
        in_netns(node_ns, "sysctl", "-qw", "net.ipv4.conf.eth1.forwarding=1")
        lab.xo("lab", "up", "--nodes", "3", timeout=120)    # the agent: XDP back, stale flag cleared
    deadline = time.monotonic() + 5
    while sorted(status_lints()) != ["xdp-costs-offloads"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(status_lints()) == ["xdp-costs-offloads"]       # as before it was broken
    assert monitor_flag.read_flag(n3) == Monitor()


@pytest.mark.lab
def test_status_without_bpffs_says_so(lab):
    n1 = lab.nodes()[0]
    script = f"umount /sys/fs/bpf && {PY} -m xoverlay --state {lab.state} status --node {n1} --json"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    assert r.returncode == 0, r.stderr
    snap = json.loads(r.stdout)
    assert [x["id"] for x in snap["lints"]] == ["bpffs-not-mounted"]
    assert not snap["node"]["pinned"]
