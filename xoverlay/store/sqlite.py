"""The embedded store: one SQLite file (/var/lib/xoverlay/state.db by default), every
writer serialized by SQLite's own lock."""
from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Callable

from xoverlay.core.model import State
from xoverlay.errors import StoreError
from xoverlay.store.base import Store, alive_now, changes, default_path, state_of


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
