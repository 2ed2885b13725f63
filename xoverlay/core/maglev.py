"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), computed here and
pushed to the kernel as one lookup table per service.

Each backend has a preference list over the M slots of the table, a permutation given by
two hashes of its name (offset, skip). Backends take turns claiming their next preferred
slot that is still free until every slot is taken; a backend of weight w takes w turns
per round. The data path then picks `table[hash(flow) % M]`.

M is prime (so every skip generates a full permutation) and at least 100 times the
number of backends: each backend then gets its share of slots to within about 1%, and
removing one of N backends moves only about 1/N of the slots (docs/SERVICES.md has the
measured figures). A per-service M keeps 10,000 small services small: three backends
need 401 slots (1.6 KB), not 65537.

M belongs to the service, not to the current backend count: it is chosen for a capacity
(the next power of two >= the backends, at least 4) and only grows when the backends
outgrow it. Were it recomputed on every change, removing one backend would change M and
with it almost every slot, which is exactly what Maglev is there to avoid."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

SLOTS_PER_BACKEND = 100
MAX_TABLE = 65537          # a prime; the largest table we build (256 KB of u32)


@lru_cache(maxsize=4096)
def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


@lru_cache(maxsize=4096)
def table_size(backends: int) -> int:
    """The smallest prime >= 100 * backends, at most MAX_TABLE (and at least 7)."""
    n = max(7, SLOTS_PER_BACKEND * backends)
    if n >= MAX_TABLE:
        return MAX_TABLE
    while not is_prime(n):
        n += 1
    return min(n, MAX_TABLE)


def size_for(backends: int, current: int | None = None) -> int:
    """The table size a service with this many backends should use, keeping `current`
    while it still holds 100 slots per backend."""
    if current and backends * SLOTS_PER_BACKEND <= current:
        return current
    capacity = 4
    while capacity < backends:
        capacity *= 2
    return table_size(capacity)


def _hashes(name: str) -> tuple[int, int]:
    """Two independent 64-bit hashes of a backend's name (stable across processes and
    machines, unlike Python's hash())."""
    d = hashlib.blake2b(name.encode(), digest_size=16, person=b"xoverlay-maglev").digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def permutation(name: str, m: int) -> tuple[int, int]:
    """(offset, skip) of a backend's preference list: slot j is (offset + j * skip) % m."""
    h1, h2 = _hashes(name)
    return h1 % m, h2 % (m - 1) + 1


@dataclass(frozen=True)
class Weighted:
    name: str
    weight: int = 1


def build(backends: list, m: int | None = None) -> list[int]:
    """The lookup table: m entries, each the position in `backends` of the backend that
    owns that slot. `backends` are names or Weighted; the result does not depend on
    their order (turns are taken in name order). Empty list: empty table."""
    items = [b if isinstance(b, Weighted) else Weighted(b) for b in backends]
    if not items:
        return []
    names = [b.name for b in items]
    if len(set(names)) != len(names):
        raise ValueError("backend names must be unique")
    if any(b.weight < 1 for b in items):
        raise ValueError("weights must be >= 1")
    m = m or table_size(len(items))
    if not is_prime(m):
        raise ValueError(f"table size {m} is not prime")
    order = sorted(range(len(items)), key=lambda i: names[i])
    offsets, skips, weights = [], [], []
    for i in order:
        off, skip = permutation(names[i], m)
        offsets.append(off)
        skips.append(skip)
        weights.append(items[i].weight)
    nxt = [0] * len(order)
    entry = [-1] * m
    filled = 0
    while True:
        for k, owner in enumerate(order):
            off, skip = offsets[k], skips[k]
            for _ in range(weights[k]):
                j = nxt[k]
                c = (off + j * skip) % m
                while entry[c] >= 0:
                    j += 1
                    c = (off + j * skip) % m
                entry[c] = owner
                nxt[k] = j + 1
                filled += 1
                if filled == m:
                    return entry


def shares(table: list[int], n: int) -> list[int]:
    """How many slots each of n backends owns."""
    counts = [0] * n
    for owner in table:
        counts[owner] += 1
    return counts


def disruption(before: list[str], after: list[str], m: int | None = None) -> float:
    """Fraction of slots whose backend changes when the backend set goes from `before`
    to `after` with the same table size (a service keeps its M, see size_for)."""
    m = m or size_for(max(len(before), len(after)))
    t1 = [before[i] for i in build(before, m)]
    t2 = [after[i] for i in build(after, m)]
    return sum(a != b for a, b in zip(t1, t2)) / m


# The data path's flow hash (bpf/lib/lb.h), to know which slot a flow reads.
def _mix32(h: int) -> int:
    h &= 0xffffffff
    h ^= h >> 16
    h = (h * 0x85ebca6b) & 0xffffffff
    h ^= h >> 13
    h = (h * 0xc2b2ae35) & 0xffffffff
    h ^= h >> 16
    return h


def flow_hash(saddr_be: int, daddr_be: int, sport_be: int, dport_be: int, proto: int, affinity: bool) -> int:
    """bpf/lib/lb.h xo_lb_hash(), on the same in-memory (network order) integers."""
    h = _mix32(saddr_be ^ 0x9e3779b9)
    if affinity:
        return h
    h = _mix32(h ^ daddr_be)
    h = _mix32(h ^ ((sport_be << 16) | dport_be))
    return _mix32(h ^ proto)


def slot_of(hash_: int, m: int) -> int:
    """The table slot (1..M) the data path reads for a hash."""
    return hash_ % m + 1
