"""Monitor event types, program hooks and forwarding actions, read from their one
definition in bpf/lib/events.h (as xoverlay/maps/drops.py reads drop.h)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from xoverlay.maps import BPF_DIR

EVENTS_HEADER = BPF_DIR / "lib" / "events.h"


@dataclass(frozen=True)
class Code:
    code: int
    name: str
    text: str


def _load(macro: str) -> dict[int, Code]:
    line = re.compile(rf'{macro}\((\w+),\s*(\d+),\s*"([^"]*)"\)')
    return {int(code): Code(int(code), name, text) for name, code, text in line.findall(EVENTS_HEADER.read_text())}


EVENT_TYPES: dict[int, Code] = _load("XO_EVENT")
HOOKS: dict[int, Code] = _load("XO_HOOK")
FWD_ACTIONS: dict[int, Code] = _load("XO_FWD")
HOOK_ENDPOINT = next(c.code for c in HOOKS.values() if c.name == "ENDPOINT")    # its ifindex is an endpoint's veth
