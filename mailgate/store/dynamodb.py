"""The DynamoDB backend: the SES deployments' tables, shared by several mailgate hosts.

boto3 is synchronous and by default waits 60 s and tries 10 times: here every call runs on a
small thread pool with store.timeout per request, two attempts, and store.deadline for the whole
call; after an outage (no connection, a timeout, throttling, a 5xx), calls fail at once for
store.timeout (no pile-up), but for one at a time that still asks, so the store's return is seen
at once; an error that is only that request's (a missing table) fails that call alone. Reads of
rules and patterns go through a short memory cache and leave a copy in the local SQLite file,
which answers for addresses read before when DynamoDB cannot (StoreUnavailable.known).
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from mailgate.config import Config
from mailgate.store import TABLES, Rule, StoreUnavailable, normal
from mailgate.store import dynamoitems as ddb
from mailgate.store.items import rule_from_item, rule_to_item
from mailgate.store.local import MISS, LastRead, Memory
from mailgate.store.sqlite import OUTBOUND_DAYS, sqlite_path

WORKERS = 4   # boto3 calls in flight; also the HTTP connection pool size
TABLE_DEADLINE = 120.0  # creating a table on AWS takes seconds to a minute


class DynamoStore:
    def __init__(self, config: Config):
        self.settings = config.store
        self.tables = {kind: getattr(config.store, f"{kind}_table") for kind in TABLES}
        self.memory = Memory(config.store.cache_ttl)
        self.last_read = LastRead(sqlite_path(config), config.store.timeout)
        self._executor = ThreadPoolExecutor(WORKERS, thread_name_prefix="mailgate-dynamodb")
        self._lock = threading.Lock()
        self._client: Any = None
        self._failing_until = 0.0   # monotonic; calls before it fail at once, but one probe
        self._probing = False
        self._last_error = ""

    # -- calling boto3 -------------------------------------------------------------------
    def client(self) -> Any:
        with self._lock:  # boto3 clients are thread-safe; making one is not
            if self._client is None:
                self._client = ddb.make_client(self.settings, WORKERS)
            return self._client

    async def call(self, fn: Callable[..., Any], *args: Any, deadline: float = 0) -> Any:
        """fn(client, *args) on the pool, within store.deadline; failures: StoreUnavailable."""
        deadline = deadline or self.settings.deadline
        probe = time.monotonic() < self._failing_until
        if probe and self._probing:
            raise StoreUnavailable(f"DynamoDB unavailable: {self._last_error}")
        # In the fail-fast window one call at a time still asks: the store may be back, and
        # mail that arrives after it is back must not be deferred for the window's length.
        self._probing = self._probing or probe
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, lambda: fn(self.client(), *args))
        try:
            result = await asyncio.wait_for(future, deadline)
            self._failing_until = 0.0
            return result
        except asyncio.TimeoutError:
            error = f"no answer within {deadline:g} s"
        except ddb.ERRORS as e:
            if not ddb.outage(e):  # DynamoDB answered: this call fails, the next ones ask
                self._failing_until = 0.0
                raise StoreUnavailable(f"DynamoDB refused: {ddb.describe(e)}") from None
            error = ddb.describe(e)
        finally:
            if probe:
                self._probing = False
        self._last_error = error
        self._failing_until = time.monotonic() + self.settings.timeout
        raise StoreUnavailable(f"DynamoDB unavailable: {error}")

    # -- reads ---------------------------------------------------------------------------
    async def rules(self, addresses: Sequence[str]) -> dict[str, Rule]:
        return await self._lookup("rules", addresses, rule_from_item)

    async def blocked(self, addresses: Sequence[str]) -> dict[str, tuple[str, ...]]:
        return await self._lookup("blocked", addresses, lambda a, item: ddb.patterns(item))

    async def _lookup(self, kind: str, addresses: Sequence[str],
                      convert: Callable[[str, dict], Any]) -> dict[str, Any]:
        items, error = await self._items(kind, {normal(a) for a in addresses})
        found = {a: convert(a, items[normal(a)]) for a in addresses if items.get(normal(a))}
        found = {a: value for a, value in found.items() if value}
        if error:
            unread = [a for a in addresses if normal(a) not in items]
            raise StoreUnavailable(error, known=found, unread=unread)
        return found

    async def _items(self, kind: str, keys: set[str]) -> tuple[dict[str, Any], str]:
        """Each key's item (None: nothing there), and the error that left some out."""
        items = {k: hit for k in keys if (hit := self.memory.get(kind, k)) is not MISS}
        missing = sorted(keys - items.keys())
        if not missing:
            return items, ""
        try:
            fresh = await self.call(ddb.batch_get, self.tables[kind], missing)
        except StoreUnavailable as e:
            items.update(await self.last_read.load(kind, missing))
            return items, str(e)
        self.memory.put(kind, fresh)
        await self.last_read.save(kind, fresh)
        items.update(fresh)
        return items, ""

    async def outbound(self, message_id: str) -> dict | None:
        item = await self.call(ddb.get, self.tables["outbound"], {"message_id": message_id})
        return item if item and _live(item) else None

    async def put_outbound(self, message_id: str, item: dict) -> None:
        expires = int(time.time() + OUTBOUND_DAYS * 86400)
        await self.call(ddb.put, self.tables["outbound"],
                        {**item, "message_id": message_id, "expires_at": expires})

    # -- state ---------------------------------------------------------------------------
    async def claim(self, key: str, ttl: float) -> bool:
        return await self.call(ddb.claim, self.tables["state"], key, time.time() + ttl)

    async def seen(self, key: str) -> bool:
        item = await self.call(ddb.get, self.tables["state"], {"state_key": key}, True)
        return item is not None and _live(item)

    async def forget(self, key: str) -> None:
        await self.call(ddb.delete, self.tables["state"], {"state_key": key})

    async def keys(self, prefix: str) -> list[str]:
        return await self.call(ddb.state_keys, self.tables["state"], prefix, time.time())

    # -- admin ---------------------------------------------------------------------------
    async def rule(self, address: str) -> Rule | None:
        """GetItem with ConsistentRead, past the cache: a BatchGetItem (as filters read) may
        return the item as it was before the last write."""
        item = await self.call(ddb.get, self.tables["rules"], {"email_address": normal(address)},
                               True)
        return rule_from_item(address, item) if item else None

    async def set_rule(self, rule: Rule) -> None:
        self.memory.drop("rules", normal(rule.address))
        await self.call(ddb.put, self.tables["rules"], rule_to_item(rule))

    async def clear_rule(self, address: str) -> bool:
        self.memory.drop("rules", normal(address))
        return await self.call(ddb.delete, self.tables["rules"], {"email_address": normal(address)})

    async def add_block(self, address: str, pattern: str) -> bool:
        self.memory.drop("blocked", normal(address))
        return await self.call(ddb.change_pattern, self.tables["blocked"], normal(address),
                               pattern.lower(), True)

    async def remove_block(self, address: str, pattern: str) -> bool:
        self.memory.drop("blocked", normal(address))
        return await self.call(ddb.change_pattern, self.tables["blocked"], normal(address),
                               pattern.lower(), False)

    async def ensure_tables(self, kinds: Sequence[str] = TABLES) -> list[str]:
        return await self.call(ddb.ensure_tables, {k: self.tables[k] for k in kinds},
                               deadline=TABLE_DEADLINE)

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
        await self.last_read.close()


def _live(item: dict) -> bool:
    """DynamoDB deletes expired items some time later (up to days): expired is gone here."""
    expires = item.get("expires_at")
    return not isinstance(expires, (int, float)) or expires > time.time()
