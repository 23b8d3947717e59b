"""SMTP and LMTP listeners: aiosmtpd's protocol, with what a Postfix neighbour needs added.

Added or changed here, because aiosmtpd 1.4.6 lacks or gets them wrong for us: XFORWARD from
trusted networks; the null sender <>; DSN parameters (NOTIFY, ORCPT, ENVID, RET) accepted instead
of 555; enhanced status codes on every reply; a session cap (421 4.3.2); an idle deadline that
counts from the last byte received and never fires while a message is being processed.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
from typing import TYPE_CHECKING

from aiosmtpd import __version__ as aiosmtpd_version
from aiosmtpd.smtp import SMTP, login_always_fail

from mailgate import metrics
from mailgate.message import Client
from mailgate.verdict import (BAD_ARGUMENTS, BAD_PARAMETER, BAD_RECIPIENT, BAD_SENDER,
                              BAD_SYNTAX,
                              BAD_SEQUENCE, IDLE_TIMEOUT, RCPT_OK, SENDER_OK, SHUTTING_DOWN,
                              TOO_BIG, TOO_MANY_RECIPIENTS, TOO_MANY_SESSIONS, XFORWARD_DENIED,
                              XFORWARD_OK, Reply, enhance)

if TYPE_CHECKING:
    from mailgate.gateway import Gateway

log = logging.getLogger("mailgate.server")

XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
# The common path, <dot-atom@domain> and parameters, parsed without aiosmtpd's RFC 5322
# parser (which builds a class per call); anything else still goes through that parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
SIMPLE_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
                         r"((?: +[A-Za-z0-9][A-Za-z0-9-]*(?:=[!-~]+)?)*) *\Z")
IGNORED_MAIL_PARAMS = {"RET", "ENVID", "AUTH"}       # DSN and AUTH: Postfix may pass them on
IGNORED_RCPT_PARAMS = {"NOTIFY", "ORCPT"}


def xtext_decode(value: str) -> str:
    """RFC 3461 xtext: +XX hex escapes."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "+" and _is_hex(value[i + 1:i + 3]):
            out.append(chr(int(value[i + 1:i + 3], 16)))
            i += 3
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _is_hex(text: str) -> bool:
    return len(text) == 2 and all(c in "0123456789ABCDEFabcdef" for c in text)


def is_trusted(peer: object, networks: tuple[str, ...]) -> bool:
    if not isinstance(peer, tuple):  # unix socket: only local processes can connect
        return True
    try:
        addr = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    return any(addr in network for network in _networks(networks))


@functools.lru_cache(maxsize=8)
def _networks(networks: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(n, strict=False) for n in networks]


FAST_INIT_VERSION = "1.4.6"
_attribute_names: dict[tuple[type, str], list[str]] = {}


def fast_init(server: SMTP, handler, *, hostname: str, ident: str, data_size_limit: int,
              enable_SMTPUTF8: bool, decode_data: bool, timeout: float,
              auth_require_tls: bool) -> None:
    """aiosmtpd 1.4.6's SMTP.__init__ for our fixed settings, minus its per-connection
    introspection (inspect.getmembers over protocol and handler, about 0.2 ms a connection).

    XXX tied to aiosmtpd's internals: used only for the version it was written against
    (tests/unit compare the attributes with the real __init__); other versions take super().
    No AUTH mechanisms: we never offer AUTH (no TLS here), so none are collected.
    """
    loop = asyncio.get_running_loop()
    asyncio.StreamReaderProtocol.__init__(
        server, asyncio.StreamReader(loop=loop, limit=server.line_length_limit),
        client_connected_cb=server._cb_client_connected, loop=loop)
    server.__ident__, server.loop, server.event_handler = ident, loop, handler
    server.data_size_limit, server.enable_SMTPUTF8 = data_size_limit, enable_SMTPUTF8
    server._decode_data, server.hostname = decode_data, hostname
    server.command_size_limits.clear()
    server.tls_context, server.require_starttls = None, None
    server._timeout_duration, server._timeout_handle = timeout, None
    server._tls_handshake_okay, server._tls_protocol, server._original_transport = True, None, None
    server.session = server.envelope = server.transport = server._handler_coroutine = None
    server._auth_require_tls, server._proxy_timeout = auth_require_tls, None
    server._authenticator, server._auth_callback = None, login_always_fail
    server._auth_required, server._auth_methods = False, {}
    server._handle_hooks = {m[7:]: getattr(handler, m) for m in _names(handler, "handle_")}
    server._ehlo_hook_ver = "new" if "EHLO" in server._handle_hooks else None
    server._smtp_methods = {m[5:]: getattr(server, m) for m in _names(server, "smtp_")}
    server._enforce_call_limit = False


def _names(obj: object, prefix: str) -> list[str]:
    """Attribute names with `prefix` on obj's class, looked up once per class."""
    key = (type(obj), prefix)
    names = _attribute_names.get(key)
    if names is None:
        names = _attribute_names[key] = [m for m in dir(obj) if m.startswith(prefix)]
    return names


class SMTPServer(SMTP):
    """One client session. The mail decisions live in the Gateway (aiosmtpd's handler)."""

    protocol_name = "SMTP"

    def __init__(self, gateway: Gateway, listener: str):
        config = gateway.config
        self.gateway, self.listener = gateway, listener
        self.xforward: dict[str, str] = {}
        self.busy = False        # between DATA and our reply: shutdown waits
        self.processing = False  # the whole message is in, our reply is due: idle timer waits
        self.in_ehlo = False
        self.trusted = False
        self.last_activity = 0.0
        settings = dict(hostname=config.hostname, ident="mailgate",
                        data_size_limit=config.limits.message_size, enable_SMTPUTF8=True,
                        decode_data=False, timeout=config.listen.command_timeout,
                        auth_require_tls=True)
        if aiosmtpd_version == FAST_INIT_VERSION:
            fast_init(self, gateway, **settings)
        else:
            super().__init__(gateway, **settings)

    # -- connection life ------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.last_activity = self.loop.time()
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
        super().data_received(data)

    def _timeout_cb(self) -> None:
        if self.processing:  # bounded by limits.message_timeout instead
            self._reset_timeout()
            return
        idle = self.loop.time() - self.last_activity
        if idle < self._timeout_duration:  # bytes arrived (e.g. during DATA): not idle
            self._reset_timeout(self._timeout_duration - idle)
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
                self.last_activity = self.loop.time()
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
        in_data = self.envelope.content is not None
        replies = len(self.envelope.rcpt_tos) if in_data and self.protocol_name == "LMTP" else 1
        self._set_post_data_state()  # a failed transaction must not leak into the next one
        status = enhance(await super().handle_exception(error))
        return "\r\n".join([status] * max(replies, 1))  # LMTP: one reply per recipient

    # -- who the client is --------------------------------------------------------------
    def client(self) -> Client:
        peer = self.session.peer
        addr = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        name = "localhost" if addr in ("127.0.0.1", "::1") else "unknown"
        fwd = self.xforward
        return Client(addr=fwd.get("ADDR", addr), name=fwd.get("NAME", name if "ADDR" not in fwd else "unknown"),
                      helo=fwd.get("HELO", self.session.host_name or ""),
                      proto=fwd.get("PROTO", "ESMTP" if self.session.extended_smtp else "SMTP"))

    # -- verbs ----------------------------------------------------------------------------
    async def smtp_EHLO(self, hostname: str) -> None:
        await self._ehlo(hostname)

    async def _ehlo(self, hostname: str) -> None:
        self.in_ehlo = True  # EHLO lines carry no enhanced status code (RFC 2034 §3)
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self.in_ehlo = False

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        if not self.trusted:
            await self.reply(XFORWARD_DENIED)
            return
        if await self.check_helo_needed("EHLO"):
            return
        if self.envelope.mail_from is not None:
            await self.reply(BAD_SEQUENCE)
            return
        attrs = {}
        for item in (arg or "").split():
            name, eq, value = item.partition("=")
            if not eq or name.upper() not in XFORWARD_ATTRS:
                await self.reply(BAD_ARGUMENTS, f"Bad XFORWARD attribute {name!r}: ")
                return
            if value not in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
                attrs[name.upper()] = xtext_decode(value)
        if not attrs and not arg:
            await self.reply(BAD_ARGUMENTS)
            return
        self.xforward.update(attrs)
        await self.reply(XFORWARD_OK)

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
                if not value.isdigit():
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
        """(address, parameters) from "FROM:<a@b> X=Y"; "" for the null path <>."""
        if arg is None:
            return None
        arg = self._strip_command_keyword(keyword, arg)
        if arg is None:
            return None
        if arg.startswith("<>"):
            return "", arg[2:].split()
        simple = SIMPLE_PATH.match(arg)
        if simple:
            return simple.group(1), simple.group(2).split()
        address, rest = self._getaddr(arg)
        # XXX the parser eats the space before parameters ("<a@b> SIZE=1" leaves "SIZE=1"):
        # look at what preceded them in the command, or every parameter would get 501.
        before = arg[:len(arg) - len(rest or "")]
        if not address or rest is None or (rest and not before[-1:].isspace()):
            return None
        # XXX the parser also takes RFC 5322 forms no SMTP path has and rewrites them
        # ("<foo bar@x>" becomes '"foo bar"@x', "<a (c)@x>" becomes "a@x"): refuse those.
        path = before.strip().removeprefix("<").removesuffix(">")
        path = path.partition(":")[2] if path.startswith("@") else path  # source route
        if path != address and not path.startswith('"'):
            return None
        # SMTPUTF8 may come as a parameter of this very MAIL command.
        utf8 = self.envelope.smtp_utf8 or "SMTPUTF8" in rest.upper().split()
        if not address.isascii() and not utf8:
            return None
        return address, rest.split()

    async def smtp_DATA(self, arg: str | None) -> None:
        self.busy = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.busy = False
            self.gateway.transaction_ended()
        if self.close_after_transaction():
            await self.push(str(SHUTTING_DOWN))
            self.transport.close()


class LMTPServer(SMTPServer):
    """LMTP (RFC 2033): LHLO instead of HELO/EHLO; the Gateway answers per recipient."""

    protocol_name = "LMTP"

    replies_due = 0  # recipients awaiting a reply after DATA

    async def smtp_DATA(self, arg: str | None) -> None:
        self.replies_due = 0 if arg else len(self.envelope.rcpt_tos)
        try:
            await super().smtp_DATA(arg)
        finally:
            self.replies_due = 0

    async def push(self, status) -> None:
        """aiosmtpd's own DATA errors (552, line too long) are one line: LMTP needs one each."""
        if self.replies_due > 1 and isinstance(status, str) and "\r\n" not in status \
                and status[:1] in "45":
            status = "\r\n".join([enhance(status)] * self.replies_due)
        await super().push(status)

    async def smtp_LHLO(self, hostname: str) -> None:
        await self._ehlo(hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        await self.reply(BAD_SYNTAX.with_text('Error: command "HELO" not recognized'))

    async def smtp_EHLO(self, hostname: str) -> None:
        await self.reply(BAD_SYNTAX.with_text('Error: command "EHLO" not recognized'))
