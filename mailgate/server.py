"""SMTP and LMTP listeners: the conversation with the client, on asyncio's plain Protocol.

Written by hand rather than on aiosmtpd. aiosmtpd 1.4.6 gives each session a StreamReader, a
task and a chain of awaits per command, and inspects its classes per connection; in the auth
benchmark that was about a third of mailgate's CPU per message with the empty chain
(BENCHMARKS.md, notes).
Here a command that needs nobody else (EHLO, MAIL, RSET, ...) is answered inside data_received;
only RCPT (Dovecot or the store may be asked) and the message get a task. While one runs, what
the client pipelined waits in the buffer, and reading pauses if that grows.

What a Postfix neighbour needs, beyond RFC 5321: XFORWARD and XFEED from trusted networks
(forwarded.py); the null sender <>; DSN parameters accepted; enhanced status codes on every
reply but EHLO's and HELO's; a session cap (421 4.3.2); an idle deadline that counts from the
last byte received or our last answer and never fires while we owe one (a RCPT being checked,
a message being processed), and a line that takes longer than twice that deadline ends the
session too (a slowloris); a client that shuts its side still gets its replies.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from mailgate import faults, metrics
from mailgate.commands import (IGNORED_MAIL_PARAMS, IGNORED_RCPT_PARAMS, getaddr, is_trusted,
                               parse_path)
from mailgate.dataphase import MessageReader
from mailgate.forwarded import Forwarded
from mailgate.verdict import (BAD_ARGUMENTS, BAD_PARAMETER, BAD_RECIPIENT, BAD_SENDER,
                              BAD_SEQUENCE, CLOSING, DATA_GO_AHEAD, IDLE_TIMEOUT, OK, RCPT_OK,
                              SENDER_OK, SHUTTING_DOWN, TOO_BIG, TOO_MANY_RECIPIENTS,
                              TOO_MANY_SESSIONS, Reply, enhance)

if TYPE_CHECKING:
    from mailgate.gateway import Gateway

LINE_LIMIT = 1001          # a command line, CRLF included, as aiosmtpd read it
COMMAND_LIMIT = 512        # RFC 5321 §4.5.3.1.4, CRLF excluded here as aiosmtpd counted
MAIL_LIMIT_ESMTP = 512 + 26 + 10  # after EHLO: room for SIZE= and SMTPUTF8 (RFC 1870, 6531)
BOGUS_LIMIT = 5            # unknown commands before we hang up
PENDING_LIMIT = 64 * 1024  # pipelined input held while a command runs: reading pauses beyond


class Session:
    """Who the client says it is (HELO/EHLO) and where it connects from."""
    __slots__ = ("peer", "host_name", "extended_smtp")

    def __init__(self, peer) -> None:
        self.peer, self.host_name, self.extended_smtp = peer, "", False


class Envelope:
    """One transaction, MAIL to the end of DATA."""
    __slots__ = ("mail_from", "rcpt_tos", "body_8bit", "smtp_utf8", "original_content")

    def __init__(self) -> None:
        self.mail_from: str | None = None
        self.rcpt_tos: list[str] = []
        self.body_8bit = self.smtp_utf8 = False
        self.original_content: bytes | None = None


class SMTPServer(Forwarded, asyncio.Protocol):
    """One client session. The mail decisions live in the Gateway; who the client is, XFORWARD
    and XFEED, in Forwarded; the LMTP variant in lmtpserver.py."""

    protocol_name = "SMTP"
    # After "220 hostname". ESMTP, as in Postfix's greeting: some clients (smtp-source) send
    # EHLO only to a server that says it.
    greeting = "ESMTP mailgate"
    verbs = {"HELO": "smtp_HELO", "EHLO": "smtp_EHLO", "MAIL": "smtp_MAIL", "RCPT": "smtp_RCPT",
             "DATA": "smtp_DATA", "RSET": "smtp_RSET", "NOOP": "smtp_NOOP", "QUIT": "smtp_QUIT",
             "VRFY": "smtp_VRFY", "EXPN": "smtp_EXPN", "HELP": "smtp_HELP", "AUTH": "smtp_AUTH",
             "STARTTLS": "smtp_STARTTLS", "XFORWARD": "smtp_XFORWARD", "XFEED": "smtp_XFEED"}

    def __init__(self, gateway: Gateway, listener: str):
        self.gateway, self.listener = gateway, listener
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.session = Session(None)
        self.envelope = Envelope()
        self.xforward: dict[str, str] = {}
        self.trusted = False
        self.busy = False        # from DATA to our reply: shutdown waits
        self.eof = False         # the client has shut its side: answer what came, then close
        self.pending = bytearray()  # received, not yet handled (pipelined commands)
        self.message: MessageReader | None = None  # inside DATA
        self.task: asyncio.Task | None = None      # RCPT or the message, being answered
        self.skipping = False    # inside a command line too long, until its end
        self.reading_paused = self.writing_paused = False
        self.bogus = BOGUS_LIMIT
        self.last_activity = self.last_line = 0.0  # a byte, a line end (LF) last received
        self.timer: asyncio.TimerHandle | None = None

    # What a reload changes applies to the next command (EHLO says the SIZE that MAIL and
    # DATA then hold to).
    @property
    def hostname(self) -> str:
        return self.gateway.config.hostname

    @property
    def data_size_limit(self) -> int:
        return self.gateway.config.limits.message_size

    @property
    def timeout(self) -> float:
        return self.gateway.config.listen.command_timeout

    # -- connection life ------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.last_activity = self.last_line = self.loop.time()
        peer = transport.get_extra_info("peername")
        self.session = Session(peer)
        self.trusted = is_trusted(peer, self.gateway.config.listen.trusted_networks)
        self.gateway.session_opened(self)
        if self.gateway.closing:
            self.hang_up(SHUTTING_DOWN)
            return
        if self.gateway.over_session_limit(self):
            metrics.child(metrics.SESSIONS, self.listener, "refused").inc()
            self.hang_up(TOO_MANY_SESSIONS)
            return
        metrics.child(metrics.SESSIONS, self.listener, "accepted").inc()
        self.timer = self.loop.call_later(self.timeout, self._timeout_cb)
        self.write(f"220 {self.hostname} {self.greeting}")

    def connection_lost(self, error) -> None:
        self.gateway.session_closed(self)
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:  # the message's delivery goes on (Gateway shields it)
            self.task.cancel()
        if self.busy:  # gone during the upload: no transaction left to wait for
            self.busy = False
            self.gateway.transaction_ended()

    def eof_received(self) -> bool:
        """The client shut its side (after QUIT, or after the final dot, say): what it sent is
        still answered, as Postfix's smtpd does; then we close."""
        self.eof = True
        if self.task is None:
            self.advance()
        return True  # our side stays open for the replies; advance() closes it after them

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if b"\n" in data:
            self.last_line = self.last_activity
        self.pending += data
        if self.task is None and not self.writing_paused:
            self.advance()
        elif len(self.pending) > PENDING_LIMIT and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:  # our replies back up: handle no more of its commands
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.task is None:
            self.advance()

    def write(self, line: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line.encode("utf-8", "surrogateescape") + b"\r\n")

    def reply(self, reply: Reply, subject: str = "") -> None:
        self.write(f"{reply.code} {reply.status} {subject}{reply.text}")

    def push(self, status: str) -> None:
        """A reply line as text, given an enhanced status code if it has none."""
        self.write(enhance(status))

    def hang_up(self, reply: Reply) -> None:
        self.reply(reply)
        self.close()

    def close(self) -> None:
        if self.transport is None:
            return
        # close() waits until what we wrote has gone; a client that does not read (our replies
        # back up beyond the socket's buffer) would hold its session slot forever.
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def close_after_transaction(self) -> bool:
        return self.gateway.closing and self.transport is not None

    def close_idle(self) -> None:
        """Tell the client we are going away (421) and close."""
        self.hang_up(SHUTTING_DOWN)

    def _timeout_cb(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        now, timeout = self.loop.time(), self.timeout
        # Our answer is due, not the client's move: a RCPT check is bounded by
        # delivery.lmtp_timeout, a message by limits.message_timeout.
        if self.task is not None:
            self.timer = self.loop.call_later(timeout, self._timeout_cb)
            return
        # XXX bytes arriving (during DATA, say) are not idleness; but a client that sends a
        # byte now and then and never ends its line holds a session forever: a line gets
        # twice the timeout at most (Postfix's smtpd_per_record_deadline, relaxed).
        left = min(timeout - (now - self.last_activity), 2 * timeout - (now - self.last_line))
        if left > 0:
            self.timer = self.loop.call_later(left, self._timeout_cb)
            return
        self.hang_up(IDLE_TIMEOUT)

    # -- the input, one command or message at a time --------------------------------------
    def advance(self) -> None:
        """Handle what has been received, up to a command that must wait for an answer."""
        while self.task is None and self.pending and not self.writing_paused \
                and self.transport is not None and not self.transport.is_closing():
            try:
                if self.message is not None:
                    self._take_message()
                    continue
                end = self.pending.find(b"\n")
                if end < 0:
                    if len(self.pending) > LINE_LIMIT:  # as aiosmtpd: read on to its end
                        self.skipping = True
                        del self.pending[:]
                    break
                line = bytes(self.pending[:end + 1])
                del self.pending[:end + 1]
                if self.skipping or end + 1 > LINE_LIMIT:
                    self.skipping = False
                    self.push("500 Command line too long")
                    continue
                self.command(line.rstrip(b"\r\n"))
            except Exception as error:  # our bug is a 451 for that command; the next one follows
                inside_message = self.message is not None
                self.write(self.internal_error(error))
                if inside_message:  # where the message ends is unknown: its rest must never be
                    self.close()    # taken for commands
                    return
        if self.eof and self.task is None and not self.writing_paused \
                and self.transport is not None:
            # All that can be answered was (an unfinished line or message cannot). Not close():
            # what is still in the buffer goes out first; the idle deadline aborts a client
            # that never takes it.
            self.transport.close()
        if self.reading_paused and self.task is None and len(self.pending) <= PENDING_LIMIT \
                and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def command(self, line: bytes) -> None:
        verb_bytes, _, arg_bytes = line.partition(b" ")
        try:
            verb = verb_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            verb = ""
        if not verb:
            self.push("500 Error: bad syntax")
            return
        # Arguments may be UTF-8 (SMTPUTF8) or anything; surrogateescape keeps every byte.
        arg = str(arg_bytes.strip(), "utf-8", "surrogateescape") or None
        limit = MAIL_LIMIT_ESMTP if verb == "MAIL" and self.session.extended_smtp \
            else COMMAND_LIMIT
        if len(line) > limit:
            self.push("500 Command line too long")
            return
        name = self.verbs.get(verb)
        if name is None:
            self.bogus -= 1
            if self.bogus < 1:
                self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                self.transport.close()
                return
            self.push(f'500 Error: command "{verb}" not recognized')
            return
        getattr(self, name)(arg)

    def run(self, coroutine) -> None:
        """Answer this command in a task; the input waits for it (pipelining keeps order)."""
        self.task = self.loop.create_task(coroutine)
        self.task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.task = None
        if self.transport is None:  # the client is gone (connection_lost cancelled it)
            return
        # Answered: the client's move, and its idle time, start now.
        self.last_activity = self.last_line = self.loop.time()
        # XXX a CancelledError from a filter, with the client still here, is our bug too: the
        # command must be answered, or every later reply would answer the one before it.
        error = asyncio.CancelledError() if task.cancelled() else task.exception()
        if error is not None:
            self.write(self.internal_error(error))
        self.advance()

    def internal_error(self, error: BaseException) -> str:
        """451 for our failure: the reply to what failed (one line per recipient after LMTP's
        DATA). A transaction that failed inside DATA ends with it; elsewhere only that command
        failed, and MAIL and the RCPTs accepted before it stand."""
        status = enhance(self.gateway.internal_error(error))
        replies = 1
        if self.busy:
            replies = self.replies_after_data()
            self.end_transaction()
        return "\r\n".join([status] * replies)

    def replies_after_data(self) -> int:
        return 1

    # -- verbs ----------------------------------------------------------------------------
    def helo_needed(self, verb: str = "HELO") -> bool:
        if not self.session.host_name:
            self.push(f"503 Error: send {verb} first")
            return True
        return False

    def reset(self) -> None:
        self.envelope = Envelope()
        self.xforward = {}  # XFORWARD describes one transaction (Postfix XFORWARD_README)
        vars(self).pop("feed_verdicts", None)  # XFEED too
        vars(self).pop("fed", None)

    def smtp_HELO(self, hostname: str | None) -> None:
        if not hostname:  # HELO's and EHLO's replies carry no enhanced code (RFC 2034 §3)
            self.write("501 Syntax: HELO hostname")
            return
        self.reset()
        self.session.extended_smtp, self.session.host_name = False, hostname
        self.write(f"250 {self.hostname}")

    def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            self.write("501 Syntax: EHLO hostname")
            return
        self.reset()
        self.session.extended_smtp, self.session.host_name = True, hostname
        self.write(self.gateway.ehlo_reply(self))

    def smtp_MAIL(self, arg: str | None) -> None:
        faults.point("mail")
        if self.helo_needed():
            return
        if self.envelope.mail_from is not None:
            self.reply(BAD_SEQUENCE, "Error: nested MAIL command; ")
            return
        parsed = self._path(arg, "FROM:")
        if parsed is None:
            self.reply(BAD_SENDER)
            return
        address, params = parsed
        checked = self._mail_params(params)
        if isinstance(checked, Reply):  # nothing of a refused MAIL stays for the next one
            self.reply(checked)
            return
        self.envelope.mail_from = address
        self.envelope.body_8bit, self.envelope.smtp_utf8 = checked
        self.reply(SENDER_OK)

    def _mail_params(self, params: list[str]) -> Reply | tuple[bool, bool]:
        """(BODY=8BITMIME, SMTPUTF8), or the reply refusing a parameter."""
        body_8bit = smtp_utf8 = False
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
                body_8bit = value.upper() == "8BITMIME"
            elif name == "SMTPUTF8":
                smtp_utf8 = True
            elif name not in IGNORED_MAIL_PARAMS:
                return BAD_PARAMETER
        return body_8bit, smtp_utf8

    def smtp_RCPT(self, arg: str | None) -> None:
        if self.helo_needed():
            return
        if self.envelope.mail_from is None:
            self.reply(BAD_SEQUENCE, "Error: need MAIL command; ")
            return
        parsed = self._path(arg, "TO:")
        if parsed is not None and parsed[0].lower() == "postmaster":  # RFC 5321 §4.5.1: MUST
            parsed = f"postmaster@{self.gateway.config.domains[0]}", parsed[1]
        if parsed is None or "@" not in parsed[0]:
            self.reply(BAD_RECIPIENT)
            return
        address, params = parsed
        if params and any(p.partition("=")[0].upper() not in IGNORED_RCPT_PARAMS for p in params):
            self.reply(BAD_PARAMETER)
            return
        if len(self.envelope.rcpt_tos) >= self.gateway.config.limits.max_recipients:
            self.reply(TOO_MANY_RECIPIENTS)
            return
        self.run(self._rcpt(address))

    async def _rcpt(self, address: str) -> None:
        reply = await self.gateway.check_recipient(self, address)
        if reply is RCPT_OK:
            self.envelope.rcpt_tos.append(address)
        self.reply(reply, f"<{address}>: " if not reply.ok else "")

    def _path(self, arg: str | None, keyword: str) -> tuple[str, list[str]] | None:
        if arg is None or arg[:len(keyword)].upper() != keyword:
            return None
        return parse_path(arg[len(keyword):].strip(), getaddr, self.envelope.smtp_utf8)

    def smtp_DATA(self, arg: str | None) -> None:
        if self.helo_needed():
            return
        if not self.envelope.rcpt_tos:
            self.reply(BAD_SEQUENCE, "Error: need RCPT command; ")
            return
        if arg:
            self.reply(BAD_ARGUMENTS)
            return
        self.busy = True
        self.message = MessageReader(self.data_size_limit)
        self.write(f"{DATA_GO_AHEAD.code} {DATA_GO_AHEAD.text}")

    def _take_message(self) -> None:
        """Feed the pending input to the message; at its end, process it (or refuse it)."""
        faults.point("data")
        ended = self.message.feed(self.pending)
        del self.pending[:]
        if ended is None:
            return
        content, self.pending[:] = ended
        self.message = None
        if content is None:
            self.write("\r\n".join([str(TOO_BIG)] * self.replies_after_data()))
            self.end_transaction()
            return
        self.envelope.original_content = content
        self.run(self._message())

    async def _message(self) -> None:
        # Only the processing, not the upload, is exempt from the idle deadline (a task runs):
        # a client that stalls half-way through its upload is idle.
        status = await self.gateway.handle_DATA(self, self.envelope)
        self.write(status)
        self.end_transaction()

    def end_transaction(self) -> None:
        self.reset()
        self.message = None
        self.busy = False
        self.gateway.transaction_ended()
        if self.close_after_transaction():
            self.hang_up(SHUTTING_DOWN)

    def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            self.push("501 Syntax: RSET")
            return
        self.reset()
        self.reply(OK)

    def smtp_NOOP(self, arg: str | None) -> None:
        self.reply(OK)

    def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            self.push("501 Syntax: QUIT")
            return
        self.hang_up(CLOSING)

    def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:
            self.push("501 Syntax: VRFY <address>")
        elif getaddr(arg)[0] is None:  # the client's text is not echoed back
            self.push("502 Could not VRFY that address")
        else:
            self.push("252 Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, arg: str | None) -> None:
        self.push("502 EXPN not implemented")

    def smtp_HELP(self, arg: str | None) -> None:
        public = sorted(verb for verb in self.verbs if not verb.startswith("X"))
        self.push(f"250 Supported commands: {' '.join(public)}")

    def smtp_AUTH(self, arg: str | None) -> None:
        if self.helo_needed("EHLO"):
            return
        self.push("538 5.7.11 Encryption required for requested authentication mechanism")

    def smtp_STARTTLS(self, arg: str | None) -> None:
        self.push("501 Syntax: STARTTLS" if arg else "454 TLS not available")
