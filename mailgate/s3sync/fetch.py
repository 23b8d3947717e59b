"""Reading a stored message from S3, whole and checked, with CRLF line endings.

An object that is gone (NoSuchKey) or larger than the listener takes is final (dead letter);
one that cannot be read, or whose length differs from its ContentLength, is retried: it is never
delivered as it is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mailgate.s3sync import metrics
from mailgate.s3sync.clients import AWS_ERRORS, Clients, error_code

LINE_END = re.compile(rb"\r\n|\r|\n")
GONE = ("NoSuchKey", "NoSuchBucket", "404")


class Unusable(Exception):
    """Never deliverable: the text says why (dead letter)."""


class Unreadable(Exception):
    """Not readable now: retried later."""


@dataclass(frozen=True)
class Stored:
    data: bytes   # CRLF line endings
    etag: str     # without quotes


def crlf(data: bytes) -> bytes:
    """Every line ending CRLF (SES may store LF; the listener refuses bare LF)."""
    pairs = data.count(b"\r\n")
    if data.count(b"\r") == pairs and data.count(b"\n") == pairs:
        return data
    return LINE_END.sub(b"\r\n", data)


def _read(s3, bucket: str, key: str, max_size: int) -> tuple[bytes, int, str]:
    """In a worker thread: the object's bytes, its ContentLength and ETag."""
    response = s3.get_object(Bucket=bucket, Key=key)
    length = int(response.get("ContentLength", -1))
    with response["Body"] as body:
        if length > max_size:
            return b"", length, response.get("ETag", "")
        return body.read(), length, response.get("ETag", "")


async def fetch(clients: Clients, bucket: str, key: str, max_size: int) -> Stored:
    try:
        data, length, etag = await clients.call(_read, s3=clients.s3, bucket=bucket, key=key,
                                                max_size=max_size)
    except AWS_ERRORS as e:
        if error_code(e) in GONE:
            raise Unusable(f"object s3://{bucket}/{key} does not exist ({error_code(e)})") from None
        metrics.ERRORS.labels("s3").inc()
        raise Unreadable(f"reading s3://{bucket}/{key}: {e}") from None
    if length > max_size:
        raise Unusable(f"object s3://{bucket}/{key} has {length} bytes, over limits.message_size")
    if len(data) != length:
        metrics.ERRORS.labels("s3").inc()
        raise Unreadable(f"s3://{bucket}/{key}: read {len(data)} bytes of {length}")
    metrics.S3_BYTES.inc(len(data))
    return Stored(crlf(data), etag.strip('"'))
