"""The agent's repairs (xoverlay/agent/repair.py): what it decides to put back, from what it finds
(pure), and what putting it back did, on a veth of a netns of the test's own."""
from __future__ import annotations

import os

import pytest
from conftest import inside_netns_with_veth

from xoverlay.agent.repair import Repair, Seen, Want, pin_names, plan


def test_nothing_undone_nothing_to_do():
    assert plan(Seen(frozenset(), 7, 8), Want(7, 8), "eth1") == []


def test_every_deleted_pin_is_pinned_again_in_a_stable_order():
    seen = Seen(frozenset({"xo_peers", "prog_endpoint", "xo_config"}), 7, 8)
    assert plan(seen, Want(7, 8), "eth1") == [Repair("pin", "prog_endpoint"), Repair("pin", "xo_config"),
                                             Repair("pin", "xo_peers")]


def test_detached_or_foreign_tc_program_is_attached_again():
    assert plan(Seen(frozenset(), 0, 8), Want(7, 8), "eth1") == [Repair("tc", "eth1")]
    assert plan(Seen(frozenset(), 99, 8), Want(7, 8), "eth1") == [Repair("tc", "eth1")]


def test_xdp_is_repaired_only_where_the_node_runs_it():
    assert plan(Seen(frozenset(), 7, 0), Want(7, 8), "eth1") == [Repair("xdp", "eth1")]
    assert plan(Seen(frozenset(), 7, 0), Want(7, 0), "eth1") == []      # up --no-xdp
    assert plan(Seen(frozenset(), 7, 5), Want(7, 0), "eth1") == []      # not ours to judge


def test_lo_is_repaired_as_a_device_of_its_own():
    assert plan(Seen(frozenset(), 7, 8, 0), Want(7, 8, 9), "eth1") == [Repair("tc", "lo")]
    assert plan(Seen(frozenset(), 7, 8, 9), Want(7, 8, 9), "eth1") == []


def test_pins_checked_are_every_map_and_program():
    names = pin_names()
    assert {"prog_endpoint", "prog_underlay_tc", "prog_underlay_xdp", "prog_loopback", "xo_config",
            "xo_endpoints"} <= set(names)


def test_repairs_say_what_was_done():
    assert str(Repair("pin", "xo_peers")) == "repaired: pin xo_peers was deleted: pinned again"
    assert "tc program on eth1" in str(Repair("tc", "eth1"))


# --- applying them, in the kernel ---------------------------------------------------------------

NODE = f"xotest-repair-{os.getpid()}"


@pytest.fixture(scope="module")
def progs():
    """The node's real programs, compiled and pinned as `up` does; unpinned at the end."""
    from xoverlay.kernel import datapath
    if os.geteuid() != 0:
        pytest.skip("BPF programs need root")
    loaded = datapath.load(NODE)
    try:
        yield loaded
    finally:
        loaded.close()
        datapath.unpin(NODE)


@pytest.fixture
def underlay():
    """A veth standing for the underlay, with this thread in its netns for the test."""
    from xoverlay.agent.loop import Underlay
    with inside_netns_with_veth(NODE, "u0", "u1") as ifindex:
        yield Underlay("u0", ifindex, "192.0.2.1", 1500)


def test_attach_says_what_it_attached(progs, underlay):
    from xoverlay.kernel import datapath
    assert datapath.attach_underlay(underlay.ifindex, progs, True).attached == ("tc", "lo", "xdp")
    again = datapath.attach_underlay(underlay.ifindex, progs, True)
    assert again.attached == () and again.mode == "native"


def test_a_repair_reports_what_it_found_when_it_acted_not_what_was_planned(progs, underlay):
    """The agent looked, found the tc program gone and planned that; XDP went before it
    acted. Both are put back and both are said (the log of an agent that raced a test
    detaching one after the other missed the XDP line)."""
    from xoverlay.agent.repair import apply
    from xoverlay.kernel import bpf, datapath
    datapath.attach_underlay(underlay.ifindex, progs, True)
    planned = plan(Seen(frozenset(), 0, datapath.prog_id(progs.fds["prog_underlay_xdp"])),
                   Want(datapath.prog_id(progs.fds["prog_underlay_tc"]),
                        datapath.prog_id(progs.fds["prog_underlay_xdp"])), underlay.name)
    assert planned == [Repair("tc", "u0")]
    bpf.tc_detach(underlay.ifindex)
    datapath.detach_xdp(underlay.ifindex)
    assert apply(NODE, planned, progs.fds, underlay, progs, True) == [Repair("tc", "u0"), Repair("xdp", "u0")]
    assert bpf.tc_query(underlay.ifindex) == datapath.prog_id(progs.fds["prog_underlay_tc"])
    assert bpf.xdp_query(underlay.ifindex)[1] == datapath.prog_id(progs.fds["prog_underlay_xdp"])
    # Planned, but put back by someone else before it acted: nothing done, nothing said.
    assert apply(NODE, planned, progs.fds, underlay, progs, True) == []


def test_lo_detached_is_attached_again(progs, underlay):
    """The node's own connections to its published ports go through lo's program."""
    from xoverlay.agent.repair import apply, observe
    from xoverlay.kernel import bpf, datapath
    datapath.attach_underlay(underlay.ifindex, progs, False)
    want = Want(datapath.prog_id(progs.fds["prog_underlay_tc"]), 0, datapath.prog_id(progs.fds["prog_loopback"]))
    assert plan(observe(NODE, underlay.ifindex), want, underlay.name) == []
    bpf.tc_detach(datapath.LOOPBACK_IFINDEX)
    planned = plan(observe(NODE, underlay.ifindex), want, underlay.name)
    assert planned == [Repair("tc", "lo")]
    assert apply(NODE, planned, progs.fds, underlay, progs, False) == [Repair("tc", "lo")]
    assert bpf.tc_query(datapath.LOOPBACK_IFINDEX) == want.lo_prog


def test_a_deleted_pin_is_pinned_again(progs, underlay):
    from xoverlay.agent.repair import apply
    from xoverlay.maps.layout import pin_dir
    path = os.path.join(pin_dir(NODE), "prog_endpoint")
    os.unlink(path)
    assert apply(NODE, [Repair("pin", "prog_endpoint")], progs.fds, underlay, progs, True) == \
        [Repair("pin", "prog_endpoint")]
    assert os.path.exists(path)
