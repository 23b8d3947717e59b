"""Delivery: Dovecot over LMTP first; when Dovecot cannot take it (no answer, or a 4xx of its
own trouble), the maildir fallback.

Returns one Result per recipient. A recipient is "sent" only when Dovecot said 250 or the
maildir file is durable; a Dovecot 5xx is "bounced" with Dovecot's words; anything else is
"deferred". An LMTP reply lost after DATA is deferred, not written to the maildir, because
Dovecot may already hold the message (a duplicate is worse than a retry). A 4xx that says the
mailbox is full or disabled, or refuses by policy (decided()), is Dovecot deciding, not failing:
deferred with its words, never written around its quota.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from typing import Sequence

from mailgate import faults, maildir, metrics
from mailgate.address import fold
from mailgate.config import Config
from mailgate.lmtp import LMTPReply
from mailgate.lmtppool import Pool
from mailgate.message import Envelope
from mailgate.store import Store, StoreUnavailable
from mailgate.verdict import DELIVERED, DELIVERY_DEFERRED, OUTCOME_UNKNOWN, TEMP_FAILURE, Reply

log = logging.getLogger("mailgate.deliver")
HASH_IN_THREAD_BYTES = 1 << 20  # below this, a thread hop costs more than the hash


@dataclass(frozen=True, slots=True)
class Result:
    recipient: str
    reply: Reply      # what the client is told for this recipient
    relay: str        # dovecot[127.0.0.1:24], maildir, none
    status: str       # sent | deferred | bounced | discarded (Postfix's words)
    detail: str = ""  # the peer's own reply or the reason, for the log

    @property
    def ok(self) -> bool:
        return self.reply.ok


def from_lmtp(recipient: str, reply: LMTPReply, relay: str) -> Result:
    status, text = reply.split()
    kind = "sent" if reply.code < 400 else "deferred" if reply.code < 500 else "bounced"
    return Result(recipient, Reply(reply.code, status, text), relay, kind, str(reply))


def decided(reply: LMTPReply) -> bool:
    """A 4xx in which Dovecot decides rather than fails (RFC 3463): the mailbox is full (4.2.2,
    Dovecot's quota_full_tempfail) or not accepting mail (4.2.1), or its policy says no (4.7.x).
    Not 4.2.0: Dovecot says that when it cannot write the mailbox, which the fallback may."""
    status = reply.split()[0]
    return status in ("4.2.1", "4.2.2") or status.startswith("4.7.")


class Deliverer:
    def __init__(self, config: Config, pool: Pool | None):
        self.pool = pool
        self.template = config.maildir_template()
        self.domains = config.domains

    async def deliver(self, envelope: Envelope, recipients: list[str],
                      data: bytes | Sequence[bytes], deadline: float,
                      crlf_checked: bool = False) -> list[Result]:
        """`data`: the message in CRLF form, whole or as pieces in a row (trace headers, then
        the message as received), so that a large message is never copied to be sent.
        `crlf_checked`: no bare CR or LF in it (wireform.data_chunks)."""
        parts = (data,) if isinstance(data, bytes) else tuple(data)
        replies: list[LMTPReply | None] = [None] * len(recipients)
        error = "LMTP delivery disabled"
        if self.pool is not None:
            started = time.perf_counter()
            replies, error = await self.pool.deliver(envelope.sender, recipients, parts,
                                                     envelope.body_8bit, deadline, crlf_checked)
            if not error:  # a refused connection is not a delivery time
                metrics.child(metrics.DELIVERY_SECONDS, "lmtp").observe(time.perf_counter() - started)
            if any(reply is not None and reply.code == 250 for reply in replies):
                faults.point("after-lmtp-250")
        results = [self._settled(rcpt, reply, error) for rcpt, reply in zip(recipients, replies)]
        retry = [i for i, result in enumerate(results) if result is None]
        if retry:  # only the fallback runs concurrently; Dovecot's answers need no task
            # XXX every write ends before we answer: a bug in one recipient's must not let the
            # client hear 451 while another's thread still writes (a copy the retry doubles).
            written = await asyncio.gather(*(
                self._to_maildir(envelope, recipients[i], parts, str(replies[i] or error))
                for i in retry), return_exceptions=True)
            for i, result in zip(retry, written):
                results[i] = self._failed(envelope, recipients[i], result) \
                    if isinstance(result, BaseException) else result
        return results

    @staticmethod
    def _failed(envelope: Envelope, rcpt: str, error: BaseException) -> Result:
        """Our bug in one recipient's fallback: a retry (451 4.3.0) for that recipient only."""
        if not isinstance(error, Exception):  # cancelled: not ours to turn into a reply
            raise error
        log.error("%s: internal error while processing the maildir fallback for %s",
                  envelope.queue_id, rcpt, exc_info=error)
        metrics.child(metrics.ERRORS, "message").inc()
        return Result(rcpt, TEMP_FAILURE, "maildir", "deferred", "internal error")

    def _settled(self, rcpt: str, reply: LMTPReply | None, error: str) -> Result | None:
        """The outcome Dovecot's reply decides, or None where the maildir fallback should try."""
        relay = self.pool.relay if self.pool else "none"
        if reply is not None and reply.unknown:  # Dovecot may hold it: defer, no fallback
            return Result(rcpt, OUTCOME_UNKNOWN, relay, "deferred", reply.text)
        if reply is not None and (reply.code < 400 or reply.code >= 500 or decided(reply)):
            return from_lmtp(rcpt, reply, relay)
        if self.template:
            return None
        # no fallback: the client hears Dovecot's own words, if any
        return from_lmtp(rcpt, reply, relay) if reply else Result(
            rcpt, DELIVERY_DEFERRED, relay, "deferred", error)

    async def _to_maildir(self, envelope: Envelope, rcpt: str, parts: tuple[bytes, ...],
                          why: str) -> Result:
        trace = (f"Return-Path: <{envelope.sender}>\r\nDelivered-To: {rcpt}\r\n").encode()
        started = time.perf_counter()
        try:
            name = await asyncio.to_thread(maildir.deliver, self.template, rcpt, self.domains,
                                           (trace, *parts))
        except maildir.MaildirError as e:
            log.warning("%s: maildir fallback for %s failed: %s", envelope.queue_id, rcpt, e)
            metrics.child(metrics.FALLBACK, "failed").inc()
            return Result(rcpt, DELIVERY_DEFERRED, "maildir", "deferred", f"{why}; {e}")
        metrics.child(metrics.DELIVERY_SECONDS, "maildir").observe(time.perf_counter() - started)
        metrics.child(metrics.FALLBACK, "delivered").inc()
        log.info("%s: Dovecot did not take %s (%s): written to maildir", envelope.queue_id, rcpt, why)
        reply = DELIVERED.with_text(DELIVERED.text.format(queue_id=envelope.queue_id))
        return Result(rcpt, reply, "maildir", "sent", f"delivered to maildir as {name}")


class DeliveryRecord:
    """Recipients that already have a message whose sender was not told so (bounded).

    SMTP has one reply per message: after a partial failure we say 451, and the sender's retry
    must not deliver again to the recipients that got it. Also used when the client vanished
    before it heard our reply. Checked in memory; written through to the store's state table
    and read back at start, so a restart between the failure and the retry forgets nothing.
    The store unreachable: memory only, logged (a restart then may duplicate).
    """
    PREFIX = "delivered:"

    def __init__(self, ttl: float, store: Store | None = None, max_entries: int = 100_000):
        self.ttl, self.max_entries = ttl, max_entries
        self.entries: OrderedDict[bytes, float] = OrderedDict()
        self.store = store
        self.writes: set[asyncio.Task] = set()

    async def load(self) -> int:
        """Read back what the store remembers (at start: one scan, not a read per message)."""
        if self.store is None:
            return 0
        try:
            keys = await self.store.keys(self.PREFIX)
        except StoreUnavailable as e:
            log.warning("delivery record: not read back from the store: %s", e)
            return 0
        expires = time.monotonic() + self.ttl
        for key in keys:
            with contextlib.suppress(ValueError):  # not ours: someone else's key
                self.entries[bytes.fromhex(key[len(self.PREFIX):])] = expires
        return len(keys)

    async def flush(self) -> None:
        """Wait for the store writes under way (before answering, and at shutdown)."""
        if self.writes:
            await asyncio.wait(list(self.writes))

    async def _persist(self, key: bytes) -> None:
        try:
            await self.store.claim(self.PREFIX + key.hex(), self.ttl)
        except StoreUnavailable as e:
            log.warning("delivery record: kept in memory only: %s", e)

    @staticmethod
    async def digest(envelope: Envelope, raw: bytes) -> bytes:
        """One hash per transaction, not per recipient; a large message hashes off the event
        loop (hashlib releases the GIL), without copying it."""
        sha = hashlib.sha256(envelope.sender.encode() + b"\0")
        if len(raw) > HASH_IN_THREAD_BYTES:
            await asyncio.to_thread(sha.update, raw)
        else:
            sha.update(raw)
        return sha.digest()

    @staticmethod
    def key(digest: bytes, recipient: str) -> bytes:
        return digest + fold(recipient).encode()

    def remember(self, key: bytes) -> None:
        self.entries[key] = time.monotonic() + self.ttl
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        if self.store is not None:
            task = asyncio.ensure_future(self._persist(key))
            self.writes.add(task)
            task.add_done_callback(self.writes.discard)

    def seen(self, key: bytes) -> bool:
        expires = self.entries.get(key)
        if expires is None:
            return False
        if expires < time.monotonic():
            del self.entries[key]
            return False
        return True
