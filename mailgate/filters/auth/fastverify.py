"""dkimpy's verification without its avoidable costs: RSA in pure Python, keys parsed per use,
a slow pattern for taking b= out of the signature, patterns compiled on every use, and each
signature's tags read twice.

dkimpy checks an RSA signature with big-integer `pow` and byte-by-byte conversions in Python, and
parses the key record's ASN.1 again for every signature. Measured on a 2 KB message with one
RSA-2048 signature: 0.64 ms of CPU in dkimpy as it is, 0.31 ms with both replaced; OpenSSL (the
`cryptography` package) does the RSA check in about 50 microseconds. Everything else stays
dkimpy's: canonicalization (its patterns, compiled once below), hashing, tags, the meaning of key
records. Keys OpenSSL will not take and digests other than SHA-256/SHA-1 keep dkimpy's own RSA
code. dkimpy's RE_BTAG allows folding whitespace before each base64 character of b= in a form that
backtracks per character: 48 microseconds per signature. B_TAG matches the same text (that folding
is any run of whitespace) in 6. Its canonicalization helpers pass their patterns to `re.sub` as
text, a cache lookup per call, some 20 per message: here the same patterns, compiled once, and
skipped when a substring test shows they would change nothing (header values rarely hold a tab
or two blanks in a row): 18 % of the instructions of `Auth.check` (bench/auth_cost.py). Each
signature's tags were parsed and validated twice, once to read them before any key lookup
(signatures.py) and again inside dkimpy's verify: another 10 %. `Tags` keeps them for the
message in hand, and dkimpy reads them from there while `reading` it; they are parsed by
`parse_tags`, dkimpy's parser in fewer steps (2 microseconds for a DKIM-Signature, not 8; a
property test holds it to dkimpy's results and exceptions). `install()` swaps all of
these into dkimpy, for DKIM and ARC alike.
"""
from __future__ import annotations

import functools
import re
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import dkim
import dkim.canonicalization as canonicalization
import dkim.crypto
import dkim.util
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

_DKIMPY = dkim.crypto.RSASSA_PKCS1_v1_5_verify
_DKIMPY_BTAG = dkim.RE_BTAG
_DKIMPY_PARSE = dkim.util.parse_tag_value
_DKIMPY_VALIDATE = dkim.validate_signature_fields
_DKIM_TAGS = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")   # dkimpy's default mandatory tags
_PREHASHED = {32: utils.Prehashed(hashes.SHA256()), 20: utils.Prehashed(hashes.SHA1())}
_PADDING = padding.PKCS1v15()
_MIN_BYTES = 128   # below 1024 bits dkimpy refuses the key anyway; leave such keys to it
_B64 = rb"A-Za-z0-9+/="
# b=, then its value: base64 characters with any whitespace between them, and a final CRLF
# dkimpy's canonicalization patterns, as it writes them
_TRAILING, _BLANKS = re.compile(b"[\t ]+\r\n"), re.compile(b"[\t ]+")
_DKIMPY_CANONICAL = (canonicalization.strip_trailing_whitespace,
                     canonicalization.compress_whitespace, canonicalization.unfold_header_value)
B_TAG = re.compile(rb"([;\s]b\s*=)(?:[\s" + _B64 + rb"]*[" + _B64 + rb"])?(?:\r?\n\Z)?")


@functools.lru_cache(maxsize=1024)  # the same senders' keys: built once
def _public_key(modulus: int, exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def verify(hash, signature: bytes, public_key: dict) -> bool:
    """RSASSA-PKCS1-v1_5-VERIFY with dkimpy's arguments (a hash object, the signature bytes,
    the parsed key) and answer."""
    modulus, exponent = public_key["modulus"], public_key["publicExponent"]
    size = (modulus.bit_length() + 7) // 8
    digest = hash.digest()
    algorithm = _PREHASHED.get(len(digest))
    if algorithm is None or size < _MIN_BYTES:
        return _DKIMPY(hash, signature, public_key)
    s = int.from_bytes(signature, "big")
    if s >= modulus:   # RFC 8017 §5.2.2: "signature representative out of range"
        return False
    try:
        key = _public_key(modulus, exponent)
    except ValueError:  # an exponent OpenSSL refuses (even, 1, ...): dkimpy's arithmetic decides
        return _DKIMPY(hash, signature, public_key)
    try:
        key.verify(s.to_bytes(size, "big"), digest, _PADDING, algorithm)
    except InvalidSignature:
        return False
    return True


@functools.lru_cache(maxsize=1024)  # a parsed key is read-only to dkimpy
def parse_key(record: bytes):
    """dkimpy's (key, bits, k=, tlsrpt) for a key record, parsed once per record; raises as
    dkimpy does for a record it cannot use."""
    return dkim.evaluate_pk(b"key", record)


def load_key(name: bytes, dnsfunc, timeout: float = 5):
    """dkimpy's load_pk_from_dns, each record parsed once."""
    record = dnsfunc(name, timeout=timeout)
    if not record:  # dkimpy's own error, naming the key
        return dkim.evaluate_pk(name, record)
    return parse_key(record)


class Tags:
    """One message's tag lists, each parsed once and its checks passed once (dkimpy's
    functions, dkimpy's exceptions). A passed check counts for the same second only: dkimpy
    reads the clock for t= and x=."""

    def __init__(self) -> None:
        self.parsed: dict[bytes, dict] = {}
        self.valid: set[tuple] = set()

    def parse(self, tag_list: bytes) -> dict:
        """A fresh dict, as from dkimpy; kept stripped, as dkimpy reads it (its header values
        end in CRLF, ours do not)."""
        key = tag_list.strip()
        tags = self.parsed.get(key)
        if tags is None:
            tags = self.parsed[key] = parse_tags(key)
        return dict(tags)

    def validate(self, sig: dict, mandatory_fields=_DKIM_TAGS, arc: bool = False) -> None:
        passed = (tuple(sig.items()), tuple(mandatory_fields), arc, int(time.time()))
        if passed not in self.valid:
            _DKIMPY_VALIDATE(sig, list(mandatory_fields), arc)
            self.valid.add(passed)


def parse_tags(tag_list: bytes) -> dict:
    """dkimpy's parse_tag_value (the same dict, the same exceptions), without its two Python
    steps per tag that cost most: a list built to unpack `key, value`, and a pattern looked up
    in re's cache to test the name's first character (`^[a-zA-Z](\\w)*` asks no more)."""
    tags = {}
    specs = tag_list.strip().split(b";")
    if not specs[-1]:   # a trailing semicolon is valid
        specs.pop()
    for spec in specs:
        key, eq, value = spec.partition(b"=")
        key = key.strip()
        if not eq or not key[:1].isalpha():   # bytes: ASCII letters only, as [a-zA-Z]
            raise dkim.util.InvalidTagSpec(spec)
        if key in tags:
            raise dkim.util.DuplicateTag(key)
        tags[key] = value.strip()
    return tags


_reading = threading.local()   # the Tags of the message dkimpy verifies in this thread


@contextmanager
def reading(tags: Tags) -> Iterator[None]:
    """dkimpy, in this thread and within the block, takes tags from `tags`. The block must not
    await: messages take turns on the event loop's thread."""
    _reading.tags = tags
    try:
        yield
    finally:
        _reading.tags = None


def parse_tag_value(tag_list: bytes) -> dict:
    tags = getattr(_reading, "tags", None)
    if tags is None or type(tag_list) is not bytes:
        return _DKIMPY_PARSE(tag_list)
    return tags.parse(tag_list)


def validate_signature_fields(sig: dict, mandatory_fields=_DKIM_TAGS, arc: bool = False) -> None:
    tags = getattr(_reading, "tags", None)
    if tags is None:
        return _DKIMPY_VALIDATE(sig, mandatory_fields, arc)
    return tags.validate(sig, mandatory_fields, arc)


def install() -> None:
    """Make dkimpy (DKIM and ARC) use `verify`, `load_key`, B_TAG and the message's `Tags`."""
    dkim.RSASSA_PKCS1_v1_5_verify = verify
    dkim.load_pk_from_dns = load_key
    dkim.RE_BTAG = B_TAG
    dkim.parse_tag_value = parse_tag_value
    dkim.validate_signature_fields = validate_signature_fields
    canonicalization.strip_trailing_whitespace = strip_trailing_whitespace
    canonicalization.compress_whitespace = compress_whitespace
    canonicalization.unfold_header_value = unfold_header_value


def strip_trailing_whitespace(text: bytes) -> bytes:
    if b" \r\n" not in text and b"\t\r\n" not in text:
        return text
    return _TRAILING.sub(b"\r\n", text)


def compress_whitespace(text: bytes) -> bytes:
    if b"\t" not in text and b"  " not in text:   # every run of blanks is one space already
        return text
    return _BLANKS.sub(b" ", text)


def unfold_header_value(text: bytes) -> bytes:
    return text.replace(b"\r\n", b"").replace(b"\n", b"")   # "\r?\n", as dkimpy has it
