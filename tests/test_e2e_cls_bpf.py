"""The namespace lab with its tc programs attached the way kernels before 6.6 need them
(clsact + cls_bpf, direct-action; forced here with XOVERLAY_TC_ATTACH, since this kernel
has tcx): traffic, services, status, in-place replacement of another build, and repair.
On the SQLite store only: how programs attach has nothing to do with the store."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
from conftest import LabHandle, in_netns, leftovers, ping_loss, run_xo

from xoverlay.kernel import bpf

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("lab-cls-bpf") / "state.db")
    saved = os.environ.get(bpf.TC_ATTACH_ENV)
    os.environ[bpf.TC_ATTACH_ENV] = bpf.CLS_BPF        # the agents the lab starts inherit it
    handle = LabHandle(state)
    try:
        handle.xo("lab", "up", "--nodes", "2", timeout=180)
        yield handle
    finally:
        run_xo(state, "lab", "down", check=False, timeout=180)
        if saved is None:
            os.environ.pop(bpf.TC_ATTACH_ENV, None)
        else:
            os.environ[bpf.TC_ATTACH_ENV] = saved
        bpf.tc_attach_kind.cache_clear()


def tc_filters(lab, node: str, dev: str) -> str:
    """`tc filter show`: our underlay program shows as xo_underlay_ing (names are cut at 15)."""
    return in_netns(lab.node_netns(node), "tc", "filter", "show", "dev", dev, "ingress").stdout


def test_traffic_and_services_run_on_cls_bpf(lab):
    n1, n2 = lab.nodes()
    eps = lab.endpoints()
    for dst in (f"{n1}-b", f"{n2}-a"):
        assert lab.ping(f"{n1}-a", eps[dst]["ip"]), f"{n1}-a cannot ping {dst}"
    vip = json.loads(lab.xo("service", "inspect", "web", "--json").out)["vip"]
    backends = set()
    for _ in range(10):
        r = lab.run_in(f"{n1}-a", "curl", "-s", "-m", "3", f"http://{vip}/", check=False)
        assert r.returncode == 0, r.stderr
        backends.add(r.stdout.split()[0])
    assert backends <= {f"{n}-web" for n in (n1, n2)} and backends


def test_the_programs_are_cls_bpf_filters_and_status_says_so(lab):
    n1, _ = lab.nodes()
    shown = tc_filters(lab, n1, "eth1")
    assert "xo_underlay_ing" in shown and "direct-action" in shown
    from xoverlay.kernel.netns import entered
    with entered(lab.node_netns(n1)):
        assert bpf.tcx_programs(socket.if_nametoindex("eth1")) == []
    snap = json.loads(lab.xo("status", "--node", n1, "--json").out)
    tc_rows = snap["node"]["programs"][1:]
    assert [(p["mode"], p["attached"] == p["places"]) for p in tc_rows] == [("cls_bpf", True)] * 4
    assert "xo_tunnel_devic" in tc_filters(lab, n1, "xo-gro")     # xo-gro's program, a filter too


def test_a_new_build_replaces_the_filters_in_place_without_loss(lab):
    n1, n2 = lab.nodes()
    before = tc_filters(lab, n1, "eth1")
    lab.stop_as_another_build(n1)
    ping = lab.ping_stream(f"{n1}-a", lab.ep(f"{n2}-a")["ip"])
    time.sleep(0.5)
    run_xo(lab.state, "lab", "up", "--nodes", "2", timeout=120)
    time.sleep(0.5)
    sent, received = ping_loss(ping)
    assert sent >= 100 and received == sent, f"lost {sent - received} of {sent}"
    after = tc_filters(lab, n1, "eth1")
    assert after.count("handle 0x58") == 1 and after != before     # one filter, another program


def test_the_agent_puts_a_removed_filter_back(lab):
    n1, n2 = lab.nodes()
    in_netns(lab.node_netns(n1), "tc", "filter", "del", "dev", "eth1", "ingress", "pref", "1")
    assert "xo_underlay_ing" not in tc_filters(lab, n1, "eth1")
    deadline = time.monotonic() + 10
    while "xo_underlay_ing" not in tc_filters(lab, n1, "eth1"):
        assert time.monotonic() < deadline, "the agent did not put the filter back"
        time.sleep(0.2)
    assert lab.ping(f"{n2}-a", lab.ep(f"{n1}-a")["ip"])


def test_lab_down_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(bpf.TC_ATTACH_ENV, bpf.CLS_BPF)
    state = str(tmp_path / "state.db")
    run_xo(state, "lab", "up", "--nodes", "1", "--no-xdp", timeout=120)
    from xoverlay.lab.namespace_lab import Lab
    from xoverlay.store import open_store
    prefix = Lab(open_store(state), state).prefix
    assert leftovers(prefix)
    run_xo(state, "lab", "down", timeout=120)
    assert leftovers(prefix) == []
