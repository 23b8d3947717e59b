"""What the filters share, made once per process and only when a configured filter asks for it:
the DNS resolver, the store, the outbound relay. Kept across a SIGHUP (the chain is rebuilt,
these are not: a change to [dns], [store] or [relay] needs a restart).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mailgate.config import Config

if TYPE_CHECKING:
    from mailgate.dns import Resolver
    from mailgate.outbound import Outbound
    from mailgate.store import Store


class Resources:
    def __init__(self, config: Config, dry_run: bool = False):
        self.config = config
        self.dry_run = dry_run   # `mailgate explain`: nothing is sent, nothing remembered
        self._dns: Resolver | None = None
        self._store: Store | None = None
        self._outbound: Outbound | None = None

    @property
    def dns(self) -> Resolver:
        if self._dns is None:
            from mailgate.dns import Resolver
            self._dns = Resolver(self.config.dns)
        return self._dns

    @property
    def store(self) -> Store:
        if self._store is None:
            from mailgate.store import open_store
            store = open_store(self.config)
            self._store = ReadOnlyStore(store) if self.dry_run else store
        return self._store

    @property
    def outbound(self) -> Outbound:
        if self._outbound is None:
            from mailgate.outbound import Outbound
            self._outbound = Outbound(self.config, dry_run=self.dry_run)
        return self._outbound

    async def close(self) -> None:
        for resource in (self._outbound, self._store, self._dns):
            if resource is not None:
                await resource.close()


class ReadOnlyStore:
    """The store as `mailgate explain` sees it: reads pass through, writes do nothing, and a
    claim answers what the real one would answer now (True unless the key is there) without
    recording it. So explaining a bounce or an auto-reply leaves the real message its notice
    or reply: explain "delivers, sends and remembers nothing" (README)."""

    def __init__(self, store: Store):
        self._store = store

    def __getattr__(self, name: str) -> Any:   # reads: rules, blocked, outbound, seen, keys, rule
        return getattr(self._store, name)

    async def claim(self, key: str, ttl: float) -> bool:
        return not await self._store.seen(key)

    async def put_outbound(self, message_id: str, item: dict) -> None:
        pass

    async def forget(self, key: str) -> None:
        pass

    async def set_rule(self, rule: Any) -> None:
        pass

    async def clear_rule(self, address: str) -> bool:
        return False

    async def add_block(self, address: str, pattern: str) -> bool:
        return False

    async def remove_block(self, address: str, pattern: str) -> bool:
        return False

    async def ensure_tables(self, kinds: Sequence[str] = ()) -> list[str]:
        return []

    async def close(self) -> None:
        await self._store.close()
