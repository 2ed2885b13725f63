"""The SQLite store: atomic read-validate-write across processes, root-only file."""
import multiprocessing
import os
import stat

import pytest

from xoverlay.core import model
from xoverlay.errors import XoError
from xoverlay.store.sqlite import SqliteStore


def test_file_is_root_only(tmp_path):
    SqliteStore(str(tmp_path / "s" / "state.db"))
    assert stat.S_IMODE(os.stat(tmp_path / "s" / "state.db").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700


def test_failed_update_changes_nothing(tmp_path):
    store = SqliteStore(str(tmp_path / "state.db"))
    store.update(lambda s: model.create_network(s, "a", "10.1.0.0/16"))
    gen = store.generation()

    def half_then_fail(s):
        s = model.create_network(s, "b", "10.2.0.0/16")
        return model.create_network(s, "c", "10.1.0.0/24")   # overlaps a
    with pytest.raises(XoError):
        store.update(half_then_fail)
    assert set(store.read().networks) == {"a"} and store.generation() == gen


def test_an_internal_network_stays_internal_across_processes(tmp_path):
    """--internal is part of the network's record, and a record written before the flag
    existed reads as not internal."""
    path = str(tmp_path / "s.db")
    SqliteStore(path).update(lambda s: model.create_network(s, "in", "10.1.0.0/16", internal=True))
    SqliteStore(path).update(lambda s: model.create_network(s, "out", "10.2.0.0/16"))
    nets = SqliteStore(path).read().networks
    assert (nets["in"].internal, nets["out"].internal) == (True, False)
    from xoverlay.store.base import decode
    assert decode("network", '{"name": "old", "subnet": "10.3.0.0/16", "vni": 7, "slice_prefix": 24}').internal is False


def test_noop_update_keeps_generation(tmp_path):
    store = SqliteStore(str(tmp_path / "state.db"))
    gen = store.generation()
    store.update(lambda s: s)
    assert store.generation() == gen


def test_snapshot_reads_again_only_when_something_moved(tmp_path):
    """Another process's write, or the file replaced by one with the same generation (a
    restored copy): a new state. Nothing moved: the same state, not read again."""
    path = str(tmp_path / "state.db")
    store, writer = SqliteStore(path), SqliteStore(path)
    writer.update(lambda s: model.create_network(s, "a", "10.1.0.0/16"))
    gen, first = store.snapshot()
    assert set(first.networks) == {"a"}
    assert store.snapshot() == (gen, first) and store.snapshot()[1] is first
    writer.update(lambda s: model.create_network(s, "b", "10.2.0.0/16"))
    gen2, second = store.snapshot()
    assert gen2 == gen + 1 and set(second.networks) == {"a", "b"}

    other = str(tmp_path / "other.db")           # two writes as well: the same generation
    restored = SqliteStore(other)
    restored.update(lambda s: model.create_network(s, "c", "10.3.0.0/16"))
    restored.update(lambda s: model.create_network(s, "d", "10.4.0.0/16"))
    restored.close()                              # its WAL checkpointed into the file
    writer.close()
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")    # so is the old file's (see _follow)
    os.replace(other, path)
    gen3, third = store.snapshot()
    assert gen3 == gen2 and set(third.networks) == {"c", "d"}


def _allocate(path, node, count, queue):
    store = SqliteStore(path)
    for i in range(count):
        store.update(lambda s, i=i: model.add_endpoint(s, f"{node}-{i}", "app", node, f"/x/{node}/{i}", True))
    queue.put(node)


def test_concurrent_allocators_never_share_an_address(tmp_path):
    path = str(tmp_path / "state.db")
    store = SqliteStore(path)
    nodes = [f"n{i}" for i in range(4)]
    for i, n in enumerate(nodes):
        store.update(lambda s, n=n, i=i: model.join_node(s, n, f"192.0.2.{i + 1}"))
    store.update(lambda s: model.create_network(s, "app", "10.10.0.0/16", slice_prefix=28))
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_allocate, args=(path, n, 25, q)) for n in nodes]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    eps = store.read().endpoints
    assert len(eps) == 100
    assert len({e.ip for e in eps.values()}) == 100
    slices = [s.subnet for s in store.read().slices.values()]
    assert len(slices) == len(set(slices))
