"""Where rules, blocklists and mailgate's own memory live: one small interface, two backends.

SQLite (sqlite.py, the default: no cloud account needed) and DynamoDB (dynamodb.py: the tables
the SES deployments already have, shared by several hosts). Filters, the CLI and the SES feed
see only `Store`; never boto3 or sqlite3. Calls are async; a backend runs blocking I/O off the
event loop with short timeouts. An unreachable backend raises StoreUnavailable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    from mailgate.config import Config


class StoreUnavailable(Exception):
    """The backend could not be asked in time (network, throttling, timeout)."""


@dataclass(frozen=True)
class Rule:
    """One address's forwarding and out-of-office settings (the rules table's item)."""
    address: str
    forward: tuple[str, ...] = ()
    keep_copy: bool = True
    vacation: bool = False
    subject: str = ""
    body: str = ""
    start: str = ""        # ISO 8601; "" = no bound
    end: str = ""


class Store(Protocol):
    # -- what filters read (one batch call for all recipients of a message) ----------------
    async def rules(self, addresses: Sequence[str]) -> dict[str, Rule]: ...
    async def blocked(self, addresses: Sequence[str]) -> dict[str, tuple[str, ...]]: ...
    async def outbound(self, message_id: str) -> dict | None: ...
    async def put_outbound(self, message_id: str, item: dict) -> None:
        """Record a message sent through SES (its attributes: README), for `bounce` to match."""

    # -- mailgate's own memory (state table; items expire after ttl seconds) -------------
    async def claim(self, key: str, ttl: float) -> bool:
        """Record `key` unless it is there: True for the first caller (a conditional write)."""
    async def seen(self, key: str) -> bool: ...
    async def forget(self, key: str) -> None: ...

    # -- admin (the CLI) -------------------------------------------------------------------
    async def set_rule(self, rule: Rule) -> None: ...
    async def clear_rule(self, address: str) -> bool: ...
    async def add_block(self, address: str, pattern: str) -> None: ...
    async def remove_block(self, address: str, pattern: str) -> bool: ...
    async def close(self) -> None: ...


def open_store(config: Config) -> Store:
    """The configured backend (not connected yet: the first call connects)."""
    if config.store.backend == "dynamodb":
        from mailgate.store.dynamodb import DynamoStore
        return DynamoStore(config)
    from mailgate.store.sqlite import SQLiteStore
    return SQLiteStore(config)
