"""The store's interface, small on purpose (read, update, generation, wait, and a node's
liveness) so that etcd stands behind it as well as the embedded SQLite file: update runs a
pure State -> State function atomically, with every writer serialized. Also what every
backend shares: how objects are encoded, and how two states differ."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Callable

from xoverlay.core.model import KINDS, State
from xoverlay.errors import StoreError

DEFAULT_STATE = "/var/lib/xoverlay/state.db"


ETCD_SCHEME = "etcd://"
LAB_SUFFIX = ".lab.json"      # a namespace lab's registry, beside the store path it was made for


class StoreUnavailable(StoreError):
    """The store cannot be reached now (etcd down, network): worth retrying, and never a
    reason to touch the data path."""


@dataclass(frozen=True)
class Tls:
    """Client TLS for etcd (--store-ca/--store-cert/--store-key); all None: plain HTTP."""
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __bool__(self) -> bool:
        return bool(self.ca or self.cert or self.key)


def default_path() -> str:
    return os.environ.get("XOVERLAY_STORE") or os.environ.get("XOVERLAY_STATE") or DEFAULT_STATE


def is_etcd(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(ETCD_SCHEME)


def encode(obj) -> str:
    return json.dumps(dataclasses.asdict(obj), sort_keys=True)


def decode(kind: str, body: str):
    cls = KINDS[kind]
    fields = json.loads(body)
    return cls.from_dict(fields) if hasattr(cls, "from_dict") else cls(**fields)


def state_of(objects) -> State:
    """A State from (kind, name, body) rows; kinds this version does not know are skipped."""
    tables = {kind: {} for kind in KINDS}
    for kind, name, body in objects:
        if kind in KINDS:
            tables[kind][name] = decode(kind, body)
    return State(**{kind + "s": t for kind, t in tables.items()})


def changes(old: State, new: State) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """What to write to turn `old` into `new`: (kind, name, body) to put, (kind, name) to delete."""
    puts, deletes = [], []
    for kind in KINDS:
        before, after = old.table(kind), new.table(kind)
        deletes += [(kind, name) for name in sorted(before.keys() - after.keys())]
        puts += [(kind, name, encode(obj)) for name, obj in sorted(after.items()) if before.get(name) != obj]
    return puts, deletes


def alive_now(rows, now: float) -> dict[str, dict]:
    """Nodes whose registration has not expired: {node: what the agent registered}."""
    return {node: json.loads(body) for node, expires, body in rows if expires > now}


class Store:
    """What every backend offers. `where` names it for messages."""
    where = "?"

    def read(self) -> State: ...
    def update(self, change: Callable[[State], State]) -> State: ...
    def generation(self) -> int: ...

    def snapshot(self) -> tuple[int, State]:
        """The generation and the state it belongs to (etcd: one consistent read)."""
        return self.generation(), self.read()

    # Node liveness: the agent registers with a TTL and renews well before it ends; a node
    # missing from alive() is down (its agent is gone, or cannot reach the store).
    def register(self, node: str, ttl: float, info: dict) -> None: ...
    def renew(self) -> None: ...
    def unregister(self) -> None: ...
    def alive(self) -> dict[str, dict]: ...

    def close(self) -> None:
        pass

    def wait(self, since: int, timeout: float, poll: float = 0.05) -> int:
        """Block until the generation moves past `since` or the timeout ends."""
        deadline = time.monotonic() + timeout
        while True:
            gen = self.generation()
            if gen != since or time.monotonic() >= deadline:
                return gen
            time.sleep(poll)
