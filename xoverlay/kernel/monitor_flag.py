"""The monitor's flag (xo_monitor): whether, and how often, the programs write events to
the ring buffer, and which process asked. A flag whose process is gone is stale: the
agent clears it on every pass, so programs never write events nobody reads."""
from __future__ import annotations

from typing import Callable

from xoverlay.kernel.pinned import PinnedMap
from xoverlay.kernel.processes import owner_alive
from xoverlay.maps.layout import MAPS, U32, Monitor, pin_dir


def flag_state(mon: Monitor | None, alive: Callable[[int, int], bool] = owner_alive) -> str:
    """'off' (no monitor asked for events), 'running' (its monitor lives) or 'stale'
    (the monitor that set it is gone: the programs write events nobody reads)."""
    if mon is None or not mon.events:
        return "off"
    return "running" if alive(mon.pid, mon.pid_start) else "stale"


def read_flag(node: str) -> Monitor | None:
    """The node's xo_monitor entry; None if it is not pinned (no node, or programs that
    predate the monitor)."""
    try:
        with PinnedMap(pin_dir(node), MAPS["xo_monitor"]) as m:
            return m.get(U32(0))
    except OSError:
        return None


def clear_if_stale(flag: PinnedMap) -> Monitor | None:
    """Clear a monitor flag (the opened xo_monitor map) if it is stale; return the stale
    entry, else None. The agent calls this on every reconcile pass."""
    mon = flag.get(U32(0))
    if flag_state(mon) != "stale":
        return None
    flag.set(U32(0), Monitor())
    return mon
