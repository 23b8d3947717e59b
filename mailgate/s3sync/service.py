"""Running mailgate sync: wire the parts, metrics and readiness, signals, and the exit status.

SIGTERM/SIGINT: stop receiving, let the messages that have begun finish (those still waiting
for a worker, and those received after the signal, are given back at once), exit 0. READY=1
once every queue is resolved, like serve. Exit 1 when `--once` could not receive from a queue;
2 for a setup error naming the queue or the key (sync.metrics on a port in use).
"""
from __future__ import annotations

import asyncio
import logging
import signal

from mailgate import maillog
from mailgate.config import Config, parse_hostport
from mailgate.notify import notify
from mailgate.s3sync import metrics
from mailgate.s3sync.ack import DEAD_LETTER_SIZE, Marker
from mailgate.s3sync.claims import Claims
from mailgate.s3sync.clients import Clients
from mailgate.s3sync.feed import Feed
from mailgate.s3sync.handover import Handover
from mailgate.s3sync.inject import Injector
from mailgate.s3sync.queues import load_domains, message_limit, resolve, short_name, url_of
from mailgate.s3sync.replay import replay
from mailgate.s3sync.secret import feed_secret
from mailgate.store import open_store

log = logging.getLogger("mailgate.sync")


def run(args, config: Config) -> int:
    maillog.setup(config.log)
    logging.getLogger("botocore").setLevel(logging.WARNING)  # "Found credentials in ..."
    return asyncio.run(main(args, config))


async def main(args, config: Config) -> int:
    sync = config.sync
    clients = Clients(config, threads=sync.concurrency + 8)
    store = open_store(config)
    secret = feed_secret(sync.secret_file)
    if not secret:
        log.warning("sync.secret_file not set or unusable: SES verdicts are not carried")
    injector = Injector(sync.inject, config.hostname, secret, config.limits.message_timeout + 60)
    lock_ttl = max(sync.visibility_timeout, config.limits.message_timeout) + 60
    handover = Handover(config, clients, injector, Claims(store, lock_ttl), load_domains(config))
    try:
        if args.action == "replay":
            return await replay(args, config, clients, handover,
                                Marker(config, clients, handover.claims))
        return await feed(args, config, clients, handover)
    finally:
        injector.close()
        await store.close()
        clients.close()


async def feed(args, config: Config, clients: Clients, handover: Handover) -> int:
    sync = config.sync
    urls = await resolve(config, clients, handover.domains)
    dlq = await url_of(clients, sync.dead_letter_queue) if sync.dead_letter_queue else ""
    dlq_limit = await message_limit(clients, dlq) if dlq else DEAD_LETTER_SIZE
    if sync.metrics:
        try:
            metrics.serve(*parse_hostport(sync.metrics, "sync.metrics"))
        except OSError as e:
            # XXX imported here: mailgate.service brings serve's whole listener with it
            from mailgate.service import cannot_listen
            raise cannot_listen("sync.metrics", sync.metrics, e) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    feed = Feed(config, clients, handover, dlq, dlq_limit)
    log.info("mailgate sync ready: queues=%s inject=%s dead_letter=%s processed=%s",
             ",".join(map(short_name, urls)), sync.inject, short_name(dlq) if dlq else "redrive",
             sync.processed)
    notify("READY=1")
    task = asyncio.ensure_future(feed.run(urls, args.once, stop))
    await asyncio.wait([task, asyncio.ensure_future(stop.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        notify("STOPPING=1")
        log.info("stopping: no new receives; of %d messages received, those begun finish, "
                 "the others are given back", len(feed.tasks))
    await task
    log.info("stopped")
    return 1 if args.once and feed.receive_failed else 0
