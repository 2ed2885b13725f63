"""Per-second rates from two status snapshots, and a bounded history of them for
sparklines. Pure: no clock, no kernel; the caller says how many seconds passed.

A counter that went down between two readings was reset (its map entry was pruned and
created again, e.g. an endpoint recreated with the same address): that interval's rate
is 0, never negative. A row that was not in the earlier snapshot has no rate yet."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Hashable, Iterable


def per_second(before: int, after: int, seconds: float) -> float:
    """How fast a counter grew: 0 if it went backwards (reset) or no time passed."""
    if seconds <= 0 or after < before:
        return 0.0
    return (after - before) / seconds


@dataclass(frozen=True)
class Rates:
    tx_pps: float = 0.0     # packets per second
    rx_pps: float = 0.0
    tx_Bps: float = 0.0     # bytes per second
    rx_Bps: float = 0.0

    @property
    def pps(self) -> float:
        """tx + rx packets per second: what the sparklines draw and `sort by rate` uses."""
        return self.tx_pps + self.rx_pps


def traffic_rates(before: dict, after: dict, seconds: float) -> Rates:
    """Rates of one peer or endpoint row (tx/rx packets/bytes counters)."""
    def r(field):
        return per_second(before.get(field, 0), after.get(field, 0), seconds)
    return Rates(tx_pps=r("tx_packets"), rx_pps=r("rx_packets"), tx_Bps=r("tx_bytes"), rx_Bps=r("rx_bytes"))


def row_rates(before: Iterable[dict], after: Iterable[dict], key: str, seconds: float) -> dict[Hashable, Rates]:
    """Rates of every row of `after` that was already in `before` (matched on `key`)."""
    earlier = {row[key]: row for row in before}
    return {row[key]: traffic_rates(earlier[row[key]], row, seconds) for row in after if row[key] in earlier}


def drop_rates(before: Iterable[dict], after: Iterable[dict], seconds: float) -> dict[str, float]:
    """Dropped packets per second by reason. The status snapshot lists only reasons with a
    non-zero count, so a reason absent before counted from 0."""
    earlier = {d["reason"]: d["packets"] for d in before}
    return {d["reason"]: per_second(earlier.get(d["reason"], 0), d["packets"], seconds) for d in after}


@dataclass(frozen=True)
class SnapshotRates:
    peers: dict          # peer node name -> Rates
    endpoints: dict      # endpoint name -> Rates
    drops: dict          # drop reason name -> packets/s


def snapshot_rates(before: dict | None, after: dict, seconds: float) -> SnapshotRates:
    """Rates between two status snapshots of the same node taken `seconds` apart."""
    if before is None or before["node"]["name"] != after["node"]["name"]:
        return SnapshotRates({}, {}, {})
    return SnapshotRates(peers=row_rates(before["peers"], after["peers"], "node", seconds),
                         endpoints=row_rates(before["endpoints"], after["endpoints"], "name", seconds),
                         drops=drop_rates(before["drops"], after["drops"], seconds))


class History:
    """The last `size` samples of each key, oldest first. A key missing from a push is
    forgotten (its row is gone), so memory stays bounded by rows x size."""

    def __init__(self, size: int = 60):
        if size < 1:
            raise ValueError("history size must be at least 1")
        self.size = size
        self._series: dict[Hashable, deque] = {}

    def push(self, samples: dict[Hashable, float]) -> None:
        for key in self._series.keys() - samples.keys():
            del self._series[key]
        for key, value in samples.items():
            self._series.setdefault(key, deque(maxlen=self.size)).append(value)

    def get(self, key: Hashable) -> list[float]:
        return list(self._series.get(key, ()))

    def keys(self) -> set:
        return set(self._series)

    def clear(self) -> None:
        self._series.clear()


def ago(seconds: float | None) -> str:
    """How long since the last packet, in the largest whole unit: 'now' (under a
    second), '12s', '3m', '5h', '2d'; 'never' for None."""
    if seconds is None:
        return "never"
    if seconds < 1:
        return "now"
    for div, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= div:
            return f"{int(seconds // div)}{unit} ago"
    return f"{int(seconds)}s ago"
