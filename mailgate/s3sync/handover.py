"""One stored message from S3 into mailgate serve: fetch, envelope, claim, inject, remember.

Shared by the feed and replay; it acknowledges nothing itself. The Outcome says whether the
message is finished (every recipient got serve's 250 or a final 5xx) or must come back
(a 4xx, a broken conversation, an unreadable object, the store away, another process on it).
A missing object that sync itself deleted after delivering it is finished, not dead.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from mailgate.config import Config
from mailgate.s3sync import headers, metrics
from mailgate.s3sync.claims import Claim, Claims, identity
from mailgate.s3sync.clients import Clients
from mailgate.s3sync.fetch import Gone, Stored, Unreadable, Unusable, fetch
from mailgate.s3sync.inject import Answer, Handoff, Injector
from mailgate.s3sync.notifications import Notice
from mailgate.store import StoreUnavailable

log = logging.getLogger("mailgate.sync")


@dataclass(frozen=True)
class Outcome:
    status: str                  # delivered | invalid | blocked | bounced | deferred
    detail: str = ""
    invalid_inboxes: tuple[str, ...] = ()
    delivered: int = 0           # recipients that have it (now or before)
    stored: bool = True          # the object is there, in sync.buckets: it may be marked

    @property
    def final(self) -> bool:
        return self.status != "deferred"

    @property
    def dead(self) -> bool:
        """Finished with nothing delivered: it belongs in the dead-letter queue."""
        return self.final and self.status != "delivered"


class Handover:
    def __init__(self, config: Config, clients: Clients, injector: Injector, claims: Claims,
                 domains: frozenset[str]):
        self.config, self.clients, self.injector, self.claims = config, clients, injector, claims
        self.domains = domains

    async def run(self, notice: Notice, where: str) -> Outcome:
        """Deliver the object `notice` names; `where` names queue and key in the log."""
        buckets = self.config.sync.buckets
        if buckets and notice.bucket not in buckets:
            return Outcome("invalid", f"bucket {notice.bucket} is not in sync.buckets",
                           stored=False)
        try:
            stored = await fetch(self.clients, notice.bucket, notice.key,
                                 self.config.limits.message_size)
        except Gone as e:
            return await self._gone(notice, str(e))
        except Unusable as e:
            return Outcome("invalid", str(e), stored=e.exists)
        except Unreadable as e:
            return Outcome("deferred", str(e))
        handoff = self.envelope(notice, stored.data, where)
        if not handoff.recipients:
            return Outcome("invalid", "no recipient in our domains")
        try:
            return await self._deliver(notice, stored, handoff)
        except StoreUnavailable as e:
            metrics.ERRORS.labels("store").inc()
            return Outcome("deferred", f"store unavailable: {e}")

    async def _gone(self, notice: Notice, error: str) -> Outcome:
        """No object: a repeated notification of one delivered and deleted (processed =
        "delete") is finished; any other is dead. Its claims cannot tell (the ETag, and for an
        S3 event the recipients, are in the object), so the deletion is remembered on its own."""
        try:
            deleted = await self.claims.was_deleted(notice.bucket, notice.key)
        except StoreUnavailable as e:
            metrics.ERRORS.labels("store").inc()
            return Outcome("deferred", f"{error}; store unavailable to say whether sync "
                                       f"deleted it after its delivery: {e}")
        if deleted:
            return Outcome("delivered", "already processed (delivered, then deleted)",
                           stored=False)
        return Outcome("invalid", error, stored=False)

    def envelope(self, notice: Notice, data: bytes, where: str) -> Handoff:
        """Recipients, sender, SES's client and verdicts: from the notification, else from SES's
        headers; recipients outside our domains are dropped here, logged and counted."""
        section = headers.header_section(data)
        block = headers.ses_block(section)
        candidates = list(notice.recipients) or headers.ses_recipients(block)
        if not notice.recipients and not headers.in_domains(candidates, self.domains)[0]:
            candidates = headers.header_recipients(section)
            if candidates:
                metrics.HEADER_RECIPIENTS.inc()
                log.warning("%s: no envelope recipient from SES; using header To/Cc: %s",
                            where, ", ".join(candidates))
        ours, foreign = headers.in_domains(candidates, self.domains)
        if foreign:
            metrics.RECIPIENTS.labels("foreign").inc(len(foreign))
            log.warning("%s: not our domains, not injected: %s", where, ", ".join(foreign))
        sender = notice.sender if notice.sender is not None else headers.sender(block)
        verdicts = notice.verdicts if notice.verdicts is not None else headers.verdicts(block)
        return Handoff(sender, tuple(ours), data, headers.origin(block), verdicts)

    async def _deliver(self, notice: Notice, stored: Stored, handoff: Handoff) -> Outcome:
        idents = {r: identity(notice.bucket, notice.key, stored.etag, r)
                  for r in handoff.recipients}
        claims: dict[str, Claim] = {}
        try:
            for rcpt, ident in idents.items():
                claims[rcpt] = await self.claims.take(ident)
            mine = tuple(r for r, c in claims.items() if c is Claim.MINE)
            answers = await self.injector.inject(
                dataclasses.replace(handoff, recipients=mine)) if mine else {}
            for rcpt in mine:
                if answers[rcpt].ok:
                    # serve has it: done before it is recorded, so a store that fails now
                    # cannot bring the message back to be injected again.
                    claims[rcpt] = Claim.DONE
                    await self._record(notice, rcpt, idents[rcpt])
        finally:  # a lock we hold and did not turn into "done" is given back
            for rcpt, claim in claims.items():
                if claim is Claim.MINE:
                    await self.claims.release(idents[rcpt])
        return outcome(claims, answers)

    async def _record(self, notice: Notice, rcpt: str, ident: str) -> None:
        """Remember serve's 250 for `rcpt`; when the store will not, say what that risks."""
        # XXX a crash between serve's 250 and this write delivers twice on the retry; a store
        # that refuses it keeps the lock, so only a copy announced after lock_ttl does.
        try:
            await self.claims.delivered(ident)
        except StoreUnavailable as e:
            metrics.ERRORS.labels("store").inc()
            log.error("s3://%s/%s: delivered to %s, but not recorded in the store (%s); a copy "
                      "announced more than %g s from now would be delivered again", notice.bucket,
                      notice.key, rcpt, e, self.claims.lock_ttl)


def outcome(claims: dict[str, Claim], answers: dict[str, Answer]) -> Outcome:
    """The message's outcome from each recipient's claim and serve's answer."""
    done = [r for r, c in claims.items() if c is Claim.DONE]
    refused = {r: a for r, a in answers.items() if a.permanent}
    waiting = {r: a for r, a in answers.items() if not a.ok and not a.permanent}
    busy = [r for r, c in claims.items() if c is Claim.BUSY]
    metrics.RECIPIENTS.labels("duplicate").inc(len(done) - sum(a.ok for a in answers.values()))
    for label, count in (("delivered", sum(a.ok for a in answers.values())),
                         ("refused", len(refused)), ("deferred", len(waiting) + len(busy))):
        metrics.RECIPIENTS.labels(label).inc(count)
    if waiting or busy:
        detail = "; ".join([f"{r}: {a.code} {a.text}" for r, a in waiting.items()] +
                           [f"{r}: being delivered by another sync process" for r in busy])
        return Outcome("deferred", detail, delivered=len(done))
    invalid = tuple(r for r, a in refused.items() if a.text.startswith("5.1."))
    detail = "; ".join(f"{r}: {a.code} {a.text}" for r, a in refused.items())
    if done:
        return Outcome("delivered", detail, invalid, len(done))
    if len(invalid) == len(refused):
        return Outcome("invalid", detail, invalid)
    blocked = any(a.text.startswith("5.7.") for a in refused.values())
    return Outcome("blocked" if blocked else "bounced", detail, invalid)
