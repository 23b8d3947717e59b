"""Handing a stored message to mailgate serve over SMTP, as the trusted feed.

XFEED (the shared secret, SES's verdicts) and XFORWARD (the
client SES saw, so SPF runs on the real sender) precede MAIL. The answer is one reply per
recipient: the RCPT refusal, or the reply to DATA. Anything that breaks the conversation is a
temporary failure for every recipient still open: nothing is acknowledged on it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import aiosmtplib

from mailgate.config import parse_hostport
from mailgate.s3sync import metrics
from mailgate.s3sync.headers import Origin
from mailgate.s3sync.notifications import Verdicts

IDLE_REUSE = 30.0  # seconds an idle connection is reused (serve closes idle ones much later)
BROKEN = 421       # our code for "the conversation broke": temporary, like serve's 421


@dataclass(frozen=True)
class Handoff:
    sender: str
    recipients: tuple[str, ...]
    data: bytes                 # as stored; aiosmtplib sends it with CRLF line endings
    origin: Origin
    verdicts: Verdicts


@dataclass(frozen=True)
class Answer:
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500


def xtext(value: str) -> str:
    """RFC 3461 xtext: "+", "=" and anything outside printable ASCII as +XX."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else
                   "".join(f"+{b:02X}" for b in c.encode()) for c in value)


class Injector:
    def __init__(self, target: str, hostname: str, secret: bytes, timeout: float):
        self.target, self.hostname, self.secret, self.timeout = target, hostname, secret, timeout
        self.idle: list[tuple[float, aiosmtplib.SMTP]] = []

    async def inject(self, handoff: Handoff, fresh: bool = False) -> dict[str, Answer]:
        """One reply per recipient; a broken conversation is BROKEN for those not answered."""
        started = time.monotonic()
        answers: dict[str, Answer] = {}
        client, reused = None, bool(self.idle) and not fresh
        try:
            client = await self._client(fresh)
            await self._transaction(client, handoff, answers)
        except (aiosmtplib.SMTPException, OSError) as e:
            if client is not None:
                client.close()
            if reused and not answers:  # XXX serve closed an idle connection: once more, fresh
                return await self.inject(handoff, fresh=True)
            broken = Answer(BROKEN, f"{self.target}: {e}")
            return {r: answers.get(r, broken) for r in handoff.recipients}
        except BaseException:
            if client is not None:
                client.close()
            raise
        self.idle.append((time.monotonic(), client))
        metrics.INJECT_SECONDS.observe(time.monotonic() - started)
        return answers

    async def _client(self, fresh: bool) -> aiosmtplib.SMTP:
        """An idle connection of the last IDLE_REUSE seconds, else a new one (EHLO done)."""
        while self.idle and not fresh:
            since, client = self.idle.pop()
            if time.monotonic() - since < IDLE_REUSE and client.is_connected:
                return client
            client.close()
        if self.target.startswith("unix:"):
            client = aiosmtplib.SMTP(socket_path=self.target[5:], local_hostname=self.hostname,
                                     timeout=self.timeout, start_tls=False)
        else:
            host, port = parse_hostport(self.target, "sync.inject")
            client = aiosmtplib.SMTP(hostname=host, port=port, local_hostname=self.hostname,
                                     timeout=self.timeout, start_tls=False)
        await client.connect()
        await client.ehlo()
        return client

    async def _transaction(self, client: aiosmtplib.SMTP, h: Handoff,
                           answers: dict[str, Answer]) -> None:
        await self._introduce(client, h)
        try:
            await client.mail(h.sender, options=self._mail_options(h), encoding="utf-8")
        except aiosmtplib.SMTPSenderRefused as e:
            answers.update((r, Answer(e.code, e.message)) for r in h.recipients)
            await client.rset()
            return
        accepted = []
        for rcpt in h.recipients:
            try:
                await client.rcpt(rcpt, encoding="utf-8")
                accepted.append(rcpt)
            except aiosmtplib.SMTPRecipientRefused as e:
                answers[rcpt] = Answer(e.code, e.message)
        if not accepted:
            await client.rset()
            return
        try:
            reply = await client.data(h.data)
            answers.update((r, Answer(reply.code, reply.message)) for r in accepted)
        except aiosmtplib.SMTPDataError as e:
            answers.update((r, Answer(e.code, e.message)) for r in accepted)

    async def _introduce(self, client: aiosmtplib.SMTP, h: Handoff) -> None:
        """XFEED when we have the secret, XFORWARD when we know SES's client."""
        if self.secret:
            words = [f"SECRET={xtext(self.secret.decode())}"]
            words += [f"{method}={result}" for method, result in h.verdicts]
            reply = await client.execute_command(b"XFEED", *(w.encode() for w in words))
            if reply.code != 250:  # wrong secret, or serve reads another file: never without
                raise aiosmtplib.SMTPResponseException(reply.code, f"XFEED: {reply.message}")
        origin = h.origin
        if origin.addr and client.supports_extension("xforward"):
            attrs = [f"ADDR={xtext(origin.addr)}", f"NAME={xtext(origin.name or 'unknown')}",
                     f"HELO={xtext(origin.helo)}" if origin.helo else "", "PROTO=ESMTP"]
            reply = await client.execute_command(b"XFORWARD", *(a.encode() for a in attrs if a))
            if reply.code != 250:
                raise aiosmtplib.SMTPResponseException(reply.code, f"XFORWARD: {reply.message}")

    @staticmethod
    def _mail_options(h: Handoff) -> list[str]:
        # the size on the wire: aiosmtplib turns every LF and lone CR into CRLF
        size = len(h.data) + h.data.count(b"\n") - h.data.count(b"\r\n") + \
            h.data.count(b"\r") - h.data.count(b"\r\n")
        options = [f"SIZE={size}"]
        if not h.data.isascii():
            options.append("BODY=8BITMIME")
        if not all(a.isascii() for a in (h.sender, *h.recipients)):
            options.append("SMTPUTF8")
        return options

    def close(self) -> None:
        while self.idle:
            self.idle.pop()[1].close()
