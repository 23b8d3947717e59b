"""Header fields read straight from the raw message: what `auth` checks, with byte offsets.

Hand-written because neither the stdlib parser nor dkimpy gives byte offsets, and removing a
forged Authentication-Results must leave every other byte as received. Lenient on purpose: a line
that is not a field is skipped (and counted), never an error; the checks decide what it means.
"""
from __future__ import annotations

import asyncio
import email.utils
import functools
import re
from dataclasses import dataclass

from mailgate.address import a_labels

# name (printable, no colon), optional WSP before the colon (obsolete syntax, still seen and
# still honoured by mail clients), the value with its continuation lines.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)\r\n")
_DOMAIN = re.compile(r"(?=.{1,253}\Z)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
                     r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class Field:
    name: bytes      # lower case
    value: bytes     # after the colon, continuation lines included, without the final CRLF
    start: int       # byte offsets of the whole field in the raw message, final CRLF included
    end: int


@dataclass(frozen=True, slots=True)
class Header:
    fields: tuple[Field, ...]
    malformed: int   # lines in the header that are not fields

    def values(self, name: bytes) -> list[bytes]:
        return [f.value for f in self.fields if f.name == name]


SLICE_LINES = 10_000   # lines read_in_slices reads at a time: ~30 ms


def read(raw: bytes) -> Header:
    """Every header field of `raw` (CRLF lines) up to the first empty line."""
    fields: list[Field] = []
    malformed, _ = _scan(raw, _block_end(raw), 0, fields, len(raw))
    return Header(tuple(fields), malformed)


async def read_in_slices(raw: bytes, lines: int = SLICE_LINES) -> Header:
    """read(), letting the event loop run after every `lines` lines: a header of megabytes
    is read to its end (a forged Authentication-Results may follow any amount of padding)
    without holding every session for the half second per 10 MB it takes. Not a thread: a
    thread holding the GIL makes each of the loop's socket calls wait for it."""
    fields: list[Field] = []
    block_end, malformed, at = _block_end(raw), 0, 0
    while True:
        bad, at = _scan(raw, block_end, at, fields, lines)
        malformed += bad
        if at >= block_end or raw.startswith(b"\r\n", at):
            return Header(tuple(fields), malformed)
        await asyncio.sleep(0)



def _block_end(raw: bytes) -> int:
    end = raw.find(b"\r\n\r\n")
    return len(raw) if end < 0 else end + 2


def _scan(raw: bytes, block_end: int, at: int, fields: list[Field],
          lines: int) -> tuple[int, int]:
    """Fields from `at` on, at most `lines` lines of them, appended to `fields`; (lines that
    are not fields, where it stopped)."""
    malformed = 0
    while lines > 0 and at < block_end and not raw.startswith(b"\r\n", at):
        lines -= 1
        match = _FIELD.match(raw, at, block_end)
        if match is None:
            malformed += 1
            nl = raw.find(b"\r\n", at, block_end)
            at = block_end if nl < 0 else nl + 2
            continue
        fields.append(Field(match[1].lower(), match[2], match.start(), match.end()))
        at = match.end()
    return malformed, at


def authserv_id(value: bytes) -> str | None:
    """The authserv-id an Authentication-Results value claims, read as RFC 5322 reads it
    (comments, nested or holding quoted-pairs; a quoted-string with quoted-pairs), plus a
    trailing dot and case: none of these hides a claim. None when it cannot be read within
    the first READ_LIMIT characters (a comment, padding or the id itself going past them):
    the caller decides.
    Bounded, so a hostile header of many "(" costs no more than a normal one."""
    text = value[:READ_LIMIT].decode("latin-1")
    cut = len(value) > READ_LIMIT
    at = _skip_cfws(text, 0)
    if at is None or cut and at == len(text):  # only padding in the window: the id is beyond
        return None
    if text.startswith('"', at):
        quoted = _QUOTED.match(text, at)
        if cut and quoted.end() == len(text):  # the quote runs past the window
            return None
        claimed = _QUOTED_PAIR.sub(r"\1", quoted[1])
    else:
        token = _TOKEN_END.search(text, at)
        if token is None and cut:  # the token straddles the window's end
            return None
        claimed = text[at:token.start() if token else len(text)]
    return claimed.strip().rstrip(".").lower()


READ_LIMIT = 4096   # characters; an authserv-id is a host name, its comments short
_TOKEN_END = re.compile(r'[\s;()"]')
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)', re.S)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_WSP = re.compile(r"[ \t\r\n]*")
_COMMENT_STOP = re.compile(r"[()\\]")


def _skip_cfws(text: str, at: int) -> int | None:
    """Where the next token starts after white space and comments; None if a comment is still
    open at the end."""
    while True:
        at = _WSP.match(text, at).end()
        if not text.startswith("(", at):
            return at
        depth, at = 1, at + 1
        while depth:
            stop = _COMMENT_STOP.search(text, at)
            if stop is None:
                return None
            char, at = stop[0], stop.end()
            if char == "\\":
                at += 1
            else:
                depth += 1 if char == "(" else -1


def forged_results(header: Header, hostname: str) -> tuple[Field, ...]:
    """Authentication-Results fields that claim to be ours: RFC 8601 §5 says remove them.
    One whose authserv-id cannot be read counts as ours if it names our host anywhere: a
    malformed header is no loss, a forged one reaching the mailbox is."""
    ours = hostname.rstrip(".").lower()
    return tuple(f for f in header.fields
                 if f.name == b"authentication-results" and _claims(f.value, ours))


def _claims(value: bytes, ours: str) -> bool:
    claimed = authserv_id(value)
    return claimed == ours if claimed is not None else ours.encode() in value.lower()


def is_domain(name: str) -> bool:
    return bool(_DOMAIN.fullmatch(name))


def from_domain(header: Header) -> tuple[str, str]:
    """(domain of the RFC 5322 From, "") or ("", why there is none) for DMARC (RFC 7489 §6.6.1)."""
    values = header.values(b"from")
    if not values:
        return "", "no From field"
    if len(values) > 1:
        return "", f"{len(values)} From fields"
    return (_known_domain if len(values[0]) <= _KEPT else _domain_of)(values[0])


def _domain_of(value: bytes) -> tuple[str, str]:
    text = value.decode("utf-8", "surrogateescape").replace("\r\n", " ")
    try:
        addresses = [addr for _, addr in email.utils.getaddresses([text]) if addr]
    # XXX the stdlib's parser recurses once per nested comment: a From of 1000 "(" raises
    # RecursionError. Hostile bytes are a From we cannot read, not a reason to defer the mail.
    except Exception:  # noqa: BLE001
        return "", "From not parseable"
    domains = {addr.rpartition("@")[2].rstrip(".").lower() for addr in addresses if "@" in addr}
    if not domains or "" in domains:
        return "", "From has no domain"
    if len(domains) > 1:
        return "", "From names several domains"
    domain = a_labels(domains.pop())   # already lower case, no final dot
    return (domain, "") if is_domain(domain) else ("", "From domain is not a domain name")


# A repeated sender's From is parsed once (30 us a message); long values, rare, are not kept.
_KEPT = 256
_known_domain = functools.lru_cache(maxsize=4096)(_domain_of)
