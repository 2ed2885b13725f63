"""The agent's repair decision (ctl/repair.py): what it puts back, from what it finds."""
from ctl.repair import Repair, Seen, Want, pin_names, plan


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


def test_pins_checked_are_every_map_and_program():
    names = pin_names()
    assert {"prog_endpoint", "prog_underlay_tc", "prog_underlay_xdp", "xo_config", "xo_endpoints"} <= set(names)


def test_repairs_say_what_was_done():
    assert str(Repair("pin", "xo_peers")) == "repaired: pin xo_peers was deleted: pinned again"
    assert "tc program on eth1" in str(Repair("tc", "eth1"))
