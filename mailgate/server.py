"""SMTP and LMTP listeners: aiosmtpd's protocol, with what a Postfix neighbour needs added.

Added or changed here, because aiosmtpd 1.4.6 lacks or gets them wrong for us: XFORWARD from
trusted networks (forwarded.py); the null sender <>; DSN parameters (NOTIFY, ORCPT, ENVID, RET) accepted instead
of 555; enhanced status codes on every reply; a session cap (421 4.3.2); an idle deadline that
counts from the last byte received and never fires while a message is being processed, and a
line that takes longer than twice that deadline ends the session too (a slowloris).
"""
from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from aiosmtpd.smtp import SMTP

from mailgate import dataphase, metrics
from mailgate.aiosmtpd_setup import FAST_INIT, fast_init
from mailgate.commands import IGNORED_MAIL_PARAMS, IGNORED_RCPT_PARAMS, is_trusted, parse_path
from mailgate.forwarded import Forwarded
from mailgate.verdict import (BAD_ARGUMENTS, BAD_PARAMETER, BAD_RECIPIENT, BAD_SENDER,
                              BAD_SEQUENCE, DATA_GO_AHEAD, IDLE_TIMEOUT, RCPT_OK, SENDER_OK,
                              SHUTTING_DOWN, TOO_BIG, TOO_MANY_RECIPIENTS, TOO_MANY_SESSIONS,
                              Reply, enhance)

if TYPE_CHECKING:
    from mailgate.gateway import Gateway

class SMTPServer(Forwarded, SMTP):
    """One client session. The mail decisions live in the Gateway (aiosmtpd's handler); who
    the client is, XFORWARD and XFEED, in Forwarded; the LMTP variant in lmtpserver.py."""

    protocol_name = "SMTP"
    # After "220 hostname". ESMTP, as in Postfix's greeting: some clients (smtp-source) send
    # EHLO only to a server that says it.
    greeting = "ESMTP mailgate"
    last_line = 0.0  # when a line last ended (a LF arrived); set from connection_made on

    def __init__(self, gateway: Gateway, listener: str):
        config = gateway.config
        self.gateway, self.listener = gateway, listener
        self.xforward: dict[str, str] = {}
        self.busy = False        # between DATA and our reply: shutdown waits
        self.processing = False  # the whole message is in, our reply is due: idle timer waits
        self.in_ehlo = False     # replying to EHLO or HELO: no enhanced status codes
        self.data_failed = False  # an exception inside DATA: handle_exception ends the transaction
        self.trusted = False
        self.last_activity = 0.0
        settings = dict(hostname=config.hostname, ident=self.greeting,
                        data_size_limit=config.limits.message_size, enable_SMTPUTF8=True,
                        decode_data=False, timeout=config.listen.command_timeout,
                        auth_require_tls=True)
        # XXX aiosmtpd 1.4.6 keeps command_size_limits on the class: its __init__ clears it and
        # every EHLO adds to it, so one session's limit for MAIL moved with others' connections.
        # One dict per session (__init__ then clears this one).
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        if FAST_INIT:
            fast_init(self, gateway, **settings)
        else:
            super().__init__(gateway, **settings)

    # -- connection life ------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.last_activity = self.last_line = self.loop.time()
        if self.transport is None:  # not the STARTTLS re-entry
            self.trusted = is_trusted(transport.get_extra_info("peername"),
                                      self.gateway.config.listen.trusted_networks)
            self.gateway.session_opened(self)
        super().connection_made(transport)

    def connection_lost(self, error) -> None:
        self.gateway.session_closed(self)
        super().connection_lost(error)

    def eof_received(self) -> bool:
        # XXX aiosmtpd cancels the session task on EOF and keeps the transport half-open; a
        # task cancelled before it ran (connect, then close at once: a TCP probe) never closes
        # it, so the socket and the session slot leak until max_sessions refuses everyone.
        super().eof_received()
        return False  # nothing is read after EOF anyway: let the transport close

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if b"\n" in data:
            self.last_line = self.last_activity
        super().data_received(data)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd re-arms the idle timer for every command: a cancel and a new timer each.
        # _timeout_cb counts idleness from last_activity itself, so a timer already running
        # is left to fire and re-arm for what remains.
        if duration is not None or self._timeout_handle is None:
            super()._reset_timeout(duration)

    def _timeout_cb(self) -> None:
        if self.processing:  # bounded by limits.message_timeout instead
            self._reset_timeout(self._timeout_duration)
            return
        now, timeout = self.loop.time(), self._timeout_duration
        # XXX bytes arriving (during DATA, say) are not idleness; but a client that sends a
        # byte now and then and never ends its line holds a session forever: a line gets
        # twice the timeout at most (Postfix's smtpd_per_record_deadline, relaxed).
        left = min(timeout - (now - self.last_activity), 2 * timeout - (now - self.last_line))
        if left > 0:
            self._reset_timeout(left)
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"{IDLE_TIMEOUT}\r\n".encode())
        super()._timeout_cb()

    async def _call_handler_hook(self, command: str, *args):
        # XXX only the message's processing, not all of DATA: a client that stalls half-way
        # through its upload is idle. Once we answer, the client's idle time starts afresh.
        self.processing = command == "DATA"
        try:
            return await super()._call_handler_hook(command, *args)
        finally:
            if self.processing:
                self.last_activity = self.last_line = self.loop.time()
            self.processing = False

    async def _handle_client(self) -> None:
        if self.gateway.closing:
            await self.push(str(SHUTTING_DOWN))
            self.transport.close()
            return
        if self.gateway.over_session_limit(self):
            metrics.child(metrics.SESSIONS, self.listener, "refused").inc()
            await self.push(str(TOO_MANY_SESSIONS))
            self.transport.close()
            return
        metrics.child(metrics.SESSIONS, self.listener, "accepted").inc()
        await super()._handle_client()

    def _create_envelope(self):
        envelope = super()._create_envelope()
        envelope.body_8bit = False
        return envelope

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()
        self.xforward = {}  # XFORWARD describes one transaction (Postfix XFORWARD_README)
        vars(self).pop("feed_verdicts", None)  # XFEED too

    async def push(self, status) -> None:
        if isinstance(status, str) and not self.in_ehlo:
            status = enhance(status)
        await super().push(status)

    async def reply(self, reply: Reply, subject: str = "") -> None:
        await self.push(f"{reply.code} {reply.status} {subject}{reply.text}")

    def close_after_transaction(self) -> bool:
        return self.gateway.closing and self.transport is not None

    def close_idle(self) -> None:
        """Tell the client we are going away (421) and close."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"{SHUTTING_DOWN}\r\n".encode())
            self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        """451 for our failure. Inside DATA the transaction ends with it (it must not leak into
        the next one); elsewhere only that command failed, and MAIL and the RCPTs accepted
        before it stand."""
        in_data, self.data_failed = self.data_failed, False
        replies = len(self.envelope.rcpt_tos) if in_data and self.protocol_name == "LMTP" else 1
        if in_data:
            self._set_post_data_state()
        status = enhance(await super().handle_exception(error))
        return "\r\n".join([status] * max(replies, 1))  # LMTP: one reply per recipient

    # -- verbs ----------------------------------------------------------------------------
    async def smtp_EHLO(self, hostname: str) -> None:
        await self._ehlo(hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        self.in_ehlo = True  # nor do HELO's (RFC 2034 §3)
        try:
            await super().smtp_HELO(hostname)
        finally:
            self.in_ehlo = False

    async def _ehlo(self, hostname: str) -> None:
        self.in_ehlo = True  # EHLO lines carry no enhanced status code (RFC 2034 §3)
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self.in_ehlo = False

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self.envelope.mail_from is not None:
            await self.reply(BAD_SEQUENCE, "Error: nested MAIL command; ")
            return
        parsed = self._path(arg, "FROM:")
        if parsed is None:
            await self.reply(BAD_SENDER)
            return
        address, params = parsed
        problem = self._mail_params(params)
        if problem is not None:
            await self.reply(problem)
            return
        self.envelope.mail_from = address
        self.envelope.mail_options.extend(params)
        await self.reply(SENDER_OK)

    def _mail_params(self, params: list[str]) -> Reply | None:
        for param in params:
            name, _, value = param.partition("=")
            name = name.upper()
            if name == "SIZE":
                if not (value.isascii() and value.isdigit()):  # "²".isdigit(), int() fails
                    return BAD_ARGUMENTS
                if int(value) > self.data_size_limit:
                    return TOO_BIG
            elif name == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return BAD_ARGUMENTS
                self.envelope.body_8bit = value.upper() == "8BITMIME"
            elif name == "SMTPUTF8":
                self.envelope.smtp_utf8 = True
            elif name not in IGNORED_MAIL_PARAMS:
                return BAD_PARAMETER
        return None

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self.envelope.mail_from is None:
            await self.reply(BAD_SEQUENCE, "Error: need MAIL command; ")
            return
        parsed = self._path(arg, "TO:")
        if parsed is not None and parsed[0].lower() == "postmaster":  # RFC 5321 §4.5.1: MUST
            parsed = f"postmaster@{self.gateway.config.domains[0]}", parsed[1]
        if parsed is None or "@" not in parsed[0]:
            await self.reply(BAD_RECIPIENT)
            return
        address, params = parsed
        if params and any(p.partition("=")[0].upper() not in IGNORED_RCPT_PARAMS for p in params):
            await self.reply(BAD_PARAMETER)
            return
        if len(self.envelope.rcpt_tos) >= self.gateway.config.limits.max_recipients:
            await self.reply(TOO_MANY_RECIPIENTS)
            return
        reply = await self.gateway.check_recipient(self, address)
        if reply is RCPT_OK:
            self.envelope.rcpt_tos.append(address)
        await self.reply(reply, f"<{address}>: " if not reply.ok else "")

    def _path(self, arg: str | None, keyword: str) -> tuple[str, list[str]] | None:
        arg = None if arg is None else self._strip_command_keyword(keyword, arg)
        return None if arg is None else parse_path(arg, self._getaddr, self.envelope.smtp_utf8)

    async def smtp_DATA(self, arg: str | None) -> None:
        self.busy = True
        try:
            await self._data(arg)
        except Exception:
            self.data_failed = True  # for handle_exception, which aiosmtpd calls next
            raise
        finally:
            self.busy = False
            self.gateway.transaction_ended()
        if self.close_after_transaction():
            await self.push(str(SHUTTING_DOWN))
            self.transport.close()

    async def _data(self, arg: str | None) -> None:
        """aiosmtpd's smtp_DATA with mailgate's reader of the message (dataphase.py: why)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.reply(BAD_SEQUENCE, "Error: need RCPT command; ")
            return
        if arg:
            await self.reply(BAD_ARGUMENTS)
            return
        await self.push(f"{DATA_GO_AHEAD.code} {DATA_GO_AHEAD.text}")
        try:
            content = await dataphase.read_message(self._reader, self.data_size_limit)
        except asyncio.CancelledError:  # the client went away mid-DATA (as aiosmtpd does)
            self._writer.close()
            raise
        if content is None:
            self._set_post_data_state()
            await self.push(str(TOO_BIG))
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

