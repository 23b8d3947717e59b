"""The one DNS resolver every filter shares: async (dnspython), cached across messages, bounded.

Answers are cached for their TTL (NXDOMAIN and "no such record" for the zone's negative TTL, or
dnspython's 300 s when the answer carries no SOA);
concurrent lookups of one name share one query. Each lookup is bounded by `[dns] timeout` and by
the message's `Budget`; a timeout, SERVFAIL or a spent budget raises DnsError, which a check turns
into `temperror`, never into a hang or a rejection. Nothing here blocks the event loop.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from mailgate import metrics
from mailgate.config import Dns, parse_nameserver

CACHE_ENTRIES = 50_000        # answers kept (LRU beyond that)
NEGATIVE_TTL = 60.0           # seconds: a name that cannot exist, an NXDOMAIN dnspython cannot read


class DnsError(Exception):
    """No answer in time: a timeout, SERVFAIL/REFUSED, or the message's DNS budget is spent."""


@dataclass(frozen=True, slots=True)
class Answer:
    """Plain values: TXT -> tuple of byte strings per record; A/AAAA/PTR -> text; MX -> (pref,
    exchange). `exists` is False for NXDOMAIN. `expiration` (time.time()) is for the cache."""
    name: str
    rdtype: str
    records: tuple
    exists: bool
    expiration: float


class Budget:
    """Seconds of DNS one message may still spend (wall clock: its lookups run concurrently)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def _values(answer: dns.resolver.Answer, rdtype: str) -> tuple:
    if answer.rrset is None:
        return ()
    if rdtype == "TXT":
        return tuple(tuple(r.strings) for r in answer)
    if rdtype == "MX":
        return tuple((r.preference, r.exchange.to_text(True)) for r in answer)
    if rdtype == "PTR":
        return tuple(r.target.to_text(True) for r in answer)
    return tuple(r.to_text() for r in answer)


def _negative_expiration(error: dns.resolver.NXDOMAIN, qname: dns.name.Name) -> float:
    """NXDOMAIN is cached for the SOA's negative TTL (RFC 2308), as dnspython computes it."""
    try:
        return dns.resolver.Answer(qname, dns.rdatatype.ANY, dns.rdataclass.IN,
                                   error.response(qname)).expiration
    except (KeyError, dns.exception.DNSException):
        return time.time() + NEGATIVE_TTL


class Resolver:
    def __init__(self, settings: Dns):
        self.timeout = settings.timeout
        self.budget_seconds = settings.budget
        self._resolver = dns.asyncresolver.Resolver(configure=not settings.nameservers)
        if settings.nameservers:
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(ns))
                                          for ns in settings.nameservers]
        self._resolver.timeout = settings.timeout
        self._resolver.cache = None  # ours below holds plain values, readable from any thread
        self._cache = dns.resolver.LRUCache(CACHE_ENTRIES)  # thread-safe; honours .expiration
        self._inflight: dict[tuple[str, str], asyncio.Task] = {}
        self._derived: dict[tuple, tuple[float, object]] = {}

    def budget(self) -> Budget:
        return Budget(self.budget_seconds)

    def cached(self, name: str, rdtype: str) -> Answer | None:
        """The cached answer, or None; safe from worker threads."""
        return self._cache.get((_normal(name), rdtype))

    def recall(self, key: tuple) -> object | None:
        """What a check worked out from answers and kept with remember(), while it is fresh."""
        hit = self._derived.get(key)
        return hit[1] if hit is not None and hit[0] > time.time() else None

    def remember(self, key: tuple, value: object, expiration: float) -> None:
        """Keep `value` until `expiration`, the first of its answers' (time.time())."""
        if len(self._derived) >= CACHE_ENTRIES:
            self._derived.clear()
        self._derived[key] = (expiration, value)

    def cached_all(self, queries: list[tuple[str, str]]) -> list[Answer] | None:
        """The answer to each (name, type) from the cache; None unless all are there."""
        answers = [self._cache.get((_normal(name), rdtype)) for name, rdtype in queries]
        if any(answer is None for answer in answers):
            return None
        metrics.child(metrics.DNS_CACHE, "hit").inc(len(answers))
        return answers

    async def lookup_all(self, queries: list[tuple[str, str]], budget: Budget) -> list:
        """lookup() for each (name, type) at once: an Answer or the DnsError per query. When all
        are cached, no task per name (a warm cache is the common case, every message)."""
        answers = self.cached_all(queries)
        if answers is not None:
            return answers
        done = await asyncio.gather(*(self.lookup(name, rdtype, budget)
                                      for name, rdtype in queries), return_exceptions=True)
        for answer in done:
            if isinstance(answer, BaseException) and not isinstance(answer, DnsError):
                raise answer
        return done

    async def lookup(self, name: str, rdtype: str, budget: Budget) -> Answer:
        """The answer for (name, rdtype), from the cache or the network; else DnsError."""
        key = (_normal(name), rdtype)
        answer = self._cache.get(key)
        if answer is not None:
            metrics.child(metrics.DNS_CACHE, "hit").inc()
            return answer
        metrics.child(metrics.DNS_CACHE, "miss").inc()
        remaining = budget.remaining()  # the query itself gives up after `timeout`
        if remaining <= 0:
            metrics.child(metrics.DNS_FAILURES, "budget").inc()
            raise DnsError(f"DNS budget spent before {key[0]} {rdtype}")
        task = self._inflight.get(key)
        if task is None:  # one query per name, however many messages wait for it
            task = asyncio.ensure_future(self._query(*key))
            self._inflight[key] = task
            task.add_done_callback(lambda done, key=key: self._finished(key, done))
        try:
            return await asyncio.wait_for(asyncio.shield(task), remaining)
        except TimeoutError:
            metrics.child(metrics.DNS_FAILURES, "budget").inc()
            raise DnsError(f"{key[0]} {rdtype}: no answer within the message's budget") from None

    async def _query(self, name: str, rdtype: str) -> Answer:
        started = time.perf_counter()
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:  # not a valid name: no record can exist
            return Answer(name, rdtype, (), False, time.time() + NEGATIVE_TTL)
        try:
            found = await self._resolver.resolve(qname, rdtype, raise_on_no_answer=False,
                                                 lifetime=self.timeout, search=False)
            answer = Answer(name, rdtype, _values(found, rdtype), True, found.expiration)
        except dns.resolver.NXDOMAIN as e:
            answer = Answer(name, rdtype, (), False, _negative_expiration(e, qname))
        except dns.exception.Timeout:
            raise self._failed("timeout", f"{name} {rdtype}: timed out") from None
        except dns.exception.DNSException as e:  # SERVFAIL, REFUSED, YXDOMAIN, bad reply
            raise self._failed("error", f"{name} {rdtype}: {type(e).__name__}") from None
        finally:
            metrics.child(metrics.DNS_SECONDS, rdtype).observe(time.perf_counter() - started)
        self._cache.put((name, rdtype), answer)
        return answer

    def _finished(self, key: tuple[str, str], task: asyncio.Task) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have given up on it already

    @staticmethod
    def _failed(reason: str, text: str) -> DnsError:
        metrics.child(metrics.DNS_FAILURES, reason).inc()
        return DnsError(text)

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        self._cache.flush()


def _normal(name: str) -> str:
    return name.rstrip(".").lower()
