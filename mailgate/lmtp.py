"""An LMTP connection to Dovecot: pipelined transactions, one reply per recipient.

Every failure (connection, protocol, timeout) is an LMTPError; the pool (lmtppool.py) decides
what it means. A message of up to one CHUNK goes out in the same write as its MAIL and RCPTs, as
BDAT LAST (RFC 3030; Dovecot offers CHUNKING): one round trip to Dovecot instead of two (DATA
waits for the 354), about 5 % more messages a second in bench/auth.py. A larger message, or a
server without CHUNKING, gets DATA: CRLF line endings and dot-stuffing done on the CRLF form, so
a bare-LF dot can never end DATA early at Dovecot (an injection path in Dovecot 2.3's LMTP),
sent as slices of the received bytes under flow control, never copied whole.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Iterable, Sequence

from mailgate import faults
from mailgate.config import parse_hostport
from mailgate.wireform import CHUNK, bdat_data, data_chunks
from mailgate.wireform import encode_data  # noqa: F401 (API)

TIMED_OUT = "no reply from Dovecot in time (delivery.lmtp_timeout or the message budget)"


class LMTPError(Exception):
    """The conversation with Dovecot broke (connection, protocol or timeout)."""


@dataclass(frozen=True, slots=True)
class LMTPReply:
    code: int
    text: str       # the text after the code, enhanced status included
    unknown: bool = False  # no reply after DATA went out: Dovecot may have the message

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    def split(self) -> tuple[str, str]:
        """(enhanced status, text); the status is derived from the code if Dovecot gave none."""
        status, _, text = self.text.partition(" ")
        if status[:1] in "245" and status.count(".") == 2:
            return status, text
        return f"{self.code // 100}.0.0", self.text


class _Reader(asyncio.StreamReader):
    """Counts what Dovecot sent (a close counts too), so that Connection can tell whether it
    spoke since its last reply we read: an idle connection it closed, with or without a 421."""
    received = 0

    def feed_data(self, data: bytes) -> None:
        self.received += len(data)
        super().feed_data(data)

    def feed_eof(self) -> None:
        self.received += 1
        super().feed_eof()


class Connection:
    def __init__(self, reader: _Reader, writer: asyncio.StreamWriter, timeout: float):
        self.reader, self.writer, self.timeout = reader, writer, timeout
        self.data_sent = False
        self.deadline = float("inf")  # loop time by which the whole transaction must end
        self.chunking = False  # the server offers BDAT (LHLO: CHUNKING)
        self.consumed = 0      # bytes of replies read: reader.received - consumed are unread

    @classmethod
    async def open(cls, target: str, hostname: str, timeout: float,
                   deadline: float = float("inf")) -> Connection:
        """Connected and greeted within `timeout`, and by `deadline` (loop time)."""
        loop = asyncio.get_running_loop()
        reader = _Reader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:  # asyncio.open_connection, with our reader
            async with asyncio.timeout_at(min(loop.time() + timeout, deadline)):
                if target.startswith("unix:"):
                    transport, _ = await loop.create_unix_connection(lambda: protocol, target[5:])
                else:
                    transport, _ = await loop.create_connection(lambda: protocol,
                                                                *parse_hostport(target))
        except (OSError, TimeoutError) as e:
            raise LMTPError(f"connect to {target}: {e or 'timeout'}") from None
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        conn = cls(reader, writer, timeout)
        conn.deadline = deadline
        try:
            async with asyncio.timeout_at(conn.limit()):
                conn.expect(await conn.read_reply(), 220)
                conn.send(f"LHLO {hostname}\r\n".encode())
                lines: list[str] = []
                conn.expect(await conn.read_reply(lines), 250)
                conn.chunking = any(line.upper() == "CHUNKING" for line in lines)
        except (LMTPError, TimeoutError) as e:
            conn.close()
            raise LMTPError(f"greeting from {target}: {str(e) or TIMED_OUT}") from None
        except BaseException:  # cancelled (the client hung up during its RCPT check): not
            conn.close()       # left for the garbage collector to close
            raise
        conn.deadline = float("inf")
        return conn

    def send(self, data: bytes | memoryview) -> None:
        # XXX uvloop raises RuntimeError, not OSError, for a transport the peer already
        # reset (Dovecot restarted under an idle pooled connection): the caller needs LMTPError.
        if self.writer.transport.is_closing():
            raise LMTPError("connection closed by Dovecot")
        try:
            self.writer.write(data)
        except RuntimeError as e:
            raise LMTPError(f"writing to Dovecot: {e}") from None

    def limit(self) -> float:
        """When the next reply is due: lmtp_timeout from now, never past the message budget."""
        return min(asyncio.get_running_loop().time() + self.timeout, self.deadline)

    async def read_reply(self, lines: list[str] | None = None) -> LMTPReply:
        """One (possibly multi-line) reply, its lines' texts added to `lines`; the caller holds
        the timeout (one per phase)."""
        lines = [] if lines is None else lines
        try:
            while True:
                line = await self.reader.readline()
                self.consumed += len(line)
                if not line.endswith(b"\n") or len(line) < 4 or not line[:3].isdigit():
                    raise LMTPError(f"bad reply from Dovecot: {line[:80]!r}")
                lines.append(line[4:].rstrip(b"\r\n").decode("utf-8", "replace"))
                if line[3:4] != b"-":
                    return LMTPReply(int(line[:3]), lines[-1])
        except (OSError, ValueError) as e:  # ValueError: a line over the stream limit
            raise LMTPError(f"reading from Dovecot: {e}") from None

    @staticmethod
    def expect(reply: LMTPReply, code: int) -> None:
        if reply.code != code:
            raise LMTPError(f"unexpected reply from Dovecot: {reply}")

    async def transaction(self, sender: str, recipients: list[str], parts: Sequence[bytes],
                          body_8bit: bool, results: list[LMTPReply | None],
                          crlf_checked: bool = False) -> None:
        """One pipelined transaction, filling `results` with the reply per recipient.
        `parts` (trace headers, the message) are sent one after the other; `crlf_checked`:
        see wireform.data_chunks."""
        body = " BODY=8BITMIME" if body_8bit else ""
        commands = [f"MAIL FROM:<{_clean(sender)}>{body}\r\n"]
        commands += [f"RCPT TO:<{_clean(r)}>\r\n" for r in recipients]
        envelope = "".join(commands).encode("utf-8")
        if self.chunking and len(parts) == 1 and len(parts[0]) <= CHUNK:
            await self._in_one_write(envelope, bdat_data(parts[0], crlf_checked), results)
            return
        self.send(envelope + b"DATA\r\n")
        try:
            async with asyncio.timeout_at(self.limit()) as limit:
                accepted = await self._envelope_replies(len(recipients), results)
                if accepted is None:
                    return
                last = await self._send_all_but_last(
                    data_chunks(parts, crlf_checked=crlf_checked), limit)
                faults.point("before-lmtp-dot")
                # From here on Dovecot may deliver: a lost reply is "unknown", not "not taken".
                self.data_sent = True
                self.send(last + b".\r\n")  # a small message: one write in all
                await self._delivery_replies(accepted, results, limit)
        except TimeoutError:
            raise LMTPError(TIMED_OUT) from None

    async def _in_one_write(self, envelope: bytes, data: bytes,
                            results: list[LMTPReply | None]) -> None:
        """MAIL, the RCPTs and the whole message as BDAT LAST in one write (RFC 3030)."""
        if self.reader.received != self.consumed:
            # Dovecot spoke (a 421) or closed since its last reply: stale, and nothing sent yet
            # (the pool opens a fresh one). With DATA the envelope's replies would show it; here
            # the message would be out before we knew.
            raise LMTPError("connection closed by Dovecot")
        faults.point("before-lmtp-dot")
        self.send(envelope + b"BDAT %d LAST\r\n" % len(data) + data)
        # From here on Dovecot may deliver: a lost reply is "unknown", not "not taken".
        self.data_sent = True
        try:
            async with asyncio.timeout_at(self.limit()) as limit:
                accepted = await self._envelope_replies(len(results), results, chunked=True)
                await self._delivery_replies(accepted or [], results, limit)
        except TimeoutError:
            raise LMTPError(TIMED_OUT) from None

    async def _delivery_replies(self, accepted: list[int], results: list[LMTPReply | None],
                                limit: asyncio.Timeout) -> None:
        """A reply per accepted recipient: Dovecot delivers one by one, each gets lmtp_timeout."""
        for i in accepted:
            limit.reschedule(self.limit())
            reply = await self.read_reply()
            if reply.code == 421:  # the service is closing (RFC 5321 §3.8), not this
                # recipient's delivery: it may be saved already, so its outcome is unknown
                raise LMTPError(f"Dovecot closing after DATA: {reply}")
            results[i] = reply

    async def _send_all_but_last(self, chunks: Iterable[bytes | memoryview],
                                 limit: asyncio.Timeout) -> bytes:
        """Write every chunk but the last under flow control (the transport holds one chunk
        at most, each gets lmtp_timeout); the last one, copied, for the caller to finish."""
        pending = None
        for chunk in chunks:
            if pending is not None:
                self.send(pending)
                await self.writer.drain()
                await asyncio.sleep(0)  # drain() returns at once on loopback: let others run
                limit.reschedule(self.limit())
            pending = chunk
        return b"" if pending is None else bytes(pending)

    async def _envelope_replies(self, count: int, results: list[LMTPReply | None],
                                chunked: bool = False) -> list[int] | None:
        """Replies to the pipelined MAIL, RCPTs and DATA; the accepted indexes, None: no DATA.
        `chunked` (BDAT LAST instead of DATA): the accepted indexes, whose replies come next;
        with none accepted, the BDAT's one refusal is read here and the transaction reset."""
        mail = await self.read_reply()
        accepted = []
        for i in range(count):
            reply = await self.read_reply()
            if reply.code == 250 and mail.code == 250:
                accepted.append(i)
            else:
                results[i] = reply if mail.code == 250 else mail
        if chunked and accepted:
            return accepted  # their replies come once Dovecot has delivered
        answer = await self.read_reply()  # to DATA (354 to go on), or the BDAT's refusal
        if not chunked:
            if answer.code == 354:
                return accepted
            self.expect(answer, 354 if accepted else answer.code)
        # Nothing goes further, and the server may still hold the MAIL (Dovecot does after a
        # refused BDAT): RSET, so that the next transaction on this connection starts clean.
        self.send(b"RSET\r\n")
        self.expect(await self.read_reply(), 250)
        return [] if chunked else None

    async def probe(self, recipient: str) -> LMTPReply:
        """Ask Dovecot's userdb about one address (MAIL, RCPT, RSET; nothing delivered)."""
        self.send(f"MAIL FROM:<>\r\nRCPT TO:<{_clean(recipient)}>\r\nRSET\r\n"
                          .encode("utf-8"))
        try:
            async with asyncio.timeout_at(self.limit()):
                mail = await self.read_reply()
                rcpt = await self.read_reply()
                self.expect(await self.read_reply(), 250)
        except TimeoutError:
            raise LMTPError(TIMED_OUT) from None
        return rcpt if mail.code == 250 else mail

    def close(self) -> None:
        self.writer.close()


def _clean(address: str) -> str:
    return address.replace("\r", "").replace("\n", "")
