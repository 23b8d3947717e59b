"""What the listeners ask of mailgate: decides at RCPT, runs the pipeline and delivery after
DATA, answers.

A message's processing runs in its own task, shielded from the client's connection: if the
client goes away mid-delivery, delivery still finishes and what was delivered is remembered, so
the client's retry does not deliver twice. Any exception becomes 451 4.3.0, never a 5xx.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging

from mailgate import faults, maillog, metrics, trace
from mailgate.address import fold
from mailgate.config import Config
from mailgate.deliver import Deliverer, DeliveryRecord, Result
from mailgate.forward import OWN_MAILBOX, Forwarder
from mailgate.lmtppool import Pool
from mailgate.message import Envelope, parse, unparsed
from mailgate.outbound import send_after_delivery
from mailgate.pipeline import Chain, Outcome
from mailgate.recipients import Recipients
from mailgate.s3sync.secret import feed_secret
from mailgate.sessions import Session, Sessions
from mailgate.store import Store
from mailgate.verdict import (BARE_NEWLINE, DELIVERED, DELIVERY_DEFERRED, MESSAGE_TIMEOUT,
                              RCPT_OK, TEMP_FAILURE, Action, Reply, Verdict)
from mailgate.wireform import has_bare_newline, scan_bare_newline  # noqa: F401 (API)

log = logging.getLogger("mailgate.gateway")


def without(raw: bytes, spans: tuple[tuple[int, int], ...]) -> bytes:
    """`raw` minus the given (start, end) spans (sorted, not overlapping): the removed headers."""
    if not spans:
        return raw
    kept, at = [], 0
    for start, end in spans:
        kept.append(raw[at:start])
        at = max(at, end)
    kept.append(raw[at:])
    return b"".join(kept)


class Gateway(Sessions):
    def __init__(self, config: Config, pool: Pool | None, chain: Chain, store: Store | None = None):
        super().__init__()
        self.pool = pool
        self.configure(config, chain)
        self.record = DeliveryRecord(config.delivery.delivery_record, store)

    def configure(self, config: Config, chain: Chain) -> None:
        """Take a config for the transactions that start from now (at start, and on SIGHUP)."""
        self.config, self.chain = config, chain
        self.max_sessions = config.listen.max_sessions
        self.feed_secret = feed_secret(config.sync.secret_file)
        self.recipients = Recipients(config, self.pool)
        self.deliverer = Deliverer(config, self.pool)
        self.forwarder = Forwarder(config, self.deliverer, chain.resources)

    # -- what the listeners ask --------------------------------------------------------------
    def ehlo_reply(self, server: Session) -> str:
        """The reply to EHLO and LHLO: the extensions, as one write."""
        words = [self.config.hostname, "PIPELINING", f"SIZE {self.config.limits.message_size}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if server.trusted:
            words.append("XFORWARD NAME ADDR PROTO HELO IDENT SOURCE PORT")
            if self.feed_secret:
                words.append("XFEED")
        return "\r\n".join([f"250-{w}" for w in words[:-1]] + [f"250 {words[-1]}"])

    def internal_error(self, error: BaseException) -> str:
        log.error("internal error, answered %s", TEMP_FAILURE, exc_info=error)
        metrics.child(metrics.ERRORS, "session").inc()
        return str(TEMP_FAILURE)

    async def check_recipient(self, server: Session, address: str) -> Reply:
        faults.point("rcpt")
        if not server.envelope.mail_from and self.forwarder.senders.reverse(address):
            return RCPT_OK  # a bounce of a forward, to its SRS address: goes back to the sender
        reply = await self.recipients.check(address)
        if reply.ok and self.chain.filters:  # a filter that can refuse before DATA (blocklist)
            early = await self.chain.check_recipient(server.envelope.mail_from or "", address)
            reply = early.default_reply() if early is not None else reply
        if not reply.ok:
            client = server.client()
            maillog.reject("RCPT", maillog.client_text(client.name, client.addr),
                           f"{reply.code} {reply.status} <{address}>: {reply.text}",
                           server.envelope.mail_from, address, client.proto, client.helo)
            metrics.child(metrics.RECIPIENTS, "rejected").inc()
        return reply

    async def handle_DATA(self, server: Session, envelope) -> str:
        loop = asyncio.get_running_loop()
        env = Envelope(trace.queue_id(), envelope.mail_from, tuple(envelope.rcpt_tos),
                       server.client(), loop.time(), envelope.body_8bit, envelope.smtp_utf8,
                       server.feed_verdicts)
        raw = envelope.original_content
        maillog.received(env, len(raw))
        if await scan_bare_newline(raw):
            results = [Result(r, BARE_NEWLINE, "none", "bounced", "bare newline in DATA")
                       for r in env.recipients]
            maillog.transaction(env, len(raw), results, server.listener)
        else:
            task = self.keep(asyncio.ensure_future(self.process(env, raw, server)))
            results = await asyncio.shield(task)  # the client leaving must not cut delivery short
        faults.point("before-reply")
        return self.answer(env, results, server.protocol_name == "LMTP")

    # -- one message ----------------------------------------------------------------------
    async def process(self, env: Envelope, raw: bytes, server: Session) -> list[Result]:
        try:
            faults.point("after-data")
            results = await self._process(env, raw, server.protocol_name)
            await self._remember(env, raw, results, server)
        # XXX our bug must become a retry (451), never a bounce nor a silent loss.
        except Exception:
            log.exception("%s: internal error while processing", env.queue_id)
            metrics.child(metrics.ERRORS, "message").inc()
            results = [Result(r, TEMP_FAILURE, "none", "deferred", "internal error")
                       for r in env.recipients]
        try:
            maillog.transaction(env, len(raw), results, server.listener)
        except Exception:  # the answer stands: the mail is where the results say it is
            log.exception("%s: internal error while logging the transaction", env.queue_id)
            metrics.child(metrics.ERRORS, "message").inc()
        return results

    async def _remember(self, env: Envelope, raw: bytes, results: list[Result],
                        server: Session) -> None:
        """Who got it, when the client is not told so per recipient (see DeliveryRecord)."""
        # A client that shut its side (EOF) may have gone altogether: our reply may never arrive.
        lost = server.transport is None or server.transport.is_closing() or server.eof
        told_per_recipient = server.protocol_name == "LMTP" and not lost
        if (not told_per_recipient and not all(r.ok for r in results)) or lost:
            digest = await self.record.digest(env, raw)
            for rcpt, result in zip(env.recipients, results):
                if result.ok:  # keyed by the envelope recipient: that is what a retry names
                    self.record.remember(self.record.key(digest, rcpt))
            await self.record.flush()  # in the store before the client hears 451

    async def _process(self, env: Envelope, raw: bytes, proto: str) -> list[Result]:
        deadline = env.received_at + self.config.limits.message_timeout
        outcome = await self._run_chain(env, raw, deadline)
        # Each address once, as Postfix's cleanup removes duplicate recipients: bob@x and BOB@x
        # are one mailbox. The first spelling is delivered; every duplicate gets its result.
        first: dict[str, str] = {}
        for rcpt in env.recipients:
            first.setdefault(fold(rcpt), rcpt)
        done: dict[str, Result] = {}
        targets: list[str] = []  # recipients delivered to their own mailbox
        forwards: dict[str, Verdict] = {}  # recipients whose copies go elsewhere (forward.py)
        digest = await self.record.digest(env, raw) if self.record.entries else b""
        for rcpt in first.values():
            verdict = outcome.verdicts.get(rcpt, Verdict(Action.CONTINUE))
            if digest and self.record.seen(self.record.key(digest, rcpt)):
                done[rcpt] = Result(rcpt, self._delivered(env), "none", "sent",
                                    "already delivered (retry after a partial failure)")
            elif verdict.action >= Action.DISCARD:
                status = {Action.DISCARD: "discarded", Action.DEFER: "deferred"}.get(
                    verdict.action, "bounced")
                done[rcpt] = Result(rcpt, verdict.default_reply(), "none", status, verdict.reason)
            elif verdict.action is Action.REDIRECT and (
                    verdict.redirect_to or verdict.content is not None):
                forwards[rcpt] = verdict
            elif not env.sender and (original := self.forwarder.senders.reverse(rcpt)):
                forwards[rcpt] = Verdict(Action.REDIRECT, "SRS: back to the original sender",
                                         redirect_to=(original,))
            else:
                targets.append(rcpt)
        if targets or forwards:
            head = trace.received(env.client, self.config.hostname,
                                  trace.protocol_word(proto, env.client.proto, env.smtputf8),
                                  env.queue_id, tuple(first.values())) + b"".join(outcome.headers)
            done.update(await self._deliver(env, targets, forwards, head,
                                            without(raw, outcome.drop), deadline))
        if outcome.outbound and self.chain.resources is not None:
            self._send_after(env, outcome, done)
        return self._per_recipient(env, first, done)

    @staticmethod
    def _per_recipient(env: Envelope, first: dict[str, str],
                       done: dict[str, Result]) -> list[Result]:
        """One result per envelope recipient, in order (LMTP: one reply per RCPT); a duplicate
        shares its address's result, and its log line says it got no copy of its own."""
        results, seen = [], set()
        for rcpt in env.recipients:
            key = fold(rcpt)
            result = done[first[key]]
            if key in seen:
                result = dataclasses.replace(result, recipient=rcpt,
                                             detail=f"duplicate of <{result.recipient}>")
            seen.add(key)
            results.append(result)
        return results

    async def _deliver(self, env: Envelope, targets: list[str], forwards: dict[str, Verdict],
                       head: bytes, raw: bytes, deadline: float) -> dict[str, Result]:
        if not forwards:  # two pieces, not one copy: a 30 MB message is handed on as received;
            # handle_DATA refused bare CR and LF, so delivery need not count them again
            return dict(zip(targets, await self.deliverer.deliver(
                env, targets, (head, raw), deadline, crlf_checked=True)))
        # The others' copies join the forwarders' own copies: one LMTP transaction for all.
        return await self.forwarder.run(env, {**dict.fromkeys(targets, OWN_MAILBOX), **forwards},
                                        head, raw, deadline, self.record)

    def _send_after(self, env: Envelope, outcome: Outcome, done: dict[str, Result]) -> None:
        """Auto-replies leave only once their recipient's copy is durable, in tasks of their
        own: they never delay nor fail the reply to the client."""
        for mail in outcome.outbound:
            result = done.get(mail.after)
            if result is not None and result.status == "sent":
                self.keep(asyncio.ensure_future(send_after_delivery(mail, self.chain.resources,
                                                                    env.queue_id)))

    async def _run_chain(self, env: Envelope, raw: bytes, deadline: float) -> Outcome:
        if not self.chain.filters:
            return Outcome({}, ())
        try:
            async with asyncio.timeout_at(deadline):
                message = await parse(env, raw, self.config.limits) if self.chain.needs_parse \
                    else unparsed(env, raw)
                if message.headers is None and message.parse_error:
                    metrics.PARSE_FAILURES.inc()
                    log.warning("%s: delivered unparsed: %s", env.queue_id, message.parse_error)
                return await self.chain.run(message)
        except TimeoutError:
            verdict = Verdict(Action.DEFER, "message time budget exhausted", MESSAGE_TIMEOUT)
            return Outcome({r: verdict for r in env.recipients}, ())

    @staticmethod
    def _delivered(env: Envelope) -> Reply:
        return DELIVERED.with_text(DELIVERED.text.format(queue_id=env.queue_id))

    # -- replies and logs -----------------------------------------------------------------
    def answer(self, env: Envelope, results: list[Result], lmtp: bool) -> str:
        """LMTP: one line per recipient, in order. SMTP: one line for the message."""
        pairs = list(zip(env.recipients, results))
        if lmtp:
            return "\r\n".join(self._line(rcpt, r) for rcpt, r in pairs)
        if all(r.ok for r in results):
            return str(self._delivered(env))
        if not any(r.ok for r in results) and all(r.reply.permanent for r in results):
            return self._line(*pairs[0])
        # XXX mixed outcomes: one SMTP reply cannot say "some got it"; 451, and the delivery
        # record keeps the retry from delivering twice (a permanent failure among them is
        # retried until the sender's queue lifetime ends, then bounced by the sender).
        temporary = next(((rcpt, r) for rcpt, r in pairs if r.reply.temporary), None)
        return self._line(*temporary) if temporary else str(DELIVERY_DEFERRED)

    @staticmethod
    def _line(recipient: str, result: Result) -> str:
        reply = result.reply
        if reply.ok:
            return str(reply)
        return f"{reply.code} {reply.status} <{recipient}>: {reply.text}"
