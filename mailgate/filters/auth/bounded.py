"""dkimpy's whole-message steps in bounded pieces, so a large message never holds the GIL long.

Large messages are verified in a worker thread (signatures.py), but a thread frees the event loop
only between C calls: dkimpy makes a few over the whole message, each holding the GIL throughout.
Measured on a 16 MB message: splitting it into lines with `re.split(b"\\r?\\n")` took 0.2 s, and
relaxed body canonicalization costs ~0.1 s per MB in two regex passes; the loop stood still
for each. Replaced here, with the same results:
- `rfc822_parse`: when every line ends in CRLF (as mailgate's messages do), only the header is
  split (and its lines read as dkimpy reads them); the body is the bytes after the empty line,
  which is what joining its lines gave.
- relaxed `canonicalize_body`: the two passes run over pieces of CHUNK bytes ending in CRLF.
  Neither pattern can match across a CRLF, so the pieces give what the whole gave.
Anything else (a bare LF, a message without a body, a body without CRLF) takes dkimpy's code.
`install()` swaps both for DKIM and ARC alike; tests/unit/test_bounded.py checks the results
against dkimpy's own functions.
"""
from __future__ import annotations

import re

import dkim
import dkim.canonicalization as canonicalization

CHUNK = 64 * 1024   # ~7 ms of relaxed canonicalization at worst, measured
_DKIMPY_PARSE = dkim.rfc822_parse
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")   # dkimpy's, for a header line
_DKIMPY_RELAXED_BODY = canonicalization.Relaxed.canonicalize_body


def rfc822_parse(message: bytes) -> tuple[list, bytes]:
    """dkimpy's (headers, body) without splitting the body into lines."""
    if message.count(b"\n") != message.count(b"\r\n"):
        return _DKIMPY_PARSE(message)
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return _DKIMPY_PARSE(message)
    return _header_fields(message[:end].split(b"\r\n")), message[end + 4:]


def _header_fields(lines: list[bytes]) -> list[list[bytes]]:
    """dkimpy's reading of header lines (none empty), with its pattern compiled once."""
    headers: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b"\t", b" "):
            headers[-1][1] += line + b"\r\n"   # IndexError first, as in dkimpy
            continue
        name = _FIELD_NAME.match(line)
        if name is not None:
            headers.append([name.group(1), line[name.end(0):] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line}")
    return headers


def pieces(body: bytes) -> list[bytes]:
    """`body` cut after a CRLF every CHUNK bytes or so (one piece when there is none)."""
    out, start, size = [], 0, CHUNK
    while len(body) - start > size:
        cut = body.find(b"\r\n", start + size)
        if cut < 0:
            break
        out.append(body[start:cut + 2])
        start = cut + 2
    out.append(body[start:])
    return out


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 as dkimpy does it, the whitespace passes one piece at a time."""
    if len(body) <= CHUNK:
        return _DKIMPY_RELAXED_BODY(body)
    done = b"".join(canonicalization.compress_whitespace(
        canonicalization.strip_trailing_whitespace(piece)) for piece in pieces(body))
    return canonicalization.correct_empty_body(canonicalization.strip_trailing_lines(done))


def install() -> None:
    dkim.rfc822_parse = rfc822_parse
    canonicalization.Relaxed.canonicalize_body = staticmethod(relaxed_body)
