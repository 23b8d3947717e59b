"""Postfix asks here, at RCPT, whether an address is one of ours: a socketmap server on loopback.

`virtual_mailbox_maps = socketmap:inet:127.0.0.1:10027:recipients` sends one netstring
"recipients alice@example.org" per lookup. The answer comes from the same cached Dovecot check
the listeners use at RCPT (recipients.py): OK, NOTFOUND, or TEMP when Dovecot cannot be asked or
anything goes wrong here, so Postfix answers 451 and the sender retries: never "unknown" by mistake.
A valid SRS address of ours (where bounces of forwards come back) is OK: mailgate's own RCPT
check then takes it from the null sender only.
"""
from __future__ import annotations

import asyncio
import logging
import re

from mailgate import metrics
from mailgate.config import parse_hostport

log = logging.getLogger("mailgate.lookup")

MAP_NAME = "recipients"
MAX_REQUEST = 1100  # bytes: the map name and an address (at most 256 octets per RFC 5321)
# What may be put in an LMTP RCPT: no space, control character, angle bracket or second "@".
ADDRESS = re.compile(r"[^\s<>@\x00-\x1f\x7f]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


class Malformed(Exception):
    """Not a socketmap request: the connection is closed, which Postfix treats as a failure."""


async def read_netstring(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """One netstring ("5:hello,"), or None at a clean end of input.

    Written by hand: a netstring is a length, a colon, the bytes and a comma, and no maintained
    asyncio library reads them.
    """
    try:
        head = await reader.readuntil(b":")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise Malformed("truncated length") from None
        return None
    except asyncio.LimitOverrunError:
        raise Malformed("no length") from None
    digits = head[:-1]
    if not digits.isdigit() or len(digits) > 5 or int(digits) > limit:
        raise Malformed(f"bad length {digits[:16]!r}")
    try:
        body = await reader.readexactly(int(digits) + 1)
    except asyncio.IncompleteReadError:
        raise Malformed("truncated request") from None
    if body[-1:] != b",":
        raise Malformed("no comma after the request")
    return body[:-1]


def netstring(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"%d:%s," % (len(data), data)


class LookupServer:
    """Answers Postfix's socketmap lookups from `gateway.recipients` (the live one, also after a
    reload), so Postfix and the listeners share one cache of Dovecot's answers."""

    def __init__(self, gateway):
        self.gateway = gateway
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self, address: str) -> asyncio.Server:
        host, port = parse_hostport(address, "listen.lookup")
        self.server = await asyncio.start_server(self.handle, host, port, reuse_address=True,
                                                 limit=MAX_REQUEST + 16)
        return self.server

    def close(self) -> None:
        """Stop listening and close Postfix's idle connections (it reconnects elsewhere or 451s)."""
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests one after another on one connection, as Postfix keeps it open between them."""
        self.writers.add(writer)
        idle = self.gateway.config.listen.command_timeout
        try:
            while True:
                async with asyncio.timeout(idle):
                    request = await read_netstring(reader, MAX_REQUEST)
                if request is None:
                    break
                writer.write(netstring(await self.answer(request)))
                await writer.drain()
        except Malformed as e:
            log.warning("lookup: malformed request from %s: %s", _peer(writer), e)
        except (TimeoutError, ConnectionError):
            pass  # an idle or vanished client: nothing to answer
        finally:
            self.writers.discard(writer)
            writer.close()

    async def answer(self, request: bytes) -> str:
        name, _, key = request.decode("utf-8", "replace").partition(" ")
        if name != MAP_NAME:
            return self._count("perm", f"PERM unknown map {name[:64]!r}: use {MAP_NAME}")
        if not ADDRESS.fullmatch(key):  # "@domain" (catch-all), bare local parts, junk
            return self._count("notfound", "NOTFOUND ")
        try:
            # A valid SRS address of ours: a bounce of a forward, which mailgate takes (its own
            # RCPT check then wants the null sender). The sender is not known here.
            if self.gateway.forwarder.senders.reverse(key) is not None:
                return self._count("ok", f"OK {key}")
            reply = await self.gateway.recipients.check(key)
        # XXX our bug must become a retry (TEMP: Postfix says 451), never a "User unknown".
        except Exception:  # noqa: BLE001
            log.exception("lookup %s: internal error, answered TEMP", key)
            metrics.child(metrics.ERRORS, "lookup").inc()
            return self._count("temp", "TEMP internal error in mailgate")
        if reply.ok:
            return self._count("ok", f"OK {key}")
        # an unknown user, a domain that is not ours, or a mailbox Dovecot refuses for good
        # (full, disabled): refused in Postfix's own session, so no bounce is made later
        if reply.permanent:
            return self._count("notfound", "NOTFOUND ")
        log.warning("lookup %s: TEMP: %s %s %s", key, reply.code, reply.status, reply.text)
        return self._count("temp", f"TEMP {reply.text}")

    @staticmethod
    def _count(result: str, answer: str) -> str:
        metrics.child(metrics.LOOKUPS, result).inc()
        return answer


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

