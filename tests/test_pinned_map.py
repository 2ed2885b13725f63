"""PinnedMap.items() reads maps in batches (values packed at their own size, per-CPU ones
at 8-byte slots): the same entries as reading them one by one. Real maps, pinned in a
throwaway directory."""
from __future__ import annotations

import ctypes
import os
import shutil

import pytest

from xoverlay.kernel import bpf
from xoverlay.kernel.pinned import PinnedMap
from xoverlay.maps.layout import MAP_TYPES, MAPS, PIN_ROOT, U32, EndpointKey, Subnet, Traffic, subnet_key

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="BPF maps need root")

HASH, LPM_TRIE = 1, 11
BPF_F_NO_PREALLOC = 1


@pytest.fixture
def pin(tmp_path):
    os.makedirs(PIN_ROOT, exist_ok=True)
    path = os.path.join(PIN_ROOT, f"pytest-pm-{os.getpid()}")
    os.makedirs(path)
    yield path
    shutil.rmtree(path)


def _pinned(pin: str, spec, map_type: int, flags: int = 0) -> PinnedMap:
    value_size = ctypes.sizeof(spec.value)
    fd = bpf.map_create(map_type, spec.name, ctypes.sizeof(spec.key), value_size, spec.max_entries, flags)
    try:
        bpf.obj_pin(fd, os.path.join(pin, spec.name))
    finally:
        os.close(fd)
    return PinnedMap(pin, spec)


def test_hash_map_in_batches_equals_entry_by_entry(pin):
    m = _pinned(pin, MAPS["xo_endpoints"], HASH)
    spec = MAPS["xo_endpoints"]
    for i in range(5000):
        m.set(EndpointKey(vni=4096 + i % 3, ip=i), spec.value(node_ip=i * 7, ifindex=i % 11))
    batched = m.items()
    assert len(batched) == 5000
    assert {bytes(k): bytes(v) for k, v in batched.items()} == \
        {bytes(k): bytes(v) for k, v in m._items_one_by_one().items()}
    m.close()


@pytest.mark.parametrize("kind", ["percpu_array", "percpu_hash"])
def test_per_cpu_counters_in_batches(pin, kind):
    """Our counters' per-CPU array (every slot there, zero or not), and a per-CPU hash."""
    spec = MAPS["xo_peer_stats"]
    m = _pinned(pin, spec, MAP_TYPES[kind])
    for i in range(300):
        m.set(U32(i), Traffic(tx_packets=i, rx_bytes=2 * i))
    batched = m.items()
    assert len(batched) == (spec.max_entries if kind == "percpu_array" else 300)
    for key, per_cpu in batched.items():
        i = key.value if key.value < 300 else 0
        assert [(c.tx_packets, c.rx_bytes) for c in per_cpu] == [(i, 2 * i)] * bpf.possible_cpus()
    m.close()


def test_lpm_trie_with_values_smaller_than_a_slot(pin):
    m = _pinned(pin, MAPS["xo_subnets"], LPM_TRIE, BPF_F_NO_PREALLOC)
    m.set(subnet_key("10.10.0.0/16"), Subnet(vni=4096))
    m.set(subnet_key("10.20.0.0/16"), Subnet(vni=4097))
    assert sorted(v.vni for v in m.items().values()) == [4096, 4097]
    m.close()
