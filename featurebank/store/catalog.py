r"""The store's SQLite catalog: stat cache, embedded items (path -> key, label), failures.

One file ``catalog.sqlite`` in WAL mode with a busy timeout, so several processes can read
and write it at once. Tables (plain SQL, readable with the ``sqlite3`` shell)::

    stat_cache(path PK, size, mtime_ns, ctime_ns, inode, dev, key, hashed_at_ns)
    items(path PK, key, label, updated)                  -- what was embedded, for export
    failures(path, space, key, reason, attempts, time, PK(path, space))

Paths are kept losslessly: a path (or label) that is valid UTF-8 is stored as TEXT, one that
is not (a Latin-1 ``caf\xe9.jpg`` from an old disk, which Python sees as ``'caf\udce9.jpg'``)
as a BLOB of its raw bytes (``os.fsencode``); :func:`to_db` / :func:`from_db` convert, and
each path always maps to the same value, so lookups match. Reasons are free text for people:
bytes that are not UTF-8 are written as ``\xNN`` escapes (:func:`printable`).

Schema versions (``PRAGMA user_version``): 1 held TEXT only; 2 may hold BLOB paths and labels.
A version-1 catalog is valid version 2 data and is upgraded in place on open; featurebank
releases that read only version 1 then refuse it (they would return bytes as paths).

Vectors never live here: they are in the Arrow shard files.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from featurebank.errors import StoreError

CATALOG_NAME = "catalog.sqlite"
CATALOG_SCHEMA = 2
_READABLE_SCHEMAS = (0, 1, 2)  # 0: a new file; 1: upgraded to 2 on open (nothing to rewrite)
BUSY_TIMEOUT_S = 60.0
_CHUNK = 500  # rows per `IN (...)` query, below SQLite's default variable limit

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS stat_cache (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    dev INTEGER NOT NULL,
    key TEXT NOT NULL,
    hashed_at_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    path TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    label TEXT,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_key ON items(key);
CREATE TABLE IF NOT EXISTS failures (
    path TEXT NOT NULL,
    space TEXT NOT NULL,
    key TEXT,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    time REAL NOT NULL,
    PRIMARY KEY (path, space)
);
"""


def to_db(path: str) -> str | bytes:
    """A path or label as stored: TEXT when it is valid UTF-8, else its raw bytes (BLOB)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(path)
    except UnicodeEncodeError:
        raise ValueError(
            f"{printable(path)!r} holds lone surrogate characters that are not file-name bytes "
            "(os.fsdecode never produces them); pass the path as the operating system gave it"
        ) from None


def from_db(value: str | bytes | None) -> str | None:
    """Inverse of :func:`to_db`: BLOB bytes become the str Python uses for that file name."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def printable(text: str) -> str:
    """``text`` with every character UTF-8 cannot encode shown as an escape, never raising:
    file-name bytes that are not UTF-8 as ``\\xNN`` (``'caf\\udce9.jpg'`` -> ``caf\\xe9.jpg``),
    other lone surrogates as ``\\uNNNN``. Valid text is returned unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Catalog:
    """Thin wrapper over one SQLite connection (autocommit; explicit write transactions)."""

    def __init__(self, root: Path) -> None:
        self.path = root / CATALOG_NAME
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(
                str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); is the store on a network file system?")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            with self.write():
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                if version not in _READABLE_SCHEMAS:
                    raise StoreError(
                        f"{self.path}: catalog schema version {version} is not supported by this featurebank "
                        f"(supports {CATALOG_SCHEMA}); upgrade featurebank"
                    )
                for statement in _SCHEMA_SQL.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {CATALOG_SCHEMA}")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: catalog database is unusable: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; BEGIN IMMEDIATE takes the write lock up front (no upgrade deadlocks)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def query_in(self, sql_prefix: str, values: Sequence) -> list[tuple]:
        """Run ``sql_prefix + "(?, ?, ...)"`` over ``values`` in chunks; concatenated rows."""
        rows: list[tuple] = []
        with self._lock:
            for s in range(0, len(values), _CHUNK):
                part = values[s : s + _CHUNK]
                rows.extend(self._conn.execute(sql_prefix + "(" + ",".join("?" * len(part)) + ")", part).fetchall())
        return rows

    # ------------------------------------------------------------------ stat cache
    def stat_lookup(self, paths: Sequence[str]) -> dict[str, tuple]:
        rows = self.query_in(
            "SELECT path, size, mtime_ns, ctime_ns, inode, dev, key, hashed_at_ns FROM stat_cache WHERE path IN ",
            [to_db(p) for p in paths],
        )
        return {from_db(r[0]): r[1:] for r in rows}

    def stat_store(self, rows: Sequence[tuple]) -> None:
        if not rows:
            return
        with self.write() as c:
            c.executemany(
                "INSERT OR REPLACE INTO stat_cache (path, size, mtime_ns, ctime_ns, inode, dev, key, hashed_at_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(to_db(r[0]), *r[1:]) for r in rows],
            )

    # ------------------------------------------------------------------ items
    def record_items(self, rows: Sequence[tuple[str, str, str | None]]) -> None:
        now = time.time()
        with self.write() as c:
            c.executemany(
                "INSERT OR REPLACE INTO items (path, key, label, updated) VALUES (?, ?, ?, ?)",
                [(to_db(p), k, None if lab is None else to_db(lab), now) for p, k, lab in rows],
            )

    def items(self) -> list[tuple[str, str, str | None, float]]:
        """Every (path, key, label, updated) row, oldest first."""
        rows = self.query("SELECT path, key, label, updated FROM items ORDER BY updated, path")
        return [(from_db(p), k, from_db(lab), t) for p, k, lab, t in rows]

    def items_of_keys(self, keys: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """key -> (path, label) of the most recently embedded file with that key, for the keys
        of ``keys`` that have one (a bounded query per chunk of keys, for streaming export)."""
        rows = self.query_in("SELECT key, path, label, updated FROM items WHERE key IN ", list(keys))
        rows.sort(key=lambda r: (r[3], r[1] if isinstance(r[1], str) else os.fsdecode(r[1])))
        return {k: (from_db(p), from_db(lab)) for k, p, lab, _ in rows}

    # ------------------------------------------------------------------ failures
    def failures(self, space: str | None = None) -> list[tuple[str, str, str | None, str, float, int]]:
        """(path, reason, key, space, time, attempts) of recorded failures (of one space, or all),
        oldest first."""
        sql = "SELECT path, reason, key, space, time, attempts FROM failures"
        params: tuple = ()
        if space is not None:
            sql += " WHERE space = ?"
            params = (space,)
        rows = self.query(sql + " ORDER BY time, path", params)
        return [(from_db(r[0]), *r[1:]) for r in rows]

    def record_failures(self, rows: Sequence[tuple[str, str, str | None, str]]) -> None:
        now = time.time()
        with self.write() as c:
            c.executemany(
                "INSERT INTO failures (path, space, key, reason, attempts, time) VALUES (?, ?, ?, ?, 1, ?) "
                "ON CONFLICT(path, space) DO UPDATE SET key = excluded.key, reason = excluded.reason, "
                "attempts = failures.attempts + 1, time = excluded.time",
                [(to_db(p), s, k, printable(r), now) for p, s, k, r in rows],
            )

    def clear_failures(self, space: str | None, paths: Sequence[str] | None) -> int:
        with self.write() as c:
            if paths is None:
                if space is None:
                    return c.execute("DELETE FROM failures").rowcount
                return c.execute("DELETE FROM failures WHERE space = ?", (space,)).rowcount
            n = 0
            for s in range(0, len(paths), _CHUNK):
                part = [to_db(p) for p in paths[s : s + _CHUNK]]
                marks = ",".join("?" * len(part))
                if space is None:
                    n += c.execute(f"DELETE FROM failures WHERE path IN ({marks})", part).rowcount
                else:
                    n += c.execute(f"DELETE FROM failures WHERE space = ? AND path IN ({marks})", [space, *part]).rowcount
            return n

    # ------------------------------------------------------------------ health
    def counts(self) -> dict[str, int]:
        """Rows per table: {"stat_cache", "items", "failures"}."""
        return {t: self.query(f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("stat_cache", "items", "failures")}

    def quick_check(self) -> list[str]:
        """Problems SQLite's ``PRAGMA quick_check`` finds in the file (empty when it is sound);
        a check that cannot run at all is reported as one problem."""
        try:
            res = [str(r[0]) for r in self.query("PRAGMA quick_check")]
        except sqlite3.Error as exc:
            return [str(exc)]
        return [] if res == ["ok"] else res
