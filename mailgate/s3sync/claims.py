"""Exactly once per stored message and recipient, across redeliveries, processes and hosts.

SQS delivers at least once; the store's conditional write (SQLite here, DynamoDB across hosts)
makes delivery happen once. Keyed by bucket, key, ETag and recipient, so the feed (both
notification formats) and replay share one memory. A lock (as long as a message's visibility)
guards the injection; "done" is written right after serve's 250, before any acknowledgement.
A lock that cannot be given back, or a "done" the store never took, leaves the lock to expire.
With processed = "delete", each deleted object is remembered too (by bucket and key), for a
notification that comes again once the object, and with it the ETag, is gone.
"""
from __future__ import annotations

import asyncio
import enum
import hashlib
import logging

from mailgate.address import fold
from mailgate.s3sync import metrics
from mailgate.store import Store, StoreUnavailable

log = logging.getLogger("mailgate.sync")
DAYS = 24 * 3600.0
# Longer than SQS keeps a message (14 days at most): a redelivery always finds its record.
REMEMBER = 15 * DAYS
# Seconds before each try to record a 250: the later ones fall after the store's fail-fast
# window (store.timeout, 2 s by default), in which a call fails without asking.
RECORD_PAUSES = (0.0, 1.0, 3.0)


class Claim(enum.Enum):
    MINE = "mine"    # inject it, then delivered() or release()
    DONE = "done"    # delivered before: skip
    BUSY = "busy"    # another process is injecting it now: leave it for later


def mailbox_key(recipient: str) -> str:
    """One mailbox however SES spelt it: what a claim is keyed by, and what recipients are
    deduplicated by (two spellings of one mailbox would otherwise wait on each other's lock).
    A-Z only, as serve and Dovecot (%Lu) fold: str.lower() would make U+212A KELVIN SIGN a
    "k", and so drop another mailbox's copy as a duplicate."""
    return fold(recipient)


def identity(bucket: str, key: str, etag: str, recipient: str) -> str:
    text = "\0".join((bucket, key, etag, mailbox_key(recipient)))
    return hashlib.sha256(text.encode()).hexdigest()


def object_identity(bucket: str, key: str) -> str:
    return hashlib.sha256("\0".join((bucket, key)).encode()).hexdigest()


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
        """Record serve's 250, then give the lock back. StoreUnavailable when every try failed:
        the lock is then kept, so a copy finds it busy (until lock_ttl) instead of delivering."""
        for pause in RECORD_PAUSES:
            await asyncio.sleep(pause)
            try:
                await self.store.claim(f"sync-done:{ident}", REMEMBER)  # False: already there
                break
            except StoreUnavailable as e:
                failed = e
        else:
            raise failed
        await self.release(ident)

    async def release(self, ident: str) -> None:
        """Give the lock back; if the store is away, it expires after lock_ttl instead (the
        message waits that long; nothing is lost or doubled)."""
        try:
            await self.store.forget(f"sync-lock:{ident}")
        except StoreUnavailable as e:
            metrics.ERRORS.labels("store").inc()
            log.warning("sync lock %s not given back, it expires in %g s: %s", ident[:16],
                        self.lock_ttl, e)

    async def deleting(self, bucket: str, key: str) -> None:
        """Remember, before processed = "delete" deletes a delivered object, that it was sync:
        a repeated notification then finds it gone and knows why (StoreUnavailable: do not
        delete)."""
        await self.store.claim(f"sync-deleted:{object_identity(bucket, key)}", REMEMBER)

    async def was_deleted(self, bucket: str, key: str) -> bool:
        return await self.store.seen(f"sync-deleted:{object_identity(bucket, key)}")
