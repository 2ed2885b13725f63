#!/usr/bin/env python3
"""Interleaved UDP packet rate: paths compared in the same seconds, not in turn.

On this VM the CPU's own speed swings by up to 2x from one second to the next (a
pinned busy loop does 2.3 to 4.6 M iterations a second, steal time reads 0-1%), so
two iperf3 tests a few seconds apart can differ by 10% with nothing changed. A bar
drawn at 95% cannot be judged that way. Here one sender alternates between the paths
in batches of ~10 ms (targets in order, then in reverse: A B C C B A ...), so every
path sees the same CPU; the rate of a path is the packets that arrived over the time
the sender spent sending them.

On veths the whole path, down to the receiving socket, runs inside the sender's
send() (the veth hands each packet to the backlog, which runs when the send leaves
its bottom-half section), so the time a batch takes is the path's cost per packet,
plus the sender's own (Python's loop: about what iperf3 spends, the same on every
path).

    pairrate.py count --port P [--idle S]           # in each server's netns; counts per
                                                    # source port, prints one JSON line
    pairrate.py send --target NETNS,IP,PORT ... --seconds S [--batch K]
                                                    # opens each target's socket in its
                                                    # netns, prints one JSON line

Run by bench/services and bench/eastwest. No compiler needed, like bench/connrate.py."""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import signal
import socket
import sys
import time

CLONE_NEWNET = 0x40000000
PAYLOAD = bytes(64)                      # iperf3 -l 64
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns {what}: {os.strerror(err)}")


def open_socket(netns: str, ip: str, port: int) -> socket.socket:
    """A UDP socket connected to ip:port in the network namespace at `netns` (a socket
    stays in the namespace it was made in), made from this thread's own namespace."""
    try:
        return _open_socket(netns, ip, port)
    except OSError as e:
        raise OSError(e.errno, f"{ip}:{port} from {netns}: {e.strerror or e}") from None


def _open_socket(netns: str, ip: str, port: int) -> socket.socket:
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(netns, os.O_RDONLY)
    try:
        _setns(there, netns)
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect((ip, port))
        finally:
            _setns(home, "back")
    finally:
        os.close(there)
        os.close(home)
    return s


def send(targets: list[tuple[str, str, int]], seconds: float, batch: int) -> dict:
    socks = [open_socket(*t) for t in targets]
    n = len(socks)
    sent = [0] * n
    spent = [0] * n                       # ns
    errors = [0] * n
    cycles: list[list[float]] = []        # per cycle, each target's rate (packets/s)
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)
    forward = True
    while clock() < end:
        order = range(n) if forward else range(n - 1, -1, -1)
        forward = not forward
        rates = [0.0] * n
        for i in order:
            out = socks[i].send
            ok = 0
            t0 = clock()
            for _ in range(batch):
                try:
                    out(PAYLOAD)
                    ok += 1
                except OSError:
                    errors[i] += 1
            took = clock() - t0
            sent[i] += ok
            spent[i] += took
            rates[i] = ok / took * 1e9 if took else 0.0
        cycles.append(rates)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    # Every cycle's rates, target by target: two targets' rates in the same cycle were
    # measured ~10 ms apart, and the median of their ratios over the cycles shrugs off a
    # batch the machine stalled (bench/lib/stats.cycle_ratio).
    return {"targets": [{"netns": t[0], "ip": t[1], "port": t[2], "source_port": ports[i], "sent": sent[i],
                         "seconds": spent[i] / 1e9, "errors": errors[i],
                         "cycle_rates": [round(c[i], 1) for c in cycles]}
                        for i, t in enumerate(targets)],
            "cycles": len(cycles), "batch": batch}


def count(port: int, idle: float, limit: float) -> dict:
    """Packets per source port until `idle` seconds pass without one (after the first),
    or `limit` seconds in all, or SIGTERM."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", port))
    s.setblocking(False)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)
    counts: dict[int, int] = {}
    recv = s.recvfrom
    deadline = time.monotonic() + limit
    while not stop and time.monotonic() < deadline:
        ready, _, _ = select.select([s], [], [], idle)
        if not ready:
            if counts:
                break
            continue
        # Drain without a select per packet.
        try:
            while True:
                _, (_, sport) = recv(2048)
                counts[sport] = counts.get(sport, 0) + 1
        except BlockingIOError:
            pass
    return {"counts": {str(k): v for k, v in counts.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("count")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--idle", type=float, default=1.0)
    c.add_argument("--limit", type=float, default=600.0)
    s = sub.add_parser("send")
    s.add_argument("--target", action="append", required=True, metavar="NETNS,IP,PORT")
    s.add_argument("--seconds", type=float, default=5.0)
    s.add_argument("--batch", type=int, default=800)
    a = p.parse_args()
    if a.cmd == "count":
        print(json.dumps(count(a.port, a.idle, a.limit)), flush=True)
        return 0
    targets = []
    for t in a.target:
        try:
            netns, ip, port = t.split(",")
            targets.append((netns, ip, int(port)))
        except ValueError:
            p.error(f"--target {t!r}: expected NETNS,IP,PORT")
    try:
        print(json.dumps(send(targets, a.seconds, a.batch)))
    except OSError as e:
        sys.exit(f"pairrate send: {e.strerror or e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
