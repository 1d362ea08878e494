"""The shared stores behind each worker's memory cache: key bytes -> value bytes.

* `DiskStore`: an SQLite database in a directory, shared by every process of
  the host that opens it. SQLite because it ships with Python (no new
  dependency, no server), its WAL mode lets readers run while one process
  writes, a transaction cut short by SIGKILL is rolled back at the next open,
  and one table with a last-used column is all an LRU bound on disk needs.
* `RedisStore`: a Redis or Valkey server shared by every replica; entries
  expire a set time after they were last read or written.

Both raise on any fault; `pipeline.cache.SharedLayer` turns that into a miss.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from .cache import DISK, REDIS, StoreRebuilt

log = logging.getLogger(__name__)

STORE_TIMEOUT_S = 0.5  # the longest one store call may wait (a lock, a connection, a reply)
MIB = 1024 * 1024


class DiskStore:
    """An LRU-bounded SQLite file in `directory`, opened lazily (after gunicorn forks).

    `max_bytes` bounds the directory's files: the database's pages in use stay
    below it less the write-ahead log's allowance (the WAL is cut back to that
    at each checkpoint); the least recently used entries go first. "Recently"
    is to the minute: a read refreshes an entry's time only when it is older,
    so hits stay reads. A file SQLite finds damaged (or not a database) is set
    aside in `damaged/` (replacing the one there) and a new one started.
    """

    layer = DISK
    FILE = "embeddings.sqlite3"
    TOUCH_AFTER_S = 60
    SHM_BYTES = 64 * 1024  # the WAL's shared-memory index, at this WAL size
    _QUERY_KEYS = 500  # keys per statement (SQLite allows 32,766 parameters)
    _DAMAGED = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB (primary codes)

    def __init__(
        self, directory: str | Path, max_bytes: int, timeout_s: float = STORE_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ):
        self.directory = Path(directory).expanduser()
        self.clock = clock  # seconds, for last-used times
        self.path = self.directory / self.FILE
        self.wal_bytes = min(8 * MIB, max_bytes // 8)
        self.max_db_bytes = max_bytes - self.wal_bytes - self.SHM_BYTES
        self.timeout_s = timeout_s
        self._connections: dict[tuple[int, int], tuple[int, sqlite3.Connection]] = {}  # by (process, OS thread)
        self._generation = 0
        self._inode = 0

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        return self._guarded(self._read, keys)

    def put_many(self, values: dict[bytes, bytes]) -> None:
        self._guarded(self._write, values)

    def _read(self, db: sqlite3.Connection, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        found, stale = {}, []
        now = int(self.clock())
        for start in range(0, len(keys), self._QUERY_KEYS):
            part = keys[start : start + self._QUERY_KEYS]
            rows = db.execute(
                f"SELECT key, value, used FROM entries WHERE key IN ({','.join('?' * len(part))})", part
            )
            for key, value, used in rows:
                found[key] = value
                if now - used >= self.TOUCH_AFTER_S:
                    stale.append(key)
        for start in range(0, len(stale), self._QUERY_KEYS):
            part = stale[start : start + self._QUERY_KEYS]
            try:
                db.execute(f"UPDATE entries SET used = ? WHERE key IN ({','.join('?' * len(part))})", [now, *part])
            except sqlite3.OperationalError:  # busy: the order of eviction is best effort
                break
        return found

    def _write(self, db: sqlite3.Connection, values: dict[bytes, bytes]) -> None:
        """In transactions of at most 1/16 of the WAL's allowance: one writes up to four
        times its bytes in pages (rows, index, the pages eviction frees), and the log is
        checkpointed past a quarter of its allowance, so it stays within it."""
        batch, batch_bytes = [], 0
        for key, value in values.items():
            if batch and batch_bytes + len(key) + len(value) > self.wal_bytes // 16:
                self._write_batch(db, batch, batch_bytes)
                batch, batch_bytes = [], 0
            batch.append((key, value))
            batch_bytes += len(key) + len(value)
        self._write_batch(db, batch, batch_bytes)

    def _write_batch(self, db: sqlite3.Connection, values: list[tuple[bytes, bytes]], incoming: int) -> None:
        if not values or incoming > self.max_db_bytes // 2:
            return  # (an entry that would evict half the store is not kept)
        now = int(self.clock())
        db.execute("BEGIN IMMEDIATE")
        try:
            self._evict(db, incoming)
            db.executemany(
                "INSERT INTO entries (key, value, size, used) VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                # the longer of two values for a key: one with a sentence's token states
                "value = iif(excluded.size > size, excluded.value, value), size = max(size, excluded.size), "
                "used = excluded.used",
                [(k, v, len(k) + len(v), now) for k, v in values],
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _evict(self, db: sqlite3.Connection, incoming: int) -> None:
        """Delete the least recently used entries until the pages in use, plus what is
        about to be written, fit the bound less one more transaction's worth (so eviction
        runs every few writes, and deletes little enough at once for the write-ahead log
        to stay within its allowance). Each row costs more pages than its bytes; a few
        passes settle it."""
        for _ in range(4):
            in_use = _bytes_in_use(db)
            if in_use + incoming <= self.max_db_bytes:
                return
            excess = in_use + incoming - (self.max_db_bytes - self.wal_bytes // 16)
            doomed, freed = [], 0
            oldest_first = db.execute("SELECT key, size FROM entries ORDER BY used")
            for key, size in oldest_first:
                if freed >= excess:
                    break
                doomed.append((key,))
                freed += size
            oldest_first.close()
            if not doomed:
                return
            db.executemany("DELETE FROM entries WHERE key = ?", doomed)

    def _guarded(self, operation, argument):
        """Run on this thread's connection; on damage, set the files aside and raise
        StoreRebuilt (the next call starts a new database)."""
        try:
            return operation(self._connection(), argument)
        except sqlite3.DatabaseError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in self._DAMAGED:
                raise
            self._set_aside()
            raise StoreRebuilt(f"{self.path} was damaged ({exc}); set aside, starting afresh") from exc

    def _connection(self) -> sqlite3.Connection:
        """This OS thread's connection, so that no lock is needed: the event loop's
        greenlets share one, and a call never yields to another greenlet midway (SQLite
        does no gevent I/O), so none sees another's open transaction."""
        thread = (os.getpid(), threading.get_native_id())
        generation, db = self._connections.get(thread, (-1, None))
        if db is not None and generation != self._generation:  # the files were set aside since
            db.close()
            db = None
        if db is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
            try:
                self._inode = os.stat(self.path).st_ino
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")  # WAL: a crash loses recent commits, never the file
                db.execute(f"PRAGMA journal_size_limit = {self.wal_bytes}")
                db.execute(f"PRAGMA wal_autocheckpoint = {self.wal_bytes // 4 // 4096}")  # pages
                db.execute(
                    "CREATE TABLE IF NOT EXISTS entries (key BLOB PRIMARY KEY, value BLOB NOT NULL, "
                    "size INTEGER NOT NULL, used INTEGER NOT NULL)"
                )
                db.execute("CREATE INDEX IF NOT EXISTS entries_by_use ON entries (used)")
            except BaseException:
                db.close()
                raise
            self._connections[thread] = (self._generation, db)
        return db

    def _set_aside(self) -> None:
        """Move the damaged files to `damaged/` unless another process did already (the
        file at the path is no longer the one this process opened)."""
        self._generation += 1  # every thread reopens (each closes its own connection)
        with open(self.directory / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not self.path.exists() or os.stat(self.path).st_ino != self._inode:
                    return
                damaged = self.directory / "damaged"
                damaged.mkdir(exist_ok=True)
                for old in damaged.iterdir():
                    old.unlink()
                for suffix in ("", "-wal", "-shm"):
                    source = self.path.with_name(self.FILE + suffix)
                    if source.exists():
                        source.rename(damaged / source.name)
                log.warning("embedding cache: %s was damaged; set aside in %s", self.path, damaged)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _bytes_in_use(db: sqlite3.Connection) -> int:
    """The database's pages that hold data (not the free ones), in bytes."""
    pragma = {name: db.execute(f"PRAGMA {name}").fetchone()[0] for name in ("page_size", "page_count", "freelist_count")}
    return pragma["page_size"] * (pragma["page_count"] - pragma["freelist_count"])


class RedisStore:
    """Entries in a Redis (or Valkey) server under `distill:embedding:<key in hex>`, each
    expiring `ttl_s` after it was last written or read. One round trip per call: the
    reads (GETEX, which also renews the expiry) and the writes are pipelined. A call
    waits at most `timeout_s` for the connection and for each reply, and is never retried.
    """

    layer = REDIS
    PREFIX = b"distill:embedding:"

    def __init__(self, url: str, ttl_s: int, timeout_s: float = STORE_TIMEOUT_S):
        self.url, self.ttl_s, self.timeout_s = url, ttl_s, timeout_s
        self._clients: dict[int, object] = {}

    def _client(self):
        """This OS thread's client: under gevent a connection opened on one thread cannot be
        used from another (the event loop's and the CPU pool's both look entries up); the
        greenlets of one thread share its connection pool."""
        thread = threading.get_native_id()
        client = self._clients.get(thread)
        if client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            client = redis.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
            self._clients[thread] = client
        return client

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        pipe = self._client().pipeline(transaction=False)
        for key in keys:
            pipe.getex(self._name(key), ex=self.ttl_s)
        return {key: value for key, value in zip(keys, pipe.execute()) if value is not None}

    def put_many(self, values: dict[bytes, bytes]) -> None:
        pipe = self._client().pipeline(transaction=False)
        for key, value in values.items():
            pipe.set(self._name(key), value, ex=self.ttl_s)
        pipe.execute()

    def _name(self, key: bytes) -> bytes:
        return self.PREFIX + key.hex().encode()


def open_store(url: str, directory: str, max_bytes: int, ttl_s: int) -> DiskStore | RedisStore | None:
    """The store `DISTILL_CACHE_URL` names: "" the disk store in `directory` ("": the
    user's cache directory), "none" no store, a redis:// or rediss:// URL that server
    (validated at start-up by the config)."""
    if url == "none":
        return None
    if url:
        return RedisStore(url, ttl_s)
    return DiskStore(directory or user_cache_dir(), max_bytes)


def user_cache_dir() -> Path:
    """`distill/` in the user's cache directory: $XDG_CACHE_HOME, else ~/.cache (XDG's rule)."""
    return Path(os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache").expanduser() / "distill"
