"""The live dashboard (`xoverlay status` on a terminal), driven headless through
Textual's pilot. The data source is a test double that plays a small cluster whose
counters grow at known rates, with a clock that moves one second per snapshot, so every
rate on screen is exact. One test runs the real source on a real 2-node lab."""
from __future__ import annotations

import asyncio
import io
import subprocess
import time

import pytest
from rich.console import Console

from xoverlay.maps.drops import REASONS
from xoverlay.ui.tui import Dashboard, PeerScreen, ServiceScreen, StatusApp, StoreSource, human, matches, spark

DROP = next(iter(REASONS.values()))

# node -> its address; per-second packet rates of each node's traffic to/from each peer
NODES = {"n1": "192.0.2.1", "n2": "192.0.2.2", "n3": "192.0.2.3"}
PEER_PPS = {"n1": 5, "n2": 1, "n3": 10}      # "n3" is the busiest peer, "n2" the quietest
ENDPOINTS = {"n1": [("web1", "10.10.0.1", 20), ("api1", "10.10.0.2", 0)],
             "n2": [("db1", "10.10.1.1", 3)],
             "n3": [("cache1", "10.10.2.1", 7)]}


class FakeSource:
    """Snapshots in the status.snapshot schema; counters = rate x number of snapshots."""

    def __init__(self):
        self.calls: list[str] = []
        self.fail_next = False
        self.programs = [
            {"program": "prog_underlay_xdp", "id": 11, "hook": "xdp", "where": "eth1", "mode": "native",
             "attached": 1, "places": 1},
            {"program": "prog_underlay_tc", "id": 12, "hook": "tc ingress", "where": "eth1", "mode": None,
             "attached": 1, "places": 1},
            {"program": "prog_endpoint", "id": 13, "hook": "tc ingress", "where": "endpoint veths", "mode": None,
             "attached": 2, "places": 2}]

    def nodes(self) -> list[str]:
        return sorted(NODES)

    def snapshot(self, node: str) -> dict:
        self.calls.append(node)
        if self.fail_next:
            self.fail_next = False
            raise OSError("pins vanished")
        tick = len(self.calls)

        def traffic(pps):
            return {"tx_packets": pps * tick, "tx_bytes": pps * tick * 100,
                    "rx_packets": pps * tick, "rx_bytes": pps * tick * 100}
        peers = [p for p in sorted(NODES) if p != node]
        return {
            "node": {"name": node, "underlay_ip": NODES[node], "underlay_device": "eth1", "vxlan_port": 4789,
                     "agent_pid": 42, "agent_alive": True, "pinned": True, "build": "abc123", "build_current": True,
                     "programs": self.programs},
            "peers": [{"node": p, "underlay_ip": NODES[p], "subnets": [f"10.10.{sorted(NODES).index(p)}.0/24"],
                       "last_rx_ago": None if p == "n3" else 75.0, **traffic(PEER_PPS[p])} for p in peers],
            "endpoints": [{"name": name, "network": "demo", "ip": ip, "netns": f"/run/netns/{name}",
                           "state": "ready", **traffic(pps)} for name, ip, pps in ENDPOINTS[node]],
            "drops": [{"reason": DROP.name, "code": DROP.code, "text": DROP.text,
                       "packets": 3 * tick, "bytes": 300 * tick}],
            "maps": [{"name": "xo_endpoints", "entries": 4, "max_entries": 65536},
                     {"name": "xo_peers", "entries": 900, "max_entries": 1024},
                     {"name": "xo_drops", "entries": 32, "max_entries": 32}],
            "drift": [{"map": "xo_endpoints", "kind": "missing", "key": "EndpointKey(vni=4096, ip=10.10.9.9)"}],
            "store": {"path": "/fake", "reachable": True, "error": None},
            "peer_endpoints": {p: [{"name": n, "network": "demo", "ip": ip, "state": "ready"}
                                   for n, ip, _ in ENDPOINTS[p]] for p in peers},
            "array_maps": ["xo_drops"],
            "services": [{"name": "web", "id": 1, "network": "demo", "vip": "10.10.255.254", "ports": ["80/tcp"],
                          "publish": ["8080:80/tcp"], "affinity": "none", "packets": 12 * tick, "bytes": 0,
                          "connections": 3 * tick,
                          "backends": [{"endpoint": "web1", "id": 1, "ip": "10.10.0.1", "node": "n1", "port": None,
                                        "weight": 2, "state": "active", "packets": 8 * tick, "bytes": 0,
                                        "connections": 2 * tick},
                                       {"endpoint": "db1", "id": 2, "ip": "10.10.1.1", "node": "n2", "port": None,
                                        "weight": 1, "state": "draining", "packets": 4 * tick, "bytes": 0,
                                        "connections": tick}]}],
        }


class Clock:
    """One second per reading."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def make_app(source=None, node="n1", interval=3600.0):
    source = source or FakeSource()
    return StatusApp(source.snapshot, node, source.nodes, interval=interval, clock=Clock()), source


def screen_text(app) -> str:
    """The screen as plain text, as a terminal would show it (what the tests assert on)."""
    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(), record=True,
                      force_terminal=True, color_system=None, legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


def run(app, scenario):
    """Run the app headless at 160x50 and play `scenario(pilot)` against it."""
    async def main():
        async with app.run_test(size=(160, 50)) as pilot:
            await pilot.pause()
            await scenario(pilot)
    asyncio.run(main())


async def settled(pilot):
    """Two snapshots taken (rates need two) and the screen redrawn."""
    app = pilot.app
    for _ in range(200):
        if app.snap is not None:
            break
        await pilot.pause(0.01)
    await app.refresh_now()
    await pilot.pause()


async def until(pilot, condition, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def rows(app, table_id) -> list[str]:
    table = app.screen.query_one(f"#{table_id}")
    return [r.key.value for r in table.ordered_rows]


def cell(app, table_id, row, column) -> str:
    return str(app.dashboard.query_one(f"#{table_id}").get_cell(row, column))


# --- what is on the screen -----------------------------------------------------------

def test_dashboard_shows_every_panel_with_exact_rates():
    app, _ = make_app()

    async def scenario(pilot):
        await settled(pilot)
        text = screen_text(app)
        for expected in [
            "node n1", "underlay eth1 192.0.2.1:4789", "agent alive, pid 42", "abc123 (current)", "store reachable",
            "peers 2/2, sorted by name", "n2", "192.0.2.2", "10.10.1.0/24", "n3",
            "all peers: tx 11 pkt/s 1.1kB/s, rx 11 pkt/s 1.1kB/s",
            "endpoints 2/2", "web1", "10.10.0.1", "api1", "ready",
            DROP.name, DROP.text,
            "map pressure (1 at 80% or more)", "xo_peers", "88%", "array: always full",
            "drift: 1", "missing", "EndpointKey(vni=4096, ip=10.10.9.9)",
            "s sort", "/ filter", "n next node", "q quit", "p pause",
        ]:
            assert expected in text, f"{expected!r} not on screen:\n{text}"
        assert cell(app, "peers", "n2", "tx_pps") == "1"
        assert cell(app, "peers", "n3", "tx_pps") == "10" and cell(app, "peers", "n3", "rx_Bps") == "1.0k"
        assert cell(app, "peers", "n2", "last_rx") == "1m ago" and cell(app, "peers", "n3", "last_rx") == "never"
        assert cell(app, "endpoints", "web1", "rx_pps") == "20"
        assert cell(app, "drops", DROP.name, "pps") == "3"
    run(app, scenario)


def test_services_table_shows_backends_with_their_rates():
    app, _ = make_app()

    async def scenario(pilot):
        await settled(pilot)
        text = screen_text(app)
        for expected in ["services 1, backends 2", "10.10.255.254:80/tcp", "8080/tcp", "web1 (10.10.0.1)",
                         "draining"]:
            assert expected in text, f"{expected!r} not on screen:\n{text}"
        assert rows(app, "services") == ["web/web1", "web/db1"]
        assert cell(app, "services", "web/web1", "cps") == "2" and cell(app, "services", "web/web1", "pps") == "8"
        assert cell(app, "services", "web/db1", "cps") == "1" and cell(app, "services", "web/db1", "weight") == "1"
    run(app, scenario)


def test_map_at_80_percent_is_highlighted_and_arrays_are_not():
    app, _ = make_app()

    async def scenario(pilot):
        await settled(pilot)
        table = app.dashboard.query_one("#maps")
        assert "red" in str(table.get_cell("xo_peers", "fill").style)
        assert "red" not in str(table.get_cell("xo_endpoints", "fill").style)
        assert "red" not in str(table.get_cell("xo_drops", "fill").style)
    run(app, scenario)


LINTS = [{"id": "mtu-headroom", "severity": "error", "subject": "eth1", "message": "1 endpoint(s) with an MTU ...",
          "fix": "endpoint MTU at most 1430"},
         {"id": "xdp-generic", "severity": "warning", "subject": "eth1", "message": "XDP runs in generic mode",
          "fix": "use a driver with native XDP"}]


class LintingSource(FakeSource):
    def snapshot(self, node):
        snap = super().snapshot(node)
        snap["lints"] = LINTS if node == "n1" else LINTS[1:]
        snap["monitor"] = {"state": "stale", "pid": 77, "lost": 0}
        return snap


def test_lints_panel_and_monitor_in_the_header():
    app, _ = make_app(LintingSource())

    async def scenario(pilot):
        await settled(pilot)
        text = screen_text(app)
        for expected in ["lints: 2", "error   mtu-headroom (eth1) 1 endpoint(s)", "fix: endpoint MTU at most 1430",
                         "warning xdp-generic (eth1)", "monitor flag stale (pid 77 gone)"]:
            assert expected in text, f"{expected!r} not on screen:\n{text}"
        box = app.dashboard.query_one("#lints")
        assert box.has_class("bad") and not box.has_class("warn"), "an error makes it red"
        await pilot.press("n")             # n2: only the warning
        await until(pilot, lambda: app.snap is not None and app.snap["node"]["name"] == "n2")
        await pilot.pause()
        assert box.has_class("warn") and not box.has_class("bad")
    run(app, scenario)


def test_header_shows_where_each_program_runs_and_a_missing_one_in_red():
    source = FakeSource()
    app, _ = make_app(source)

    async def scenario(pilot):
        await settled(pilot)
        text = screen_text(app)
        expected = ("programs xdp #11 native on eth1 · tc ingress #12 on eth1 · "
                    "tc ingress #13 on 2/2 endpoint veths")
        assert expected in text, text
        assert "node n1  underlay eth1 192.0.2.1:4789" in text
        source.programs[2] = dict(source.programs[2], attached=1)    # a filter detached behind our back
        await app.refresh_now()
        await pilot.pause()
        header = app.header_text()
        missing = next(span for span in header.spans if "1/2" in header.plain[span.start:span.end])
        assert "red" in str(missing.style)
    run(app, scenario)


def test_enter_on_a_service_drills_into_it_and_escape_comes_back():
    app, _ = make_app()

    async def scenario(pilot):
        await settled(pilot)
        app.dashboard.query_one("#services").focus()
        await pilot.press("down", "enter")         # db1's row: its service, web
        await pilot.pause()
        assert isinstance(app.screen, ServiceScreen) and app.screen.service == "web"
        await app.refresh_now()
        await pilot.pause()
        text = screen_text(app)
        for expected in ["service web seen from n1", "network demo", "VIP 10.10.255.254:80/tcp",
                         "published 8080:80/tcp", "affinity none", "now 3 conn/s, 12 pkt/s",
                         "new connections/s over the last 60s, max 3", "backends 2"]:
            assert expected in text, f"{expected!r} not on screen:\n{text}"
        table = app.screen.query_one("#service-backends")
        assert [r.key.value for r in table.ordered_rows] == ["web1", "db1"]
        assert [str(table.get_cell("web1", c)) for c in ("cps", "pps", "share", "state")] == \
            ["2", "8", "67%", "active"]
        assert [str(table.get_cell("db1", c)) for c in ("cps", "pps", "share", "state")] == \
            ["1", "4", "33%", "draining"]
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, Dashboard)
    run(app, scenario)


def test_lints_panel_when_all_is_well():
    app, _ = make_app()

    async def scenario(pilot):
        await settled(pilot)
        text = screen_text(app)
        assert "lints: 0" in text and "none: nothing known to break or slow this node" in text
        assert "monitor" not in text.split("\n")[0], "no monitor: nothing said in the header"
    run(app, scenario)


def test_drift_panel_is_red_when_non_zero():
    app, _ = make_app()

    async def scenario(pilot):
        await settled(pilot)
        assert app.dashboard.query_one("#drift").has_class("bad")
    run(app, scenario)


def test_first_snapshot_shows_counters_but_no_rates_yet():
    app, _ = make_app()

    async def scenario(pilot):
        while app.snap is None:
            await pilot.pause(0.01)
        await pilot.pause()
        assert cell(app, "peers", "n3", "tx_pps") == "-"
        assert cell(app, "peers", "n3", "tx_packets") == "10"
    run(app, scenario)


def test_a_failed_refresh_is_shown_and_the_last_data_kept():
    app, source = make_app()

    async def scenario(pilot):
        await settled(pilot)
        source.fail_next = True
        await app.refresh_now()
        await pilot.pause()
        text = screen_text(app)
        assert "last refresh failed: OSError: pins vanished" in text
        assert "n3" in rows(app, "peers")
        await app.refresh_now()
        await pilot.pause()
        assert "last refresh failed" not in screen_text(app)
    run(app, scenario)


# --- keys ----------------------------------------------------------------------------

def test_filter_narrows_peers_and_endpoints_and_escape_clears_it():
    app, _ = make_app()

    async def scenario(pilot):
        await settled(pilot)
        await pilot.press("slash")
        await pilot.press(*"web")
        await pilot.pause()
        assert rows(app, "peers") == [] and rows(app, "endpoints") == ["web1"]
        assert "endpoints 1/2, sorted by name, filter 'web'" in screen_text(app)
        await pilot.press("escape")
        await pilot.pause()
        assert rows(app, "peers") == ["n2", "n3"] and rows(app, "endpoints") == ["api1", "web1"]
    run(app, scenario)


def test_filter_matches_peer_subnets_and_keys_typed_in_it_are_text_not_commands():
    app, source = make_app()

    async def scenario(pilot):
        await settled(pilot)
        await pilot.press("f")
        await pilot.press(*"10.10.2")
        await pilot.pause()
        assert rows(app, "peers") == ["n3"] and rows(app, "endpoints") == []
        await pilot.press("enter")              # keep the filter, back to the tables
        await pilot.pause()
        assert rows(app, "peers") == ["n3"]
        await pilot.press("slash", *"pqsn")     # the old filter is selected: typing replaces it
        await pilot.pause()
        assert app.is_running and not app.paused and app.sort == "name" and app.node == "n1"
        assert app.filter == "pqsn" and rows(app, "peers") == []
    run(app, scenario)


def test_s_cycles_sort_between_name_and_rate():
    app, _ = make_app()

    async def scenario(pilot):
        await settled(pilot)
        assert rows(app, "peers") == ["n2", "n3"] and rows(app, "endpoints") == ["api1", "web1"]
        await pilot.press("s")
        await pilot.pause()
        assert rows(app, "peers") == ["n3", "n2"] and rows(app, "endpoints") == ["web1", "api1"]
        assert "peers 2/2, sorted by rate (tx+rx pkt/s)" in screen_text(app)
        await pilot.press("s")
        await pilot.pause()
        assert rows(app, "peers") == ["n2", "n3"]
    run(app, scenario)


def test_p_pauses_refresh_and_resumes_it():
    app, source = make_app(interval=0.1)

    async def scenario(pilot):
        while len(source.calls) < 3:
            await pilot.pause(0.02)
        await pilot.press("p")
        await until(pilot, lambda: not app._busy)  # a snapshot already under way may land
        await pilot.pause()
        calls, shown = len(source.calls), cell(app, "peers", "n3", "tx_packets")
        assert "PAUSED (p: resume)" in screen_text(app)
        await asyncio.sleep(0.6)                   # six refresh periods
        assert len(source.calls) == calls, "snapshots taken while paused"
        assert cell(app, "peers", "n3", "tx_packets") == shown
        await pilot.press("p")
        await until(pilot, lambda: len(source.calls) > calls + 1)
        await pilot.pause()
        assert cell(app, "peers", "n3", "tx_packets") != shown
        assert "PAUSED" not in screen_text(app)
    run(app, scenario)


def test_enter_on_a_peer_drills_into_it_and_escape_comes_back():
    app, _ = make_app()

    async def scenario(pilot):
        await settled(pilot)
        await pilot.press("down", "enter")         # second row: n3
        await pilot.pause()
        assert isinstance(app.screen, PeerScreen) and app.screen.peer == "n3"
        await app.refresh_now()                    # the detail follows the refresh
        await pilot.pause()
        text = screen_text(app)
        for expected in ["peer n3 seen from n1", "underlay 192.0.2.3", "subnets 10.10.2.0/24",
                         "now      10 pkt/s", "endpoints on n3: 1", "cache1", "10.10.2.1",
                         "tx+rx packets/s over the last 60s, max 20"]:
            assert expected in text, f"{expected!r} not on screen:\n{text}"
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, Dashboard)
    run(app, scenario)


def test_n_moves_to_the_next_node_of_the_store():
    app, source = make_app()

    async def scenario(pilot):
        await settled(pilot)
        await pilot.press("n")
        await pilot.pause()
        assert app.node == "n2" and source.calls[-1] == "n2"
        assert rows(app, "peers") == ["n1", "n3"] and rows(app, "endpoints") == ["db1"]
        assert "node n2  underlay eth1 192.0.2.2:4789" in screen_text(app)
        await pilot.press("n", "n")
        await pilot.pause()
        assert app.node == "n1"
    run(app, scenario)


def test_q_quits():
    app, _ = make_app()

    async def scenario(pilot):
        await settled(pilot)
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running
    run(app, scenario)
    assert app.return_code == 0


# --- formatting ----------------------------------------------------------------------

def test_human_numbers():
    assert [human(x) for x in [None, 0, 0.2, 5, 12.7, 1234, 5_600_000]] == ["-", "0", "0.2", "5", "13", "1.2k", "5.6M"]
    assert human(2048, "B") == "2.0kB"


def test_sparkline_is_zero_based_newest_right_and_padded():
    assert spark([], 4) == "    "
    assert spark([0, 0], 4) == "  ▁▁"
    assert spark([0, 1, 8], 3) == "▁▂█"
    assert spark([5, 5, 5, 5, 5], 3) == "███"


def test_filter_is_a_case_insensitive_substring_of_any_field():
    row = {"node": "Node2", "underlay_ip": "192.0.2.2", "subnets": ["10.10.1.0/24"]}
    fields = ("node", "underlay_ip", "subnets")
    assert matches(row, "node2", fields) and matches(row, "10.1.0", fields) and matches(row, "", fields)
    assert not matches(row, "node3", fields)


# --- the real source -----------------------------------------------------------------

def test_store_source_reports_an_unreadable_store_and_never_creates_one(tmp_path):
    missing = tmp_path / "nope.db"
    snap = StoreSource(str(missing)).snapshot("ghost")
    assert snap["store"]["reachable"] is False and "no such file" in snap["store"]["error"]
    assert not missing.exists()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    snap = StoreSource(str(garbage)).snapshot("ghost")
    assert snap["store"]["reachable"] is False
    assert snap["node"]["name"] == "ghost" and snap["peers"] == [] and not snap["node"]["pinned"]


@pytest.mark.lab
def test_real_lab_peer_rate_rises_while_a_ping_runs(tmp_path):
    from conftest import PY, run_xo

    from xoverlay.store import open_store
    state = str(tmp_path / "state.db")
    ping = None
    try:
        run_xo(state, "lab", "up", "--nodes", "2", timeout=180)
        st = open_store(state).read()
        n1, n2 = sorted(st.nodes)
        dst = st.endpoints[f"{n2}-a"].ip
        source = StoreSource(state)
        ping = subprocess.Popen([PY, "-m", "xoverlay", "--state", state, "lab", "exec",
                                 f"{n1}-a", "--", "ping", "-i", "0.2", dst],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        app = StatusApp(source.snapshot, n1, source.nodes, interval=0.5)

        async def scenario(pilot):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                await pilot.pause(0.25)
                if app.rates.peers.get(n2) and app.rates.peers[n2].pps > 0:
                    break
            await pilot.pause()
            assert app.rates.peers[n2].tx_pps > 0 and app.rates.peers[n2].rx_pps > 0
            assert cell(app, "peers", n2, "tx_pps") not in ("-", "0")
            text = screen_text(app)
            for expected in [f"node {n1}", "agent alive", "(current)", "store reachable", n2, f"{n1}-a",
                             "drift: 0"]:
                assert expected in text, f"{expected!r} not on screen:\n{text}"
        run(app, scenario)
    finally:
        if ping is not None:
            ping.terminate()
            ping.wait(timeout=10)
        run_xo(state, "lab", "down", check=False, timeout=180)

