"""What SES wrote at the top of a stored message: its Received line, verdicts, Return-Path.

Pure functions over the header section. Only the block SES prepends counts (the headers above
the message's second Received line: anything below came from the sender and could say anything).
Used for a bare S3 event, which names no recipients and no verdicts; header To/Cc are the last
resort for recipients, and the caller logs and counts that.
"""
from __future__ import annotations

import email.parser
import email.policy
import email.utils
import re
from dataclasses import dataclass

from mailgate.s3sync.claims import mailbox_key
from mailgate.s3sync.notifications import SES_STATUS, Verdicts

HEADER_LIMIT = 256 * 1024   # bytes of header section read; beyond it: no header information
END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")
# SES's own hop: "from HELO (RDNS [IP]) by inbound-smtp.REGION.amazonaws.com ... for RCPT;"
SES_RECEIVED = re.compile(
    r"^\s*from\s+(?P<helo>\S+)\s+"
    r"\((?:(?P<name>[^\s\[\]()]+)\s+)?\[(?:IPv6:)?(?P<addr>[0-9A-Fa-f.:]+)\]\)"
    r".*?\bby\s+\S*amazonaws\.com\b(?P<rest>.*)$", re.S | re.I)
FOR_CLAUSE = re.compile(r"\bfor\s+(?P<list>[^;]+);", re.I)
# SES's Authentication-Results is not RFC 8601 (client-ip=, helo= properties): authres refuses
# it, so the three results SES gives are read with a pattern.
SES_RESULT = re.compile(r"(?:^|;)\s*(spf|dkim|dmarc)=([a-z]+)", re.I)
SES_HEADER_VERDICTS = (("x-ses-spam-verdict", "x-ses-spam"), ("x-ses-virus-verdict", "x-ses-virus"))


@dataclass(frozen=True)
class Origin:
    """The client SES received the message from (for XFORWARD), "" where unknown."""
    addr: str = ""
    name: str = ""
    helo: str = ""


def header_section(raw: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) pairs of the header section, in order."""
    end = END_OF_HEADERS.search(raw, 0, HEADER_LIMIT)
    head = raw[:end.start()] if end else raw[:HEADER_LIMIT]
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    return [(name.lower(), re.sub(r"\s+", " ", str(value)).strip())
            for name, value in parsed.items()]


def ses_block(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers above the second Received line; [] if the first is not SES's."""
    received = [i for i, (name, _) in enumerate(headers) if name == "received"]
    if not received or not SES_RECEIVED.match(headers[received[0]][1]):
        return []
    return headers[:received[1]] if len(received) > 1 else headers


def _first(block: list[tuple[str, str]], name: str) -> str | None:
    return next((value for n, value in block if n == name), None)


def origin(block: list[tuple[str, str]]) -> Origin:
    match = SES_RECEIVED.match(_first(block, "received") or "")
    if not match:
        return Origin()
    return Origin(match["addr"], match["name"] or "", match["helo"])


def ses_recipients(block: list[tuple[str, str]]) -> list[str]:
    """The addresses in the "for" clause of SES's Received line."""
    match = SES_RECEIVED.match(_first(block, "received") or "")
    found = FOR_CLAUSE.search(match["rest"]) if match else None
    if not found:
        return []
    return [a for _, a in email.utils.getaddresses([found["list"].replace(" ", ",")]) if "@" in a]


def header_recipients(headers: list[tuple[str, str]]) -> list[str]:
    """To and Cc of the message itself: the last resort."""
    values = [value for name, value in headers if name in ("to", "cc")]
    return [a for _, a in email.utils.getaddresses(values) if "@" in a]


def sender(block: list[tuple[str, str]]) -> str:
    """SES's Return-Path (the envelope sender it received), "" for <> or none."""
    value = _first(block, "return-path") or ""
    return email.utils.parseaddr(value)[1]


def verdicts(block: list[tuple[str, str]]) -> Verdicts:
    out = []
    for name, method in SES_HEADER_VERDICTS:
        status = (_first(block, name) or "").strip().upper()
        if status in SES_STATUS:
            out.append((method, SES_STATUS[status]))
    results = next((v for n, v in block if n == "authentication-results"
                    and v.lower().startswith("amazonses.com")), "")
    seen = set()
    for method, result in SES_RESULT.findall(results):
        if method.lower() not in seen:
            seen.add(method.lower())
            out.append((f"x-ses-{method.lower()}", result.lower()))
    return tuple(out)


def in_domains(addresses: list[str], domains: frozenset[str]) -> tuple[list[str], list[str]]:
    """(ours, foreign): addresses split by whether their domain is one we serve. One mailbox
    given twice in different case (SES lists RCPT TO as written) counts once, by the key the
    claims use (mailbox_key), in its first spelling."""
    ours, foreign = [], []
    first: dict[str, str] = {}
    for address in (a.strip() for a in addresses):
        first.setdefault(mailbox_key(address), address)
    for address in first.values():  # in order of first appearance
        domain = address.rpartition("@")[2].lower()
        (ours if domain in domains else foreign).append(address)
    return ours, foreign
