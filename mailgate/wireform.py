"""The message in the form it travels to Dovecot after a 354: CRLF, dot-stuffed, in slices
(or, small, in one BDAT chunk: the same without dot-stuffing); and the check that refuses a
received message with a bare CR or LF (SMTP smuggling).

What arrives from the listener is already CRLF; only a line that starts with "." (and, from other
callers, a bare CR or LF) needs a change. Windows with nothing to change are handed on as slices
of the caller's bytes, so a 30 MB message is never copied whole, and no single scan holds the
event loop for more than one window (CHUNK bytes).
"""
from __future__ import annotations

import asyncio
import re
from typing import Iterator, Sequence

LINE_END = re.compile(rb"\r\n|\r|\n")
LINE_START_DOT = re.compile(rb"\n\.")
CHUNK = 256 * 1024  # bytes scanned and written at a time: bounds copies and event-loop stalls


def data_chunks(parts: Sequence[bytes], chunk: int = CHUNK,
                crlf_checked: bool = False) -> Iterator[bytes | memoryview]:
    """The message after a 354, minus the final ".": CRLF everywhere, dot-stuffed.

    `parts` are sent one after the other (trace headers, then the message as received). A
    window with nothing to change goes out as a slice of the caller's bytes; only a window with
    a leading dot or a bare CR/LF is copied, and a window is at most `chunk` bytes.
    `crlf_checked`: the caller has refused bare CR and LF already (the listener does), so the
    windows are not counted again (3 scans of the message, a third of the time spent here).
    """
    at_line_start, last = True, b"\n"
    for part in parts:
        view = memoryview(part)
        for start, end in windows(part, chunk):
            regular = crlf_checked or _regular(part, start, end)
            if regular and (not at_line_start or part[start:start + 1] != b".") \
                    and part.find(b"\n.", start, end) < 0:
                piece = view[start:end]
            else:
                piece = part[start:end] if regular else LINE_END.sub(b"\r\n", part[start:end])
                piece = LINE_START_DOT.sub(b"\n..", piece)
                if at_line_start and piece[:1] == b".":
                    piece = b"." + piece
            if len(piece):
                yield piece
                last = bytes(piece[-1:])
                at_line_start = last in (b"\n", b"\r")
    if last not in (b"\n", b"\r"):
        yield b"\r\n"


def _regular(part: bytes, start: int, end: int) -> bool:
    pairs = part.count(b"\r\n", start, end)
    return part.count(b"\r", start, end) == pairs == part.count(b"\n", start, end)


def windows(data: bytes, chunk: int = CHUNK) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive windows of at most `chunk` bytes, each ending after a LF
    where there is one, and never between a CR and the LF that follows it."""
    start, size = 0, len(data)
    while start < size:
        end = min(start + chunk, size)
        if end < size:
            newline = data.rfind(b"\n", start, end)
            if newline >= 0:
                end = newline + 1
            elif data[end - 1:end] == b"\r":
                end -= 1
        yield start, end
        start = end


def bdat_data(data: bytes, crlf_checked: bool = False) -> bytes:
    """The message for BDAT, which counts octets: CRLF everywhere and a final CRLF, as
    data_chunks gives it, but no dot-stuffing (RFC 3030 §2)."""
    if not crlf_checked and has_bare_newline(data):
        data = LINE_END.sub(b"\r\n", data)
    return data if not data or data.endswith(b"\n") else data + b"\r\n"


def encode_data(data: bytes) -> bytes:
    """CRLF everywhere, dot-stuffed, terminated: the bytes that follow a 354 (in one piece)."""
    return b"".join(data_chunks((data,))) + b".\r\n"


def has_bare_newline(raw: bytes, start: int = 0, end: int | None = None) -> bool:
    """A CR or LF outside CRLF: refused, as Postfix does, against SMTP smuggling."""
    pairs = raw.count(b"\r\n", start, end)
    return raw.count(b"\r", start, end) != pairs or raw.count(b"\n", start, end) != pairs


async def scan_bare_newline(raw: bytes) -> bool:
    """has_bare_newline a window at a time, other sessions running in between (a whole scan of
    30 MB holds the event loop for about 80 ms here)."""
    for start, end in windows(raw):
        if has_bare_newline(raw, start, end):
            return True
        if end < len(raw):
            await asyncio.sleep(0)
    return False
