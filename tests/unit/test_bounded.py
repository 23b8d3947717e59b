"""bounded.py's message split and relaxed body canonicalization must give what dkimpy's give.

Pure functions, compared with dkimpy's own on generated input: line endings of every kind (CRLF,
bare LF, bare CR), continuation lines, no empty line, an empty header, runs of spaces and tabs at
the ends of pieces. The pieces are made small here so that a short body is cut many times.
"""
from __future__ import annotations

import dkim
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dkimpy_state import restored
from dnsserver import dkim_key
from mailgate.filters.auth import bounded

LINE_BITS = st.sampled_from([b"a", b"Subject: x", b" ", b"\t", b"  \t", b":", b"\r\n", b"\n",
                             b"\r", b"\r\n\r\n", b"From ", b" folded"])
TEXT = st.lists(LINE_BITS, max_size=60).map(b"".join)


def outcome(fn, *args):
    """The value, or the exception's type: dkimpy raises on some headers, and so must we."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - compared, not swallowed
        return type(e)


@settings(max_examples=500, deadline=None)
@given(TEXT)
@example(b"\r\nbody\r\n")                       # no header at all
@example(b"A: b\r\n")                            # no empty line
@example(b"A: b\r\n\r\n")                        # an empty body
@example(b"A: b\r\n\r\nx\ny\r\n")                # a bare LF in the body
@example(b" A: b\r\n\r\nx\r\n")                  # a continuation line first
def test_rfc822_parse_gives_what_dkimpy_gives(message: bytes) -> None:
    assert outcome(bounded.rfc822_parse, message) == outcome(bounded._DKIMPY_PARSE, message)


@settings(max_examples=500, deadline=None)
@given(TEXT, st.integers(min_value=1, max_value=8))
@example(b"a \r\nb\t\r\n  \r\n\r\n", 1)
@example(b"x" * 20, 1)                           # longer than a piece, no CRLF
def test_relaxed_body_in_pieces_gives_what_dkimpy_gives(body: bytes, chunk: int) -> None:
    size, bounded.CHUNK = bounded.CHUNK, chunk   # not monkeypatch: hypothesis runs it many times
    try:
        assert bounded.relaxed_body(body) == bounded._DKIMPY_RELAXED_BODY(body)
        assert b"".join(bounded.pieces(body)) == body
    finally:
        bounded.CHUNK = size


def test_pieces_end_in_crlf_and_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bounded, "CHUNK", 5)
    body = b"ab\r\n" * 10 + b"tail"
    parts = bounded.pieces(body)
    assert all(p.endswith(b"\r\n") for p in parts[:-1])
    assert [len(p) for p in parts] == [8, 8, 8, 8, 8, 4]   # cut at the first CRLF past 5 bytes
    assert b"".join(parts) == body


@pytest.mark.parametrize("canonicalize", [(b"relaxed", b"relaxed"), (b"relaxed", b"simple"),
                                          (b"simple", b"simple")])
def test_a_large_signed_message_still_verifies(canonicalize: tuple[bytes, bytes]) -> None:
    key = dkim_key()
    body = b"a  line\t with \t runs  of blanks \t\r\n" * 20_000 + b"\r\n\r\n"   # ~0.7 MB
    message = (b"From: <a@sender.test>\r\nTo: <b@example.test>\r\nSubject: big\r\n"
               b" folded\r\n\r\n" + body)
    signed = dkim.sign(message, b"sel", b"sender.test", key.pem, canonicalize=canonicalize,
                       include_headers=[b"from", b"to", b"subject"]) + message
    with restored():
        bounded.install()
        assert dkim.rfc822_parse is bounded.rfc822_parse
        assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: key.record.encode())
        altered = signed[:-1000] + signed[-1000:].replace(b"line", b"lime", 1)
        assert not dkim.verify(altered, dnsfunc=lambda name, timeout=5: key.record.encode())
