"""The embedded store: one SQLite file (default {data_dir}/mailgate.sqlite3), no cloud account.

Several processes share it (serve, sync, the CLI): WAL mode, a busy timeout of store.timeout,
store.deadline for a whole call.
Batch reads are one SELECT ... IN (...). A file that cannot be read or written in time raises
StoreUnavailable with every asked address unread (there is no older copy to fall back on).
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Sequence

from mailgate.config import Config
from mailgate.store import TABLES, Rule, StoreUnavailable, normal
from mailgate.store.items import now_iso, rule_from_item, rule_to_item
from mailgate.store.sqlfile import Worker

OUTBOUND_DAYS = 30   # how long a sent message's record can match a bounce
PURGE_EVERY = 1000   # claims between deletions of expired state and outbound records


def sqlite_path(config: Config) -> str:
    return config.store.path or os.path.join(config.data_dir, "mailgate.sqlite3")


class SQLiteStore:
    def __init__(self, config: Config, path: str | None = None):
        self.path = path or sqlite_path(config)
        self.worker = Worker(self.path, config.store.timeout, config.store.deadline)
        self._claims = 0

    # -- reads ---------------------------------------------------------------------------
    async def rule(self, address: str) -> Rule | None:
        return (await self.rules([address])).get(address)  # one file: every read is current

    async def rules(self, addresses: Sequence[str]) -> dict[str, Rule]:
        rows = await self._batch("SELECT * FROM rules WHERE email_address IN ({})", addresses)
        by_key = {row["email_address"]: row for row in rows}
        return {a: _rule(a, by_key[normal(a)]) for a in addresses if normal(a) in by_key}

    async def blocked(self, addresses: Sequence[str]) -> dict[str, tuple[str, ...]]:
        rows = await self._batch("SELECT email_address, pattern FROM blocked "
                                 "WHERE email_address IN ({}) ORDER BY pattern", addresses)
        patterns: dict[str, list[str]] = {}
        for row in rows:
            patterns.setdefault(row["email_address"], []).append(row["pattern"])
        return {a: tuple(patterns[normal(a)]) for a in addresses if normal(a) in patterns}

    async def _batch(self, sql: str, addresses: Sequence[str]) -> list[sqlite3.Row]:
        keys = sorted({normal(a) for a in addresses})
        if not keys:
            return []

        def select(db: sqlite3.Connection) -> list[sqlite3.Row]:
            cursor = db.execute(sql.format(",".join("?" * len(keys))), keys)
            cursor.row_factory = sqlite3.Row
            return cursor.fetchall()
        try:
            return await self.worker.read(select)
        except StoreUnavailable as e:
            raise StoreUnavailable(str(e), unread=addresses) from None

    async def outbound(self, message_id: str) -> dict | None:
        row = await self.worker.read(lambda db: db.execute(
            "SELECT item FROM outbound WHERE message_id = ? AND expires_at > ?",
            (message_id, time.time())).fetchone())
        return json.loads(row[0]) if row else None

    async def put_outbound(self, message_id: str, item: dict) -> None:
        expires = int(time.time() + OUTBOUND_DAYS * 86400)
        text = json.dumps({**item, "message_id": message_id, "expires_at": expires})
        await self.worker.call(lambda db: db.execute(
            "INSERT OR REPLACE INTO outbound VALUES (?, ?, ?)", (message_id, text, expires)))

    # -- state ---------------------------------------------------------------------------
    async def claim(self, key: str, ttl: float) -> bool:
        self._claims += 1
        purge = self._claims % PURGE_EVERY == 1

        def insert(db: sqlite3.Connection) -> bool:
            now = time.time()
            if purge:
                db.execute("DELETE FROM state WHERE expires_at <= ?", (now,))
                db.execute("DELETE FROM outbound WHERE expires_at <= ?", (now,))
            return db.execute(
                "INSERT INTO state VALUES (?, ?) ON CONFLICT (state_key) DO UPDATE "
                "SET expires_at = excluded.expires_at WHERE state.expires_at <= ?",
                (key, now + ttl, now)).rowcount == 1
        return await self.worker.call(insert)

    async def seen(self, key: str) -> bool:
        return await self.worker.read(lambda db: db.execute(
            "SELECT 1 FROM state WHERE state_key = ? AND expires_at > ?",
            (key, time.time())).fetchone() is not None)

    async def forget(self, key: str) -> None:
        await self.worker.call(lambda db: db.execute(
            "DELETE FROM state WHERE state_key = ?", (key,)))

    async def keys(self, prefix: str) -> list[str]:
        rows = await self.worker.read(lambda db: db.execute(
            "SELECT state_key FROM state WHERE state_key >= ? AND state_key < ? "
            "AND expires_at > ?", (prefix, prefix + "\U0010ffff", time.time())).fetchall())
        return [row[0] for row in rows]

    # -- admin ---------------------------------------------------------------------------
    async def set_rule(self, rule: Rule) -> None:
        item = rule_to_item(rule)
        item["forward_to"] = json.dumps(item.get("forward_to", []))
        names = ", ".join(item)
        await self.worker.call(lambda db: db.execute(
            f"INSERT OR REPLACE INTO rules ({names}) VALUES ({','.join('?' * len(item))})",
            list(item.values())))

    async def clear_rule(self, address: str) -> bool:
        return await self.worker.call(lambda db: db.execute(
            "DELETE FROM rules WHERE email_address = ?", (normal(address),)).rowcount > 0)

    async def add_block(self, address: str, pattern: str) -> bool:
        return await self.worker.call(lambda db: db.execute(
            "INSERT OR IGNORE INTO blocked VALUES (?, ?, ?)",
            (normal(address), pattern.lower(), now_iso())).rowcount > 0)

    async def remove_block(self, address: str, pattern: str) -> bool:
        return await self.worker.call(lambda db: db.execute(
            "DELETE FROM blocked WHERE email_address = ? AND pattern = ?",
            (normal(address), pattern.lower())).rowcount > 0)

    async def ensure_tables(self, kinds: Sequence[str] = TABLES) -> list[str]:
        """Every table is made when the file is opened; nothing is ever missing after that."""
        existed = os.path.exists(self.path) and os.path.getsize(self.path) > 0
        await self.worker.call(lambda db: None)
        return [] if existed else [f"{self.path}: {kind}" for kind in kinds]

    async def close(self) -> None:
        await self.worker.close()


def _rule(address: str, row: sqlite3.Row) -> Rule:
    item = dict(row)
    item["forward_to"] = json.loads(item["forward_to"] or "[]")
    return rule_from_item(address, item)
