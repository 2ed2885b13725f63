"""The interleaved measurements the benchmarks judge their bars on, bench/pairrate.py
(packet rate) and bench/connrate.py (connection rate): every target's packets or
connections are counted as its own (and a target's connections leave from its own
client netns), the time a batch takes is charged to the target it was sent to, and a
target whose packets never arrive shows as loss. On two namespaces of the test's own, in
10.251.0.0/24."""
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, REPO)
from bench.lib.shell import BenchError  # noqa: E402
from bench.lib.stats import cycle_ratio, json_text  # noqa: E402
from bench.lib.traffic import CONN_PORT, TCP_PORT, UDP_PORT, Target, conn_rate, interleaved_rate, tcp_together  # noqa: E402

CLIENT, SERVER = "xtpr-client", "xtpr-server"
FAST, SLOW, DROPPED = "10.251.0.2", "10.251.0.3", "10.251.0.4"
SLOW_RULES = 3000


def _sh(*cmd, input=None):
    subprocess.run(cmd, check=True, capture_output=True, text=True, input=input)


@pytest.fixture
def pair():
    """A client and a server namespace on one veth. Packets to SLOW walk SLOW_RULES rules
    that never match (a dearer path); DROPPED drops UDP and refuses TCP on arrival."""
    for ns in (CLIENT, SERVER):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    try:
        for ns in (CLIENT, SERVER):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "link", "add", "xtpr0", "netns", CLIENT, "type", "veth", "peer", "name", "xtpr1",
            "netns", SERVER)
        _sh("ip", "-n", CLIENT, "addr", "add", "10.251.0.1/24", "dev", "xtpr0")
        for ip in (FAST, SLOW, DROPPED):
            _sh("ip", "-n", SERVER, "addr", "add", f"{ip}/24", "dev", "xtpr1")
        for ns, dev in ((CLIENT, "xtpr0"), (SERVER, "xtpr1")):
            _sh("ip", "-n", ns, "link", "set", dev, "up")
        slow = "\n".join(f"    ip saddr 192.0.2.{i % 250 + 1} udp sport {i + 1} drop" for i in range(SLOW_RULES))
        # DROPPED: UDP is dropped, TCP refused (a reset: a failed connection takes no timeout).
        rules = ("table ip xtpr {\n  chain slow {\n" + slow + "\n  }\n"
                 "  chain pre { type filter hook prerouting priority 0; policy accept;\n"
                 f"    ip daddr {SLOW} jump slow\n    ip daddr {DROPPED} meta l4proto udp drop\n  }}\n"
                 "  chain in { type filter hook input priority 0; policy accept;\n"
                 f"    ip daddr {DROPPED} meta l4proto tcp reject with tcp reset\n  }}\n}}\n")
        _sh("nsenter", f"--net=/run/netns/{SERVER}", "--", "nft", "-f", "-", input=rules)
        yield
    finally:
        for ns in (CLIENT, SERVER):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _target(key, ip):
    return Target(key, key, f"/run/netns/{CLIENT}", ip, f"/run/netns/{SERVER}")


def test_each_target_is_counted_and_timed_as_its_own(pair):
    rows = interleaved_rate([_target("fast", FAST), _target("slow", SLOW), _target("dropped", DROPPED),
                             _target("fast-again", FAST)], 2.0)
    fast, slow, dropped, again = rows
    # Counted by source port at the server: what the sender sent to it arrived (a veth
    # between two idle namespaces loses nothing but what a starved counter misses).
    for row in (fast, slow, again):
        assert row["pair_loss_pct"] < 5, rows
        assert row["pair_kpps"] > 0
    assert dropped["pair_kpps"] == 0 and dropped["pair_loss_pct"] == 100, rows
    # The time of a batch is charged to its target: the rule walk makes SLOW dearer in
    # the same seconds; the same path twice measures the same.
    assert slow["pair_kpps"] < 0.8 * fast["pair_kpps"], rows
    assert 0.8 < again["pair_kpps"] / fast["pair_kpps"] < 1.25, rows
    # Cycle by cycle too, each cycle's rates aligned across the targets.
    assert 0.8 < cycle_ratio(again["pair_cycle_rates"], fast["pair_cycle_rates"]) < 1.25, rows
    assert cycle_ratio(slow["pair_cycle_rates"], fast["pair_cycle_rates"]) < 0.8, rows
    assert len({len(r["pair_cycle_rates"]) for r in rows}) == 1


def test_a_target_that_cannot_be_sent_to_is_an_error(pair):
    # No route to it from the client: every send fails, which is no measurement.
    with pytest.raises(BenchError, match=r"10\.252\.0\.1:5400 .*unreachable"):
        interleaved_rate([_target("fast", FAST), Target("unroutable", "unroutable", f"/run/netns/{CLIENT}",
                                                        "10.252.0.1", f"/run/netns/{SERVER}")], 0.5)


@pytest.fixture
def tcp_servers(pair):
    """iperf3 in the server netns, where tcp_together sends its first, second and third
    stream."""
    servers = [subprocess.Popen(["nsenter", f"--net=/run/netns/{SERVER}", "--", "iperf3", "-s", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in (TCP_PORT, UDP_PORT + 1, UDP_PORT + 2)]
    try:
        deadline = time.monotonic() + 10
        while not all(str(port) in subprocess.run(["nsenter", f"--net=/run/netns/{SERVER}", "--", "ss", "-Hltn"],
                                                  capture_output=True, text=True).stdout
                      for port in (TCP_PORT, UDP_PORT + 1, UDP_PORT + 2)):
            assert time.monotonic() < deadline, "iperf3 servers not listening"
            time.sleep(0.1)
        yield
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=10)


def test_tcp_streams_together_each_counted_as_its_own(tcp_servers):
    """Two paths' streams and a second stream on the first (the control), all at once:
    each row is its own stream's, and the two on one path share alike."""
    rows = tcp_together([_target("fast", FAST), _target("slow", SLOW), _target("fast", FAST)], 2.0)
    assert len(rows) == 3 and all(r["tcp_together_gbps"] > 0.1 for r in rows), rows
    assert 0.5 < rows[2]["tcp_together_gbps"] / rows[0]["tcp_together_gbps"] < 2, rows


def test_a_tcp_stream_together_that_cannot_connect_is_an_error(tcp_servers):
    with pytest.raises(BenchError, match="refused|unable to connect"):
        tcp_together([_target("fast", FAST), _target("dropped", DROPPED)], 1.0)


@pytest.fixture
def conn_server(pair):
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{SERVER}", "--", sys.executable,
                               os.path.join(BENCH, "connrate.py"), "serve", "--port", str(CONN_PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while str(CONN_PORT) not in subprocess.run(
                ["nsenter", f"--net=/run/netns/{SERVER}", "--", "ss", "-Hltn"], capture_output=True,
                text=True).stdout:
            assert time.monotonic() < deadline, "connrate server not listening"
            time.sleep(0.1)
        yield
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_connections_are_counted_and_timed_per_target(conn_server):
    fast, slow, again = conn_rate([_target("fast", FAST), _target("slow", SLOW), _target("fast-again", FAST)],
                                  2.0, 2)
    assert fast["conn_rate"] > 0 and fast["conn_errors"] == 0
    # Every packet of a connection to SLOW walks the rules: fewer connections a second,
    # measured in the same seconds as FAST's.
    assert slow["conn_rate"] < 0.8 * fast["conn_rate"], (fast, slow)
    assert 0.8 < again["conn_rate"] / fast["conn_rate"] < 1.25, (fast, again)
    assert cycle_ratio(slow["conn_cycle_rates"], fast["conn_cycle_rates"]) < 0.8
    assert 0.8 < cycle_ratio(again["conn_cycle_rates"], fast["conn_cycle_rates"]) < 1.25


def test_connections_leave_from_each_targets_own_netns(conn_server):
    # 127.0.0.1 has the server only in SERVER's netns: from there every connection is
    # made, from CLIENT's every one is refused. So each target's connections left from
    # its own client netns, interleaved with a target of another client.
    here = Target("server-loopback", "server-loopback", f"/run/netns/{SERVER}", "127.0.0.1")
    fast, local = conn_rate([_target("fast", FAST), here], 1.0, 1)
    for row in (fast, local):
        assert row["conn_rate"] > 0 and row["conn_errors"] == 0, (fast, local)
    assert len(fast["conn_cycle_rates"]) == len(local["conn_cycle_rates"])
    with pytest.raises(BenchError, match="client-loopback: connrate"):
        conn_rate([here, _target("client-loopback", "127.0.0.1")], 0.5, 1)


def test_connections_that_fail_are_an_error(conn_server):
    with pytest.raises(BenchError, match="dropped: connrate"):
        conn_rate([_target("fast", FAST), _target("dropped", DROPPED)], 1.0, 1)


def test_a_stalled_cycle_does_not_move_the_cycle_ratio():
    vip, direct = [95.0, 96.0, 95.5, 10.0, 96.0], [100.0, 100.0, 100.0, 100.0, 100.0]
    assert cycle_ratio(vip, direct) == 0.955
    # The totals' ratio carries the stalled batch whole.
    assert sum(vip) / sum(direct) < 0.8
    assert cycle_ratio([], []) is None


def test_results_files_keep_number_lists_on_one_line():
    res = {"rates": [1.5, -2, 3e-05, 10], "rows": [{"k": "v"}, [1, 2]], "empty": [], "name": "x"}
    text = json_text(res)
    assert json.loads(text) == res
    assert '"rates": [1.5, -2, 3e-05, 10]' in text and "[1, 2]" in text
    assert text.splitlines()[4].strip() == '"k": "v"'   # other lists as json.dumps has them
