"""Drop reasons, read from their one definition in bpf/lib/drop.h."""
from __future__ import annotations

import re
from dataclasses import dataclass

from xoverlay.maps import BPF_DIR

DROP_HEADER = BPF_DIR / "lib" / "drop.h"
_LINE = re.compile(r'XO_DROP\((\w+),\s*(\d+),\s*"([^"]*)"\)')


@dataclass(frozen=True)
class DropReason:
    code: int
    name: str
    text: str


def _load() -> dict[int, DropReason]:
    reasons = {}
    for name, code, text in _LINE.findall(DROP_HEADER.read_text()):
        reasons[int(code)] = DropReason(int(code), name, text)
    return reasons


REASONS: dict[int, DropReason] = _load()
BY_NAME: dict[str, DropReason] = {r.name: r for r in REASONS.values()}
