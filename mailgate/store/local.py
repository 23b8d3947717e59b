"""What a remote store keeps on this host: a short in-memory cache and the last read per address.

The memory cache (store.cache_ttl) spares DynamoDB a read per message. The last-read copy lives
in the local SQLite file and outlives restarts: during an outage it answers for every address
read before, so an outage changes nothing for them. Losing the copy (a broken file) only means
those addresses count as never read.
"""
from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Any, Iterable, Mapping

from mailgate.store import StoreUnavailable
from mailgate.store.sqlfile import Worker

log = logging.getLogger("mailgate.store")
MISS = object()


class Memory:
    """(kind, address) -> item, each for `ttl` seconds; at most `size` entries (oldest go)."""

    def __init__(self, ttl: float, size: int = 50_000):
        self.ttl, self.size = ttl, size
        self.entries: OrderedDict[tuple[str, str], tuple[float, Any]] = OrderedDict()

    def get(self, kind: str, key: str) -> Any:
        hit = self.entries.get((kind, key))
        if hit is None or hit[0] < time.monotonic():
            return MISS
        return hit[1]

    def put(self, kind: str, items: Mapping[str, Any]) -> None:
        if self.ttl <= 0:
            return
        expires = time.monotonic() + self.ttl
        for key, item in items.items():
            self.entries[(kind, key)] = (expires, item)
            self.entries.move_to_end((kind, key))
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def drop(self, kind: str, key: str) -> None:
        self.entries.pop((kind, key), None)


class LastRead:
    """The outage copy: for each address read, the item (or None: read, nothing there)."""

    def __init__(self, path: str, timeout: float):
        self.worker = Worker(path, timeout, timeout)   # a local file: no longer than a lock wait

    async def save(self, kind: str, items: Mapping[str, Any]) -> None:
        rows = [(kind, key, json.dumps(item), time.time())
                for key, item in items.items()]
        try:
            await self.worker.call(lambda db: db.executemany(
                "INSERT OR REPLACE INTO last_read VALUES (?, ?, ?, ?)", rows))
        except StoreUnavailable as e:
            log.warning("store: cannot keep the outage copy: %s", e)

    async def load(self, kind: str, keys: Iterable[str]) -> dict[str, Any]:
        keys = list(keys)
        if not keys:
            return {}
        try:
            rows = await self.worker.read(lambda db: db.execute(
                f"SELECT email_address, item FROM last_read WHERE kind = ? "
                f"AND email_address IN ({','.join('?' * len(keys))})", [kind, *keys]).fetchall())
        except StoreUnavailable as e:
            log.warning("store: cannot read the outage copy: %s", e)
            return {}
        return {key: json.loads(text) for key, text in rows}

    async def close(self) -> None:
        await self.worker.close()

