"""A small pool of LMTP connections to Dovecot; its size bounds the deliveries in flight.

A connection that errs or times out is closed, never reused; an idle one Dovecot closed (it
restarted) is replaced once by a fresh one, at no cost to the message. A recipient Dovecot never
took gets `None` (the maildir fallback is safe); one whose reply was lost after the message's
end went out (DATA's final ".", or BDAT LAST) gets a reply marked `unknown` (Dovecot may hold
the message: defer, never fall back).
"""
from __future__ import annotations

import asyncio
from typing import Sequence

from mailgate import metrics
from mailgate.lmtp import Connection, LMTPError, LMTPReply
from mailgate.wireform import CHUNK

STALE = object()  # a pooled connection failed before anything was exchanged on it


class Pool:
    def __init__(self, target: str, hostname: str, size: int, timeout: float):
        self.target, self.hostname, self.timeout = target, hostname, timeout
        self.idle: list[Connection] = []
        self.slots = asyncio.Semaphore(size)

    @property
    def relay(self) -> str:
        return f"dovecot[{self.target}]"

    async def deliver(self, sender: str, recipients: list[str], parts: Sequence[bytes],
                      body_8bit: bool, deadline: float,
                      crlf_checked: bool = False) -> tuple[list[LMTPReply | None], str]:
        """Replies per recipient and an error text. None: Dovecot never took that recipient.

        `parts` (trace headers, the message) are sent one after the other, unchanged but for
        line endings and dot-stuffing; the whole transaction ends by `deadline` (loop time).
        `crlf_checked`: see wireform.data_chunks.
        """
        results: list[LMTPReply | None] = [None] * len(recipients)
        if sum(map(len, parts)) <= CHUNK:  # small: one write; copying it costs less than a send
            parts = (b"".join(parts),)

        async def send(conn: Connection) -> None:
            conn.deadline = deadline
            try:
                await conn.transaction(sender, recipients, parts, body_8bit, results,
                                       crlf_checked)
            finally:
                conn.deadline = float("inf")
        return results, await self._with_connection(send, results, deadline)

    async def probe(self, recipient: str) -> LMTPReply | None:
        """Dovecot's RCPT answer for `recipient`, or None when Dovecot cannot be asked within
        one lmtp_timeout, waiting for a free connection included: with Dovecot hung, RCPTs
        queued behind each other's timeouts would keep the client waiting one timeout each."""
        answer: list[LMTPReply | None] = [None]
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def ask(conn: Connection) -> None:
            conn.deadline = deadline
            try:
                answer[0] = await conn.probe(recipient)
            finally:
                conn.deadline = float("inf")
        await self._with_connection(ask, [], deadline)
        return answer[0]

    async def _with_connection(self, work, results: list[LMTPReply | None],
                               deadline: float = float("inf")) -> str:
        """Run `work` on a pooled connection; "" or the error. A stale idle one is replaced
        once. Waiting for a free connection counts against `deadline` too."""
        try:
            async with asyncio.timeout_at(None if deadline == float("inf") else deadline):
                await self.slots.acquire()
        except TimeoutError:
            return "no Dovecot connection free within the message budget"
        metrics.LMTP_IN_USE.inc()
        try:
            if self.idle:
                error = await self._attempt(work, results, self.idle.pop(), deadline)
                if error is not STALE:
                    return error
            return await self._attempt(work, results, None, deadline)
        finally:
            metrics.LMTP_IN_USE.dec()
            self.slots.release()

    async def _attempt(self, work, results: list[LMTPReply | None], conn: Connection | None,
                       deadline: float):
        reused = conn is not None
        try:
            conn = conn or await Connection.open(self.target, self.hostname, self.timeout,
                                                 deadline)
            # Per use: an earlier transaction's final "." must not make a stale reuse (a probe
            # too) look like "outcome unknown" (451, no retry on a fresh connection).
            conn.data_sent = False
            await work(conn)
        except (LMTPError, OSError) as e:
            if conn is not None:
                conn.close()
            if reused and not conn.data_sent and not any(results):
                return STALE  # XXX Dovecot closed an idle connection: the caller opens a fresh one
            return self._unknown_after_data(conn, results, e)
        except BaseException:  # cancelled: the connection is in an unknown state
            if conn is not None:
                conn.close()
            raise
        self.idle.append(conn)
        return ""

    @staticmethod
    def _unknown_after_data(conn: Connection | None, results: list, error: Exception) -> str:
        """After DATA went out a missing reply is unknown, not "not delivered": defer it."""
        if conn is not None and conn.data_sent:
            unknown = LMTPReply(0, f"outcome unknown: {error}", unknown=True)
            results[:] = [r or unknown for r in results]
        return str(error) or type(error).__name__

    async def close(self) -> None:
        while self.idle:
            self.idle.pop().close()
