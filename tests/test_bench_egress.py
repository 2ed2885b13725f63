"""bench/egress.py on the tests' lab: a short run measures all three paths (the node
itself, an endpoint through egress, Docker's way) and writes its results and chart; it
leaves nothing of Docker's way in the node (netns, bridge, veth, nft table) and the
agents running, also when interrupted in the middle of a round. On the SQLite lab only:
the bench reads either store the same way, and a run takes ~20 s."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from conftest import skip_if_bench_locked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.egress import DOCKER_BRIDGE, DOCKER_NETNS, DOCKER_TABLE, DOCKER_VETH  # noqa: E402

EGRESS = os.path.join(REPO, "bench", "egress.py")
pytestmark = pytest.mark.lab


@pytest.fixture
def sqlite_lab(lab):
    if lab.backend != "sqlite":
        pytest.skip("the bench reads either store the same way: run on the SQLite lab")
    return lab


def _egress(lab, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, EGRESS, "--state", lab.state, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _left_behind(lab) -> list[str]:
    node_ns = os.path.basename(lab.node_netns(lab.nodes()[0]))
    found = [f"netns {DOCKER_NETNS}"] if os.path.exists(f"/run/netns/{DOCKER_NETNS}") else []
    for dev in (DOCKER_BRIDGE, DOCKER_VETH):
        if subprocess.run(["ip", "-n", node_ns, "link", "show", "dev", dev], capture_output=True).returncode == 0:
            found.append(f"link {dev}")
    if subprocess.run(["ip", "netns", "exec", node_ns, "nft", "list", "table", "ip", DOCKER_TABLE],
                      capture_output=True).returncode == 0:
        found.append(f"nft table {DOCKER_TABLE}")
    return found


def _stopped_agents(lab) -> list[str]:
    from xoverlay.kernel.processes import running_pid
    out = []
    for node in lab.nodes():
        with open(f"/proc/{running_pid(node)}/status") as f:
            if any(line.startswith("State:") and "stopped" in line for line in f):
                out.append(node)
    return out


def test_a_short_run_measures_three_paths_and_leaves_nothing(sqlite_lab, tmp_path):
    out = tmp_path / "egress.json"
    p = _egress(sqlite_lab, "--rounds", "1", "--seconds", "1", "--out", str(out))
    stdout, stderr = p.communicate(timeout=180)
    skip_if_bench_locked(stderr)
    assert p.returncode == 0, stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["paths"]) == {"node", "endpoint", "docker"}
    for key, path in res["paths"].items():
        [run] = path["runs"]
        assert run["pair_kpps"] > 0 and run["tcp_gbps"] > 0 and run["conn_rate"] > 0, (key, run)
        assert run["pair_loss_pct"] < 50, (key, run)
    assert set(res["ratios"]) == {"endpoint/node", "docker/node", "endpoint/docker"}
    for name, r in res["ratios"].items():
        assert all(r[w]["n"] == 1 and r[w]["median"] > 0 for w in ("pair", "tcp", "conn")), (name, r)
    assert [b["threshold"] for b in res["bars"]] == [0.95, 0.95]
    assert "masquerade" in res["docker"]["nft"]
    assert (tmp_path / "egress.png").stat().st_size > 0
    assert "Docker's way" in stdout
    assert _left_behind(sqlite_lab) == [] and _stopped_agents(sqlite_lab) == []


def test_interrupted_in_a_round_it_removes_everything(sqlite_lab, tmp_path):
    p = _egress(sqlite_lab, "--rounds", "1", "--seconds", "30", "--out", str(tmp_path / "egress.json"))
    try:
        err, deadline = "", time.monotonic() + 60
        while "round 1/1" not in err:
            if p.poll() is not None:
                err += p.stderr.read()
                skip_if_bench_locked(err)
            assert p.poll() is None and time.monotonic() < deadline, err[-2000:]
            if select.select([p.stderr], [], [], 1)[0]:
                err += p.stderr.readline()
        assert _left_behind(sqlite_lab) and _stopped_agents(sqlite_lab)    # up, measuring
        time.sleep(1)
        p.send_signal(signal.SIGINT)
        _, rest = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err + rest
    assert "interrupted: everything removed" in rest
    assert not (tmp_path / "egress.json").exists()
    assert _left_behind(sqlite_lab) == [] and _stopped_agents(sqlite_lab) == []
