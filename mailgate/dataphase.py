"""The DATA phase: the message read up to CRLF.CRLF in large pieces, dot-unstuffed on the way.

Written by hand because aiosmtpd 1.4.6 reads DATA one line at a time in Python: about 50 ms
of CPU per MB here, the event loop's main load with many sessions (lag over 100 ms), and a
bytearray per line (about twice the message in memory). This takes what the socket delivered.
Only CRLF.CRLF ends the data, never a bare-LF form (SMTP smuggling); a line longer than 1000
octets is taken, as Postfix takes it; past the size limit the rest is read and dropped.
"""
from __future__ import annotations

import asyncio

END = b"\r\n.\r\n"


async def read_message(reader: asyncio.StreamReader, size_limit: int) -> bytes | None:
    """The message as sent, minus dot-stuffing and the final "."; None if it was larger than
    `size_limit` bytes (read to its end all the same, so the session stays in step)."""
    body = bytearray()
    carry = b"\r\n"  # unprocessed: a CRLF that a "." in the next piece may follow; the
    #                  message's start counts as a line start, so the first line is no exception
    tail = b"\r\n"   # the last two bytes read, to see CRLF.CRLF across pieces
    size = 0
    while True:
        piece, dot_line = await _next_piece(reader)
        ended = dot_line and (tail + piece).endswith(END)
        tail = (tail + piece)[-2:]
        size += len(piece) - 3 * ended
        data = carry + (piece[:-3] if ended else piece)
        hold = 0 if ended else 2 if data.endswith(b"\r\n") else 1 if data.endswith(b"\r") else 0
        carry = data[len(data) - hold:]
        if size <= size_limit:
            end = len(data) - hold
            if data.find(b"\r\n.", 0, end) < 0:
                body += memoryview(data)[:end]  # no dot to drop: no copy but the append
            else:
                body += data[:end].replace(b"\r\n.", b"\r\n")
        if ended:
            break
    return bytes(memoryview(body)[2:]) if size <= size_limit else None  # [2:]: the start's CRLF


async def _next_piece(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Up to and including the next ".\r\n" (True); or, when the reader holds more than its
    limit without one, all it holds but the last two bytes, a "." or ".\r" maybe (False)."""
    try:
        return await reader.readuntil(b".\r\n"), True
    except asyncio.LimitOverrunError as e:  # documented: the data stays in the reader
        return await reader.readexactly(e.consumed), False
