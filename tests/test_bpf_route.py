"""How the endpoint program sends a tunnel packet out of the underlay (bpf/lib/route.h), in
the kernel. BPF_PROG_TEST_RUN runs bpf_fib_lookup() in the calling thread's network
namespace, so these tests enter one of their own, with an underlay device and the routes
each case needs; the verdict and the drop counters say what the lookup decided."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from bpfrun import Datapath, Topology as T  # noqa: E402
from test_bpf_programs import Case, container, run_case  # noqa: E402

from xoverlay.kernel import netns  # noqa: E402
from xoverlay.maps.layout import CFG_FIB_MAIN_ONLY, U32  # noqa: E402

TC_ACT_SHOT, TC_ACT_REDIRECT = 2, 7
NETNS = f"xotest-route-{os.getpid()}"
TO_B = container(T.WEB1, T.API1.ip)          # a remote endpoint on peer B
TO_C = container(T.WEB1, T.DB1.ip)           # ... and one on peer C


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", "-n", NETNS, *args], check=check, capture_output=True)


def entered(name: str):
    return netns.entered(f"/run/netns/{name}")


@pytest.fixture(scope="module")
def dp():
    """A throwaway node whose underlay is u0 (T.NODE_IP/24, peers B and C on-link) in a
    netns of the test's own."""
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        ip("link", "add", "u0", "type", "veth", "peer", "name", "u1")
        ip("addr", "add", f"{T.NODE_IP}/24", "dev", "u0")
        ip("link", "set", "u0", "up")
        ip("link", "set", "u1", "up")
        # As on a Docker host (and a lab node): bpf_fib_lookup answers only for a device
        # that forwards; without it the kernel's route decides (the last test).
        forwarding(True)
        with Datapath(f"pytest-route-{os.getpid()}") as datapath:
            with entered(NETNS):
                ifindex = socket.if_nametoindex("u0")
            cfg = datapath.maps["xo_config"].get(U32(0))
            cfg.underlay_ifindex = ifindex
            datapath.maps["xo_config"].set(U32(0), cfg)
            yield datapath
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False)


def forwarding(on: bool) -> None:
    subprocess.run(["nsenter", f"--net=/run/netns/{NETNS}", "sysctl", "-qw",
                    f"net.ipv4.conf.u0.forwarding={int(on)}"], check=True)


def set_main_only(dp, on: bool) -> None:
    cfg = dp.maps["xo_config"].get(U32(0))
    cfg.flags = CFG_FIB_MAIN_ONLY if on else 0
    dp.maps["xo_config"].set(U32(0), cfg)


def send(dp, frame: bytes, verdict: int, drop: str | None = None):
    with entered(NETNS):
        return run_case(dp, "prog_endpoint", Case("to a peer", frame, verdict, None, drop, T.WEB1.ifindex))


@pytest.fixture
def routes(dp):
    """Whatever a test adds to the netns' routing goes again after it."""
    yield
    ip("rule", "del", "pref", "100", check=False)
    for table in ("main", "100"):
        for peer in (T.PEER_B, T.PEER_C):
            ip("route", "del", f"{peer}/32", "table", table, check=False)
    ip("route", "replace", f"{T.NODE_IP.rsplit('.', 1)[0]}.0/24", "dev", "u0", "src", T.NODE_IP)
    set_main_only(dp, False)
    forwarding(True)


@pytest.mark.parametrize("main_only", [False, True], ids=["full policy", "main table"])
def test_a_peer_with_a_route_is_sent_to(dp, routes, main_only):
    set_main_only(dp, main_only)
    send(dp, TO_B, TC_ACT_REDIRECT)


@pytest.mark.parametrize("kind", ["blackhole", "unreachable", "prohibit"])
@pytest.mark.parametrize("main_only", [False, True], ids=["full policy", "main table"])
def test_a_route_that_refuses_the_peer_drops_its_tunnel_packets(dp, routes, kind, main_only):
    """Counted as UNDERLAY_UNREACHABLE, and not as traffic to the peer; the other peer's
    packets still go."""
    set_main_only(dp, main_only)
    ip("route", "add", kind, f"{T.PEER_B}/32")
    before = dp.peer_traffic(T.PEER_B)
    send(dp, TO_B, TC_ACT_SHOT, drop="UNDERLAY_UNREACHABLE")
    after = dp.peer_traffic(T.PEER_B)
    assert (after.tx_packets, after.tx_bytes) == (before.tx_packets, before.tx_bytes)
    send(dp, TO_C, TC_ACT_REDIRECT)


def test_policy_rules_count_unless_the_agent_found_none_of_the_operators(dp, routes):
    """A rule sends the way to B into a table where it is a blackhole: the full policy
    lookup obeys it; with XO_CFG_FIB_MAIN_ONLY (which the agent sets only when there is no
    such rule: xoverlay/kernel/gateway.py main_table_suffices) the main table's on-link route is used."""
    ip("route", "add", "blackhole", f"{T.PEER_B}/32", "table", "100")
    ip("rule", "add", "to", f"{T.PEER_B}/32", "lookup", "100", "pref", "100")
    send(dp, TO_B, TC_ACT_SHOT, drop="UNDERLAY_UNREACHABLE")
    set_main_only(dp, True)
    send(dp, TO_B, TC_ACT_REDIRECT)


def test_no_route_at_all_leaves_it_to_the_kernel(dp, routes):
    """Nothing routes B (the on-link prefix removed): the kernel's own output route for
    the underlay device decides, as before route lookups moved into the program (it
    takes B as on-link). Not a drop of ours."""
    ip("route", "del", f"{T.NODE_IP.rsplit('.', 1)[0]}.0/24", "dev", "u0")
    send(dp, TO_B, TC_ACT_REDIRECT)


def test_an_underlay_that_does_not_forward_leaves_it_to_the_kernel(dp, routes):
    """bpf_fib_lookup refuses a device without forwarding (FWD_DISABLED): the kernel's
    output route sends it, the slower way (a blackhole route is then not seen: the
    kernel takes the peer as on-link on the underlay; `xoverlay lint` says so)."""
    forwarding(False)
    ip("route", "add", "blackhole", f"{T.PEER_B}/32")
    send(dp, TO_B, TC_ACT_REDIRECT)
