"""Pure pieces of the protocol: reply table, LMTP data encoding, smuggling check, XFORWARD xtext."""
import pytest

from mailgate.gateway import has_bare_newline
from mailgate.lmtp import encode_data
from mailgate.commands import is_trusted, parse_path, xtext_decode
from mailgate.trace import received
from mailgate.message import Client
from mailgate import verdict


@pytest.mark.parametrize("line, expected", [
    ("250 OK", "250 2.0.0 OK"),
    ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
    ("552 Error: Too much mail data", str(verdict.TOO_BIG)),
    ("451 4.3.0 already", "451 4.3.0 already"),
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ("220 mx ESMTP", "220 mx ESMTP"),
    ("454 TLS not available", "454 4.7.0 TLS not available"),  # the STARTTLS reply
])
def test_every_reply_gets_an_enhanced_code(line, expected):
    assert verdict.enhance(line) == expected


def test_actions_order_by_severity():
    A = verdict.Action
    assert A.CONTINUE < A.ACCEPT < A.REDIRECT < A.DISCARD < A.DEFER < A.REJECT


@pytest.mark.parametrize("raw, encoded", [
    (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"no newline", b"no newline\r\n.\r\n"),
    # Dovecot 2.3 ends DATA on "\n.\n": LF endings become CRLF before dot-stuffing.
    (b"x\n.\nMAIL FROM:<evil>\n", b"x\r\n..\r\nMAIL FROM:<evil>\r\n.\r\n"),
    (b"x\r.\r", b"x\r\n..\r\n.\r\n"),
])
def test_lmtp_data_is_crlf_and_dot_stuffed(raw, encoded):
    assert encode_data(raw) == encoded


@pytest.mark.parametrize("raw, bare", [
    (b"a\r\nb\r\n", False), (b"a\nb\r\n", True), (b"a\rb\r\n", True),
    (b"a\r\n.\n", True), (b"", False),
])
def test_bare_newline_detection(raw, bare):
    assert has_bare_newline(raw) is bare


def test_xtext():
    assert xtext_decode("mail+2Eremote+3Dx") == "mail.remote=x"
    assert xtext_decode("a+zz") == "a+zz"


def test_trusted_networks():
    nets = ("127.0.0.0/8", "::1/128")
    assert is_trusted(("127.0.0.1", 1234), nets)
    assert not is_trusted(("192.0.2.1", 1234), nets)
    assert is_trusted("/run/socket", nets)


def test_received_header_form():
    header = received(Client("192.0.2.7", "mail.remote.test", "helo.remote.test", "ESMTP"),
                      "mx.example.test", "ESMTP", "ABC123", ("a@example.test",)).decode()
    assert header.startswith("Received: from helo.remote.test (mail.remote.test [192.0.2.7])\r\n"
                             "\tby mx.example.test (mailgate) with ESMTP id ABC123\r\n"
                             "\tfor <a@example.test>; ")
    assert header.endswith("\r\n") and header.count("\r\n") == 3


@pytest.mark.parametrize("listener, proto, utf8, word", [
    ("SMTP", "ESMTP", False, "ESMTP"), ("SMTP", "SMTP", False, "SMTP"), ("LMTP", "ESMTP", False, "LMTP"),
    ("SMTP", "ESMTP", True, "UTF8SMTP"), ("LMTP", "ESMTP", True, "UTF8LMTP"),
])
def test_received_protocol_word(listener, proto, utf8, word):
    from mailgate.trace import protocol_word
    assert protocol_word(listener, proto, utf8) == word


@pytest.mark.parametrize("size", [10, 3 << 20])  # below and above the thread threshold
def test_delivery_record_digest_is_one_hash_of_sender_and_message(size):
    import asyncio
    import hashlib
    from mailgate.deliver import DeliveryRecord
    from mailgate.message import Envelope
    raw = b"x" * size
    env = Envelope("Q1", "a@b.test", ("c@example.test",), Client("127.0.0.1"), 0.0)
    got = asyncio.run(DeliveryRecord.digest(env, raw))
    assert got == hashlib.sha256(b"a@b.test\0" + raw).digest()


def _getaddr(arg):
    from mailgate.commands import getaddr
    return getaddr(arg)


@pytest.mark.parametrize("arg", [
    "<alice\r@example.test>", "<alice\n@example.test>", "<al\x00ice@example.test>",
    "<a\x1f@example.test>", "<a@example.test\x7f>", '<"a\x01b"@example.test>',
    "<\udcff@example.test> SMTPUTF8",   # the byte 0xff, as the listener decodes it
])
def test_path_with_a_control_character_or_not_utf8_is_refused(arg):
    assert parse_path(arg, _getaddr, True) is None


@pytest.mark.parametrize("arg, parsed", [
    ("<\u00e9@example.test> SMTPUTF8", ("\u00e9@example.test", ["SMTPUTF8"])),
    ("<a@example.test> SIZE=10", ("a@example.test", ["SIZE=10"])),
    ('<"a b"@example.test>', ('"a b"@example.test', [])),
])
def test_path_that_is_fine_is_parsed(arg, parsed):
    assert parse_path(arg, _getaddr, True) == parsed
