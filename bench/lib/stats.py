"""Summaries of repeated measurements, the interleaved ratio, and results files."""
from __future__ import annotations

import json
import os
import re
import statistics

_NUMBER_LIST = re.compile(r"\[\s+(-?[\d.e+-]+(?:,\s+-?[\d.e+-]+)*)\s+\]")


def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def cycle_ratio(num: list[float], den: list[float]) -> float | None:
    """Two interleaved targets' rates compared: the median, over the cycles of batches,
    of num's rate over den's in the same cycle (~10 ms apart). A batch the machine
    stalled (a connection that waited for a retransmitted SYN, a preempted sender) moves
    one cycle, not the result; the totals' ratio would carry it whole."""
    ratios = [a / b for a, b in zip(num, den) if b]
    return statistics.median(ratios) if ratios else None


def json_text(obj) -> str:
    """A results file: indent=2, but a list of plain numbers on one line (the interleaved
    tests keep every cycle's rates: hundreds per test)."""
    return _NUMBER_LIST.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", json.dumps(obj, indent=2))


def write_json(path: str, obj) -> None:
    """`obj` as a results file at `path`, in place at once (never half written)."""
    with open(path + ".tmp", "w") as f:
        f.write(json_text(obj))
    os.replace(path + ".tmp", path)
