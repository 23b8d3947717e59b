"""The local SQLite file: created so the service user can use it, opened in WAL mode, two threads.

Operators run the CLI as root: a new file takes the owner of its directory (the service's
state directory), and SQLite itself gives the -wal and -shm files it creates as root the owner
of the database file. Writes run on one worker thread with its own connection, reads on another
(WAL: a reader never waits for a writer, so a write stuck on another process's lock does not
hold up reads). Each call ends within `deadline` for its caller; a locked, unreadable or broken
file raises StoreUnavailable, never blocks the event loop. A file that was removed or replaced
(rm, a backup moved over it) is opened again at the next call, and a connection that fails is
replaced by a fresh one for one more try: a long-running serve follows what the CLI writes.
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from mailgate.store import StoreUnavailable

T = TypeVar("T")
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS rules (
    email_address TEXT PRIMARY KEY,
    forward_to TEXT NOT NULL DEFAULT '[]',        -- JSON list of addresses
    keep_copy INTEGER NOT NULL DEFAULT 1,
    vacation INTEGER NOT NULL DEFAULT 0,
    vacation_subject TEXT NOT NULL DEFAULT '',
    vacation_body TEXT NOT NULL DEFAULT '',
    vacation_start TEXT NOT NULL DEFAULT '',
    vacation_end TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocked (
    email_address TEXT NOT NULL,
    pattern TEXT NOT NULL,
    added_at TEXT NOT NULL,
    PRIMARY KEY (email_address, pattern)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbound (
    message_id TEXT PRIMARY KEY,
    item TEXT NOT NULL,                            -- JSON object (README)
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (
    state_key TEXT PRIMARY KEY,
    expires_at REAL NOT NULL                       -- Unix time
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_read (             -- DynamoDB backend: the outage copy
    kind TEXT NOT NULL,
    email_address TEXT NOT NULL,
    item TEXT NOT NULL,                            -- JSON; "null" = read, nothing there
    read_at REAL NOT NULL,
    PRIMARY KEY (kind, email_address)
) WITHOUT ROWID;
"""


def create_owned(path: str) -> None:
    """Create the file (0600) if missing, owned like its directory when we are root."""
    if os.path.exists(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return  # another process made it first
    try:
        if os.geteuid() == 0:
            st = os.stat(parent)
            os.fchown(fd, st.st_uid, st.st_gid)
    finally:
        os.close(fd)


def connect(path: str, timeout: float) -> sqlite3.Connection:
    create_owned(path)
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")     # readers never wait for the CLI's writes
        db.execute("PRAGMA synchronous=NORMAL")   # WAL: durable up to the last checkpoint
        if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            with db:
                db.executescript(f"BEGIN IMMEDIATE;{SCHEMA}"
                                 f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
    except BaseException:
        db.close()
        raise
    return db


BUSY = (5, 6)   # SQLITE_BUSY, SQLITE_LOCKED: another holder; a new connection would wait the same


def identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at path; None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class Lane:
    """One thread and its connection, with the identity of the database file it has open."""

    def __init__(self, path: str, timeout: float, name: str, query_only: bool = False):
        self.path, self.timeout, self.query_only = path, timeout, query_only
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"mailgate-sqlite-{name}")
        self.db: sqlite3.Connection | None = None
        self.opened: tuple[int, int] | None = None
        self.busy_ms = 0
        self.deadline = float("inf")   # of the call running now (monotonic)

    def connection(self) -> sqlite3.Connection:
        if self.db is not None and identity(self.path) != self.opened:
            self.reset()  # removed or replaced (a backup moved over it): the file there now
        if self.db is None:
            self.db = connect(self.path, self.timeout)
            if self.query_only:
                self.db.execute("PRAGMA query_only=1")
            # A statement still running at the call's deadline is interrupted: it fails and
            # rolls back, so a call that ends in StoreUnavailable changed nothing.
            self.db.set_progress_handler(self._past_deadline, 1000)
            self.busy_ms = int(self.timeout * 1000)
            self.opened = identity(self.path)
        return self.db

    def _past_deadline(self) -> int:
        return int(time.monotonic() > self.deadline)

    def reset(self) -> None:
        """Close the connection. The -wal and -shm at the path are never touched: another
        process may already be writing into them (replace a database file together with them,
        the README says)."""
        if self.db is None:
            return
        try:
            self.db.close()
        except sqlite3.Error:
            pass
        self.db = None

    def run(self, fn: Callable[..., T], args: tuple, deadline: float) -> T:
        """fn(db, *args), tried once more on a fresh connection after an error of the file or
        the connection; nothing runs, and no lock is waited for, past `deadline` (monotonic)."""
        self.deadline = deadline
        try:
            for attempt in (1, 2):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(f"{self.path}: no answer in time")
                try:
                    db = self.connection()
                    busy_ms = max(1, int(min(self.timeout, left) * 1000))
                    if busy_ms != self.busy_ms:
                        db.execute(f"PRAGMA busy_timeout={busy_ms}")
                        self.busy_ms = busy_ms
                    return fn(db, *args)
                except sqlite3.ProgrammingError:
                    raise   # a bug in our SQL or in how we call it
                except sqlite3.DatabaseError as e:
                    if self.db is not None and self.db.in_transaction:
                        self.db.rollback()
                    self.reset()
                    if attempt == 2 or time.monotonic() > deadline or \
                            getattr(e, "sqlite_errorcode", 0) & 0xff in BUSY:
                        raise StoreUnavailable(f"{self.path}: {e}") from None
                except OSError as e:
                    self.reset()
                    raise StoreUnavailable(f"{self.path}: {e}") from None
            raise AssertionError("not reached")
        finally:
            self.deadline = float("inf")

    def close(self) -> None:
        self.reset()


class Worker:
    """A writer and a reader lane, opened on first use; errors of the file become
    StoreUnavailable (a bug in our SQL, sqlite3.ProgrammingError, stays a bug)."""

    def __init__(self, path: str, timeout: float, deadline: float):
        self.path, self.deadline = path, deadline
        self._writer = Lane(path, timeout, "write")
        self._reader = Lane(path, timeout, "read", query_only=True)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(db, *args) on the writer's connection (one write at a time, in order)."""
        return await self._on(self._writer, fn, args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(db, *args) on the reader's connection: fn must not write."""
        return await self._on(self._reader, fn, args)

    async def _on(self, lane: Lane, fn: Callable[..., T], args: tuple) -> T:
        deadline = time.monotonic() + self.deadline
        job = lane.executor.submit(lane.run, fn, args, deadline)
        result = asyncio.wrap_future(job)
        try:
            return await asyncio.wait_for(asyncio.shield(result), self.deadline)
        except asyncio.TimeoutError:
            # Still queued: it never runs, and the caller hears so. Running: it ends by the
            # deadline by itself (busy timeout, interrupt), and what it did is the answer: a
            # caller must never hear "failed" about a write that went in (a claim, a block).
            if job.cancel():
                raise StoreUnavailable(f"{self.path}: no answer within {self.deadline:g} s") \
                    from None
            return await result

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for lane in (self._writer, self._reader):
            await loop.run_in_executor(lane.executor, lane.close)
            lane.executor.shutdown(wait=False)
