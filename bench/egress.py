#!/usr/bin/env python3
"""Egress benchmark: three sources on one node sending to the same outside host (the
lab's outside client), measured in the same run, interleaved, on a running namespace
lab (`xoverlay lab up --nodes 2`).

  node      the node itself: its own traffic, routed, no NAT (the ceiling)
  endpoint  an endpoint of that node through xoverlay's egress: endpoint.c hands the
            packet to xo-gw, the node's stack forwards it and the agent's nftables table
            masquerades it (this design)
  docker    Docker's way, built by this bench in the same node's netns: a Linux bridge
            (xbench-br, 172.31.0.1/24) with a veth to a container netns of the bench's
            own (xbench-egress-docker, 172.31.0.2, default route via the bridge),
            forwarding on for the bridge, and an nftables table of the bench's own
            (`ip xbench_egress`) masquerading that subnet out of anything but the bridge,
            as Docker's `POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE`.
            Docker's filter chains (DOCKER-USER, the isolation chains, the FORWARD
            accepts) are left out: a real Docker host walks a few more rules per
            packet, so this is its best case.

    bench/egress.py --state STATE [--rounds N] [--seconds S] [--out DIR|FILE.json]

Per round, the paths in an order that rotates from round to round:
  - the 64-byte UDP packet rate of the three in the same seconds (bench/pairrate.py: one
    sender alternating between them in ~10 ms batches, a counter in the client);
  - one TCP stream each (iperf3), in turn;
  - short TCP connections per second (connect, one byte back, close with a reset) of the
    three in the same seconds (bench/connrate.py --netns). The sources differ and the
    server is one, so each client process enters each source's netns for that source's
    batches of 40 connections (one setns per batch, the same for every path) instead of
    a connect run per netns in turn, which would measure the paths seconds apart on a
    CPU whose speed swings between seconds. A path's rate: its median cycle's, all
    client processes together; the test's total beside it, where one connection that
    waits 1 s for its SYN to be sent again costs the path a second of its ~1.5 s.
Both interleaved tests list the round's first path twice: the second against the first
is the method's own noise (the control). Ratios per round: endpoint/node, docker/node
and endpoint/docker; for packets and connections the median over the cycles of batches
(stats.cycle_ratio), for TCP the two streams'; reported as min/median/max over the
rounds. The bars: the endpoint's packet rate and TCP at least 95% of the node's. With
each TCP stream, where its packets went missing: its retransmits, and the packets
dropped meanwhile on transmit by the node's eth1 (a veth: its peer's queue full) and in
a CPU's input backlog; with each connection test, the node's conntrack counters of
refused packets and resolved clashes; the node's data path drop counters over the run.

The lab's agents are stopped (SIGSTOP) while measuring, unless --agents-running: the
data path forwards without them, and their periodic resync would take its CPU time from
whichever path runs.

One benchmark at a time (shell.Lock). Everything this creates, the container netns, the
bridge and veth in the node's netns and the nft table, is removed at the end whatever
happens (an error, Ctrl-C, SIGTERM), and removed at the start if a killed run left it.
The container netns has shell.PREFIX's name, never a lab's; the node's devices are not
named `xo...`, which the agent takes for its own; `lab down` removes them with the node.

Output: tables on stdout (Markdown), bench/results/egress.json and egress.png
(--out FILE.json: that file, the chart beside it).
Run as root with the project's venv python:  bench/egress.py --state STATE [--quick]
"""
from __future__ import annotations

import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from bench.lib.venv import ensure_venv  # noqa: E402

ensure_venv(__file__)

import argparse  # noqa: E402
import datetime  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from bench.lib import runner  # noqa: E402
from bench.lib.shell import (  # noqa: E402
    PREFIX,
    BenchError,
    in_ns,
    ip_batch,
    log,
    machine,
    ns_add,
    ns_path,
    removed_after,
    run_locked,
    sh,
)
from bench.lib.stats import cycle_ratio, summary, write_json  # noqa: E402
from bench.lib.topologies import agent_pids, drops_by_reason, signal_pids  # noqa: E402
from bench.lib.traffic import (  # noqa: E402
    CONN_PORT,
    RECEIVER_CPU,
    SENDER_CPU,
    TCP_PORT,
    UDP_PAYLOAD,
    ConnServers,
    Target,
    conn_rate,
    interleaved_rate,
)

BENCH = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(BENCH, "results")
PATHS = {"node": "the node itself (plain routing, the ceiling)",
         "endpoint": "an endpoint, xoverlay egress (xo-gw, the stack, masquerade)",
         "docker": "Docker's way (a bridge, nftables masquerade)"}
RATIOS = [("endpoint", "node"), ("docker", "node"), ("endpoint", "docker")]
METRICS = [("pair_kpps", "UDP 64 B kpps (interleaved)", "{:.1f}"), ("tcp_gbps", "TCP Gbit/s", "{:.2f}"),
           ("conn_cycle_rate", "connections/s (interleaved, median cycle)", "{:.0f}")]
# The ratio of each metric: the interleaved rates' per-cycle ratio, TCP's per round.
RATIO_OF = {"pair_kpps": "pair", "tcp_gbps": "tcp", "conn_cycle_rate": "conn"}
EXTRA = ["tcp_retransmits", "tcp_backlog_drops", "tcp_out_drops", "pair_loss_pct", "conn_rate", "conn_errors"]
UNDERLAY_DEV = "eth1"                    # the lab node's way out, every path's
BAR = 0.95
QUICK = (1, 2.0)            # rounds, seconds

# Docker's way. Nothing here may start with "xo": the agent takes such devices for its own.
DOCKER_NETNS = f"{PREFIX}egress-docker"
DOCKER_BRIDGE = "xbench-br"              # in the node's netns
DOCKER_VETH = "xbench-v0"                # the node's end; the container's is eth0
DOCKER_NET = ipaddress.IPv4Network("172.31.0.0/24")
DOCKER_GW, DOCKER_IP = str(DOCKER_NET[1]), str(DOCKER_NET[2])
DOCKER_TABLE = "xbench_egress"


class DockerWay:
    """A container as Docker attaches it, in the node's netns (`node_ns`, a name in
    /run/netns): up(), and down(), which removes whatever of it there is."""

    def __init__(self, node_ns: str):
        self.node_ns, self.node = node_ns, ns_path(node_ns)
        self.client = ns_path(DOCKER_NETNS)

    @staticmethod
    def ruleset() -> str:
        return (f"table ip {DOCKER_TABLE} {{\n"
                "  chain postrouting {\n"
                "    type nat hook postrouting priority srcnat; policy accept;\n"
                f'    ip saddr {DOCKER_NET} oifname != "{DOCKER_BRIDGE}" masquerade\n'
                "  }\n}\n")

    def up(self) -> None:
        ns_add(DOCKER_NETNS)
        ip_batch(self.node_ns, [f"link add {DOCKER_BRIDGE} type bridge",
                                f"addr add {DOCKER_GW}/{DOCKER_NET.prefixlen} dev {DOCKER_BRIDGE}",
                                f"link set {DOCKER_BRIDGE} up",
                                f"link add {DOCKER_VETH} type veth peer name eth0 netns {DOCKER_NETNS}",
                                f"link set {DOCKER_VETH} master {DOCKER_BRIDGE} up"])
        ip_batch(DOCKER_NETNS, [f"addr add {DOCKER_IP}/{DOCKER_NET.prefixlen} dev eth0", "link set eth0 up",
                                f"route add default via {DOCKER_GW}"])
        # Docker turns on net.ipv4.ip_forward (every device); forwarding is decided by the
        # device a packet came in on, so the bridge's alone is the same for this path and
        # leaves the lab's other devices as they were.
        sh(*in_ns(self.node, "sysctl", "-qw", f"net.ipv4.conf.{DOCKER_BRIDGE}.forwarding=1"))
        sh(*in_ns(self.node, "nft", "-f", "-"), input=self.ruleset())

    def info(self) -> dict:
        br_nf = sh(*in_ns(self.node, "cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"), check=False).strip()
        return {"container_netns": DOCKER_NETNS, "container_ip": DOCKER_IP, "bridge": f"{DOCKER_BRIDGE} {DOCKER_GW}",
                "nft": self.ruleset(), "node_bridge_nf_call_iptables": br_nf == "1"}

    def down(self) -> list[str]:
        """Our netns, devices and table, where they are: what was there."""
        gone = []
        if os.path.exists(self.client):
            sh("ip", "netns", "delete", DOCKER_NETNS, check=False)     # eth0 and its peer with it
            gone.append(f"netns {DOCKER_NETNS}")
        if not os.path.exists(self.node):
            return gone
        for dev in (DOCKER_VETH, DOCKER_BRIDGE):
            if subprocess.run(["ip", "-n", self.node_ns, "link", "show", "dev", dev], capture_output=True,
                              check=False).returncode == 0:
                sh("ip", "-n", self.node_ns, "link", "delete", dev, check=False)
                gone.append(f"{self.node_ns}: link {dev}")
        if subprocess.run(in_ns(self.node, "nft", "list", "table", "ip", DOCKER_TABLE), capture_output=True,
                          check=False).returncode == 0:
            sh(*in_ns(self.node, "nft", "delete", "table", "ip", DOCKER_TABLE), check=False)
            gone.append(f"{self.node_ns}: nft table ip {DOCKER_TABLE}")
        return gone


class ClientServers(ConnServers):
    """In the outside client, for the whole run: iperf3 for TCP on the receiver's CPU
    (the sender has the other) and bench/connrate.py serve."""

    def start(self) -> None:
        self._start([["taskset", "-c", RECEIVER_CPU, "iperf3", "-s", "-p", str(TCP_PORT)],
                     [sys.executable, os.path.join(BENCH, "connrate.py"), "serve", "--port", str(CONN_PORT),
                      "--workers", str(self.workers)]], {TCP_PORT, CONN_PORT}, 10.0)


# --- measuring --------------------------------------------------------------------------

def softnet_dropped() -> int:
    """Packets this machine's CPUs dropped because their input backlog was full
    (/proc/net/softnet_stat, every netns): where a veth or a redirect to a device's
    ingress queues a packet (netdev_max_backlog)."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f)


def out_dropped(node: str) -> int:
    """Packets the node's underlay device dropped on transmit (on a veth: the peer's
    queue was full)."""
    link = json.loads(sh(*in_ns(node, "ip", "-j", "-s", "link", "show", "dev", UNDERLAY_DEV)))
    return link[0]["stats64"]["tx"]["dropped"]


CT_COUNTERS = ("clashres", "invalid", "insert_failed", "drop", "early_drop")


def conntrack_stats(node: str) -> dict[str, int]:
    """The node netns's conntrack counters that say a packet was refused or a clash
    resolved (/proc/net/stat/nf_conntrack, summed over the CPUs)."""
    lines = sh(*in_ns(node, "cat", "/proc/net/stat/nf_conntrack")).split("\n")
    names = lines[0].split()
    rows = [[int(v, 16) for v in line.split()] for line in lines[1:] if line.strip()]
    return {n: sum(r[names.index(n)] for r in rows) for n in CT_COUNTERS if n in names}


def tcp(t: Target, secs: float, node: str) -> dict:
    """One iperf3 TCP stream from t's netns, on the sender's CPU; its retransmits, and
    the packets dropped meanwhile in a CPU's input backlog and on the way out of the
    node (`node`: its netns path)."""
    cmd = in_ns(t.client, "taskset", "-c", SENDER_CPU, "iperf3", "-c", t.server_ip, "-p", str(TCP_PORT),
                "-t", str(secs), "-J")
    last = ""
    for _ in range(3):
        dropped, out = softnet_dropped(), out_dropped(node)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30, check=False)
        try:
            end = json.loads(r.stdout)["end"]
            return {"tcp_gbps": end["sum_received"]["bits_per_second"] / 1e9,
                    "tcp_retransmits": end["sum_sent"].get("retransmits", 0),
                    "tcp_backlog_drops": softnet_dropped() - dropped,
                    "tcp_out_drops": out_dropped(node) - out}
        except (ValueError, KeyError):
            last = (r.stderr or r.stdout).strip()[-300:]
            time.sleep(1)          # "the server is busy" right after the previous test
    raise BenchError(f"{t.key}: iperf3 TCP failed: {last}")


def packets(ts: list[Target], secs: float) -> tuple[list[dict], float | None]:
    """The interleaved packet rate with its control. The counter tells sources apart by
    source port, and all three leave with the node's address: a masqueraded flow whose
    port a recent flow of another source holds (conntrack keeps UDP flows 30 s) gets
    another port, and its packets are counted under it. That shows as most of a path's
    packets lost, and is measured again, once."""
    for attempt in (1, 2):
        got, control = runner.with_control(lambda t: interleaved_rate(t, secs), ts, "pair")
        lost = [t.key for t, row in zip(ts, got) if row["pair_loss_pct"] > 50]
        if not lost:
            return got, control
        log(f"  {', '.join(lost)}: most packets not counted as theirs" + ("; again" if attempt == 1 else ""))
    raise BenchError(f"{', '.join(lost)}: more than half the packets did not arrive, twice (egress broken?)")


def measure(targets: dict[str, Target], args) -> tuple[dict, list]:
    runs = {k: [] for k in targets}
    rounds = []
    for r in range(args.rounds):
        order = runner.rotated(list(targets), r)
        ts = [targets[k] for k in order]
        log(f"round {r + 1}/{args.rounds}: {', '.join(order)}")
        rows = {k: {"round": r + 1} for k in order}
        got, pair_control = packets(ts, args.seconds)
        for k, row in zip(order, got):
            rows[k].update(row)
        for k in order:
            rows[k].update(tcp(targets[k], args.seconds, targets["node"].client))
        ct = conntrack_stats(targets["node"].client)
        got, conn_control = runner.with_control(lambda t: conn_rate(t, args.seconds, args.conn_procs), ts, "conn")
        ct = {k: v - ct[k] for k, v in conntrack_stats(targets["node"].client).items()}
        for k, row in zip(order, got):
            # One connection that waits 1 s for its SYN again costs its path a second of
            # its ~1.5 s in the test's total: the median cycle's rate (the client
            # processes run at once) shrugs it off, as the ratios do.
            rows[k].update(row, conn_cycle_rate=args.conn_procs * statistics.median(row["conn_cycle_rates"]))
        ratios = {}
        for a, b in RATIOS:
            ratios[f"{a}/{b}"] = {
                "pair": cycle_ratio(rows[a]["pair_cycle_rates"], rows[b]["pair_cycle_rates"]),
                "tcp": rows[a]["tcp_gbps"] / rows[b]["tcp_gbps"] if rows[b]["tcp_gbps"] else None,
                "conn": cycle_ratio(rows[a]["conn_cycle_rates"], rows[b]["conn_cycle_rates"])}
        rounds.append({"round": r + 1, "order": order, "pair_control": pair_control, "conn_control": conn_control,
                       "conn_conntrack": ct, "ratios": ratios})
        for k in targets:
            runs[k].append(rows[k])
            log(f"  {k:9s} {rows[k]['pair_kpps']:6.1f} kpps  {rows[k]['tcp_gbps']:5.2f} Gbit/s  "
                f"{rows[k]['conn_cycle_rate']:6.0f} conn/s (test's total {rows[k]['conn_rate']:.0f}, "
                f"{rows[k]['conn_errors']} failed)")
        log("  " + "  ".join(f"{n} " + "/".join(_f3(v[w]) for w in ("pair", "tcp", "conn")) for n, v in ratios.items())
            + f"  (packets/TCP/connections; control {_f3(pair_control)}/-/{_f3(conn_control)})")
        log(f"  the node's conntrack during the connections: {ct}")
    return runs, rounds


def _f3(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


# --- results ----------------------------------------------------------------------------

def summarize(res: dict, runs: dict, rounds: list) -> None:
    for k, label in PATHS.items():
        res["paths"][k] = {"label": label, "runs": runs[k],
                           "summary": {m: summary([r.get(m) for r in runs[k]])
                                       for m in [m for m, *_ in METRICS] + EXTRA}}
    res["rounds"] = rounds
    res["ratios"] = {f"{a}/{b}": {what: summary([r["ratios"][f"{a}/{b}"][what] for r in rounds])
                                  for what in ("pair", "tcp", "conn")} for a, b in RATIOS}
    res["controls"] = {what: summary([r[f"{what}_control"] for r in rounds]) for what in ("pair", "conn")}
    bars = runner.Bars()
    ep = res["ratios"]["endpoint/node"]
    for what, text in (("pair", "packet rate (64 B UDP, interleaved)"), ("tcp", "TCP (one stream)")):
        s = ep[what]
        bars.add(f"endpoint egress: {text} >= 95% of the node's own", s["median"], BAR, s["median"] >= BAR,
                 detail=f"rounds {s['min']:.3f}–{s['max']:.3f}")
    res["bars"] = bars


def report(res: dict) -> str:
    cfg, m = res["config"], res["machine"]
    lines = [f"## Egress: median (min–max) of {cfg['rounds']} rounds, {cfg['seconds']:g} s per test",
             (f"{res['date']}, kernel {m['kernel']}, {m['cpus']} CPUs ({m['cpu_model']}); to the outside client "
              f"{res['lab']['client']}; UDP {UDP_PAYLOAD}-byte payloads"), "",
             "| path | " + " | ".join(t for _, t, _ in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for p in res["paths"].values():
        lines.append(f"| {p['label']} | " + " | ".join(runner.cell(f, p["summary"][k]) for k, _, f in METRICS) + " |")
    lines += ["", (f"| path | TCP retransmits | during TCP: dropped by the node's {UNDERLAY_DEV} on transmit | "
                   "in a CPU's backlog | UDP loss % | connections/s, the test's total | connections that "
                   "failed |"), "|---|---|---|---|---|---|---|"]
    for p in res["paths"].values():
        lines.append(f"| {p['label']} | " + " | ".join(runner.cell(f, p["summary"][k]) for k, f in (
            ("tcp_retransmits", "{:.0f}"), ("tcp_out_drops", "{:.0f}"), ("tcp_backlog_drops", "{:.0f}"),
            ("pair_loss_pct", "{:.2f}"), ("conn_rate", "{:.0f}"), ("conn_errors", "{:.0f}"))) + " |")
    lines += ["", "| ratio, per round | packet rate | TCP | connections/s |", "|---|---|---|---|"]
    for name, r in res["ratios"].items():
        lines.append(f"| {name} | " + " | ".join(runner.cell("{:.3f}", r[w]) for w in ("pair", "tcp", "conn")) + " |")
    lines += [""] + runner.bar_table(res["bars"])
    c = res["controls"]
    lines.append("\nInterleaved, a path against itself (the method's noise): "
                 f"packets {runner.cell('{:.3f}', c['pair'])}, connections {runner.cell('{:.3f}', c['conn'])}.")
    if res["lab"].get("drop_deltas"):
        lines.append(f"\nThe node's data path dropped during the run: {res['lab']['drop_deltas']}")
    return "\n".join(lines)


def chart(res: dict, path: str) -> None:
    keys = list(res["paths"])
    colors = {"node": "#999999", "endpoint": "#55a868", "docker": "#4c72b0"}
    short = {"node": "node\nitself", "endpoint": "endpoint\n(xoverlay)", "docker": "Docker's\nway"}
    with runner.figure(path, res, "egress", "bars = min–max, dots = rounds", len(METRICS) + 1,
                       (3.4, 4.2)) as (_fig, axes):
        for ax, (metric, title, _) in zip(axes, METRICS):
            for i, k in enumerate(keys):
                s = res["paths"][k]["summary"][metric]
                ax.bar(i, s["median"], color=colors[k], yerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]],
                       capsize=4)
                ax.scatter([i] * len(res["paths"][k]["runs"]), [r[metric] for r in res["paths"][k]["runs"]],
                           color="black", s=8, zorder=3)
            ax.set_xticks(range(len(keys)), [short[k] for k in keys], fontsize=8)
            ax.set_title(title, fontsize=9)
        ax = axes[-1]
        for j, name in enumerate(("endpoint/node", "docker/node")):
            for i, (metric, *_) in enumerate(METRICS):
                s = res["ratios"][name][RATIO_OF[metric]]
                ax.bar(i + (j - 0.5) * 0.38, s["median"], width=0.36, color=colors[name.split("/")[0]],
                       yerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]], capsize=3,
                       label=name if i == 0 else None)
        ax.axhline(BAR, color="#c44e52", linestyle="--", linewidth=1, label="the bar, 95%")
        ax.axhline(1.0, color="#999999", linewidth=0.8)
        ax.set_xticks(range(len(METRICS)), ["packets", "TCP", "connections"], fontsize=8)
        ax.set_ylim(0, 1.35)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
        ax.set_title("ratio to the node itself, per round", fontsize=9)


def out_files(out: str) -> tuple[str, str]:
    if out.endswith(".json"):
        return out, out[:-len(".json")] + ".png"
    return os.path.join(out, "egress.json"), os.path.join(out, "egress.png")


# --- main -------------------------------------------------------------------------------

def parse_args():
    p = argparse.ArgumentParser(prog="egress.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", required=True, help="the running lab's --state")
    p.add_argument("--rounds", type=int, default=None, help="rounds, every path once per round (default 7)")
    p.add_argument("--seconds", type=float, default=None, help="length of each test (default 3)")
    p.add_argument("--conn-procs", type=int, default=2, help="connrate client processes (default 2)")
    p.add_argument("--agents-running", action="store_true",
                   help="keep the lab's agents running while measuring (default: SIGSTOP them)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 s tests (explicit options win)")
    p.add_argument("--out", default=RESULTS, help="a directory for egress.json/.png, or FILE.json")
    a = p.parse_args()
    rounds, seconds = QUICK if a.quick else (7, 3.0)
    a.rounds = rounds if a.rounds is None else a.rounds
    a.seconds = seconds if a.seconds is None else a.seconds
    return a


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("egress.py: run as root (it creates a netns, a bridge and an nftables table in the lab's node)")
    from xoverlay.lab.namespace_lab import Lab
    from xoverlay.store import open_store
    lab = Lab(open_store(args.state), args.state)
    if not lab.nodes():
        sys.exit(f"egress.py: no lab at {args.state}: `xoverlay --state {args.state} lab up --nodes 2` first")
    node = lab.nodes()[0]
    node_ns = lab.node_netns(node)
    client = ns_path(lab.client_netns)
    endpoint = lab.endpoint_names(node)[0]
    docker = DockerWay(node_ns)
    targets = {"node": Target("node", PATHS["node"], ns_path(node_ns), lab.client_ip, client),
               "endpoint": Target("endpoint", PATHS["endpoint"], lab.netns_of(endpoint), lab.client_ip, client),
               "docker": Target("docker", PATHS["docker"], docker.client, lab.client_ip, client)}
    started = time.monotonic()
    res = {"benchmark": "egress", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": machine(),
           "config": {"rounds": args.rounds, "seconds": args.seconds, "conn_procs": args.conn_procs,
                      "agents_running": args.agents_running, "quick": args.quick,
                      "cpus": {"sender": SENDER_CPU, "receiver": RECEIVER_CPU}},
           "lab": {"state": lab.state_path, "node": node, "endpoint": endpoint, "client": lab.client_ip},
           "paths": {}}

    def work():
        servers = ClientServers("client", client)
        paused: list[int] = []

        def cleanup():
            signal_pids(paused, signal.SIGCONT)   # a stopped agent would never act on `lab down`
            servers.stop()
            docker.down()

        with removed_after(cleanup):
            left = docker.down()
            if left:
                log(f"removed leftovers of an earlier run: {', '.join(left)}")
            docker.up()
            res["docker"] = docker.info()
            res["lab"][f"node_{UNDERLAY_DEV}_tso"] = _tso(ns_path(node_ns))
            servers.start()
            if not args.agents_running:
                paused[:] = agent_pids(lab.nodes())
                signal_pids(paused, signal.SIGSTOP)
            before = drops_by_reason(node)
            runs, rounds = measure(targets, args)
            after = drops_by_reason(node)
            res["lab"]["drop_deltas"] = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        summarize(res, runs, rounds)

    code = run_locked("egress", work)
    if code:
        return code
    res["duration_s"] = round(time.monotonic() - started, 1)
    json_path, png_path = out_files(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    write_json(json_path, res)
    png = runner.chart_file(chart, res, png_path)
    print(report(res))
    log(f"\nwrote {json_path}" + (f" and {png}" if png else "") + f" in {res['duration_s']:.0f} s")
    return 0


def _tso(node: str) -> str:
    """The node's underlay TSO (the lab's XDP turns it off; every path leaves through it)."""
    out = sh(*in_ns(node, "ethtool", "-k", UNDERLAY_DEV), check=False)
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("tcp-segmentation-offload")), "unknown")


if __name__ == "__main__":
    sys.exit(main())
