"""bench/etcd-scale's own parts: the simulated cluster it builds by hand is the one the
model's rules build, and EtcdStore.seed writes it so that EtcdStore reads back the same.
The whole script at a tiny scale (5 nodes, 50 endpoints) runs as a lab test."""
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from xoverlay.core import model
from xoverlay.errors import XoError
from xoverlay.store.etcd import EtcdStore

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "etcd-scale")


def _load_script():
    loader = importlib.machinery.SourceFileLoader("etcd_scale", SCRIPT)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("etcd_scale", loader))
    loader.exec_module(module)
    return module


S = _load_script()


def _through_the_model(nodes: int, endpoints: int) -> model.State:
    """The same cluster, one `up` and one `endpoint add` at a time."""
    subnet, slice_prefix = S.layout(nodes, endpoints)
    state = model.create_network(model.State(), S.NETWORK, subnet, slice_prefix=slice_prefix)
    for i in range(nodes):
        state = model.join_node(state, S.sim_node(i), str(S.SIM_UNDERLAY.network_address + 1 + i))
    for i, count in enumerate(S.shares(nodes, endpoints)):
        for j in range(count):
            name = S.sim_endpoint(i, j)
            state = model.add_endpoint(state, name, S.NETWORK, S.sim_node(i), f"/run/netns/{name}", False)
            state = model.set_endpoint_ready(state, name)
    return state


@pytest.mark.parametrize("nodes, endpoints", [(5, 50), (7, 23), (4, 2), (3, 0), (1, 120)])
def test_simulated_cluster_is_what_the_models_rules_build(nodes, endpoints):
    built = S.simulated_state(nodes, endpoints)
    assert built == _through_the_model(nodes, endpoints)
    S.check_with_model(built)


def test_simulated_cluster_has_the_requested_counts_spread_evenly():
    state = S.simulated_state(30, 1001)
    assert len(state.nodes) == 30 and len(state.endpoints) == 1001
    per_node = [sum(e.node == n for e in state.endpoints.values()) for n in state.nodes]
    assert max(per_node) - min(per_node) == 1
    assert len({e.ip for e in state.endpoints.values()}) == 1001
    assert all(e.ready and not e.removing for e in state.endpoints.values())


def test_each_slice_keeps_room_for_the_change_test():
    subnet, slice_prefix = S.layout(1000, 50000)
    assert 2 ** (32 - slice_prefix) - 2 >= 50 + S.SPARE
    assert 2 ** (slice_prefix - int(subnet.split("/")[1])) > 1000


def test_a_cluster_beyond_the_maps_is_refused():
    with pytest.raises(S.BenchError, match="xo_peers"):
        S.simulated_state(model.MAX_NODES, 0)
    with pytest.raises(S.BenchError, match="xo_endpoints"):
        S.simulated_state(10, model.MAX_ENDPOINTS + 1)


def test_a_check_with_the_model_finds_a_state_it_would_not_build():
    state = S.simulated_state(3, 9)
    last = state.endpoints[max(state.endpoints)]
    bad = state.with_("endpoint", last.name, model.Endpoint(**{**last.__dict__, "mac": "02:00:00:00:00:01"}))
    with pytest.raises(S.BenchError, match="model's rules"):
        S.check_with_model(bad)


# --- against etcd ---------------------------------------------------------------------

def test_seeded_store_reads_back_the_same_state_and_registrations(etcd):
    state = S.simulated_state(6, 40)
    writer = EtcdStore(etcd.url)
    txns = writer.seed(state, S.registrations(state), ops_per_txn=7)
    assert txns > 2, "more than one transaction of objects"
    reader = EtcdStore(etcd.url)
    assert reader.read() == state
    assert reader.generation() == 1
    assert sorted(reader.alive()) == sorted(state.nodes)
    # An ordinary update on top of it works, and moves the generation on.
    reader.update(lambda s: model.add_endpoint(s, "extra", S.NETWORK, S.sim_node(0), "/run/netns/extra", False))
    assert reader.generation() == 2 and "extra" in EtcdStore(etcd.url).read().endpoints


def test_seed_refuses_a_store_in_use(etcd):
    store = EtcdStore(etcd.url)
    store.update(lambda s: model.join_node(s, "n1", "192.0.2.1"))
    with pytest.raises(XoError, match="not empty"):
        store.seed(S.simulated_state(2, 2))


@pytest.mark.lab
def test_whole_bench_at_tiny_scale(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--nodes", "5", "--endpoints", "50", "--rounds", "1", "--no-small",
                        "--idle-seconds", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    [point] = json.load(open(tmp_path / "etcd-scale.json"))["points"]
    assert (point["nodes"], point["endpoints"]) == (5, 50)
    assert point["keys"] == 1 + 5 + 5 + 50 + 5 + 1      # network, nodes, slices, endpoints, alive, generation
    assert point["change"]["add_s"]["n"] == S.CHANGES
    assert point["maps"]["xo_endpoints"]["max_entries"] == model.MAX_ENDPOINTS
    assert "| 5 | 50 |" in r.stdout
    assert not [n for n in os.listdir("/run/netns") if n.startswith(S.PREFIX)]
    assert not [p for p in os.listdir("/sys/fs/bpf/xoverlay") if p.startswith(S.PREFIX)] \
        if os.path.isdir("/sys/fs/bpf/xoverlay") else True
    assert not S.our_etcds()
