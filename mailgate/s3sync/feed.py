"""The SQS side of mailgate sync: poll every queue, keep several messages in flight, extend
their visibility while they are delivered, and acknowledge each only once it is finished.
Told to stop, it starts no new receive, finishes what has begun, and gives back at once
(visibility 0) what was received but still waits for a worker.

A message that must come back (serve's 4xx, an unreadable object, the store away) is simply not
deleted. A poison message goes to sync.dead_letter_queue with the reason (its body cut to fit
that queue if need be) and is deleted, or, without one, is made visible again at once so the
queue's redrive policy moves it; when that fails, it simply comes back. Errors name the queue
and the key; an unexpected one (our bug) leaves the message to come back, and once it has been
received INTERNAL_FAILURES times it is poison too: a bug never loops for ever.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from mailgate.config import Config
from mailgate.s3sync import metrics
from mailgate.s3sync.ack import (DEAD_LETTER_SIZE, MARK_ERRORS, DeleteFailed, Deleter, Marker,
                                  dead_letter)
from mailgate.s3sync.clients import AWS_ERRORS, Clients
from mailgate.s3sync.handover import Handover, Outcome
from mailgate.s3sync.notifications import BadNotification, Notice, parse
from mailgate.s3sync.queues import short_name

log = logging.getLogger("mailgate.sync")
# tests only: "before-delete" SIGKILLs sync right there; "raise-in-process" stands for a bug
CRASH_POINT = "SYNC_CRASH_POINT"
RETRY_PAUSE = (1.0, 30.0)          # seconds between failed receives: first, most
INTERNAL_FAILURES = 5              # times our bug fails on a message before it is dead
INTERNAL_KEPT = 10_000             # messages whose failures are counted at once, at most
# seconds between receives that found the queue empty, when the long poll (sync.wait_time) is
# shorter: wait_time = 0 would otherwise ask an idle queue in a tight loop
EMPTY_PAUSE = 1.0


class Feed:
    def __init__(self, config: Config, clients: Clients, handover: Handover, dlq_url: str,
                 dlq_limit: int = DEAD_LETTER_SIZE):
        self.sync, self.clients, self.handover = config.sync, clients, handover
        self.dlq_url, self.dlq_limit = dlq_url, dlq_limit   # limit: its MaximumMessageSize
        self.marker = Marker(config, clients, handover.claims)
        self.internal_errors: dict[str, int] = {}   # MessageId -> times our bug failed on it
        self.deleter = Deleter(clients)
        # Received and not yet processed: what is being injected (concurrency) plus up to two
        # batches waiting for a worker. Every receive asks for a full batch (each receive is a
        # request; SQS bills it, moto's costs grow with the queue), and the next one starts
        # while a batch still waits, so workers do not idle for a receive's round trip. A
        # message waiting for its batched delete holds no room: that wait (LINGER plus a round
        # trip) would otherwise stall the next receive.
        self.capacity = config.sync.concurrency + 2 * config.sync.batch
        self.outstanding = 0
        self.freed = asyncio.Event()
        self.workers = asyncio.Semaphore(config.sync.concurrency)
        self.handles: dict[str, str] = {}   # SQS MessageId in flight -> latest receipt handle
        self.tasks: set[asyncio.Task] = set()
        self.receive_failed = False
        self.stop = asyncio.Event()   # run()'s: once set, what has not begun is given back

    async def run(self, urls: list[str], once: bool, stop: asyncio.Event) -> None:
        """Poll until `stop` (or, with once, until the queues look empty); finish what has
        begun, give back at once what was received and waits for a worker."""
        self.stop = stop
        waker = asyncio.ensure_future(self._wake_on_stop())
        try:
            await asyncio.gather(*(self._poll(url, once, stop) for url in urls))
            while self.tasks:
                await asyncio.wait(set(self.tasks))
        finally:
            waker.cancel()

    async def _wake_on_stop(self) -> None:
        """A poller waiting for room must see the signal, not wait for a message to finish."""
        await self.stop.wait()
        self.freed.set()

    async def _poll(self, url: str, once: bool, stop: asyncio.Event) -> None:
        pause = RETRY_PAUSE[0]
        while not stop.is_set():
            taken = await self._reserve()
            if stop.is_set():  # told to stop while waiting for room: no new receive
                self._free(taken)
                return
            empty = False
            try:
                messages = await self._receive(url, taken, once)
                pause, empty = RETRY_PAUSE[0], not messages
            except AWS_ERRORS as e:
                self.receive_failed = True
                metrics.ERRORS.labels("sqs").inc()
                log.error("queue %s: receive failed: %s", short_name(url), e)
                messages, pause = [], min(pause * 2, RETRY_PAUSE[1])
                if not once:
                    await _sleep(stop, pause)
            self._free(taken - len(messages))
            if stop.is_set() and messages:  # received as we were told to stop: give them back
                await self._give_back(url, [m["ReceiptHandle"] for m in messages])
                return
            for message in messages:
                self._start(url, message)
            if once and not messages:
                return
            if empty and self.sync.wait_time < EMPTY_PAUSE:
                await _sleep(stop, EMPTY_PAUSE)

    async def _reserve(self) -> int:
        """Wait until a whole batch fits, and take room for it (all at once: pollers that
        took room piecemeal could hold it all between them and wait for ever)."""
        while self.outstanding + self.sync.batch > self.capacity and not self.stop.is_set():
            self.freed.clear()
            await self.freed.wait()
        self.outstanding += self.sync.batch
        return self.sync.batch

    def _free(self, count: int) -> None:
        if count:
            self.outstanding -= count
            self.freed.set()

    async def _receive(self, url: str, count: int, once: bool) -> list[dict]:
        wait = min(self.sync.wait_time, 1.0) if once else self.sync.wait_time
        answer = await self.clients.call(
            self.clients.sqs.receive_message, QueueUrl=url, MaxNumberOfMessages=count,
            WaitTimeSeconds=int(wait), VisibilityTimeout=int(self.sync.visibility_timeout),
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"])
        return answer.get("Messages", [])

    async def _give_back(self, url: str, handles: list[str]) -> None:
        """Make messages not begun visible again at once, and free their room."""
        entries = [{"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": 0}
                   for i, handle in enumerate(handles)]
        try:
            await self.clients.call(self.clients.sqs.change_message_visibility_batch,
                                    QueueUrl=url, Entries=entries)
        except AWS_ERRORS as e:  # they come back after their visibility timeout instead
            log.warning("queue %s: could not give back %d messages: %s", short_name(url),
                        len(handles), e)
        self._free(len(handles))

    def _start(self, url: str, message: dict) -> None:
        mid = message["MessageId"]
        if mid in self.handles:  # received again while in flight: keep the newer handle only
            log.warning("queue %s message %s: received again while in flight (a heartbeat came "
                        "late); the newer receipt handle is kept", short_name(url), mid)
            self.handles[mid] = message["ReceiptHandle"]
            self._free(1)
            return
        self.handles[mid] = message["ReceiptHandle"]
        task = asyncio.ensure_future(self._handle(url, message))
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._finished(t, mid))

    def _finished(self, task: asyncio.Task, mid: str) -> None:
        self.tasks.discard(task)
        self.handles.pop(mid, None)

    async def _handle(self, url: str, message: dict) -> None:
        mid = message["MessageId"]
        heartbeat = asyncio.ensure_future(self._heartbeat(url, mid))
        room = 1
        try:
            if not await self._worker():  # stopping: not begun, so given back, not delivered
                log.info("queue %s message %s: not begun; given back as sync stops",
                         short_name(url), mid)
                room = 0
                heartbeat.cancel()
                await self._give_back(url, [self.handles[mid]])
                return
            try:
                processed = await self._process(url, message)
            finally:
                self.workers.release()
            self._free(room)
            room = 0
            # The acknowledgement (tags, a dead letter, the batched delete) holds neither a
            # worker nor room: its round trips would otherwise idle a worker and stall receives.
            result = await self._settle(url, message, processed)
            if result:
                await self._delete(url, message, result)
        except Exception as e:  # noqa: BLE001 - our bug: nothing is acked, it comes back
            metrics.ERRORS.labels("internal").inc()
            await self._internal_error(url, message, e)
        finally:
            heartbeat.cancel()
            self._free(room)

    async def _worker(self) -> bool:
        """Take a worker for a message; False, with none taken, when sync is told to stop
        before one is free (the message has not begun)."""
        if self.stop.is_set():
            return False
        acquire = asyncio.ensure_future(self.workers.acquire())
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait((acquire, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not acquire.done():
                acquire.cancel()   # asyncio.Semaphore undoes a grant it then cannot hand over
        try:
            await acquire
        except asyncio.CancelledError:
            return False
        if self.stop.is_set():   # both in the same turn of the loop: stopping wins
            self.workers.release()
            return False
        return True

    async def _internal_error(self, url: str, message: dict, error: Exception) -> None:
        """Log our bug; once it failed on the message INTERNAL_FAILURES times (counted here, not
        SQS's receive count, which counts every deferral too: a backlog after an outage would
        go at the first bug), set the message aside (the object stays in S3, untouched)
        instead of failing on it for as long as SQS keeps it."""
        queue, mid = short_name(url), message["MessageId"]
        if len(self.internal_errors) >= INTERNAL_KEPT and mid not in self.internal_errors:
            self.internal_errors.clear()
        failures = self.internal_errors[mid] = self.internal_errors.get(mid, 0) + 1
        if failures < INTERNAL_FAILURES:
            log.exception("queue %s message %s: internal error (failure %d of %d); it will come "
                          "back", queue, mid, failures, INTERNAL_FAILURES, exc_info=error)
            return
        log.error("queue %s message %s: internal error (failure %d of %d)", queue, mid,
                  failures, INTERNAL_FAILURES, exc_info=error)
        self.internal_errors.pop(mid, None)
        try:
            result = await self._poison(url, message, f"internal error, failure {failures}: "
                                        f"{type(error).__name__}: {error}", "")
            if result:
                await self._delete(url, message, result)
        except Exception as e:  # noqa: BLE001 - the same bug or AWS: it comes back once more
            log.error("queue %s message %s: not set aside, it will come back: %s: %s", queue, mid,
                      type(e).__name__, e)

    async def _heartbeat(self, url: str, mid: str) -> None:
        """Keep a slow delivery invisible to other receivers (latest receipt handle)."""
        period = max(self.sync.visibility_timeout / 3, 0.3)
        while True:
            await asyncio.sleep(period)
            try:
                await self.clients.call(self.clients.sqs.change_message_visibility, QueueUrl=url,
                                        ReceiptHandle=self.handles[mid],
                                        VisibilityTimeout=int(self.sync.visibility_timeout))
            except AWS_ERRORS as e:
                log.warning("queue %s message %s: visibility not extended: %s",
                            short_name(url), mid, e)

    async def _process(self, url: str, message: dict) -> list[tuple[Notice, Outcome]] | str:
        """Each notice's outcome (fetched, claimed, injected), or why the message is poison."""
        queue = short_name(url)
        sent = int(message.get("Attributes", {}).get("SentTimestamp", 0)) / 1000
        if sent:
            metrics.QUEUE_LAG.labels(queue).observe(max(time.time() - sent, 0))
        if os.environ.get(CRASH_POINT) == "raise-in-process":
            raise RuntimeError(f"{CRASH_POINT}=raise-in-process")
        try:
            notices = parse(message["Body"])
        except BadNotification as e:
            return str(e)
        return [(n, await self.handover.run(n, f"queue {queue} s3://{n.bucket}/{n.key}"))
                for n in notices]

    async def _settle(self, url: str, message: dict,
                      processed: list[tuple[Notice, Outcome]] | str) -> str | None:
        """What to delete the message as ("delivered", ...), or None to let it come back."""
        if isinstance(processed, str):
            return await self._poison(url, message, processed, "")
        queue, outcomes = short_name(url), processed
        waiting = [(n, o) for n, o in outcomes if not o.final]
        for notice, outcome in waiting:
            log.warning("queue %s s3://%s/%s: deferred, it will come back: %s", queue,
                        notice.bucket, notice.key, outcome.detail)
        if waiting:
            metrics.MESSAGES.labels(queue, "deferred").inc()
            return None
        return await self._finish(url, message, outcomes)

    async def _finish(self, url: str, message: dict,
                      outcomes: list[tuple[Notice, Outcome]]) -> str | None:
        queue = short_name(url)
        for notice, outcome in outcomes:
            _log_outcome(queue, notice, outcome)
            try:
                await self.marker.mark(notice.bucket, notice.key, outcome)
            except MARK_ERRORS as e:  # the audit trail is also in this log; delivery stands
                metrics.ERRORS.labels("tag").inc()
                log.error("queue %s s3://%s/%s: not marked %s: %s", queue, notice.bucket,
                          notice.key, self.sync.processed, e)
        dead = [(n, o) for n, o in outcomes if o.dead]
        if dead:
            keys = " ".join(f"s3://{n.bucket}/{n.key}" for n, _ in dead)
            return await self._poison(url, message, "; ".join(o.detail for _, o in dead), keys)
        if outcomes and os.environ.get(CRASH_POINT) == "before-delete":
            os.kill(os.getpid(), signal.SIGKILL)
        return "delivered" if outcomes else "skipped"

    async def _poison(self, url: str, message: dict, error: str, key: str) -> str | None:
        """"dead_letter" once it is in the dead-letter queue (to delete it), else None. An AWS
        failure on the way is one line: the message comes back and is set aside then."""
        queue, mid = short_name(url), message["MessageId"]
        log.error("queue %s message %s%s: cannot be delivered: %s", queue, mid,
                  f" {key}" if key else "", error)
        try:
            if not self.dlq_url:  # the redrive policy moves it after its maxReceiveCount
                await self.clients.call(self.clients.sqs.change_message_visibility, QueueUrl=url,
                                        ReceiptHandle=self.handles[mid], VisibilityTimeout=0)
                metrics.MESSAGES.labels(queue, "redrive").inc()
                return None
            await dead_letter(self.clients, self.dlq_url, url, message["Body"], error, key,
                              self.dlq_limit)
        except AWS_ERRORS as e:
            metrics.ERRORS.labels("sqs").inc()
            log.error("queue %s message %s: not set aside %s: %s; it will come back", queue, mid,
                      f"into dead-letter queue {short_name(self.dlq_url)}" if self.dlq_url else
                      "for the redrive policy", e)
            return None
        return "dead_letter"

    async def _delete(self, url: str, message: dict, result: str) -> None:
        try:
            await self.deleter.delete(url, self.handles[message["MessageId"]])
        except DeleteFailed as e:  # it comes back; the claims keep it from delivering twice
            log.warning("queue %s message %s: not deleted: %s", short_name(url),
                        message["MessageId"], e)
            return
        metrics.MESSAGES.labels(short_name(url), result).inc()


def _log_outcome(queue: str, notice: Notice, outcome: Outcome) -> None:
    log.info("queue %s s3://%s/%s: %s%s%s", queue, notice.bucket, notice.key, outcome.status,
             f" ({outcome.delivered} recipients)" if outcome.delivered else "",
             f": {outcome.detail}" if outcome.detail else "")


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
