"""What happens after serve's answer: S3 tags (the audit trail), the dead-letter queue, and
the SQS delete, in that order, each only once the message is finished.

Tags, not metadata: a metadata change is a copy, which fires a new ObjectCreated event. A tag that
fails is logged (the log is the audit trail too); a dead letter that fails leaves the message to
come back. A dead letter always fits its queue: a body too large for it is cut, and says so.
Deletes are batched (up to 10 per request) and use the latest receipt handle.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time

from mailgate.config import Config
from mailgate.s3sync import metrics
from mailgate.s3sync.claims import Claims
from mailgate.s3sync.clients import AWS_ERRORS, Clients
from mailgate.s3sync.handover import Outcome
from mailgate.store import StoreUnavailable

log = logging.getLogger("mailgate.sync")
BATCH = 10          # SQS's most entries per batch request
LINGER = 0.1        # seconds a delete waits for others to share its request
TAG_VALUE = 256     # S3's longest tag value
DEAD_LETTER_SIZE = 256 * 1024   # SQS's MaximumMessageSize, when the queue's own is not readable
ERROR_KEPT = 4096   # characters of the reason a dead letter keeps (the log has it whole)
MARK_ERRORS = (*AWS_ERRORS, StoreUnavailable)   # what mark() raises when it did not mark


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Marker:
    """The object's audit trail: tags with the old workers' keys, or its deletion.

    Only an object that is there, in sync.buckets, is touched. Only a delivered one is deleted:
    for one that is dead the dead letter holds just the notification, so the object is the
    only copy of the mail (processed = "delete" tags it instead)."""

    def __init__(self, config: Config, clients: Clients, claims: Claims):
        self.mode, self.host, self.clients = config.sync.processed, config.hostname, clients
        self.buckets, self.claims = config.sync.buckets, claims

    async def mark(self, bucket: str, key: str, outcome: Outcome) -> None:
        """AWS_ERRORS when it is not marked. A delete the store cannot record first (so a
        repeated notification would be a false dead letter) becomes a tag."""
        if self.mode == "keep" or not outcome.stored or (
                self.buckets and bucket not in self.buckets):
            return
        s3 = self.clients.s3
        if self.mode == "delete" and not outcome.dead:
            try:
                await self.claims.deleting(bucket, key)
            except StoreUnavailable as e:  # not deleted unrecorded: tagged, so it is not lost
                log.warning("s3://%s/%s: delivered; tagged, not deleted: store unavailable (%s)",
                            bucket, key, e)
            else:
                await self.clients.call(s3.delete_object, Bucket=bucket, Key=key)
                return
        # XXX the tag set is replaced whole: SES writes objects untagged, and reading the tags
        # first to merge them would cost a request per message (S3 has no "add a tag" call).
        tags = dict(processed="true", processed_at=now(), processed_by=self.host,
                    status=outcome.status,
                    invalid_inboxes=" ".join(outcome.invalid_inboxes)[:TAG_VALUE])
        await self.clients.call(s3.put_object_tagging, Bucket=bucket, Key=key, Tagging={
            "TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]})


class Deleter:
    """Batched DeleteMessageBatch per queue; `delete` returns once its entry succeeded."""

    def __init__(self, clients: Clients):
        self.clients = clients
        self.pending: dict[str, list[tuple[str, asyncio.Future]]] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.sending: set[asyncio.Task] = set()

    async def delete(self, queue_url: str, handle: str) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        batch = self.pending.setdefault(queue_url, [])
        batch.append((handle, done))
        if len(batch) >= BATCH:
            self._flush(queue_url)
        elif queue_url not in self.timers:
            self.timers[queue_url] = loop.call_later(LINGER, self._flush, queue_url)
        await done

    def _flush(self, queue_url: str) -> None:
        timer = self.timers.pop(queue_url, None)
        if timer is not None:
            timer.cancel()
        batch = self.pending.pop(queue_url, [])
        if batch:
            task = asyncio.ensure_future(self._send(queue_url, batch))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)

    async def _send(self, queue_url: str, batch: list[tuple[str, asyncio.Future]]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": handle} for i, (handle, _) in enumerate(batch)]
        try:
            result = await self.clients.call(self.clients.sqs.delete_message_batch,
                                             QueueUrl=queue_url, Entries=entries)
        except AWS_ERRORS as e:
            result = {"Failed": [{"Id": str(i), "Message": str(e)} for i in range(len(batch))]}
        failed = {f["Id"]: f.get("Message") or f.get("Code", "") for f in result.get("Failed", [])}
        for i, (_, done) in enumerate(batch):
            if str(i) in failed:
                metrics.ERRORS.labels("sqs").inc()
                done.set_exception(DeleteFailed(f"{queue_url}: {failed[str(i)]}"))
            else:
                done.set_result(None)


class DeleteFailed(Exception):
    """The message stays in the queue and comes back; claims keep it from delivering twice."""


def dead_letter_record(queue_url: str, body: str, error: str, key: str,
                       limit: int) -> tuple[str, dict]:
    """The dead letter's JSON and message attributes, together within `limit` bytes (the
    dead-letter queue's MaximumMessageSize): the key, queue and error always; the body whole if
    it fits, else cut, with `truncated`, `body_sha256` and `body_length` (bytes) of the whole."""
    error = error[:ERROR_KEPT]
    attributes = {name: {"DataType": "String", "StringValue": _attribute(value[:1024]) or "-"}
                  for name, value in (("error", error), ("queue", queue_url), ("key", key))}
    room = limit - sum(len(name.encode()) + len(a["DataType"]) + len(a["StringValue"].encode())
                       for name, a in attributes.items())
    record = {"error": error, "queue": queue_url, "key": key, "time": now(), "body": body}
    text = json.dumps(record)   # ASCII (ensure_ascii): its length is its size in bytes
    if len(text) <= room:
        return text, attributes
    whole = body.encode("utf-8", "surrogatepass")
    record.update(body="", truncated=True, body_sha256=hashlib.sha256(whole).hexdigest(),
                  body_length=len(whole))
    left = room - len(json.dumps(record))
    if left < 0:  # a tiny queue limit and a long error: the error is cut (the log has it whole)
        record["error"] = _fit(error, len(json.dumps(error)) - 2 + left)
        left = 0
    record["body"] = _fit(body, left)
    return json.dumps(record), attributes


# What SQS takes in a message attribute (XML's characters): a key or an error with a control
# character in it would have the dead letter refused, and the poison message come back for ever.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _attribute(value: str) -> str:
    return _NOT_XML.sub("?", value)


def _fit(text: str, room: int) -> str:
    """The longest start of `text` whose JSON string escape takes at most `room` bytes (a
    character takes 1 to 12: a binary search, a few dozen encodings of at most `room` bytes)."""
    short, long = 0, min(len(text), max(room, 0)) + 1   # text[:short] fits, text[:long] not
    while long - short > 1:
        middle = (short + long) // 2
        if len(json.dumps(text[:middle])) - 2 <= room:
            short = middle
        else:
            long = middle
    return text[:short]


async def dead_letter(clients: Clients, dlq_url: str, queue_url: str, body: str,
                      error: str, key: str, limit: int = DEAD_LETTER_SIZE) -> None:
    """The original body and why it could not be delivered, into sync.dead_letter_queue.
    AWS_ERRORS when it is not there: the caller leaves the message to come back."""
    text, attributes = dead_letter_record(queue_url, body, error, key, limit)
    await clients.call(clients.sqs.send_message, QueueUrl=dlq_url, MessageBody=text,
                       MessageAttributes=attributes)
