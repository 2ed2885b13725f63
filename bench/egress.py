#!/usr/bin/env python3
"""Egress against plain routing, interleaved: an endpoint sending to the lab's outside
client (through xo-gw, the node's stack and its masquerade) against the node itself
sending to that client (the ceiling: the node's own traffic, routed, no NAT), on a
running namespace lab.

    bench/egress.py --state STATE [--rounds N] [--seconds S] [--out bench/results/egress.json]

Per round: the 64-byte UDP packet rate of both paths in the same seconds (bench/pairrate.py:
one sender alternating between them in ~10 ms batches, a counter in the client), then one
TCP stream each (iperf3), in an order that alternates round to round. Reported: each
round's numbers, and the medians of the endpoint/node ratios."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.lib.shell import in_ns, machine  # noqa: E402
from bench.lib.stats import cycle_ratio, write_json  # noqa: E402
from bench.lib.traffic import RECEIVER_CPU, SENDER_CPU, TCP_PORT, Target, interleaved_rate  # noqa: E402


def tcp_gbps(client: str, server_ip: str, secs: float) -> float:
    for _ in range(3):
        r = subprocess.run(in_ns(client, "taskset", "-c", SENDER_CPU, "iperf3", "-c", server_ip, "-p", str(TCP_PORT),
                                 "-t", str(secs), "-J"), capture_output=True, text=True, timeout=secs + 30)
        try:
            return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
        except (ValueError, KeyError):
            time.sleep(1)          # "the server is busy" right after the previous test
    raise SystemExit(f"iperf3 from {client} failed: {r.stderr or r.stdout}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--state", required=True, help="the running lab's --state")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--out", default=None)
    p.add_argument("--no-tcp", action="store_true", help="packet rate only (e.g. with the masquerade taken away)")
    a = p.parse_args()
    from xoverlay.lab.namespace_lab import Lab
    from xoverlay.store import open_store
    lab = Lab(open_store(a.state), a.state)
    node = lab.nodes()[0]
    client = f"/run/netns/{lab.client_netns}"
    endpoint = f"/run/netns/{lab.endpoint_names(node)[0]}"
    paths = {"node": Target("node", "the node itself (plain routing)", f"/run/netns/{lab.node_netns(node)}",
                            lab.client_ip, client),
             "endpoint": Target("endpoint", "an endpoint, through egress", endpoint, lab.client_ip, client)}
    server = subprocess.Popen(in_ns(client, "taskset", "-c", RECEIVER_CPU, "iperf3", "-s", "-p", str(TCP_PORT)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rounds = []
    try:
        time.sleep(1)
        for r in range(a.rounds):
            order = ["node", "endpoint"] if r % 2 == 0 else ["endpoint", "node"]
            udp = dict(zip(order, interleaved_rate([paths[k] for k in order], a.seconds)))
            row = {"udp_kpps": {k: round(udp[k]["pair_kpps"], 1) for k in order},
                   "udp_ratio": cycle_ratio(udp["endpoint"]["pair_cycle_rates"], udp["node"]["pair_cycle_rates"])}
            if not a.no_tcp:
                tcp = {k: tcp_gbps(paths[k].client, lab.client_ip, a.seconds) for k in order}
                row.update(tcp_gbps={k: round(v, 2) for k, v in tcp.items()}, tcp_ratio=tcp["endpoint"] / tcp["node"])
            rounds.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait()
    res = {"bench": "egress", "machine": machine(), "rounds": rounds,
           "udp_ratio_median": statistics.median(r["udp_ratio"] for r in rounds),
           "udp_kpps_median": {k: statistics.median(r["udp_kpps"][k] for r in rounds) for k in paths}}
    if not a.no_tcp:
        res.update(tcp_ratio_median=statistics.median(r["tcp_ratio"] for r in rounds),
                   tcp_gbps_median={k: statistics.median(r["tcp_gbps"][k] for r in rounds) for k in paths})
    print(json.dumps({k: v for k, v in res.items() if k not in ("rounds", "machine")}, indent=2))
    if a.out:
        write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
