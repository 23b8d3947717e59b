"""Reading a stored message from S3, whole and checked.

An object that is gone (NoSuchKey) or larger than the listener takes is final (dead letter);
one that cannot be read, or whose length differs from its ContentLength, is retried: it is never
delivered as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

from mailgate.s3sync import metrics
from mailgate.s3sync.clients import AWS_ERRORS, Clients, error_code

GONE = ("NoSuchKey", "NoSuchBucket", "404")


class Unusable(Exception):
    """Never deliverable: the text says why (dead letter)."""


class Unreadable(Exception):
    """Not readable now: retried later."""


@dataclass(frozen=True)
class Stored:
    data: bytes   # as stored: SES may use LF; the SMTP client sends CRLF
    etag: str     # without quotes


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
    return Stored(data, etag.strip('"'))
