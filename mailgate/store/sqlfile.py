"""The local SQLite file: created so the service user can use it, opened in WAL mode, one thread.

Operators run the CLI as root: a new file takes the owner of its directory (the service's
state directory), and SQLite itself gives the -wal and -shm files it creates as root the owner
of the database file. Every call runs on one worker thread with its own connection; a locked,
unreadable or broken file raises StoreUnavailable after `timeout`, never blocks the event loop.
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
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


class Worker:
    """One thread, one connection, opened on first use; errors of the file become
    StoreUnavailable (a bug in our SQL, sqlite3.ProgrammingError, stays a bug)."""

    def __init__(self, path: str, timeout: float):
        self.path, self.timeout = path, timeout
        self._db: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mailgate-sqlite")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, fn, args)

    def _run(self, fn: Callable[..., T], args: tuple) -> T:
        try:
            if self._db is None:
                self._db = connect(self.path, self.timeout)
            return fn(self._db, *args)
        except (sqlite3.DatabaseError, OSError) as e:
            raise StoreUnavailable(f"{self.path}: {e}") from None

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=False)
