"""rates: per-second rates between two status snapshots, never negative, and a bounded
history for the dashboard's sparklines. Pure: the elapsed time is given."""
from __future__ import annotations

import pytest

from xoverlay.core.rates import History, Rates, ago, drop_rates, per_second, row_rates, snapshot_rates, traffic_rates


def traffic(tx_packets=0, tx_bytes=0, rx_packets=0, rx_bytes=0, **row):
    return dict(row, tx_packets=tx_packets, tx_bytes=tx_bytes, rx_packets=rx_packets, rx_bytes=rx_bytes)


def snap(node="n1", peers=(), endpoints=(), drops=()):
    return {"node": {"name": node}, "peers": list(peers), "endpoints": list(endpoints), "drops": list(drops)}


# --- one counter ---------------------------------------------------------------------

def test_rate_is_growth_over_elapsed_seconds():
    assert per_second(100, 160, 2.0) == 30.0


def test_counter_that_went_down_was_reset_and_gives_zero_not_negative():
    assert per_second(5000, 12, 1.0) == 0.0


def test_no_time_passed_gives_zero():
    assert per_second(1, 9, 0.0) == 0.0
    assert per_second(1, 9, -1.0) == 0.0


def test_unchanged_counter_is_zero():
    assert per_second(7, 7, 1.0) == 0.0


# --- one row -------------------------------------------------------------------------

def test_row_rates_per_direction_in_packets_and_bytes():
    r = traffic_rates(traffic(10, 1000, 20, 3000), traffic(30, 3000, 25, 3500), 2.0)
    assert r == Rates(tx_pps=10.0, rx_pps=2.5, tx_Bps=1000.0, rx_Bps=250.0)
    assert r.pps == 12.5


def test_each_counter_of_a_row_resets_on_its_own():
    r = traffic_rates(traffic(10, 1000, 20, 3000), traffic(2, 100, 30, 4000), 1.0)
    assert (r.tx_pps, r.tx_Bps, r.rx_pps, r.rx_Bps) == (0.0, 0.0, 10.0, 1000.0)


# --- tables of rows ------------------------------------------------------------------

def test_rows_are_matched_by_key_not_position():
    before = [traffic(0, name="b"), traffic(100, name="a")]
    after = [traffic(110, name="a"), traffic(5, name="b")]
    assert {k: r.tx_pps for k, r in row_rates(before, after, "name", 1.0).items()} == {"a": 10.0, "b": 5.0}


def test_new_row_has_no_rate_yet():
    assert row_rates([], [traffic(500, name="web1")], "name", 1.0) == {}


def test_row_gone_is_not_reported():
    assert row_rates([traffic(1, name="old")], [], "name", 1.0) == {}


def test_endpoint_recreated_with_the_same_name_gives_zero_not_negative():
    before = [traffic(9000, 900000, 9000, 900000, name="web1")]
    after = [traffic(3, 300, 1, 100, name="web1")]
    assert row_rates(before, after, "name", 1.0)["web1"] == Rates()


def test_drop_reason_absent_before_counts_from_zero():
    # status lists only the reasons with a non-zero count
    after = [{"reason": "NO_ROUTE", "packets": 4}, {"reason": "INNER_SPOOFED", "packets": 10}]
    assert drop_rates([{"reason": "INNER_SPOOFED", "packets": 6}], after, 2.0) == \
        {"NO_ROUTE": 2.0, "INNER_SPOOFED": 2.0}


# --- whole snapshots -----------------------------------------------------------------

def test_snapshot_rates_of_peers_endpoints_and_drops():
    before = snap(peers=[traffic(10, node="n2")], endpoints=[traffic(rx_packets=1, name="web1")],
                  drops=[{"reason": "NO_ROUTE", "packets": 1}])
    after = snap(peers=[traffic(20, node="n2")], endpoints=[traffic(rx_packets=4, name="web1")],
                 drops=[{"reason": "NO_ROUTE", "packets": 2}])
    r = snapshot_rates(before, after, 1.0)
    assert r.peers["n2"].tx_pps == 10.0
    assert r.endpoints["web1"].rx_pps == 3.0
    assert r.drops == {"NO_ROUTE": 1.0}


def test_first_snapshot_has_no_rates():
    r = snapshot_rates(None, snap(peers=[traffic(10, node="n2")]), 1.0)
    assert (r.peers, r.endpoints, r.drops) == ({}, {}, {})


def test_snapshots_of_different_nodes_give_no_rates():
    r = snapshot_rates(snap("n1", peers=[traffic(1, node="n3")]), snap("n2", peers=[traffic(50, node="n3")]), 1.0)
    assert r.peers == {}


# --- history -------------------------------------------------------------------------

def test_history_keeps_the_last_samples_oldest_first():
    h = History(size=3)
    for v in [1, 2, 3, 4, 5]:
        h.push({"n2": v})
    assert h.get("n2") == [3, 4, 5]


def test_history_forgets_a_key_missing_from_a_push():
    h = History(size=5)
    h.push({"n2": 1, "n3": 2})
    h.push({"n2": 3})
    assert h.get("n2") == [1, 3]
    assert h.get("n3") == [] and h.keys() == {"n2"}


def test_history_of_unknown_key_is_empty():
    assert History().get("nope") == []


def test_history_size_must_be_positive():
    with pytest.raises(ValueError):
        History(size=0)


def test_ago_says_how_long_since_in_its_largest_whole_unit():
    assert [ago(x) for x in [None, 0.0, 0.99, 1.0, 59.9, 60, 3599, 3600, 86399, 86400 * 3 + 5]] == [
        "never", "now", "now", "1s ago", "59s ago", "1m ago", "59m ago", "1h ago", "23h ago", "3d ago"]
