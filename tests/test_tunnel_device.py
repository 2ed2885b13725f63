"""xo-gro, the node's idle tunnel device (xoverlay/kernel/gateway.py), on the real kernel in
a netns of the test's own: made once and then left alone, made anew for another port,
refused with nothing left behind when another socket holds the port, and removed."""
from __future__ import annotations

import os
import subprocess

import pytest
from conftest import inside_netns_with_veth

from xoverlay.kernel import gateway, netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns)")


def udp_ports() -> list[int]:
    with open("/proc/thread-self/net/udp") as f:
        return [int(line.split()[1].split(":")[1], 16) for line in f.read().splitlines()[1:]]


def details() -> str:
    return subprocess.run(["ip", "-d", "link", "show", gateway.TUNNEL_DEV], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture
def ipr():
    with inside_netns_with_veth(f"xo-gro-test-{os.getpid()}"):
        with netns.iproute() as ipr:
            yield ipr


def test_made_up_with_a_socket_then_left_alone(ipr):
    index, changes = gateway.ensure_tunnel_device(ipr, 4789)
    assert changes == [f"created {gateway.TUNNEL_DEV} (a tunnel socket on UDP 4789, for GRO)"]
    assert "vxlan external" in details() and "dstport 4789" in details() and ",UP," in details()
    assert 4789 in udp_ports()
    with open(f"/proc/sys/net/ipv6/conf/{gateway.TUNNEL_DEV}/disable_ipv6") as f:
        assert f.read().strip() == "1"
    assert gateway.ensure_tunnel_device(ipr, 4789) == (index, [])


def test_another_port_makes_it_anew(ipr):
    gateway.ensure_tunnel_device(ipr, 4789)
    _, changes = gateway.ensure_tunnel_device(ipr, 4800)
    assert changes == [f"removed {gateway.TUNNEL_DEV} of another port or kind",
                       f"created {gateway.TUNNEL_DEV} (a tunnel socket on UDP 4800, for GRO)"]
    assert "dstport 4800" in details() and 4789 not in udp_ports()


def test_a_port_another_socket_holds_is_refused_and_nothing_is_left(ipr):
    subprocess.run(["ip", "link", "add", "other", "type", "vxlan", "id", "7", "dstport", "4789"], check=True)
    subprocess.run(["ip", "link", "set", "other", "up"], check=True)
    with pytest.raises(gateway.PortInUse, match="UDP 4789 is held by another socket"):
        gateway.ensure_tunnel_device(ipr, 4789)
    assert not ipr.link_lookup(ifname=gateway.TUNNEL_DEV)


def test_removed(ipr):
    assert gateway.remove_tunnel_device(ipr) is False
    gateway.ensure_tunnel_device(ipr, 4789)
    assert gateway.remove_tunnel_device(ipr) is True
    assert not ipr.link_lookup(ifname=gateway.TUNNEL_DEV) and 4789 not in udp_ports()
