"""Reading a stored message from S3, whole and checked.

An object that is gone (NoSuchKey), larger than the listener takes, or that botocore will not
even ask for (a bucket or key it refuses) is final (dead letter); one that cannot be read, or
whose length differs from its ContentLength, is retried: it is never delivered as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

from botocore.exceptions import ParamValidationError

from mailgate.s3sync import metrics
from mailgate.s3sync.clients import AWS_ERRORS, Clients, error_code

GONE = ("NoSuchKey", "NoSuchBucket", "404")


class Unusable(Exception):
    """Never deliverable: the text says why (dead letter). `exists`: there is an object to tag."""

    def __init__(self, text: str, exists: bool = True):
        super().__init__(text)
        self.exists = exists


class Gone(Unusable):
    """The object does not exist (any more): never stored, or deleted after its delivery."""

    def __init__(self, text: str):
        super().__init__(text, exists=False)


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
    except ParamValidationError as e:  # botocore refuses the request itself: so, every time
        reason = " ".join(str(e).split())  # botocore's text spans lines
        raise Unusable(f"s3://{bucket}/{key}: not a valid S3 request: {reason}",
                       exists=False) from None
    except AWS_ERRORS as e:
        if error_code(e) in GONE:
            raise Gone(f"object s3://{bucket}/{key} does not exist ({error_code(e)})") from None
        metrics.ERRORS.labels("s3").inc()
        raise Unreadable(f"reading s3://{bucket}/{key}: {e}") from None
    if length > max_size:
        raise Unusable(f"object s3://{bucket}/{key} has {length} bytes, over limits.message_size")
    if len(data) != length:
        metrics.ERRORS.labels("s3").inc()
        raise Unreadable(f"s3://{bucket}/{key}: read {len(data)} bytes of {length}")
    metrics.S3_BYTES.inc(len(data))
    return Stored(data, etag.strip('"'))
