"""Where rules, blocklists and mailgate's own memory live: one small interface, two backends.

SQLite (sqlite.py, the default: no cloud account needed) and DynamoDB (dynamodb.py: the tables
the SES deployments already have, shared by several hosts). Filters, the CLI and the SES feed
see only `Store`; never boto3 or sqlite3. Calls are async; a backend runs blocking I/O off the
event loop with short timeouts. An unreachable backend raises StoreUnavailable, which carries
what is still known (read before the outage) and which addresses were never read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

if TYPE_CHECKING:
    from mailgate.config import Config

# Table kinds, as `ensure_tables` and `mailgate store init` name them.
TABLES = ("rules", "blocked", "outbound", "state")


class StoreUnavailable(Exception):
    """The backend could not be asked in time (network, throttling, timeout, a locked file).

    For a batch read: `known` holds what was last read for some of the addresses (served during
    the outage), `unread` the addresses never read, for which nothing can be said.
    """

    def __init__(self, reason: str, known: Mapping | None = None,
                 unread: Sequence[str] | None = None):
        super().__init__(reason)
        self.known = dict(known or {})
        self.unread = None if unread is None else frozenset(unread)  # None: not said


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
    """Addresses are matched case-insensitively; results are keyed by the address as asked."""

    # -- what filters read (one batch call for all recipients of a message) ----------------
    async def rules(self, addresses: Sequence[str]) -> dict[str, Rule]:
        """The rule of each address that has one."""
    async def blocked(self, addresses: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """The sender patterns of each address that has any."""
    async def outbound(self, message_id: str) -> dict | None: ...
    async def put_outbound(self, message_id: str, item: dict) -> None:
        """Record a message sent through SES (its attributes: README), for `bounce` to match."""

    # -- mailgate's own memory (state table; items expire after ttl seconds) -------------
    async def claim(self, key: str, ttl: float) -> bool:
        """Record `key` unless it is there: True for the first caller (a conditional write)."""
    async def seen(self, key: str) -> bool: ...
    async def forget(self, key: str) -> None: ...
    async def keys(self, prefix: str) -> list[str]:
        """Unexpired keys that start with `prefix` (read once at start, not per message)."""

    # -- admin (the CLI) and start -------------------------------------------------------
    async def rule(self, address: str) -> Rule | None:
        """One address's rule as it is now (a strongly consistent read, no cache): the read
        before a change, so `rule set` never writes a whole item over a newer one."""
    async def set_rule(self, rule: Rule) -> None: ...
    async def clear_rule(self, address: str) -> bool: ...
    async def add_block(self, address: str, pattern: str) -> bool:
        """False when the pattern was there already."""
    async def remove_block(self, address: str, pattern: str) -> bool: ...
    async def ensure_tables(self, kinds: Sequence[str] = TABLES) -> list[str]:
        """Create the missing tables of these kinds; the names of those created."""
    async def close(self) -> None: ...


def normal(address: str) -> str:
    """The key an address is stored under: lower case (mail systems treat it so in practice)."""
    return address.strip().lower()


def open_store(config: Config) -> Store:
    """The configured backend (not connected yet: the first call connects)."""
    if config.store.backend == "dynamodb":
        from mailgate.store.dynamodb import DynamoStore
        return DynamoStore(config)
    from mailgate.store.sqlite import SQLiteStore
    return SQLiteStore(config)
