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
