"""Exactly once per stored message and recipient, across redeliveries, processes and hosts.

SQS delivers at least once; the store's conditional write (SQLite here, DynamoDB across hosts)
makes delivery happen once. Keyed by bucket, key, ETag and recipient, so the feed (both
notification formats) and replay share one memory. A lock (as long as a message's visibility)
guards the injection; "done" is written right after serve's 250, before any acknowledgement.
"""
from __future__ import annotations

import enum
import hashlib

from mailgate.store import Store

DAYS = 24 * 3600.0
# Longer than SQS keeps a message (14 days at most): a redelivery always finds its record.
REMEMBER = 15 * DAYS


class Claim(enum.Enum):
    MINE = "mine"    # inject it, then delivered() or release()
    DONE = "done"    # delivered before: skip
    BUSY = "busy"    # another process is injecting it now: leave it for later


def identity(bucket: str, key: str, etag: str, recipient: str) -> str:
    text = "\0".join((bucket, key, etag, recipient.lower()))
    return hashlib.sha256(text.encode()).hexdigest()


class Claims:
    def __init__(self, store: Store, lock_ttl: float):
        self.store, self.lock_ttl = store, lock_ttl

    async def take(self, ident: str) -> Claim:
        if await self.store.seen(f"sync-done:{ident}"):
            return Claim.DONE
        if not await self.store.claim(f"sync-lock:{ident}", self.lock_ttl):
            return Claim.BUSY
        # The holder before us may have finished between our two reads.
        if await self.store.seen(f"sync-done:{ident}"):
            await self.release(ident)
            return Claim.DONE
        return Claim.MINE

    async def delivered(self, ident: str) -> None:
        await self.store.claim(f"sync-done:{ident}", REMEMBER)
        await self.release(ident)

    async def release(self, ident: str) -> None:
        await self.store.forget(f"sync-lock:{ident}")
