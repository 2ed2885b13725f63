"""Where the cluster state lives. The interface is small on purpose (read, update,
wait) so that etcd can stand behind it too: update runs a pure State -> State function
atomically, with every writer serialized."""
from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
from typing import Callable

from .errors import StoreError
from .model import KINDS, State

DEFAULT_STATE = "/var/lib/xoverlay/state.db"


def default_path() -> str:
    return os.environ.get("XOVERLAY_STATE", DEFAULT_STATE)


class Store:
    def read(self) -> State: ...
    def update(self, change: Callable[[State], State]) -> State: ...
    def generation(self) -> int: ...

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
        tables = {kind: {} for kind in KINDS}
        for kind, name, body in self._db.execute("SELECT kind, name, body FROM objects"):
            if kind in KINDS:
                cls = KINDS[kind]
                fields = json.loads(body)
                tables[kind][name] = cls.from_dict(fields) if hasattr(cls, "from_dict") else cls(**fields)
        return State(**{kind + "s": t for kind, t in tables.items()})

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

    def update(self, change: Callable[[State], State]) -> State:
        self._follow()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreError(f"state store {self.path} is locked: {e}") from None
        try:
            old = self._read()
            new = change(old)
            changed = False
            for kind in KINDS:
                before, after = old.table(kind), new.table(kind)
                for name in before.keys() - after.keys():
                    self._db.execute("DELETE FROM objects WHERE kind=? AND name=?", (kind, name))
                    changed = True
                for name, obj in after.items():
                    if before.get(name) != obj:
                        self._db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)",
                                         (kind, name, json.dumps(dataclasses.asdict(obj))))
                        changed = True
            if changed:
                self._db.execute("UPDATE meta SET value = value + 1 WHERE key='generation'")
            self._db.execute("COMMIT")
            return new
        except BaseException:
            self._db.execute("ROLLBACK")
            raise


def open_store(path: str | None = None) -> Store:
    return SqliteStore(path)
