"""Forwarding is delivery: a REDIRECT verdict becomes copies, each delivered and answered for.

Our mailboxes get their copy through the same delivery as any recipient; other targets through
the relay, envelope sender rewritten (SRS or `rules.bounce_address`: SPF and DMARC p=reject
senders still pass), with `Delivered-To: <recipient>` on top so a loop is seen; a bounce to one
of our SRS addresses goes back to the original sender. A target gets one copy of a message,
however many of its recipients forward to it and also when it is a recipient itself. A copy
failing temporarily defers the recipient (4xx) and the copies that made it are remembered, so
the retry does not double them; a target refusing for good leaves the message in the
recipient's own mailbox (delivered there now, without a local copy, unless another recipient's
forward put it there already), logged. The own mailbox refusing for good (over quota) is that
recipient's 5xx, as any delivery's, and the copies that went are remembered.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailgate import metrics
from mailgate.config import Config
from mailgate.deliver import Deliverer, DeliveryRecord, Result
from mailgate.message import Envelope
from mailgate.srs import SenderRewriter, is_local
from mailgate.verdict import DELIVERED, FORWARD_DEFERRED, Action, Verdict

if TYPE_CHECKING:
    from mailgate.resources import Resources

log = logging.getLogger("mailgate.forward")
OWN_MAILBOX = Verdict(Action.REDIRECT, "delivered to its own mailbox", keep_copy=True)


@dataclass(frozen=True, slots=True)
class Copy:
    recipient: str   # the envelope recipient this copy is for
    target: str      # a mailbox of ours or an external address
    own: bool        # the recipient's own mailbox: no Delivered-To of ours
    local: bool      # delivered by us (own mailbox or a local target), not through the relay


def plan(recipient: str, verdict: Verdict, domains: tuple[str, ...]) -> list[Copy]:
    """The copies a REDIRECT asks for, the recipient's own first, each target once."""
    wanted = ([recipient] if verdict.keep_copy else []) + list(verdict.redirect_to)
    seen: set[str] = set()
    copies = []
    for target in wanted:
        if target.lower() in seen:
            continue
        seen.add(target.lower())
        own = target.lower() == recipient.lower()
        copies.append(Copy(recipient, target, own, own or is_local(target, domains)))
    return copies


class Forwarder:
    def __init__(self, config: Config, deliverer: Deliverer, resources: Resources | None):
        self.domains = config.domains
        self.deliverer = deliverer
        self.resources = resources
        self.senders = SenderRewriter(config)

    async def run(self, env: Envelope, forwards: dict[str, Verdict], head: bytes, raw: bytes,
                  deadline: float, record: DeliveryRecord) -> dict[str, Result]:
        """One Result per forwarding recipient. `head`: the trace and filter headers."""
        digest = await record.digest(env, raw)
        plans = {rcpt: plan(rcpt, v, self.domains) for rcpt, v in forwards.items()}
        shared = self._shared(plans, forwards)
        done = {c: self._already(c) for cs in plans.values() for c in cs
                if record.seen(self._key(record, digest, c))}
        todo = [c for cs in plans.values() for c in cs if c not in done and c not in shared]
        done.update(await self._deliver(env, todo, forwards, head, raw, deadline))
        for c, went in shared.items():  # its target's one copy answers for it
            done.setdefault(c, done[went])
        out = {}
        for rcpt, copies in plans.items():
            out[rcpt] = await self._settle(env, rcpt, copies, done, forwards[rcpt], head, raw,
                                           deadline)
            if not out[rcpt].ok:
                for c in copies:
                    if done[c].ok:
                        record.remember(self._key(record, digest, c))
        await record.flush()  # in the store before the client hears the 4xx
        return out

    @staticmethod
    def _shared(plans: dict[str, list[Copy]], forwards: dict[str, Verdict]) -> dict[Copy, Copy]:
        """One copy of the message per target (compared case-insensitively): a forward to
        another recipient of the message, or to a target two recipients forward to, is not
        made again. Maps each copy not made to the one that goes (own mailboxes first, so the
        copy without our Delivered-To is kept). A notice (content of its own) is not the
        message: never merged."""
        first: dict[str, Copy] = {}
        shared = {}
        everyone = [c for cs in plans.values() for c in cs
                    if forwards[c.recipient].content is None]
        for c in sorted(everyone, key=lambda c: not c.own):
            went = first.setdefault(c.target.lower(), c)
            if went is not c:
                shared[c] = went
        return shared

    @staticmethod
    def _key(record: DeliveryRecord, digest: bytes, copy: Copy) -> bytes:
        return record.key(digest, f"{copy.recipient}\n{copy.target}")

    @staticmethod
    def _already(copy: Copy) -> Result:
        return Result(copy.target, DELIVERED, "none", "sent",
                      "already delivered (retry after a partial failure)")

    async def _deliver(self, env: Envelope, copies: list[Copy], forwards: dict[str, Verdict],
                       head: bytes, raw: bytes, deadline: float) -> dict[Copy, Result]:
        """All copies at once, one transaction per distinct content: own mailboxes together,
        each forwarder's local targets, each forwarder's external targets (through the relay)."""
        groups: dict[tuple[str, bool, bool], list[Copy]] = {}
        for c in copies:
            distinct = not c.own or forwards[c.recipient].content is not None
            groups.setdefault((c.recipient if distinct else "", c.own, c.local), []).append(c)
        jobs = []
        for group in groups.values():
            first = group[0]
            data = (b"" if first.own else b"Delivered-To: " + first.recipient.encode() + b"\r\n") \
                + head + (forwards[first.recipient].content or raw)
            notice = forwards[first.recipient].content is not None
            jobs.append(self._local(env, group, data, deadline) if first.local
                        else self._relay(env, group, data, notice))
        out: dict[Copy, Result] = {}
        for part in await asyncio.gather(*jobs):
            out.update(part)
        return out

    async def _local(self, env: Envelope, copies: list[Copy], data: bytes,
                     deadline: float) -> dict[Copy, Result]:
        results = await self.deliverer.deliver(env, [c.target for c in copies], data, deadline)
        return dict(zip(copies, results))

    async def _relay(self, env: Envelope, copies: list[Copy], data: bytes,
                     notice: bool = False) -> dict[Copy, Result]:
        """`notice`: the copies carry a notification in place of the message (a bounce
        notice): it leaves with the null sender (RFC 5321 §4.5.5), so nothing answers it."""
        if self.resources is None:
            return {c: Result(c.target, FORWARD_DEFERRED, "none", "deferred", "no relay here")
                    for c in copies}
        try:
            sender = "" if notice else self.senders.rewrite(env.sender)
        except OSError as e:  # the SRS secret cannot be read or made: ours to fix, retried
            log.error("%s: cannot rewrite the sender for forwarding: %s", env.queue_id, e)
            return {c: Result(c.target, FORWARD_DEFERRED, "none", "deferred", f"SRS: {e}")
                    for c in copies}
        sent = await self.resources.outbound.send(sender, [c.target for c in copies], data)
        if sent.message_id and sender:  # a bounce of a bounce (or notice) is told to no one
            await self._remember_sent(env, copies, sent.message_id)
        out = {}
        for c in copies:
            reply = sent.replies[c.target]
            status = "sent" if reply.ok else "deferred" if reply.temporary else "bounced"
            metrics.child(metrics.OUTBOUND, "forward", status).inc()
            out[c] = Result(c.target, reply, sent.relay, status,
                            f"from=<{sender}> {reply.code} {reply.status} {reply.text}")
        return out

    async def _settle(self, env: Envelope, rcpt: str, copies: list[Copy],
                      done: dict[Copy, Result], verdict: Verdict, head: bytes, raw: bytes,
                      deadline: float) -> Result:
        """The recipient's answer: 4xx while any copy may still go; the own mailbox refusing
        for good is the recipient's 5xx; a target refusing for good is logged, and the message
        is (or is then put) in the recipient's own mailbox."""
        if len(copies) == 1 and copies[0].own:  # nothing forwarded: its delivery says it all
            return done[copies[0]]
        results = {c: done[c] for c in copies}
        failed = [c for c, r in results.items() if not r.ok]
        temporary = next((c for c in failed if results[c].reply.temporary), None)
        if temporary is not None:
            reply = results[temporary].reply if temporary.own else FORWARD_DEFERRED
            return self._result(rcpt, results, reply, "deferred")
        refused_by = ", ".join(c.target for c in failed)
        if failed and not any(c.own for c in copies) and self._filled(rcpt, done):
            log.warning("%s: forward for <%s> refused by %s: <%s>'s mailbox has it "
                        "(forwarded there)", env.queue_id, rcpt, refused_by, rcpt)
        elif failed and not any(c.own for c in copies):
            log.warning("%s: forward for <%s> refused by %s: keeping it in <%s>'s mailbox",
                        env.queue_id, rcpt, refused_by, rcpt)
            own = Copy(rcpt, rcpt, True, True)
            results.update(await self._deliver(env, [own], {rcpt: verdict}, head, raw, deadline))
            if not results[own].ok:
                return self._result(rcpt, results, results[own].reply,
                                    results[own].status)
        elif failed:
            what = ", ".join("own mailbox" if c.own else f"<{c.target}>" for c in failed)
            log.warning("%s: <%s>: %s refused for good, %d of %d copies delivered", env.queue_id,
                        rcpt, what, len(copies) - len(failed), len(copies))
            own = next((c for c in failed if c.own), None)
            if own is not None:  # the mailbox itself refused (full): as any delivery, told
                return self._result(rcpt, results, results[own].reply, "bounced")
            # The recipient has it in its own mailbox: a 5xx would make Postfix bounce mail
            # that was delivered, to a sender who may be forged. Logged only.
        delivered = DELIVERED.with_text(DELIVERED.text.format(queue_id=env.queue_id))
        return self._result(rcpt, results, delivered, "sent")

    @staticmethod
    def _filled(rcpt: str, done: dict[Copy, Result]) -> bool:
        """Whether another recipient's forward put this message in rcpt's mailbox already: a
        second copy kept there for a refused forward would be a duplicate."""
        return any(c.local and c.target.lower() == rcpt.lower() and r.ok
                   for c, r in done.items())

    @staticmethod
    def _result(rcpt: str, results: dict[Copy, Result], reply, status: str) -> Result:
        relay = ",".join(dict.fromkeys(r.relay for r in results.values()))
        detail = "; ".join(
            f"{'own mailbox' if c.own else 'to <' + c.target + '>'}: {r.status} "
            f"({r.detail or r.reply})" for c, r in results.items())
        return Result(rcpt, reply, relay, status, detail)

    async def _remember_sent(self, env: Envelope, copies: list[Copy], message_id: str) -> None:
        """SES's id for a forward, so `bounce` can tell the original sender if it bounces."""
        from mailgate.store import StoreUnavailable
        item = {"original_sender": env.sender, "recipients": [c.target for c in copies],
                "forwarded_for": copies[0].recipient, "queue_id": env.queue_id,
                "sent_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds")}
        try:
            await self.resources.store.put_outbound(message_id, item)
        except StoreUnavailable as e:  # sent all the same; a bounce of it arrives as it is
            log.warning("%s: SES message %s not recorded: %s", env.queue_id, message_id, e)
