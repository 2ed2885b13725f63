"""`xoverlay status` on a terminal: a live dashboard of one node's data path.

Every second the app takes a status snapshot (`status.snapshot`: the store plus the
node's pinned maps, so no agent is needed), turns two consecutive snapshots into rates
(`rates.py`) and redraws: header, peers, endpoints, services, drops, map pressure, drift, lints.

The app is given its data source as two functions, `snapshot(node) -> dict` and
`nodes() -> list[str]`, called from one worker thread; `StoreSource` is the real one,
tests pass their own. Keys: s sort, / or f filter, p pause, enter on a peer = details,
n next node, q quit (escape: clear the filter, or leave the details)."""
from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Sparkline, Static

from xoverlay.core.rates import History, Rates, SnapshotRates, ago, snapshot_rates

REFRESH_SECONDS = 1.0
HISTORY_SAMPLES = 60        # seconds of tx+rx pps kept per peer/endpoint (detail sparkline)
TABLE_SPARK_WIDTH = 20      # of which the table column shows the last 20
PRESSURE = 0.8              # a map this full (or fuller) is highlighted
SORTS = ("name", "rate")


# --- formatting (pure) --------------------------------------------------------------

def human(n: float | None, unit: str = "") -> str:
    """12, 0.5, 1.2k, 3.4M: short enough for a table cell. None (no rate yet) is '-'."""
    if n is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}{unit}"
    if n == 0 or abs(n) >= 10 or float(n).is_integer():
        return f"{n:.0f}{unit}"
    return f"{n:.1f}{unit}"


BARS = "▁▂▃▄▅▆▇█"


def spark(values: list[float], width: int = TABLE_SPARK_WIDTH) -> str:
    """A one-line sparkline, newest sample on the right, scaled from 0 to the window's
    maximum: '▁' is no traffic, any traffic is at least '▂'; blank is no sample yet."""
    values = list(values)[-width:]
    top = max(values, default=0)
    bars = "".join(BARS[0] if top <= 0 or v <= 0 else BARS[max(1, math.ceil(v / top * (len(BARS) - 1)))]
                   for v in values)
    return " " * (width - len(values)) + bars


def fill_bar(entries: int, max_entries: int, width: int = 10) -> str:
    frac = entries / max_entries if max_entries else 0
    full = min(width, round(frac * width))
    return "█" * full + "░" * (width - full) + f" {frac:4.0%}"


def matches(row: dict, text: str, fields: tuple[str, ...]) -> bool:
    """Does the filter text occur (case-insensitively) in any of these fields of the row?"""
    if not text:
        return True
    text = text.lower()
    for f in fields:
        v = row.get(f)
        if isinstance(v, (list, tuple)):
            v = " ".join(map(str, v))
        if text in str(v if v is not None else "").lower():
            return True
    return False


def ordered(rows: list[dict], key: str, rates: dict, sort: str) -> list[dict]:
    """By name, or busiest first (tx+rx packets/s, ties by name)."""
    if sort == "rate":
        return sorted(rows, key=lambda r: (-(rates[r[key]].pps if r[key] in rates else 0), r[key]))
    return sorted(rows, key=lambda r: r[key])


PEER_FIELDS = ("node", "underlay_ip", "subnets", "liveness")
LIVENESS_STYLE = {"up": "green", "down": "bold red", "unknown": "yellow"}
STATE_STYLE = {"ready": "green", "pending": "yellow", "removing": "red", "gone": "red"}
ENDPOINT_FIELDS = ("name", "network", "ip", "state")
BACKEND_STYLE = {"active": "green", "draining": "yellow", "gone": "red"}


def service_rates(before: dict, after: dict, seconds: float) -> dict[str, tuple[float, float]]:
    """(new connections/s, packets/s) per "service/backend" row between two snapshots."""
    from xoverlay.core.rates import per_second
    old = {f"{s['name']}/{b['endpoint']}": b for s in before.get("services", []) for b in s["backends"]}
    out = {}
    for s in after.get("services", []):
        for b in s["backends"]:
            key = f"{s['name']}/{b['endpoint']}"
            if key in old:
                out[key] = (per_second(old[key]["connections"], b["connections"], seconds),
                            per_second(old[key]["packets"], b["packets"], seconds))
    return out


# --- the real data source -----------------------------------------------------------

class StoreSource:
    """Snapshots from the state store and the node's pinned maps. The SQLite connection
    belongs to the thread that opened it, so call this from one thread only (the app's
    worker). If the store cannot be read, the last state read is used and the snapshot
    says so in "store"; the store file is never created here."""

    def __init__(self, path: str | None = None, tls=None):
        from xoverlay.store.base import Tls, default_path
        self.path = path or default_path()
        self.tls = tls or Tls()
        self._store = None
        self._state = None
        self._alive = None

    def _read(self):
        import os

        from xoverlay.errors import XoError
        from xoverlay.store import lab_store, open_store
        from xoverlay.store.base import is_etcd
        try:
            if self._store is None:
                if not is_etcd(self.path) and not lab_store(os.path.abspath(self.path)) \
                        and not os.path.exists(self.path):
                    raise XoError(f"state store {self.path}: no such file")
                self._store = open_store(self.path, self.tls)
            self._state = self._store.read()
            self._alive = self._store.alive()
            return self._state, None
        except XoError as e:
            self._alive = None
            return self._state, str(e)

    def nodes(self) -> list[str]:
        state, _ = self._read()
        return sorted(state.nodes) if state else []

    def snapshot(self, node: str) -> dict:
        from xoverlay.core.model import State
        from xoverlay.ui import status
        state, error = self._read()
        snap = status.snapshot(state or State(), node, self._alive)
        snap["store"] = {"path": self.path, "where": self.path, "reachable": error is None, "error": error}
        snap["peer_endpoints"] = status.endpoints_by_peer(state or State(), node)
        snap["array_maps"] = status.array_maps(node)
        return snap


# --- screens ------------------------------------------------------------------------

def _num(value, unit: str = "", style: str = "") -> Text:
    return Text(human(value, unit), justify="right", style=style)


def _int(value: int, style: str = "") -> Text:
    return Text(str(value), justify="right", style=style)


def fill_table(table: DataTable, rows: list[tuple[str, list]]) -> None:
    """Show these (key, cells) rows. Same rows in the same order: cells are updated in
    place (no flicker, cursor and scroll kept); otherwise the table is rebuilt and the
    cursor stays on the row it was on, if that row is still shown."""
    keys = [k for k, _ in rows]
    current = [r.key.value for r in table.ordered_rows]
    if keys == current:
        columns = table.ordered_columns
        for key, cells in rows:
            for column, value in zip(columns, cells):
                table.update_cell(key, column.key, value, update_width=True)
        return
    selected = current[table.cursor_row] if 0 <= table.cursor_row < len(current) else None
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    if selected in keys:
        table.move_cursor(row=keys.index(selected), animate=False)


def _table(id: str, columns: list[tuple[str, str]]) -> DataTable:
    t = DataTable(id=id, cursor_type="row", zebra_stripes=True)
    for label, key in columns:
        t.add_column(label, key=key)
    return t


RATE_COLUMNS = [("TX PKT/S", "tx_pps"), ("RX PKT/S", "rx_pps"), ("TX B/S", "tx_Bps"), ("RX B/S", "rx_Bps"),
                (f"PKT/S, LAST {TABLE_SPARK_WIDTH}s", "recent")]


def _rate_cells(r: Rates | None, history: list[float]) -> list:
    if r is None:
        return [_num(None), _num(None), _num(None), _num(None), Text(spark(history))]
    return [_num(r.tx_pps), _num(r.rx_pps), _num(r.tx_Bps), _num(r.rx_Bps), Text(spark(history), style="green")]


class Dashboard(Screen):
    BINDINGS = [
        Binding("s", "sort", "sort"),
        Binding("slash", "filter", "filter"),
        Binding("f", "filter", "filter", show=False),
        Binding("n", "next_node", "next node"),
        Binding("escape", "clear_filter", "clear filter", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        yield _table("peers", [("NODE", "node"), ("STATE", "liveness"), ("UNDERLAY IP", "underlay_ip"),
                               ("SUBNETS", "subnets"), *RATE_COLUMNS, ("LAST RX", "last_rx"),
                               ("TX PKTS", "tx_packets"), ("RX PKTS", "rx_packets"),
                               ("TX BYTES", "tx_bytes"), ("RX BYTES", "rx_bytes")])
        yield _table("endpoints", [("NAME", "name"), ("NETWORK", "network"), ("IP", "ip"), ("STATE", "state"),
                                   *RATE_COLUMNS])
        yield _table("services", [("SERVICE", "service"), ("VIP:PORT", "vip"), ("PUBLISHED", "published"),
                                  ("BACKEND", "backend"), ("NODE", "node"), ("WEIGHT", "weight"),
                                  ("STATE", "state"), ("NEW CONN/S", "cps"), ("PKT/S", "pps"),
                                  ("NEW CONNS", "connections"), ("PKTS", "packets")])
        with Horizontal(id="bottom"):
            yield _table("drops", [("REASON", "reason"), ("PKT/S", "pps"), ("PACKETS", "packets"),
                                   ("BYTES", "bytes"), ("WHAT HAPPENED", "text")])
            yield _table("maps", [("MAP", "name"), ("ENTRIES", "entries"), ("MAX", "max"), ("FILL", "fill")])
        yield Static(id="drift")
        yield Static(id="lints")
        yield Input(placeholder="filter peers and endpoints (enter: keep, escape: clear)", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#peers").border_subtitle = "enter: details"
        self.query_one("#services").border_subtitle = "enter: details"
        self.query_one("#filter").display = False
        self.query_one("#peers").focus()

    # actions
    def action_sort(self) -> None:
        app = self.app
        app.sort = SORTS[(SORTS.index(app.sort) + 1) % len(SORTS)]
        self.show()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.display = False
        self.app.filter = ""
        self.query_one("#peers").focus()
        self.show()

    async def action_next_node(self) -> None:
        await self.app.next_node()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.app.filter = event.value.strip()
        self.show()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if not event.value.strip():
            event.input.display = False
        self.query_one("#peers").focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "peers":
            self.app.push_screen(PeerScreen(event.row_key.value))
        elif event.data_table.id == "services" and event.row_key.value != "none":
            self.app.push_screen(ServiceScreen(event.row_key.value.split("/", 1)[0]))

    # drawing: one method per panel, each from the app's latest snapshot and rates
    def show(self) -> None:
        app: StatusApp = self.app
        self.query_one("#header", Static).update(app.header_text())
        if app.snap is None:
            return
        self._peers(app)
        self._endpoints(app)
        self._services(app)
        self._drops(app)
        self._maps(app)
        self._drift(app)
        self._lints(app)

    @staticmethod
    def _title(app, what: str, shown: int, total: int) -> str:
        sort = "by name" if app.sort == "name" else "by rate (tx+rx pkt/s)"
        return f"{what} {shown}/{total}, sorted {sort}" + (f", filter '{app.filter}'" if app.filter else "")

    def _peers(self, app) -> None:
        snap, rates = app.snap, app.rates
        peers = [p for p in snap["peers"] if matches(p, app.filter, PEER_FIELDS)]
        table = self.query_one("#peers", DataTable)
        table.border_title = self._title(app, "peers", len(peers), len(snap["peers"]))
        if app.prev_known:
            total = Rates(*(sum(getattr(r, f) for r in rates.peers.values())
                            for f in ("tx_pps", "rx_pps", "tx_Bps", "rx_Bps")))
            table.border_subtitle = (f"all peers: tx {human(total.tx_pps)} pkt/s {human(total.tx_Bps, 'B')}/s, "
                                     f"rx {human(total.rx_pps)} pkt/s {human(total.rx_Bps, 'B')}/s"
                                     "  ·  enter: details")
        else:
            table.border_subtitle = "rates after the next refresh  ·  enter: details"
        fill_table(table, [(p["node"], [
            Text(p["node"], style="bold"),
            Text(p.get("liveness", "unknown"), style=LIVENESS_STYLE.get(p.get("liveness"), "")),
            p["underlay_ip"], " ".join(p["subnets"]) or "-",
            *_rate_cells(rates.peers.get(p["node"]), app.peer_history.get(p["node"])),
            Text(ago(p.get("last_rx_ago")), justify="right"),
            _num(p["tx_packets"]), _num(p["rx_packets"]), _num(p["tx_bytes"], "B"), _num(p["rx_bytes"], "B")])
            for p in ordered(peers, "node", rates.peers, app.sort)])

    def _endpoints(self, app) -> None:
        snap, rates = app.snap, app.rates
        eps = [e for e in snap["endpoints"] if matches(e, app.filter, ENDPOINT_FIELDS)]
        table = self.query_one("#endpoints", DataTable)
        table.border_title = self._title(app, "endpoints", len(eps), len(snap["endpoints"]))
        fill_table(table, [(e["name"], [
            Text(e["name"], style="bold"), e["network"], e["ip"],
            Text(e["state"], style=STATE_STYLE.get(e["state"], "")),
            *_rate_cells(rates.endpoints.get(e["name"]), app.endpoint_history.get(e["name"]))])
            for e in ordered(eps, "name", rates.endpoints, app.sort)])

    def _services(self, app) -> None:
        services = app.snap.get("services", [])
        table = self.query_one("#services", DataTable)
        n = sum(len(s["backends"]) for s in services)
        table.border_title = (f"services {len(services)}, backends {n} (new connections and packets counted "
                              "where they started: on this node)")
        rows = []
        for s in services:
            vip = " ".join(f"{s['vip']}:{p}" for p in s["ports"])
            pub = " ".join(p.split(":")[0] + "/" + p.rsplit("/", 1)[1] for p in s["publish"]) or "-"
            if not s["backends"]:
                rows.append((f"{s['name']}/", [Text(s["name"], style="bold"), vip, pub, "-", "-", "",
                                               Text("no backend", style="red"), _num(None), _num(None),
                                               _num(s["connections"]), _num(s["packets"])]))
            for i, b in enumerate(s["backends"]):
                key = f"{s['name']}/{b['endpoint']}"
                cps, pps = app.service_rates.get(key, (None, None))
                rows.append((key, [Text(s["name"], style="bold") if i == 0 else "", vip if i == 0 else "",
                                   pub if i == 0 else "", f"{b['endpoint']} ({b['ip']})", b["node"] or "-",
                                   _int(b["weight"]), Text(b["state"], style=BACKEND_STYLE.get(b["state"], "")),
                                   _num(cps), _num(pps), _num(b["connections"]), _num(b["packets"])]))
        fill_table(table, rows or [("none", ["none", "", "", "", "", "", "", "", "", "", ""])])

    def _drops(self, app) -> None:
        drops, rates = app.snap["drops"], app.rates.drops
        table = self.query_one("#drops", DataTable)
        table.border_title = f"drops ({sum(d['packets'] for d in drops)} packets since the maps were pinned)"
        fill_table(table, [(d["reason"], [
            Text(d["reason"], style="bold red" if rates.get(d["reason"]) else "bold"),
            _num(rates.get(d["reason"]) if app.prev_known else None),
            _num(d["packets"]), _num(d["bytes"], "B"), d["text"]]) for d in drops]
            or [("none", ["none", "", "", "", "no packet dropped"])])

    def _maps(self, app) -> None:
        arrays = set(app.snap.get("array_maps", ()))
        rows, hot = [], 0
        for m in app.snap["maps"]:
            name, entries, most = m["name"], m["entries"], m["max_entries"]
            if name in arrays:
                rows.append((name, [name, _int(entries), _int(most), Text("array: always full", style="dim")]))
                continue
            high = bool(most) and entries / most >= PRESSURE
            hot += high
            style = "bold white on red" if high else ""
            rows.append((name, [Text(name, style=style), _int(entries, style), _int(most, style),
                                Text(fill_bar(entries, most) + (" high" if high else ""), style=style or "green")]))
        table = self.query_one("#maps", DataTable)
        table.border_title = f"map pressure ({hot} at {PRESSURE:.0%} or more)" if hot else "map pressure"
        fill_table(table, rows)

    def _drift(self, app) -> None:
        drift = app.snap["drift"]
        box = self.query_one("#drift", Static)
        box.set_class(bool(drift), "bad")
        box.border_title = f"drift: {len(drift)}"
        if not drift:
            box.update(Text("none: the kernel holds exactly what the store wants", style="green"))
            return
        lines = [f"{len(drift)} entries differ between the store and the kernel (the agent repairs them when it runs):"]
        lines += [f"  {d['kind']:10} {d['map']:18} {d['key']}" for d in drift[:8]]
        if len(drift) > 8:
            lines.append(f"  … and {len(drift) - 8} more (xoverlay status --json)")
        box.update(Text("\n".join(lines), style="red"))


    def _lints(self, app) -> None:
        lints = app.snap.get("lints", [])
        box = self.query_one("#lints", Static)
        worst = lints[0]["severity"] if lints else None      # errors come first
        box.set_class(worst == "error", "bad")
        box.set_class(worst == "warning", "warn")
        box.border_title = f"lints: {len(lints)}"
        if not lints:
            box.update(Text("none: nothing known to break or slow this node", style="green"))
            return
        style = {"error": "bold red", "warning": "yellow", "info": "cyan"}
        text = Text()
        for i, x in enumerate(lints[:6]):
            if i:
                text.append("\n")
            text.append(f"{x['severity']:7} ", style=style[x["severity"]]).append(f"{x['id']} ", style="bold")
            text.append(f"({x['subject']}) {x['message']}  ").append(f"fix: {x['fix']}", style="dim")
        if len(lints) > 6:
            text.append(f"\n… and {len(lints) - 6} more (xoverlay status --json)")
        box.update(text)


class PeerScreen(Screen):
    """One peer seen from the node: its subnets, the endpoints it hosts, its counters."""
    BINDINGS = [Binding("escape", "app.pop_screen", "back"), Binding("backspace", "app.pop_screen", "back",
                                                                     show=False)]

    def __init__(self, peer: str):
        super().__init__()
        self.peer = peer

    def compose(self) -> ComposeResult:
        yield Static(id="peer-header")
        yield Static(id="peer-counters")
        yield Sparkline([], id="peer-spark")
        yield _table("peer-endpoints", [("NAME", "name"), ("NETWORK", "network"), ("IP", "ip"),
                                         ("STATE", "state")])
        yield Footer()

    def on_mount(self) -> None:
        self.show()

    def show(self) -> None:
        app: StatusApp = self.app
        snap = app.snap or {"peers": [], "node": {"name": app.node}}
        peer = next((p for p in snap["peers"] if p["node"] == self.peer), None)
        head = self.query_one("#peer-header", Static)
        head.border_title = f"peer {self.peer}"
        if peer is None:
            head.update(Text(f"{self.peer} is no longer a peer of {snap['node']['name']} (escape: back)",
                             style="bold red"))
            return
        head.update(Text.assemble(("peer ", ""), (peer["node"], "bold"), f" seen from {snap['node']['name']}",
                                  "   underlay ", (str(peer["underlay_ip"]), "bold"),
                                  "   subnets ", (" ".join(peer["subnets"]) or "-", "bold"),
                                  "   escape: back"))
        r = app.rates.peers.get(self.peer)
        history = app.peer_history.get(self.peer)

        def line(direction, packets, nbytes, pps, Bps):
            return (f"{direction}  {packets:>14,} packets  {nbytes:>16,} bytes   "
                    f"now {human(pps):>7} pkt/s  {human(Bps, 'B'):>8}/s")
        counters = [line("tx", peer["tx_packets"], peer["tx_bytes"], r.tx_pps if r else None, r.tx_Bps if r else None),
                    line("rx", peer["rx_packets"], peer["rx_bytes"], r.rx_pps if r else None, r.rx_Bps if r else None),
                    f"tx+rx packets/s over the last {HISTORY_SAMPLES}s, max {human(max(history, default=0))}:"]
        self.query_one("#peer-counters", Static).update("\n".join(counters))
        # Left-padded with zeros so the time axis is always the last HISTORY_SAMPLES seconds,
        # and one more leading 0 so the graph's floor is 0 (Sparkline scales min..max: a
        # steady 10 pkt/s with one 9.8 would otherwise look like a collapse).
        self.query_one("#peer-spark", Sparkline).data = [0.0] * (HISTORY_SAMPLES + 1 - len(history)) + history
        eps = snap.get("peer_endpoints", {}).get(self.peer)
        table = self.query_one("#peer-endpoints", DataTable)
        table.border_title = (f"endpoints on {self.peer}: {len(eps)}" if eps is not None
                              else "endpoints: not given by this data source")
        fill_table(table, [(e["name"], [Text(e["name"], style="bold"), e["network"], e["ip"], e["state"]])
                           for e in eps or []])


class ServiceScreen(Screen):
    """One service seen from the node: how it is reached, and each backend's share of
    the new connections and packets that started here."""
    BINDINGS = [Binding("escape", "app.pop_screen", "back"), Binding("backspace", "app.pop_screen", "back",
                                                                     show=False)]

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def compose(self) -> ComposeResult:
        yield Static(id="service-header")
        yield Static(id="service-counters")
        yield Sparkline([], id="service-spark")
        yield _table("service-backends", [("BACKEND", "backend"), ("ADDRESS", "address"), ("NODE", "node"),
                                          ("WEIGHT", "weight"), ("STATE", "state"), ("NEW CONN/S", "cps"),
                                          ("PKT/S", "pps"), ("SHARE OF CONNS", "share"),
                                          ("NEW CONNS", "connections"), ("PKTS", "packets")])
        yield Footer()

    def on_mount(self) -> None:
        self.show()

    def show(self) -> None:
        app: StatusApp = self.app
        snap = app.snap or {"services": [], "node": {"name": app.node}}
        svc = next((s for s in snap.get("services", []) if s["name"] == self.service), None)
        head = self.query_one("#service-header", Static)
        head.border_title = f"service {self.service}"
        if svc is None:
            head.update(Text(f"{self.service} is no longer a service (escape: back)", style="bold red"))
            return
        published = " ".join(svc["publish"]) or "none"
        head.update(Text.assemble(("service ", ""), (svc["name"], "bold"), f" seen from {snap['node']['name']}",
                                  "   network ", (svc["network"], "bold"),
                                  "   VIP ", (" ".join(f"{svc['vip']}:{p}" for p in svc["ports"]), "bold"),
                                  "   published ", (published, "bold"),
                                  "   affinity ", (svc["affinity"], "bold"), "   escape: back"))
        rates = [app.service_rates.get(f"{svc['name']}/{b['endpoint']}") for b in svc["backends"]]
        known = [r for r in rates if r is not None]
        cps = sum(r[0] for r in known) if known else None
        pps = sum(r[1] for r in known) if known else None
        history = app.service_history.get(self.service)
        self.query_one("#service-counters", Static).update(
            f"{svc['connections']:,} new connections, {svc['packets']:,} packets started on this node   "
            f"now {human(cps)} conn/s, {human(pps)} pkt/s\n"
            f"new connections/s over the last {HISTORY_SAMPLES}s, max {human(max(history, default=0))}:")
        self.query_one("#service-spark", Sparkline).data = [0.0] * (HISTORY_SAMPLES + 1 - len(history)) + history
        table = self.query_one("#service-backends", DataTable)
        table.border_title = f"backends {len(svc['backends'])}"
        total = sum(b["connections"] for b in svc["backends"])
        fill_table(table, [(b["endpoint"], [
            Text(b["endpoint"], style="bold"), f"{b['ip']}:{b['port']}" if b["port"] else b["ip"],
            b["node"] or "-", _int(b["weight"]), Text(b["state"], style=BACKEND_STYLE.get(b["state"], "")),
            _num(r[0] if r else None), _num(r[1] if r else None),
            Text(f"{100 * b['connections'] / total:.0f}%" if total else "-", justify="right"),
            _num(b["connections"]), _num(b["packets"])])
            for b, r in zip(svc["backends"], rates)])


DETAIL_SCREENS = (PeerScreen, ServiceScreen)


# --- the app ------------------------------------------------------------------------

class StatusApp(App):
    TITLE = "xoverlay status"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #header { height: 3; padding: 0 1; background: $boost; }
    DataTable { height: auto; border: round $primary; }
    DataTable:focus { border: round $accent; }
    #peers { max-height: 35%; }
    #endpoints { max-height: 35%; }
    #services { max-height: 25%; }
    #bottom { height: auto; max-height: 30%; }
    #drops { width: 3fr; }
    #maps { width: 2fr; }
    #drift { height: auto; max-height: 11; border: round $success; padding: 0 1; }
    #drift.bad { border: round $error; }
    #lints { height: auto; max-height: 9; border: round $success; padding: 0 1; }
    #lints.bad { border: round $error; }
    #lints.warn { border: round $warning; }
    #filter { dock: bottom; margin-bottom: 1; }
    #peer-header, #peer-counters { height: auto; padding: 0 1; }
    #peer-header { border: round $primary; }
    #peer-spark { height: 5; margin: 0 1; }
    #service-header, #service-counters { height: auto; padding: 0 1; }
    #service-header { border: round $primary; }
    #service-spark { height: 5; margin: 0 1; }
    """
    BINDINGS = [Binding("q", "quit", "quit"), Binding("p", "pause", "pause/resume")]

    def __init__(self, snapshot: Callable[[str], dict], node: str,
                 nodes: Callable[[], list[str]] | None = None, *, interval: float = REFRESH_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._snapshot = snapshot
        self._list_nodes = nodes or (lambda: [self.node])
        self.node = node
        self.interval = interval
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xo-status")
        self._busy = False
        self.paused = False
        self.sort = "name"
        self.filter = ""
        self._reset()

    def _reset(self) -> None:
        self.snap: dict | None = None
        self.error: str | None = None
        self.refreshed: str | None = None
        self.rates = SnapshotRates({}, {}, {})
        self.service_rates: dict[str, tuple[float, float]] = {}
        self.prev_known = False             # rates need two snapshots
        self._prev_t = 0.0
        self.peer_history = History(HISTORY_SAMPLES)
        self.endpoint_history = History(HISTORY_SAMPLES)
        self.service_history = History(HISTORY_SAMPLES)

    def get_default_screen(self) -> Screen:
        self.dashboard = Dashboard()
        return self.dashboard

    def on_mount(self) -> None:
        self.run_worker(self.refresh_now(), group="refresh")
        self.set_interval(self.interval, self._tick)

    def on_unmount(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _tick(self) -> None:
        if not self.paused and not self._busy:
            self.run_worker(self._timed_refresh(), group="refresh")

    async def _timed_refresh(self) -> None:
        if not self.paused:         # p may have been pressed since the tick
            await self.refresh_now()

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def refresh_now(self) -> None:
        """Take a snapshot of the current node and redraw (one at a time; if the node
        changes while a snapshot is being taken, that snapshot is thrown away)."""
        if self._busy:
            return
        self._busy = True
        try:
            while True:
                node, t = self.node, self._clock()
                try:
                    snap, error = await self._call(self._snapshot, node), None
                except Exception as e:          # show it, keep the last good data
                    snap, error = None, f"{type(e).__name__}: {e}"
                if node == self.node:
                    break
            if snap is not None:
                self._ingest(snap, t)
            self.error = error
            self.redraw()
        finally:
            self._busy = False

    def _ingest(self, snap: dict, t: float) -> None:
        if self.snap is not None:
            self.rates = snapshot_rates(self.snap, snap, t - self._prev_t)
            self.service_rates = service_rates(self.snap, snap, t - self._prev_t)
            self.peer_history.push({k: r.pps for k, r in self.rates.peers.items()})
            self.endpoint_history.push({k: r.pps for k, r in self.rates.endpoints.items()})
            per_service: dict[str, float] = {}
            for key, (cps, _) in self.service_rates.items():
                name = key.split("/", 1)[0]
                per_service[name] = per_service.get(name, 0.0) + cps
            self.service_history.push(per_service)
            self.prev_known = True
        self.snap, self._prev_t = snap, t
        self.refreshed = time.strftime("%H:%M:%S")

    def redraw(self) -> None:
        if not self.is_running:     # a refresh that lands while the app is closing
            return
        self.dashboard.show()
        if isinstance(self.screen, DETAIL_SCREENS):
            self.screen.show()

    def header_text(self) -> Text:
        t = Text()
        snap = self.snap
        if snap is None:
            t.append(f"node {self.node}: ", style="bold")
            t.append(self.error or "reading…", style="red" if self.error else "")
            return t
        n = snap["node"]
        t.append("node ", style="dim").append(n["name"], style="bold")
        t.append("  underlay ", style="dim").append(f"{n.get('underlay_device') or '?'} ", style="bold")
        t.append(f"{n['underlay_ip']}:{n['vxlan_port']}", style="bold")
        if n["agent_alive"]:
            t.append("  agent ", style="dim").append(f"alive, pid {n['agent_pid']}", style="green")
        else:
            t.append("  agent ", style="dim").append("not running (the data path keeps forwarding)", style="yellow")
        if not n["pinned"]:
            t.append("  build ", style="dim").append("no pinned programs", style="red")
        elif n["build_current"]:
            t.append("  build ", style="dim").append(f"{n['build']} (current)", style="green")
        else:
            t.append("  build ", style="dim").append(f"{n['build']} (older than this checkout)", style="yellow")
        mon = snap.get("monitor")
        if mon and mon["state"] == "running":
            t.append("  monitor ", style="dim").append(f"running, pid {mon['pid']}", style="green")
        elif mon and mon["state"] == "stale":
            t.append("  monitor ", style="dim").append(f"flag stale (pid {mon['pid']} gone)", style="yellow")
        store = snap.get("store")
        if store is not None:
            t.append("  store ", style="dim")
            t.append("reachable" if store["reachable"] else f"UNREACHABLE: {store['error']}",
                     style="green" if store["reachable"] else "bold red")
            live = n.get("liveness", "unknown")
            t.append("  registration ", style="dim").append(live, style=LIVENESS_STYLE.get(live, ""))
        if n["pinned"]:
            from xoverlay.ui.status import program_summary
            t.append("\nprograms ", style="dim")
            for i, row in enumerate(n.get("programs", [])):
                text, ok = program_summary(row)
                t.append(" · " if i else "", style="dim").append(text, style="" if ok else "bold red")
        t.append("\n")
        if self.paused:
            t.append(" PAUSED (p: resume) ", style="bold black on yellow").append("  ")
        t.append(f"refreshed {self.refreshed}", style="dim")
        t.append(f"  every {self.interval:g}s", style="dim")
        if self.error:
            t.append(f"  last refresh failed: {self.error}", style="bold red")

        t.append(f"  sort: {self.sort}", style="dim")
        if self.filter:
            t.append("  filter: ", style="dim").append(self.filter, style="bold")
        return t

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.redraw()
        if not self.paused:
            self._tick()

    async def next_node(self) -> None:
        try:
            nodes = sorted(await self._call(self._list_nodes))
        except Exception as e:
            self.notify(f"cannot list nodes: {e}", severity="error")
            return
        if not nodes or nodes == [self.node]:
            self.notify("no other node in the store")
            return
        nxt = nodes[(nodes.index(self.node) + 1) % len(nodes)] if self.node in nodes else nodes[0]
        while isinstance(self.screen, DETAIL_SCREENS):
            self.pop_screen()
        self.node = nxt
        self._reset()
        self.redraw()
        await self.refresh_now()    # even when paused: show the new node once
