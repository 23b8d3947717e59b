"""Which queues and domains sync serves, resolved once at start.

`sync.queues` holds names or URLs; empty means one queue per served domain, `{domain}-queue`
with dots as dashes (the old workers' naming). Domains are `domains` plus sync.domains_file.
A queue that does not exist, or one with no way out for poison messages (no redrive policy and
no sync.dead_letter_queue), stops sync at start with the queue named.
"""
from __future__ import annotations

import logging

from mailgate import UsageError, maildir
from mailgate.config import Config
from mailgate.s3sync.ack import DEAD_LETTER_SIZE
from mailgate.s3sync.clients import AWS_ERRORS, Clients, error_code

log = logging.getLogger("mailgate.sync")


def load_domains(config: Config) -> frozenset[str]:
    domains = set(config.domains)
    path = config.sync.domains_file
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.split("#", 1)[0].strip().lower() for line in f]
        except OSError as e:
            raise UsageError(f"sync.domains_file: {path}: {e.strerror}") from None
        for domain in filter(None, lines):
            if not maildir.is_domain(domain):
                raise UsageError(f"sync.domains_file: {path}: {domain!r} is not a domain name")
            domains.add(domain)
    return frozenset(domains)


def queue_names(config: Config, domains: frozenset[str]) -> list[str]:
    if config.sync.queues:
        return list(config.sync.queues)
    return [f"{domain.replace('.', '-')}-queue" for domain in sorted(domains)]


def short_name(queue: str) -> str:
    """A queue's name from its URL (for logs and metric labels)."""
    return queue.rstrip("/").rpartition("/")[2]


async def url_of(clients: Clients, queue: str) -> str:
    if queue.startswith(("https://", "http://")):
        return queue
    try:
        answer = await clients.call(clients.sqs.get_queue_url, QueueName=queue)
    except AWS_ERRORS as e:
        raise UsageError(f"queue {queue}: {error_code(e)}: {e}") from None
    return answer["QueueUrl"]


async def message_limit(clients: Clients, url: str) -> int:
    """The queue's MaximumMessageSize (read once, at start: the dead letters are kept within
    it); SQS's 256 KiB when it cannot be read (sqs:GetQueueAttributes not allowed)."""
    try:
        answer = await clients.call(clients.sqs.get_queue_attributes, QueueUrl=url,
                                    AttributeNames=["MaximumMessageSize"])
        return int(answer["Attributes"]["MaximumMessageSize"])
    except (*AWS_ERRORS, KeyError, ValueError) as e:
        log.warning("queue %s: MaximumMessageSize not readable (%s); dead letters are kept "
                    "within %d bytes", short_name(url), error_code(e), DEAD_LETTER_SIZE)
        return DEAD_LETTER_SIZE


async def resolve(config: Config, clients: Clients, domains: frozenset[str]) -> list[str]:
    """The URL of every queue to poll; each checked for a way out for poison messages."""
    urls = [await url_of(clients, q) for q in queue_names(config, domains)]
    if not config.sync.dead_letter_queue:
        for url in urls:
            await _check_redrive(clients, url)
    return urls


async def _check_redrive(clients: Clients, url: str) -> None:
    try:
        answer = await clients.call(clients.sqs.get_queue_attributes, QueueUrl=url,
                                    AttributeNames=["RedrivePolicy"])
    except AWS_ERRORS as e:
        raise UsageError(f"queue {short_name(url)}: {error_code(e)}: {e}") from None
    if "RedrivePolicy" not in answer.get("Attributes", {}):
        raise UsageError(f"queue {short_name(url)} has no redrive policy and "
                         "sync.dead_letter_queue is empty: a poison message would come back "
                         "forever; set one of them")
