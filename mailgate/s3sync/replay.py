"""`mailgate sync replay`: inject stored mail again (after an outage, for a new mailbox).

Lists the bucket under a prefix (optionally only objects modified since a date), and hands each
object over exactly as the feed does, with the same claims: what was delivered before is not
delivered again. The claims' "done" records last REMEMBER (15 days) and replay reaches objects
of any age, so an object whose tags say it was delivered (processed=true, status=delivered) is
skipped as well, logged "already processed". `--to` delivers to that one address instead of
the recipients SES recorded, and leaves the object's tags alone: its outcome is on stdout and
in the log only.
"""
from __future__ import annotations

import asyncio
import datetime
import logging

from mailgate import UsageError
from mailgate.s3sync.ack import MARK_ERRORS, Marker
from mailgate.s3sync.clients import AWS_ERRORS, Clients, error_code
from mailgate.s3sync.fetch import GONE
from mailgate.s3sync.handover import Handover
from mailgate.s3sync.notifications import Notice

log = logging.getLogger("mailgate.sync")


def since(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since: {text!r} is not an ISO 8601 date") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def _tags(s3, bucket: str, key: str) -> dict[str, str]:
    """In a worker thread: the object's tags."""
    answer = s3.get_object_tagging(Bucket=bucket, Key=key)
    return {t["Key"]: t["Value"] for t in answer.get("TagSet", [])}


async def delivered_before(clients: Clients, bucket: str, key: str) -> str | None:
    """Why the object's tags say it was delivered ("tagged delivered ..."), else None. AWS_ERRORS
    when they cannot be read (a missing object reads as untagged: the handover says why)."""
    try:
        tags = await clients.call(_tags, s3=clients.s3, bucket=bucket, key=key)
    except AWS_ERRORS as e:
        if error_code(e) in GONE:
            return None
        raise
    if tags.get("processed") != "true" or tags.get("status") != "delivered":
        return None
    at, by = tags.get("processed_at"), tags.get("processed_by")
    return f"tagged delivered{' at ' + at if at else ''}{' by ' + by if by else ''}"


def _list(s3, bucket: str, prefix: str, after: datetime.datetime | None) -> list[str]:
    """In a worker thread: the keys under `prefix`, modified at or after `after`."""
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])
                 if after is None or o["LastModified"] >= after]
    return keys


async def replay(args, config, clients: Clients, handover: Handover, marker: Marker) -> int:
    """Exit 0 when every object is finished (delivered or refused for good), else 1."""
    after = since(args.since)
    if args.recipient and args.recipient.rpartition("@")[2].lower() not in handover.domains:
        raise UsageError(f"--to: {args.recipient!r} is not an address in our domains")
    try:
        keys = await clients.call(_list, s3=clients.s3, bucket=args.bucket, prefix=args.prefix,
                                  after=after)
    except AWS_ERRORS as e:
        print(f"listing s3://{args.bucket}/{args.prefix}: {e}")
        return 1
    slots = asyncio.Semaphore(config.sync.concurrency)
    to = (args.recipient,) if args.recipient else ()
    buckets = config.sync.buckets
    check_tags = not args.recipient and (not buckets or args.bucket in buckets)

    async def one(key: str) -> bool:
        async with slots:
            where = f"replay s3://{args.bucket}/{key}"
            if check_tags:  # --to is an explicit copy for one mailbox: delivered before or not
                try:
                    before = await delivered_before(clients, args.bucket, key)
                except AWS_ERRORS as e:  # not known not to be delivered: not injected now
                    log.error("%s: deferred: its tags could not be read: %s", where, e)
                    print(f"s3://{args.bucket}/{key}: deferred: reading its tags: {e}", flush=True)
                    return False
                if before:
                    log.info("%s: delivered: already processed (%s)", where, before)
                    print(f"s3://{args.bucket}/{key}: delivered: already processed ({before})",
                          flush=True)
                    return True
            outcome = await handover.run(Notice(args.bucket, key, to), where)
            print(f"s3://{args.bucket}/{key}: {outcome.status}"
                  f"{': ' + outcome.detail if outcome.detail else ''}", flush=True)
            # --to is a copy for one mailbox: the object's tags keep what its own delivery
            # did (a refused --to would otherwise re-tag a delivered object "invalid").
            if outcome.final and not args.recipient:
                try:
                    await marker.mark(args.bucket, key, outcome)
                except MARK_ERRORS as e:
                    log.error("replay s3://%s/%s: not marked: %s", args.bucket, key, e)
            return outcome.final
    finished = await asyncio.gather(*(one(k) for k in keys))
    print(f"{len(keys)} objects, {sum(finished)} finished, {len(keys) - sum(finished)} to retry")
    return 0 if all(finished) else 1
