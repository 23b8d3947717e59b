"""OpenSSL's RSA check in place of dkimpy's must answer as RFC 8017 §8.2.2 does.

Pure functions: a key made here, messages signed by dkimpy, no DNS (the filter's own tests use
the loopback DNS server). Each case is one a broken replacement would get wrong: always-true,
a digest ignored, a short or over-long signature, SHA-1; and B_TAG must take out of a signature
exactly what dkimpy's RE_BTAG takes out.
"""
from __future__ import annotations

import hashlib

import dkim
import dkim.crypto
import dkim.util
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dkimpy_state import restored
from dnsserver import dkim_key
from mailgate.filters.auth import fastverify

KEY = dkim_key()
MESSAGE = (b"From: <a@sender.test>\r\nTo: <b@example.test>\r\nSubject: hello\r\n\r\n"
           b"body line\r\n")


def dns(name: bytes, timeout: float = 5) -> bytes:
    assert name == b"sel._domainkey.sender.test."
    return KEY.record.encode()


def signed(message: bytes = MESSAGE, algorithm: bytes = b"rsa-sha256") -> bytes:
    return dkim.sign(message, b"sel", b"sender.test", KEY.pem, signature_algorithm=algorithm,
                     include_headers=[b"from", b"to", b"subject"]) + message


@pytest.fixture(autouse=True)
def installed():
    """fastverify in dkimpy for the test; dkimpy as it was after (the signer in other tests)."""
    with restored():
        fastverify.install()
        yield


@pytest.mark.parametrize("algorithm", [b"rsa-sha256", b"rsa-sha1"])
def test_a_good_signature_verifies(algorithm):
    assert dkim.verify(signed(algorithm=algorithm), dnsfunc=dns) is True


def test_an_altered_header_or_body_does_not():
    message = signed()
    assert dkim.verify(message.replace(b"Subject: hello", b"Subject: hullo"), dnsfunc=dns) is False
    assert dkim.verify(message.replace(b"body line", b"body lime"), dnsfunc=dns) is False


def _parts() -> tuple[object, bytes, dict]:
    """A digest, dkimpy's own signature of it, and the public key as dkimpy parses it."""
    digest = hashlib.sha256(b"what was signed")
    private = dkim.crypto.parse_pem_private_key(KEY.pem)
    signature = bytes(dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, private))
    public, _, _, _ = dkim.evaluate_pk(b"k", KEY.record.encode())
    return digest, signature, public


def test_the_signature_is_checked_against_the_digest():
    digest, signature, public = _parts()
    assert fastverify.verify(digest, signature, public) is True
    assert fastverify.verify(hashlib.sha256(b"something else"), signature, public) is False


def test_a_signature_with_its_leading_zero_bytes_dropped_is_the_same_number():
    digest, signature, public = _parts()
    # the integer is what counts (RFC 8017 OS2IP): strip or add leading zeros, same answer
    assert fastverify.verify(digest, signature.lstrip(b"\0"), public) is True
    assert fastverify.verify(digest, b"\0" + signature, public) is True


def test_a_signature_not_below_the_modulus_is_refused_not_raised():
    digest, signature, public = _parts()
    too_big = (int.from_bytes(signature, "big") + public["modulus"]).to_bytes(
        len(signature) + 1, "big")
    assert fastverify.verify(digest, too_big, public) is False
    assert fastverify.verify(digest, b"\xff" * (len(signature) + 8), public) is False


B_VALUE = st.lists(st.sampled_from([b"A", b"z", b"0", b"+", b"/", b"=", b" ", b"\t", b"\r\n ",
                                    b"\r\n", b"\n", b";", b"b", b"b=", b" b =", b"h", b"-", b"."]),
                   max_size=40).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(B_VALUE)
@example(b"v=1; a=rsa-sha256; bh=abc=; b=AbC+/9=\r\n xyz==\r\n")
@example(b"v=1; b= AB \r\n")     # whitespace after the value stays
@example(b"; b=AB; b=CD")       # every b= in the field, as dkimpy does
def test_b_tag_takes_out_what_dkimpy_takes_out(field: bytes) -> None:
    assert fastverify.B_TAG.sub(b"\\1", field) == fastverify._DKIMPY_BTAG.sub(b"\\1", field)


@settings(max_examples=300, deadline=None)
@given(B_VALUE)
def test_canonicalization_helpers_give_what_dkimpy_gives(text: bytes) -> None:
    ours = (fastverify.strip_trailing_whitespace, fastverify.compress_whitespace,
            fastverify.unfold_header_value)
    for mine, dkimpy in zip(ours, fastverify._DKIMPY_CANONICAL):
        assert mine(text) == dkimpy(text)


# ------------------------------------------------ a message's tags, parsed and checked once

TAG_LIST = st.lists(st.sampled_from([b"v=1", b"a=rsa-sha256", b"d=x.test", b"s=sel", b"b=QUJD",
                                     b"bh=QUJD", b"h=from:to", b"t=1", b"x=9", b" ", b"\r\n\t",
                                     b";", b"=", b"1x=y", b"d=a;d=b", b"c=relaxed", b"_a=1",
                                     b"A_1=2", b"\xc3\xa9=1", b" x = y ", b"x==y", b"x",
                                     b"\x00b=1", b"b\x00=1"]),
                    max_size=12).map(b";".join)


def _outcome(call, *args):
    try:
        return "ok", call(*args)
    except Exception as e:  # noqa: BLE001 - the outcome compared is the exception's type
        return "raised", type(e)


@settings(max_examples=300, deadline=None)
@given(TAG_LIST)
def test_tags_parse_as_dkimpy_parses(tag_list: bytes) -> None:
    tags = fastverify.Tags()
    expected = _outcome(dkim.util.parse_tag_value, tag_list)
    assert _outcome(tags.parse, tag_list) == expected
    assert _outcome(tags.parse, tag_list + b"\r\n") == expected   # dkimpy's values end in CRLF


def test_each_parse_gives_a_dict_of_its_own() -> None:
    """dkimpy keeps the dict it gets as the signature's fields: a change to one must not reach
    the next reader of the same signature."""
    tags = fastverify.Tags()
    first = tags.parse(b"v=1; d=sender.test; s=sel")
    first[b"d"] = b"forged.test"
    assert tags.parse(b"v=1; d=sender.test; s=sel")[b"d"] == b"sender.test"


def test_a_check_passed_holds_for_that_second_only(monkeypatch) -> None:
    """x= is checked against the clock (with dkimpy's 10 h of slop): a signature that was
    still valid a second ago must be checked again, and fail, now."""
    now = 1_800_000_000
    monkeypatch.setattr(fastverify.time, "time", lambda: now + 0.5)
    tags = fastverify.Tags()
    sig = tags.parse(b"v=1; a=rsa-sha256; b=QUJD; bh=QUJD; d=x.test; h=from; s=sel; "
                     + b"x=%d" % (now - 36000))
    tags.validate(sig)                  # at the edge of the slop: still valid
    tags.validate(sig)                  # the same second: known
    monkeypatch.setattr(fastverify.time, "time", lambda: now + 1.5)
    with pytest.raises(dkim.ValidationError, match="x= value is past"):
        tags.validate(sig)
    with pytest.raises(dkim.ValidationError, match="missing"):
        tags.validate({k: v for k, v in sig.items() if k != b"s"})


def test_dkimpy_reads_the_message_tags_only_while_reading_it() -> None:
    """Inside `reading`, dkimpy's parse and checks are the message's; outside, dkimpy's own."""
    tags = fastverify.Tags()
    message = signed()
    with fastverify.reading(tags):
        assert dkim.verify(message, dnsfunc=dns) is True
    # the one DKIM-Signature (and the key record, unless an earlier test parsed that key)
    signatures = [t for t in tags.parsed if t.startswith(b"v=1;")]
    assert len(signatures) == 1 and b"d=sender.test;" in signatures[0]
    assert len(tags.valid) == 1
    parsed, valid = dict(tags.parsed), set(tags.valid)
    assert dkim.verify(signed(MESSAGE.replace(b"hello", b"another")), dnsfunc=dns) is True
    assert tags.parsed == parsed and tags.valid == valid   # not this message's
