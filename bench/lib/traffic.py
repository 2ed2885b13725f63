"""The servers on a path and the traffic tools, each returning its numbers as a row: one
TCP stream and UDP packet rates (iperf3), request/response round trips (sockperf), and the
interleaved packet and connection rates (bench/pairrate.py, bench/connrate.py: several
targets measured in the same seconds, one batch of ~10 ms after the other)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.lib.shell import HOST, BenchError, Host, in_ns

if TYPE_CHECKING:
    from bench.lib.topologies import Path

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCP_PORT = 5201
UDP_PORT = 5301                          # and up, one iperf3 server per stream
RR_PORT = 11111
PAIR_PORT = 5400                         # the interleaved packet rate's counter (bench/pairrate.py)
CONN_PORT = 7777                         # the connection-rate server (bench/connrate.py)
UDP_PAYLOAD = 64
# The 1-sender test's sender and receiver each on a CPU of its own. Unpinned, the
# scheduler sometimes puts both on one CPU and the same path's rate moves by 15-20%
# from one test to the next (measured); on veths the whole path runs in the sender's
# softirq, so CPU 0 measures the path and CPU 1 only drains the socket.
SENDER_CPU, RECEIVER_CPU = "0", "1"


@dataclass
class Target:
    """Where one measurement sends its traffic: a client netns and a destination address
    (a backend's own address, or a VIP). Quacks like a topologies.Path for udp()."""
    key: str
    label: str
    client: str
    server_ip: str
    server: str = ""          # the server's netns (the interleaved rate counts there)
    client_at: Host = HOST    # the machine of the client's netns, and of the server's
    server_at: Host = HOST


# --- servers ----------------------------------------------------------------------------

def _listening(at: Host, netns: str) -> set[int]:
    """The TCP and UDP ports something listens on in `netns`."""
    out = at.run(in_ns(netns, "ss", "-Hlntu"))[1]
    return {int(m) for m in re.findall(r":(\d+)\s", out)}


class _Servers:
    """Server processes in one netns (of the machine `at`), for the whole run; stop()
    ends them."""

    def __init__(self, key: str, netns: str, at: Host = HOST):
        self.key, self.netns, self.at = key, netns, at
        self.procs: list[subprocess.Popen] = []

    def _start(self, cmds: list[list[str]], ports: set[int], timeout: float) -> None:
        """Start `cmds`, then wait until `ports` (TCP or UDP) listen."""
        for cmd in cmds:
            # nsenter execs the server (no fork for a net namespace): the pid is the server's.
            self.procs.append(self.at.serve(in_ns(self.netns, *cmd)))
        timeout *= self.at.patience
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ports <= _listening(self.at, self.netns):
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise BenchError(f"{self.key}: server {p.args[3:]} exited ({p.returncode})")
            time.sleep(0.1)
        raise BenchError(f"{self.key}: servers not listening after {timeout:g} s")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


class Servers(_Servers):
    """The servers of one path, in its server container: iperf3 for TCP, one iperf3 per
    UDP stream (iperf3 3.12 runs a test in one thread), sockperf."""

    def __init__(self, path, udp_streams: int):
        super().__init__(path.key, path.server, path.server_at)
        self.server_ip = path.server_ip
        self.udp_streams = udp_streams

    def start(self) -> None:
        cmds = [["iperf3", "-s", "-p", str(TCP_PORT)]]
        cmds += [["taskset", "-c", RECEIVER_CPU, "iperf3", "-s", "-p", str(UDP_PORT)]]
        cmds += [["iperf3", "-s", "-p", str(UDP_PORT + i)] for i in range(1, self.udp_streams)]
        cmds += [["sockperf", "sr", "-i", self.server_ip, "-p", str(RR_PORT)]]
        self._start(cmds, {TCP_PORT, RR_PORT} | {UDP_PORT + i for i in range(self.udp_streams)}, 5.0)


class ConnServers(_Servers):
    """bench/connrate.py serve and one iperf3 server, in a backend's netns."""

    def __init__(self, key: str, netns: str, workers: int = 2):
        super().__init__(key, netns)
        self.workers = workers

    def start(self) -> None:
        self._start([["taskset", "-c", RECEIVER_CPU, "iperf3", "-s", "-p", str(UDP_PORT)],
                     [sys.executable, os.path.join(BENCH, "connrate.py"), "serve", "--port", str(CONN_PORT),
                      "--workers", str(self.workers)]], {UDP_PORT, CONN_PORT}, 10.0)


# --- iperf3, sockperf -------------------------------------------------------------------

def _iperf3_client(path: Path, args: list[str], secs: float, tries: int = 3) -> dict:
    cmd = in_ns(path.client, "iperf3", "-c", path.server_ip, "-t", str(secs), "-J", *args)
    last = ""
    for _ in range(tries):
        rc, stdout, stderr = path.client_at.run(cmd, timeout=secs + 30)
        try:
            out = json.loads(stdout)
        except ValueError:
            out = {"error": stderr.strip() or stdout.strip()}
        if rc == 0 and "error" not in out:
            return out
        last = out.get("error", "")
        time.sleep(1)           # "the server is busy" right after a previous test
    raise BenchError(f"{path.key}: iperf3 {' '.join(args)} failed: {last}")


def tcp(path: Path, secs: float) -> dict:
    """One TCP stream, client -> server."""
    out = _iperf3_client(path, ["-p", str(TCP_PORT)], secs)["end"]
    return {"tcp_gbps": out["sum_received"]["bits_per_second"] / 1e9,
            "tcp_retransmits": out["sum_sent"].get("retransmits", 0)}


def _iperf3_result(proc: subprocess.Popen, timeout: float) -> dict:
    """A started `iperf3 -J` client's report (killed after `timeout`), or {"error": why}."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    try:
        return json.loads(stdout)
    except ValueError:
        return {"error": stderr.strip() or "no output"}


def tcp_together(paths: list, secs: float) -> list[dict]:
    """One TCP stream on each of `paths`, all in the same seconds. Where the machines'
    CPUs are what limits TCP (a TCG guest's are: every instruction is emulated), the
    streams share them, so each stream's rate against the others' is its path's cost
    per byte against theirs, free of the drift between tests taken in turn. A path listed
    twice gets a second stream (the method's own noise). An iperf3 server runs one test at
    a time: the first stream into a server netns goes to TCP_PORT, the next ones to the
    UDP test's servers, UDP_PORT + 1, + 2 (idle during this)."""
    into: dict = {}
    procs = []
    for p in paths:
        n = into[(p.server_at.name, p.server)] = into.get((p.server_at.name, p.server), -1) + 1
        port = UDP_PORT + n if n else TCP_PORT
        procs.append(p.client_at.start(in_ns(p.client, "iperf3", "-c", p.server_ip, "-p", str(port),
                                             "-t", str(secs), "-J"), limit=secs + 30))
    rows = []
    for p, proc in zip(paths, procs):
        out = _iperf3_result(proc, secs + 30)
        if "error" in out:
            raise BenchError(f"{p.key}: iperf3 (TCP, together) failed: {out['error']}")
        rows.append({"tcp_together_gbps": out["end"]["sum_received"]["bits_per_second"] / 1e9,
                     "tcp_together_retransmits": out["end"]["sum_sent"].get("retransmits", 0)})
    return rows


def udp(path: Path, secs: float, streams: int, key: str = "udp") -> dict:
    """`streams` iperf3 clients at once, each unlimited (-b 0) with 64-byte payloads; the
    rate that arrives counts. One sender is the bottleneck itself (little loss): on veths
    the whole path, down to the receiving socket, runs in the sender's softirq, so this
    is the per-packet cost of the path. Several senders on a 2-CPU machine starve the
    receivers (loss) and measure how the CPUs are shared as much as the path."""
    pin = ["taskset", "-c", SENDER_CPU] if streams == 1 else []
    cmds = [in_ns(path.client, *pin, "iperf3", "-c", path.server_ip, "-p", str(UDP_PORT + i), "-u", "-b", "0",
                  "-l", str(UDP_PAYLOAD), "-t", str(secs), "-J") for i in range(streams)]
    for attempt in range(3):
        procs = [path.client_at.start(c, limit=secs + 30) for c in cmds]
        outs = [_iperf3_result(p, secs + 30) for p in procs]
        errors = [o["error"] for o in outs if "error" in o]
        if not errors:
            break
        time.sleep(1)
    else:
        raise BenchError(f"{path.key}: iperf3 UDP failed: {errors[0]}")
    received = sum(o["end"]["sum_received"]["bytes"] for o in outs) / UDP_PAYLOAD
    sent = sum(o["end"]["sum"]["packets"] for o in outs)
    seconds = max(o["end"]["sum_received"]["seconds"] for o in outs)
    return {f"{key}_kpps": received / seconds / 1e3, f"{key}_sent_kpps": sent / seconds / 1e3,
            f"{key}_loss_pct": 100.0 * (sent - received) / sent if sent else 0.0}


_RTT_AVG = re.compile(r"avg-rtt=\s*([\d.]+)")
_RTT_PCT = re.compile(r"percentile (\d+\.\d+) =\s*([\d.]+)")


def rr(path: Path, secs: float) -> dict:
    """UDP request/response with 64-byte messages, one at a time: round-trip times."""
    cmd = in_ns(path.client, "sockperf", "ping-pong", "-i", path.server_ip, "-p", str(RR_PORT), "-t",
                str(secs), "-m", "64", "--full-rtt")
    rc, stdout, stderr = path.client_at.run(cmd, timeout=secs + 30)
    text = re.sub(r"\x1b\[[0-9;]*m", "", stdout + stderr)
    avg = _RTT_AVG.search(text)
    pct = {float(p): float(v) for p, v in _RTT_PCT.findall(text)}
    if rc != 0 or not avg or 50.0 not in pct:
        raise BenchError(f"{path.key}: sockperf ping-pong failed: {text.strip()[-300:]}")
    return {"rr_avg_us": float(avg.group(1)), "rr_p50_us": pct[50.0], "rr_p99_us": pct.get(99.0)}



# --- interleaved: several targets in the same seconds ---------------------------------

def _json_line(out: str, err: str, tool: str, key: str | None = None):
    """The last line a tool printed, as JSON (its `key` if given); else BenchError with
    the end of what it said."""
    try:
        got = json.loads(out.strip().splitlines()[-1])
        return got if key is None else got[key]
    except (ValueError, IndexError, KeyError, TypeError):
        raise BenchError(f"{tool} failed: {(err or out).strip()[-300:]}") from None


def interleaved_rate(targets: list[Target], secs: float) -> list[dict]:
    """64-byte UDP packet rate of several targets measured in the same seconds: one sender
    (bench/pairrate.py) alternating between them in ~10 ms batches, a counter in each
    server's netns. Per target: the rate that arrived (packets counted over the time
    the sender spent on that target), the rate sent, loss, and its rate in every cycle
    of batches (for cycle_ratio). A target may be listed twice: the two are measured as
    two paths (the method's own noise). The clients share a machine (the sender's)."""
    tool = os.path.join(BENCH, "pairrate.py")
    sender_at = targets[0].client_at
    if any(t.client_at is not sender_at for t in targets):
        raise BenchError("interleaved_rate: the targets' clients must be on one machine")
    servers = {(t.server_at.name, t.server): t.server_at for t in targets}
    counters = {}
    limit = secs + 60 * sender_at.patience
    try:
        for (name, ns), at in servers.items():
            # A counter stops `idle` s after its last packet: longer where a slow machine
            # (a guest under TCG) may leave a path that long between two of its batches.
            counters[(name, ns)] = at.start(in_ns(ns, "taskset", "-c", RECEIVER_CPU, sys.executable, tool, "count",
                                                  "--port", str(PAIR_PORT), "--idle", f"{at.patience:g}",
                                                  "--limit", f"{limit:g}"), limit=limit)
        for (name, ns), at in servers.items():
            deadline = time.monotonic() + 10 * at.patience
            while PAIR_PORT not in _listening(at, ns):
                p = counters[(name, ns)]
                if p.poll() is not None or time.monotonic() > deadline:
                    p.kill()
                    raise BenchError(f"pairrate counter in {ns} did not start: {p.communicate()[1].strip()[-300:]}")
                time.sleep(0.05)
        cmd = ["taskset", "-c", SENDER_CPU, sys.executable, tool, "send", "--seconds", str(secs)]
        for t in targets:
            cmd += ["--target", f"{t.client},{t.server_ip},{PAIR_PORT}"]
        _, stdout, stderr = sender_at.run(cmd, timeout=limit)
        sent = _json_line(stdout, stderr, "pairrate send")
        counts = {}
        for (name, ns), p in counters.items():
            # A counter stops `idle` s after its last packet; one that got none, when told.
            try:
                out, err = p.communicate(timeout=5 * servers[(name, ns)].patience)
            except subprocess.TimeoutExpired:
                p.terminate()
                out, err = p.communicate(timeout=10 * servers[(name, ns)].patience)
            counts[(name, ns)] = _json_line(out, err, f"pairrate counter in {ns}", "counts")
    finally:
        for p in counters.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    rows = []
    for t, s in zip(targets, sent["targets"]):
        got = counts[(t.server_at.name, t.server)].get(str(s["source_port"]), 0)
        if s["sent"] == 0 or s["errors"] > 0.01 * (s["sent"] + s["errors"]):
            raise BenchError(f"{t.key}: pairrate sent {s['sent']} packets, {s['errors']} send errors")
        rows.append({"pair_kpps": got / s["seconds"] / 1e3, "pair_sent_kpps": s["sent"] / s["seconds"] / 1e3,
                     "pair_loss_pct": 100.0 * (s["sent"] - got) / s["sent"],
                     "pair_cycle_rates": s["cycle_rates"]})
    return rows


def conn_rate(targets: list[Target], secs: float, procs: int) -> list[dict]:
    """Short TCP connections per second from each target's client netns to its
    server_ip:CONN_PORT, the targets interleaved (bench/connrate.py). Targets of one
    client: the tool runs in it; of several (bench/egress.py: several sources, one
    server): it enters each target's client netns for that target's batches (--netns).
    The clients share a machine."""
    if any(t.client_at is not targets[0].client_at for t in targets):
        raise BenchError("conn_rate: the targets' clients must be on one machine")
    cmd = [sys.executable, os.path.join(BENCH, "connrate.py"), "connect", "--port", str(CONN_PORT),
           "--seconds", str(secs), "--procs", str(procs)]
    if len({t.client for t in targets}) == 1:
        cmd = in_ns(targets[0].client, *cmd)
    else:
        for t in targets:
            cmd += ["--netns", t.client]
    for t in targets:
        cmd += ["--ip", t.server_ip]
    _, stdout, stderr = targets[0].client_at.run(cmd, timeout=secs + 90)
    out = _json_line(stdout, stderr, "connrate")
    rows = []
    for t, got in zip(targets, out["targets"]):
        if got["conns"] == 0 or got["errors"] > 0.01 * got["conns"]:
            raise BenchError(f"{t.key}: connrate: {got['conns']} connections, {got['errors']} errors "
                             f"({out['first_error']})")
        rows.append({"conn_rate": got["conn_rate"], "conn_errors": got["errors"],
                     "conn_cycle_rates": got["cycle_rates"]})
    return rows
