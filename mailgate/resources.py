"""What the filters share, made once per process and only when a configured filter asks for it:
the DNS resolver, the store, the outbound relay. Kept across a SIGHUP (the chain is rebuilt,
these are not: a change to [dns], [store] or [relay] needs a restart).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

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
            self._store = open_store(self.config)
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
