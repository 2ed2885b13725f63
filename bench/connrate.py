#!/usr/bin/env python3
"""TCP connection rate without a compiler: many short connections, each a full round:
connect (SYN, SYN-ACK, ACK), the server's one-byte answer, the client's close with
SO_LINGER 0 (a reset: no TIME_WAIT, so the ephemeral ports never run out and no state
is left behind on either end; netperf's TCP_CRR closes politely instead).

    connrate.py serve --port P [--workers W]             # in the server's netns
    connrate.py connect --ip IP [--ip IP2 ...] --port P --seconds S [--procs N] [--batch K]
                        [--netns PATH --netns PATH2 ...] # prints one JSON line

Blocking sockets, one connection at a time per process, several processes: per
connection Python costs ~15-20 µs of CPU on each side, so on a 2-CPU machine this is
bounded by CPU, not by waiting; the path's own per-connection cost (a conntrack entry,
NAT rules, BPF) adds to the same CPUs and shows in the rate. Python's share is the same
on every path, so differences between paths are the paths'. Run by bench/services and
bench/egress.py.

Several --ip: every client process alternates between them, K connections at a time
(~10 ms), in order and then in reverse, and each target's rate is its connections over
the time spent on them: the targets are measured in the same seconds, as in
bench/pairrate.py (this VM's CPU speed swings too much between two tests in turn).

--netns, one per --ip and in the same order: each target's connections are made from
that network namespace (several sources to one server, as bench/egress.py compares
them). A client process enters the target's namespace before each of its batches; a
socket stays in the namespace it was made in. One setns per batch of K connections, the
same on every target."""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import signal
import socket
import struct
import sys
import time

LINGER_RESET = struct.pack("ii", 1, 0)
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, path: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns {path}: {os.strerror(err)}")


def serve(port: int, workers: int) -> None:
    def worker():
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("0.0.0.0", port))
        s.listen(4096)
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                continue
            try:
                c.send(b"x")
            except OSError:
                pass
            c.close()

    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                worker()
            finally:
                os._exit(0)
        children.append(pid)

    def stop(*_):
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # If one worker dies, stop all: the caller sees the server gone.
    os.wait()
    stop()


def _connect_once(ip: str, port: int) -> str:
    """One connection; "" if it went as it should, else what went wrong."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    s.settimeout(1.0)
    try:
        s.connect((ip, port))
        return "" if s.recv(1) == b"x" else "closed without the answer"
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        s.close()


def _client(ips: list[str], port: int, start: float, seconds: float, batch: int, out,
            netns: list[str] | None = None) -> None:
    n = len(ips)
    # This process only (forked): entering a target's namespace moves no one else.
    fds = [os.open(path, os.O_RDONLY) for path in netns] if netns else None
    ok, errors, spent = [0] * n, [0] * n, [0.0] * n
    cycles = []                           # per cycle, each target's rate (connections/s)
    first_error = ""
    # Wait for the common start, then count only inside the window.
    time.sleep(max(0.0, start - time.monotonic()))
    end = start + seconds
    forward = True
    while time.monotonic() < end:
        rates = [0.0] * n
        for i in (range(n) if forward else range(n - 1, -1, -1)):
            if fds:
                _setns(fds[i], netns[i])
            t0 = time.monotonic()
            done = 0
            for _ in range(batch):
                err = _connect_once(ips[i], port)
                if err:
                    errors[i] += 1
                    first_error = first_error or err
                else:
                    done += 1
            took = time.monotonic() - t0
            ok[i] += done
            spent[i] += took
            rates[i] = done / took if took else 0.0
        cycles.append(rates)
        forward = not forward
    out.put((ok, errors, spent, first_error, cycles))


def connect(ips: list[str], port: int, seconds: float, procs: int, batch: int,
            netns: list[str] | None = None) -> dict:
    q = mp.Queue()
    start = time.monotonic() + 0.3
    ps = [mp.Process(target=_client, args=(ips, port, start, seconds, batch, q, netns)) for _ in range(procs)]
    for p in ps:
        p.start()
    results = [q.get(timeout=seconds + 60) for _ in ps]
    for p in ps:
        p.join()
    targets = []
    for i, ip in enumerate(ips):
        # The processes ran at once: the target's rate is the sum of theirs. Their cycles,
        # one after the other, each cycle's rates aligned across the targets.
        targets.append({"ip": ip, "conns": sum(r[0][i] for r in results), "errors": sum(r[1][i] for r in results),
                        "seconds": round(max(r[2][i] for r in results), 3),
                        "conn_rate": sum(r[0][i] / r[2][i] for r in results if r[2][i]),
                        "cycle_rates": [round(c[i], 1) for r in results for c in r[4]]})
    return {"targets": targets, "first_error": next((r[3] for r in results if r[3]), "")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--workers", type=int, default=2)
    c = sub.add_parser("connect")
    c.add_argument("--ip", action="append", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--seconds", type=float, default=5.0)
    c.add_argument("--procs", type=int, default=2)
    c.add_argument("--batch", type=int, default=40, help="connections in a row to one target (several --ip)")
    c.add_argument("--netns", action="append", metavar="PATH",
                   help="the namespace each target's connections leave from (one per --ip, in order)")
    a = p.parse_args()
    if a.cmd == "serve":
        serve(a.port, a.workers)
        return 0
    if a.netns and len(a.netns) != len(a.ip):
        p.error(f"{len(a.netns)} --netns for {len(a.ip)} --ip: one each, or none")
    for path in a.netns or []:
        if not os.path.exists(path):
            p.error(f"--netns {path}: no such namespace")
    print(json.dumps(connect(a.ip, a.port, a.seconds, a.procs, a.batch, a.netns)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
