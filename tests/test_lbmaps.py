"""Maglev tables in the kernel (xoverlay/kernel/maglev_maps.py) on a real array of maps: swapped in whole,
read back, emptied; and 10,000 services' worth of them, which is what the per-service
table size is chosen for."""
from __future__ import annotations

import os
import time

import pytest

from xoverlay.core import desired, maglev
from xoverlay.core.maglev import flow_hash
from xoverlay.kernel import bpf
from xoverlay.kernel import maglev_maps
from xoverlay.kernel.maglev_maps import MaglevTables
from xoverlay.maps.layout import LB_MAX_SERVICES

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating BPF maps needs root")


class Outer:
    """Stands in for the pinned xo_lb_maglev: an array of maps made the same way."""

    def __init__(self):
        inner = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, "tpl", 4, 4, 1, bpf.BPF_F_INNER_MAP)
        try:
            self.fd = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY_OF_MAPS, "outer", 4, 4, LB_MAX_SERVICES,
                                     inner_map_fd=inner)
        finally:
            os.close(inner)

    def delete_raw(self, key):
        return bpf.map_delete(self.fd, key)

    def close(self):
        os.close(self.fd)


@pytest.fixture
def tables():
    outer = Outer()
    yield MaglevTables(outer)
    outer.close()


def table_for(sid: int, n: int = 3) -> tuple:
    return desired._table(tuple((f"s{sid}-b{i}", 1, i + 1) for i in range(n)), maglev.size_for(n))


def test_set_read_replace_empty(tables):
    tables.set(7, table_for(7))
    tables.set(9, table_for(9, 5))
    assert tables.read() == {7: table_for(7), 9: table_for(9, 5)}
    # A new reader (a restarted agent) reads the kernel's tables, not a cache.
    fresh = MaglevTables(tables.outer)
    assert fresh.read() == {7: table_for(7), 9: table_for(9, 5)}
    tables.set(7, table_for(7, 2))
    assert fresh.read()[7] == table_for(7, 2)
    tables.apply({}, [9])
    assert tables.read() == {7: table_for(7, 2)} == fresh.read()


def test_the_wait_probe_says_what_a_lookup_in_a_map_of_maps_costs():
    """Before 6.8 a lookup in a map of maps waits for an RCU grace period (milliseconds);
    the probe times one and says so."""
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    assert maglev_maps.lookups_wait() == ((major, minor) < (6, 8))


@pytest.mark.parametrize("waits", [False, True])
def test_tables_are_read_back_whether_or_not_lookups_wait(tables, monkeypatch, waits):
    """Where lookups wait, only the slots of the services asked about and of the tables
    this reader wrote are looked at; elsewhere every slot is read in batches."""
    monkeypatch.setattr(maglev_maps, "lookups_wait", lambda: waits)
    tables.set(7, table_for(7))
    other = MaglevTables(tables.outer)            # another reader: knows no table of its own
    other.set(9, table_for(9))
    assert tables.read([9]) == {7: table_for(7), 9: table_for(9)}
    assert MaglevTables(tables.outer).read([7]) == ({7: table_for(7), 9: table_for(9)} if not waits
                                                     else {7: table_for(7)})
    tables.apply({}, [7])
    assert tables.read([9]) == {9: table_for(9)}


def test_ten_thousand_services(tables):
    """10,000 three-backend services: 401 slots each, about 3.5 KB of kernel memory each
    (array values are 8-byte aligned), swapped in by batches, emptied by batches."""
    want = {sid: table_for(sid) for sid in range(1, 10001)}
    assert {len(t) for t in want.values()} == {402}
    start = time.monotonic()
    tables.apply(want, [])
    pushed = time.monotonic() - start
    assert MaglevTables(tables.outer).read() == want
    start = time.monotonic()
    tables.apply({}, list(want))
    emptied = time.monotonic() - start
    assert tables.read() == {} and MaglevTables(tables.outer).read() == {}
    # One kernel wait per batch, not per service (which took 113 s here).
    assert pushed < 60 and emptied < 10, (pushed, emptied)


def test_flow_hash_is_the_data_paths():
    """Pinned values: bpf/lib/lb.h xo_lb_hash must give the same (checked against the
    kernel in test_bpf_services.py, which predicts every choice with this)."""
    assert flow_hash(1, 2, 3, 4, 6, False) == flow_hash(1, 2, 3, 4, 6, False)
    assert flow_hash(1, 2, 3, 4, 6, True) == flow_hash(1, 9, 9, 9, 17, True)
    assert flow_hash(1, 2, 3, 4, 6, False) != flow_hash(1, 2, 3, 5, 6, False)
