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
