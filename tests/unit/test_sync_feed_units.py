"""How many times sync's own bug may fail on one message before it is set aside: counted by
sync, not by SQS's receive count (which counts every deferral too)."""
import asyncio

from mailgate.s3sync.feed import Feed


def test_a_backlog_after_an_outage_is_not_dead_lettered_at_the_first_bug():
    poisoned = []
    feed = Feed.__new__(Feed)   # only the failure count: no queues, no AWS
    feed.internal_errors = {}

    async def poison(url, message, why, body):
        poisoned.append(why)
        return None
    feed._poison = poison
    # received 50 times while serve was down (deferrals): then sync's bug fails on it
    message = {"MessageId": "m1", "Attributes": {"ApproximateReceiveCount": "50"}}
    error = RuntimeError("a bug")

    async def fail(times):
        for _ in range(times):
            await feed._internal_error("https://sqs/q", message, error)
    asyncio.run(fail(4))
    assert poisoned == []
    asyncio.run(fail(1))   # the 5th time (README: "fails for the 5th time")
    assert poisoned == ["internal error, failure 5: RuntimeError: a bug"]


def test_a_dead_letter_fits_its_queue_whatever_the_body_escapes_to():
    """JSON escapes a character to as many as 12 bytes (an emoji, as a surrogate pair): the cut
    body, the reason, the key and the attributes stay within the queue's limit together."""
    import hashlib
    import json

    from mailgate.s3sync.ack import dead_letter_record
    for body in ("\U0001F600" * 70_000, "\x01" * 70_000, "x" * 70_000, "é" * 70_000):
        for limit in (1024, 4096, 65_536):
            text, attributes = dead_letter_record("https://sqs/q", body, "not JSON: " + "e" * 300,
                                                  "s3://b/k", limit)
            size = len(text.encode()) + sum(len(n) + len(a["DataType"]) +
                                            len(a["StringValue"].encode())
                                            for n, a in attributes.items())
            assert size <= limit, (body[:1], limit)
            record = json.loads(text)
            assert (record["key"], record["queue"]) == ("s3://b/k", "https://sqs/q")
            assert record["error"] == "not JSON: " + "e" * 300
            assert body.startswith(record["body"]) and record["truncated"] is True
            assert record["body_sha256"] == hashlib.sha256(body.encode()).hexdigest()
            assert record["body_length"] == len(body.encode())
            assert size > limit - 12   # cut no shorter than it has to be
    text, _ = dead_letter_record("https://sqs/q", "small", "why", "", 262_144)
    assert json.loads(text)["body"] == "small" and "truncated" not in json.loads(text)


def test_a_dead_letters_attributes_hold_only_what_sqs_takes():
    """SQS refuses a message attribute with a character outside XML's (a control character, a
    lone surrogate): the dead letter of an object whose key has one would never be sent."""
    import re

    from mailgate.s3sync.ack import dead_letter_record
    _, attributes = dead_letter_record("https://sqs/q", "body", "bad \x00 byte\x1b[31m",
                                       "s3://b/in\x01box/\udcff", 262_144)
    allowed = re.compile("[\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]*")
    for name, attribute in attributes.items():
        assert allowed.fullmatch(attribute["StringValue"]), (name, attribute)
    assert attributes["key"]["StringValue"] == "s3://b/in?box/?"
