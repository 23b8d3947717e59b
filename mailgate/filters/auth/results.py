"""What each check found, and the one Authentication-Results header (RFC 8601) they become.

Clauses are modelled and rendered by authres; this module only keeps hostile values (a d= with
a semicolon, a comment with parentheses) from breaking the header's syntax, and folds the header
one clause per line. Parsing the header back with authres gives the same clauses.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import authres
import authres.arc
import authres.dkim_b
import authres.dmarc

# The RFC 8601 result words; a check never reports anything else.
WORDS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-_]*")
_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")
_KEYWORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_UNSAFE = re.compile(r"[^\x20-\x7e]|[()\\]")
COMMENT_CHARS = 120
VALUE_CHARS = 256   # RFC 5321 §4.5.3.1.3: a path; a domain name is shorter still
# To parse what we render (tests, Sieve-minded tools): the methods this header carries.
FEATURES = authres.FeatureContext(authres.dkim_b, authres.dmarc, authres.arc)


@dataclass(frozen=True, slots=True)
class Result:
    """One result clause: `method=result (comment) ptype.property=value ...`."""
    method: str                                  # spf, dkim, dmarc, arc
    result: str                                  # one of WORDS
    comment: str = ""
    props: tuple[tuple[str, str, str], ...] = ()  # (ptype, property, value)
    domain: str = ""                             # the authenticated domain, for DMARC alignment


def safe_comment(text: str) -> str:
    return _UNSAFE.sub("?", text)[:COMMENT_CHARS]


def safe_value(value: str) -> str | None:
    """A property value authres can write without breaking the header: an address, a token
    or base64 (quoted by authres), of at most VALUE_CHARS; None for anything else, which is
    then left out (a hostile d= or s= of 1000 characters would make a line over RFC 5322's
    998)."""
    if len(value) > VALUE_CHARS:
        return None
    if _ADDRESS.fullmatch(value) or _TOKEN.fullmatch(value):
        return value
    if re.fullmatch(r"[A-Za-z0-9+/=]+", value):
        return value
    return None


def _clause(result: Result) -> authres.AuthenticationResult:
    props = [authres.AuthenticationResultProperty(ptype, name, value)
             for ptype, name, value in result.props if value and safe_value(value)]
    return FEATURES.result(result.method, result=result.result,
                           result_comment=safe_comment(result.comment) or None, properties=props)


@functools.lru_cache(maxsize=4096)  # repeated senders: the same spf, dmarc and arc clauses
def _text(result: Result) -> str:
    return str(_clause(result))


def _clause_text(result: Result) -> str:
    """_text, where a dkim clause's header.b (different in every message, so never found in
    the cache) is rendered alone after the rest of its clause, which repeats. authres writes
    the properties in order, one space apart: the same text (tests compare the two)."""
    props = result.props
    if props and props[-1][:2] == ("header", "b") and props[-1][2] and safe_value(props[-1][2]):
        rest = _text(Result(result.method, result.result, result.comment, props[:-1]))
        return f"{rest} {authres.AuthenticationResultProperty(*props[-1])}"
    return _text(result)


def feed_clauses(verdicts: tuple[tuple[str, str], ...]) -> list[authres.AuthenticationResult]:
    """The trusted feed's own verdicts (e.g. x-ses-spam=pass), one clause each, as given;
    a pair that is not a method keyword and a result word is left out."""
    return [authres.AuthenticationResult(method.lower(), result=result.lower())
            for method, result in verdicts
            if _KEYWORD.fullmatch(method) and _KEYWORD.fullmatch(result)]


def render(authserv_id: str, results: list[Result],
           feed: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The header line, folded one clause per line, CRLF-terminated."""
    clauses = [_clause_text(r) for r in results] + [str(c) for c in feed_clauses(feed)]
    value = ";\r\n\t".join([authserv_id.lower(), *clauses]) if clauses else f"{authserv_id}; none"
    return f"Authentication-Results: {value}\r\n".encode("ascii", "replace")


def parse(header: bytes | str) -> authres.AuthenticationResultsHeader:
    """The header parsed back by authres (unfolded first, as it expects)."""
    text = header.decode() if isinstance(header, bytes) else header
    return FEATURES.parse(re.sub(r"\r?\n[ \t]", " ", text).strip())
