"""A store in this process's memory."""
from __future__ import annotations

from typing import Callable

from xoverlay.core.model import State
from xoverlay.store.base import Store, changes


class MemoryStore(Store):
    """A store in this process only: for pure tests, and for tearing a lab down when its
    store is gone (its kernel objects are still removed)."""
    where = "memory"

    def __init__(self, state: State | None = None):
        self._state, self._gen = state or State(), 0

    def read(self) -> State:
        return self._state

    def generation(self) -> int:
        return self._gen

    def update(self, change: Callable[[State], State]) -> State:
        new = change(self._state)
        if any(changes(self._state, new)):
            self._state, self._gen = new, self._gen + 1
        return new

    def register(self, node: str, ttl: float, info: dict) -> None:
        self._alive = {node: info}

    def renew(self) -> None:
        pass

    def unregister(self) -> None:
        self._alive = {}

    def alive(self) -> dict[str, dict]:
        return dict(getattr(self, "_alive", {}))
