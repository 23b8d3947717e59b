"""What an SQS message body says: which stored objects to deliver, to whom, with SES's verdicts.

Pure functions. Two formats, told apart by their content: an S3 event (`Records`; the first one a
queue gets is `s3:TestEvent`, skipped) and SES's own notification, either inside the SNS envelope
(`Type`, `Message`) or as it is (raw message delivery). A body that says nothing usable raises
BadNotification with the reason, for the dead-letter queue.
"""
from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass

# SES verdict fields -> the method names mailgate's Authentication-Results shows for them.
SES_VERDICTS = (("spamVerdict", "x-ses-spam"), ("virusVerdict", "x-ses-virus"),
                ("spfVerdict", "x-ses-spf"), ("dkimVerdict", "x-ses-dkim"),
                ("dmarcVerdict", "x-ses-dmarc"))
# SES statuses -> RFC 8601 result words.
SES_STATUS = {"PASS": "pass", "FAIL": "fail", "GRAY": "neutral",
              "PROCESSING_FAILED": "temperror", "DISABLED": "none"}

Verdicts = tuple[tuple[str, str], ...]


class BadNotification(ValueError):
    """The body cannot be acted on; the text says why (it goes with the dead letter)."""


@dataclass(frozen=True)
class Notice:
    """One stored message to deliver. None/() fields are read from the stored message instead."""
    bucket: str
    key: str
    recipients: tuple[str, ...] = ()   # SES receipt.recipients: authoritative when given
    sender: str | None = None          # SES mail.source
    verdicts: Verdicts | None = None   # SES receipt verdicts as (method, result)
    message_id: str = ""               # SES mail.messageId, for the log
    size: int | None = None            # what the S3 event says the object holds


def parse(body: str) -> list[Notice]:
    """The notices in one SQS body; [] for bodies that announce nothing (s3:TestEvent)."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise BadNotification(f"not JSON: {e}") from None
    return _dispatch(doc, envelope_allowed=True)


def _dispatch(doc: object, envelope_allowed: bool) -> list[Notice]:
    if not isinstance(doc, dict):
        raise BadNotification("not a JSON object")
    if envelope_allowed and "Type" in doc and "Message" in doc:
        return _sns_envelope(doc)
    if doc.get("Event") == "s3:TestEvent":
        return []
    if "Records" in doc:
        return _s3_event(doc["Records"])
    if "receipt" in doc and "mail" in doc:
        return [_ses_notification(doc)]
    raise BadNotification("neither an S3 event nor an SES notification")


def _sns_envelope(doc: dict) -> list[Notice]:
    if doc["Type"] != "Notification":  # SubscriptionConfirmation and the like carry no mail
        return []
    try:
        inner = json.loads(doc["Message"])
    except (TypeError, ValueError) as e:
        raise BadNotification(f"SNS Message is not JSON: {e}") from None
    return _dispatch(inner, envelope_allowed=False)


def _s3_event(records: object) -> list[Notice]:
    if not isinstance(records, list):
        raise BadNotification("Records is not a list")
    notices = []
    for record in records:
        if not isinstance(record, dict) or not str(record.get("eventName", "")).startswith(
                "ObjectCreated"):
            continue  # deletions, tagging, restores: nothing arrived
        try:
            bucket, obj = record["s3"]["bucket"]["name"], record["s3"]["object"]
            key = obj["key"]
        except (KeyError, TypeError):
            raise BadNotification("S3 record without s3.bucket.name or s3.object.key") from None
        if not _text(bucket) or not _text(key):
            raise BadNotification("S3 record whose s3.bucket.name or s3.object.key is not a "
                                  "non-empty string")
        size = obj.get("size")
        # S3 URL-encodes keys in events, with "+" for a space.
        notices.append(Notice(bucket, urllib.parse.unquote_plus(key),
                              size=size if isinstance(size, int) else None))
    return notices


def _ses_notification(doc: dict) -> Notice:
    receipt, mail = doc["receipt"], doc["mail"]
    if not isinstance(receipt, dict) or not isinstance(mail, dict):
        raise BadNotification("SES receipt or mail is not an object")
    action = receipt.get("action") or {}
    if not isinstance(action, dict) or action.get("type") != "S3" or \
            not _text(action.get("bucketName")) or not _text(action.get("objectKey")):
        raise BadNotification("SES notification without an S3 action (bucketName, objectKey)")
    recipients = receipt.get("recipients")
    if not isinstance(recipients, list) or not recipients or \
            not all(isinstance(r, str) and "@" in r for r in recipients):
        raise BadNotification("SES notification with empty or invalid receipt.recipients")
    return Notice(action["bucketName"], action["objectKey"], tuple(recipients),
                  sender=str(mail.get("source", "")), verdicts=_verdicts(receipt),
                  message_id=str(mail.get("messageId", "")))


def _verdicts(receipt: dict) -> Verdicts:
    out = []
    for field, method in SES_VERDICTS:
        verdict = receipt.get(field) or {}
        if not isinstance(verdict, dict):
            raise BadNotification(f"SES notification whose receipt.{field} is not an object")
        status = verdict.get("status", "")
        if isinstance(status, str) and status in SES_STATUS:
            out.append((method, SES_STATUS[status]))
    return tuple(out)


def _text(value: object) -> bool:
    """A bucket or key sync can ask S3 for: anything else would fail in botocore, every time."""
    return isinstance(value, str) and value != ""
