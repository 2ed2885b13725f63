"""Reading what the data path counted, from the pinned maps (no agent, no compiler)."""
from __future__ import annotations

import os

from maps.layout import MAPS, PinnedMap, ip_be, pin_dir, sum_percpu, U32

from .model import State, peers_of


def read_counters(node: str, map_name: str) -> dict:
    """Per-CPU counters of one map, summed; empty if the node has no pins here."""
    try:
        with PinnedMap(pin_dir(node), MAPS[map_name]) as m:
            return {k: sum_percpu(v) for k, v in m.items().items()}
    except OSError:
        return {}


def peer_rows(state: State, node: str) -> list[dict]:
    stats = read_counters(node, "xo_peer_stats")
    rows = []
    for peer in peers_of(state, node):
        t = stats.get(U32(ip_be(peer.underlay_ip)))
        rows.append({
            "node": peer.name, "underlay_ip": peer.underlay_ip,
            "subnets": sorted(s.subnet for s in state.slices.values() if s.node == peer.name),
            "tx_packets": t.tx_packets if t else 0, "tx_bytes": t.tx_bytes if t else 0,
            "rx_packets": t.rx_packets if t else 0, "rx_bytes": t.rx_bytes if t else 0,
        })
    return rows


def drop_counts(node: str) -> dict[int, tuple[int, int]]:
    """reason code -> (packets, bytes), only the non-zero ones."""
    out = {}
    for key, c in read_counters(node, "xo_drops").items():
        if c.packets:
            out[key.value] = (c.packets, c.bytes)
    return out
