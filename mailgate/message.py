"""Envelope and Message: the plain values handed from the listener to the pipeline and delivery.

The raw bytes are kept exactly as received; what leaves is those bytes plus the trace headers we
prepend. Parsing is for filters only: it is bounded (size, MIME depth, time), runs off the event
loop, and a failure is recorded as `parse_error` instead of stopping delivery.
"""
from __future__ import annotations

import asyncio
import email.message
import email.parser
import email.policy
import re
from dataclasses import dataclass

from mailgate.config import Limits


@dataclass(frozen=True, slots=True)
class Client:
    """Who handed us the message: the peer, or what XFORWARD said about the original client."""
    addr: str
    name: str = "unknown"
    helo: str = ""
    proto: str = "ESMTP"
    # A trusted peer that named no other client (no XFORWARD ADDR): mail submitted on this
    # host or by a trusted system, not received from the Internet (auth does no SPF for it).
    local: bool = False
    ident: str = ""             # XFORWARD IDENT: the sending MTA's queue id (Postfix's)
    # A feed session (XFEED: mail SES received from the Internet) that named no client (sync
    # could not read SES's Received line): never local, but SPF has no address to check.
    origin_unknown: bool = False


@dataclass(frozen=True, slots=True)
class Envelope:
    queue_id: str
    sender: str                 # "" for the null sender <>
    recipients: tuple[str, ...]
    client: Client
    received_at: float          # loop time at end of DATA, for delay=
    body_8bit: bool = False
    smtputf8: bool = False
    # (method, result) pairs a trusted feed vouched for (mailgate sync: SES's spam, virus, SPF,
    # DKIM, DMARC verdicts); set by the listener only for a feed session, rendered by `auth`.
    feed_verdicts: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Message:
    envelope: Envelope
    raw: bytes                  # as received, CRLF line endings, dot-unstuffed
    headers: email.message.Message | None = None  # None: not parsed (see parse_error)
    parse_error: str = ""
    # (method, result) pairs earlier filters found (FilterResult.findings): auth's spf=fail,
    # dmarc=fail, quarantine; set by the chain, for the filters after them (vacation).
    findings: tuple[tuple[str, str], ...] = ()


# A multipart nested deeper than this many boundaries is not handed to the stdlib parser,
# which recurses per level (RecursionError) and is superlinear on some inputs.
_BOUNDARY = re.compile(rb"boundary\s*=", re.IGNORECASE)


def _parse(raw: bytes, limits: Limits) -> tuple[email.message.Message | None, str]:
    if len(raw) > limits.parse_size:
        return None, f"larger than limits.parse_size ({limits.parse_size} bytes)"
    if len(_BOUNDARY.findall(raw)) > limits.parse_depth:
        return None, f"MIME nesting deeper than limits.parse_depth ({limits.parse_depth})"
    try:
        return email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw), ""
    # XXX untrusted input meets a parser with known crashes (IndexError, RecursionError, ...):
    # any failure here only means "filters that need headers are skipped", never a lost message.
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"[:200]


async def parse(envelope: Envelope, raw: bytes, limits: Limits) -> Message:
    """Parse once in a worker thread; on timeout the message goes on unparsed."""
    try:
        headers, error = await asyncio.wait_for(
            asyncio.to_thread(_parse, raw, limits), limits.parse_timeout)
    except asyncio.TimeoutError:
        # XXX the worker thread runs on until the parser returns; the message does not wait.
        headers, error = None, f"parse took longer than {limits.parse_timeout} s"
    return Message(envelope, raw, headers, error)


def unparsed(envelope: Envelope, raw: bytes) -> Message:
    return Message(envelope, raw)
