"""The Maglev tables in the kernel: one array map per service (slot 0 = M, slots 1..M =
backend index), created here and swapped into the pinned array of maps xo_lb_maglev in
one update, so a packet sees either the old table or the new one, never a mix, and M
always matches its table. Also the Python twin of the data path's flow hash."""
from __future__ import annotations

import os
import time
from functools import lru_cache

from xoverlay.kernel import bpf
from xoverlay.kernel.pinned import PinnedMap
from xoverlay.maps.layout import LB_MAX_SERVICES


# Kernels before 6.8 wait for an RCU grace period after every syscall lookup in a map of
# maps (bpf_map_copy_value ends in maybe_wait_bpf_programs), empty slots of a batch
# included. Measured on Debian 12's 6.1 under TCG: 17 ms a lookup, so a batch lookup of
# the 16,384 slots of xo_lb_maglev took about 5 minutes; on 6.18, 10 us and 0.1 ms for 64
# slots. There the slots are looked up one by one, only those that can matter.
WAIT_PROBE_SECONDS = 0.001


@lru_cache(maxsize=1)
def lookups_wait() -> bool:
    """Does a lookup in a map of maps wait for a grace period on this kernel? Timed on a
    one-slot map of maps: a grace period is milliseconds, a plain lookup microseconds."""
    inner = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, "xo_probe_in", 4, 4, 1, bpf.BPF_F_INNER_MAP)
    try:
        outer = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY_OF_MAPS, "xo_probe_out", 4, 4, 1, 0, inner)
        try:
            bpf.u32_update_batch(outer, [0], [inner])
            started = time.perf_counter()
            for _ in range(3):
                bpf.map_lookup(outer, bytes(4), 4)
            return (time.perf_counter() - started) / 3 > WAIT_PROBE_SECONDS
        finally:
            os.close(outer)
    finally:
        os.close(inner)


def outer_slots(fd: int, ids) -> list[tuple[int, int]]:
    """(service id, inner map id) of the slots of the outer map that hold a table. Where
    lookups wait, only `ids` are looked at (the services that exist and the tables we
    wrote): a table in another slot is reached by no service entry and does no harm."""
    if not lookups_wait():
        return [(int.from_bytes(k, "little"), int.from_bytes(v, "little"))
                for k, v in bpf.lookup_batch(fd, 4, 4, LB_MAX_SERVICES)]
    out = []
    for sid in sorted(set(ids)):
        value = bpf.map_lookup(fd, sid.to_bytes(4, "little"), 4)
        if value is not None:
            out.append((sid, int.from_bytes(value, "little")))
    return out


class MaglevTables:
    """Reads and replaces the tables of one node. Remembers the id of each inner map it
    wrote, so that a reconcile pass costs one batch lookup of the outer map, and a table
    is read back only when its map is not the one we wrote (a restarted agent, or drift)."""

    def __init__(self, outer: PinnedMap):
        self.outer = outer
        self._known: dict[int, tuple[int, tuple]] = {}    # service id -> (inner map id, table)

    def read(self, service_ids=()) -> dict[int, tuple]:
        """The tables in the kernel by service id. `service_ids`: the services that exist
        (where lookups wait, with the ids we wrote, the only slots looked at)."""
        out = {}
        for sid, map_id in outer_slots(self.outer.fd, set(service_ids) | self._known.keys()):
            known = self._known.get(sid)
            if known and known[0] == map_id:
                out[sid] = known[1]
                continue
            try:
                fd = bpf.map_fd_by_id(map_id)
            except bpf.BpfError:
                continue            # replaced under us: the next pass sees the new one
            try:
                n = bpf.map_info(fd).max_entries
                table = tuple(bpf.array_lookup_batch(fd, n))
            finally:
                os.close(fd)
            self._known[sid] = (map_id, table)
            out[sid] = table
        # An emptied slot (see apply) holds no table.
        return {sid: t for sid, t in out.items() if t and t[0]}

    def set(self, sid: int, table: tuple) -> None:
        self.apply({sid: table}, [])

    # Open fds at a time: well under the default limit of 1024.
    CHUNK = 256

    def apply(self, sets: dict[int, tuple], deletes: list[int]) -> None:
        """Swap in new tables (each built in a map of its own first) and drop old ones,
        a chunk of services per syscall."""
        items = sorted(sets.items())
        for start in range(0, len(items), self.CHUNK):
            chunk = items[start:start + self.CHUNK]
            fds = []
            try:
                for sid, table in chunk:
                    fd = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, f"xo_maglev_{sid}", 4, 4, len(table),
                                        bpf.BPF_F_INNER_MAP)
                    fds.append(fd)
                    bpf.array_update_batch(fd, list(table))
                bpf.u32_update_batch(self.outer.fd, [sid for sid, _ in chunk], fds)
                for (sid, table), fd in zip(chunk, fds):
                    self._known[sid] = (bpf.map_info(fd).id, tuple(table))
            finally:
                for fd in fds:
                    os.close(fd)
        if deletes:
            # A slot is emptied by pointing it at an empty table (M = 0: the data path
            # finds no backend), because an array of maps has no batch delete and each
            # single delete waits for an RCU grace period (~10 ms here): 10,000 services
            # removed at once would block the agent for minutes.
            fd = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, "xo_maglev_none", 4, 4, 1, bpf.BPF_F_INNER_MAP)
            try:
                deletes = sorted(deletes)
                for start in range(0, len(deletes), self.CHUNK):
                    chunk = deletes[start:start + self.CHUNK]
                    bpf.u32_update_batch(self.outer.fd, chunk, [fd] * len(chunk))
                empty_id = bpf.map_info(fd).id
            finally:
                os.close(fd)
            for sid in deletes:
                self._known[sid] = (empty_id, (0,))
