"""Where the cluster state lives. The interface is small on purpose (read, update,
generation, wait, and a node's liveness) so that etcd stands behind it as well as the
embedded SQLite file: update runs a pure State -> State function atomically, with every
writer serialized. `open_store` picks the backend from one string: a file path (SQLite)
or etcd://HOST:PORT[/PREFIX] (ctl/store_etcd.py). docs/STORE.md has the details."""
from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Callable

from .errors import StoreError, XoError
from .model import KINDS, State

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


class SqliteStore(Store):
    """The embedded default: one SQLite file, shared by every process of the machine.
    Writers take the database lock (BEGIN IMMEDIATE) before reading, so a read-validate-
    write never races another."""

    def __init__(self, path: str | None = None):
        self.path = path or default_path()
        self.where = self.path
        self._snap: tuple[tuple[int, int], State] | None = None    # ((inode, generation), state)
        self._open(create=True)

    def _open(self, create: bool) -> None:
        directory = os.path.dirname(self.path) or "."
        try:
            if create:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            fresh = not os.path.exists(self.path)
            old_umask = os.umask(0o077)   # the state file is root's alone (0600)
            try:
                # Reopening never creates: a vanished file is an error, not an empty store.
                target = self.path if create else f"file:{self.path}?mode=rw"
                db = sqlite3.connect(target, timeout=15, isolation_level=None, uri=not create)
            finally:
                os.umask(old_umask)
            if fresh and create:
                os.chmod(self.path, 0o600)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # Only a new store is written to: opening one whose lock a writer holds
                # must still let us read it.
                if not db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
                    db.execute("CREATE TABLE IF NOT EXISTS objects (kind TEXT, name TEXT, body TEXT, "
                               "PRIMARY KEY (kind, name))")
                    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
                    db.execute("INSERT OR IGNORE INTO meta VALUES ('generation', 0)")
                ino = os.stat(self.path).st_ino
            except BaseException:
                db.close()        # an agent retrying every half second must not leak fds
                raise
        except sqlite3.DatabaseError as e:
            raise StoreError(f"state store {self.path}: {e}") from None
        except OSError as e:
            raise StoreError(f"state store {self.path}: {e.strerror}") from None
        self._db, self._ino = db, ino

    def _follow(self) -> None:
        """A state file replaced under a long-lived reader (a restored backup, or junk
        written over it) is reopened: the agent must see what is at the path now, not
        an unlinked inode it still holds."""
        try:
            ino = os.stat(self.path).st_ino
        except OSError as e:
            raise StoreError(f"state store {self.path}: {e.strerror}") from None
        if ino != self._ino:
            # Let go of the old file first: a connection left on it could checkpoint its
            # WAL (named after the path, so shared with the new file) into the old inode.
            if self._db is not None:
                self._db.close()
                self._db, self._ino = None, None
            self._open(create=False)

    def close(self):
        if self._db is not None:
            self._db.close()

    def _read(self) -> State:
        return state_of(self._db.execute("SELECT kind, name, body FROM objects"))

    def read(self) -> State:
        self._follow()
        try:
            return self._read()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"state store {self.path}: {e}") from None

    def generation(self) -> int:
        self._follow()
        try:
            return self._db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise StoreError(f"state store {self.path}: {e}") from None

    def snapshot(self) -> tuple[int, State]:
        """Read again only when the generation moved (or the file was replaced): every
        writer bumps it, and an agent takes a snapshot every pass, 2 s apart when idle
        (reading and parsing every object was most of an idle pass at 10,000 services).
        The state is read after its generation, so it is never older than the number it
        is kept under: a write in between only makes the next pass read again."""
        generation = self.generation()
        key = (self._ino, generation)
        if self._snap is None or self._snap[0] != key:
            self._snap = (key, self.read())
        return generation, self._snap[1]

    def update(self, change: Callable[[State], State]) -> State:
        self._follow()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreError(f"state store {self.path} is locked: {e}") from None
        try:
            old = self._read()
            new = change(old)
            puts, deletes = changes(old, new)
            self._db.executemany("DELETE FROM objects WHERE kind=? AND name=?", deletes)
            self._db.executemany("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)", puts)
            if puts or deletes:
                self._db.execute("UPDATE meta SET value = value + 1 WHERE key='generation'")
            self._db.execute("COMMIT")
            return new
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # Liveness in SQLite: a row per node with a wall-clock expiry (agents are separate
    # processes); renewing it does not move the generation, so it wakes nobody.
    def _alive_table(self):
        self._db.execute("CREATE TABLE IF NOT EXISTS alive (node TEXT PRIMARY KEY, expires REAL, body TEXT)")

    def register(self, node: str, ttl: float, info: dict) -> None:
        self._lease = (node, ttl, json.dumps(info))
        self.renew()

    def renew(self) -> None:
        node, ttl, body = self._lease
        self._follow()
        try:
            self._alive_table()
            self._db.execute("INSERT OR REPLACE INTO alive VALUES (?, ?, ?)", (node, time.time() + ttl, body))
        except sqlite3.DatabaseError as e:
            raise StoreError(f"state store {self.path}: {e}") from None

    def unregister(self) -> None:
        try:
            self._db.execute("DELETE FROM alive WHERE node=?", (self._lease[0],))
        except (sqlite3.DatabaseError, AttributeError):
            pass

    def alive(self) -> dict[str, dict]:
        self._follow()
        try:
            self._alive_table()
            return alive_now(self._db.execute("SELECT node, expires, body FROM alive"), time.time())
        except sqlite3.DatabaseError as e:
            raise StoreError(f"state store {self.path}: {e}") from None


def _routable(url: str) -> bool:
    """Does this netns have a route to the URL's host? (A UDP connect sends nothing.)"""
    import socket
    host = url[len(ETCD_SCHEME):].split("/")[0].rsplit(":", 1)[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return True
        except OSError:
            return False


def lab_store(path: str) -> str | None:
    """The etcd URL a namespace lab made for this store path runs on (`lab up --store
    etcd`), if any: while that lab is up, the path stands for the lab's etcd, so the host's
    CLI sees the lab's cluster with the same --state as the SQLite lab. The lab's etcd has
    an address on the underlay (for the lab's namespaces) and one on a private link to the
    host (for the host's CLI): the host's if this netns has a route to it (the host), else
    the underlay's (a lab namespace)."""
    try:
        with open(path + LAB_SUFFIX) as f:
            etcd = json.load(f).get("etcd") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not etcd.get("url"):
        return None
    return etcd["url"] if _routable(etcd["url"]) else etcd.get("node_url")


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


def open_store(spec: str | None = None, tls: Tls = Tls()) -> Store:
    """The store named by `spec`: etcd://HOST:PORT[/PREFIX], or a file path (SQLite)."""
    spec = spec or default_path()
    if not is_etcd(spec):
        spec = lab_store(os.path.abspath(spec)) or spec
    if is_etcd(spec):
        from .store_etcd import EtcdStore
        return EtcdStore(spec, tls)
    if tls:
        raise XoError(f"--store-ca/--store-cert/--store-key are for etcd, and the store is the file {spec}")
    return SqliteStore(spec)
