"""SPF (RFC 7208) with pyspf: may the client's address send mail for the MAIL FROM domain
(the HELO name for the null sender)?

pyspf resolves synchronously, one name at a time, as the record leads it. Here it runs on the
event loop and only reads answers already at hand (fetched for this message, or fresh in the
resolver's cache): an answer it lacks stops it (`_Missing`), the loop fetches that name through
mailgate's resolver, and pyspf starts over. A warm cache needs no restart and no thread; a cold
one costs one quick re-evaluation per name (pyspf's limits keep that near 20). A lookup that
failed makes pyspf see a TempError. A result is kept for the same client, sender and HELO until
the first answer pyspf read expires (a temperror is not kept).
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import ipaddress
import logging
import math

import spf

from mailgate import metrics
from mailgate.dns import Answer, Budget, DnsError, Resolver
from mailgate.filters.auth.results import Result, safe_value
from mailgate.message import Client

# Measured (2 KB message, include chain, warm cache): pyspf 0.14 ms per check, on the loop;
# a result kept from an earlier message (known) 8 us.
log = logging.getLogger("mailgate.auth")
MAX_MX = 10      # RFC 7208 §4.6.4: more MX records than this are a permerror anyway
MAX_ROUNDS = 60  # fetch-and-restart rounds per message; far above what pyspf's limits allow
_known: contextvars.ContextVar[tuple[dict, Resolver] | None] = contextvars.ContextVar(
    "spf_answers", default=None)
_pyspf_lookup = spf.DNSLookup


class _Missing(Exception):
    def __init__(self, name: str, qtype: str):
        super().__init__(name, qtype)
        self.name, self.qtype = name, qtype


def _lookup(name: str, qtype: str, strict: bool = True, timeout: float = 0) -> list:
    """pyspf's DNSLookup: answers fetched for this message or in the resolver's cache, else
    _Missing; pyspf's own lookup for anyone else in the process."""
    current = _known.get()
    if current is None:
        return _pyspf_lookup(name, qtype, strict, timeout)
    known, resolver = current
    key = (name.rstrip(".").lower(), qtype)
    if key not in known:
        answer = resolver.cached(*key)
        if answer is None:
            raise _Missing(*key)
        metrics.child(metrics.DNS_CACHE, "hit").inc()
        known.add(key, answer)
    if isinstance(known[key], str):
        raise spf.TempError(known[key])
    return known[key]


# pyspf picks its DNS implementation through this module attribute (pydns or dnspython).
spf.DNSLookup = _lookup


@functools.lru_cache(maxsize=4096)  # the same clients repeat; parsing one costs 3-8 µs
def client_address(addr: str) -> str | None:
    """The client's IP from the peer or XFORWARD (Postfix writes "IPv6:2001:db8::1")."""
    text = addr.strip().strip("[]")
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _props(sender: str, helo: str) -> tuple[tuple[str, str, str], ...]:
    props = []
    if sender:  # the address, or its domain when the local part is not header-safe
        props.append(("smtp", "mailfrom", sender if safe_value(sender) else
                      sender.rpartition("@")[2]))
    if helo:
        props.append(("smtp", "helo", helo))
    return tuple(props)


async def check(resolver: Resolver, budget: Budget, client: Client, sender: str,
                receiver: str) -> Result:
    result = known(resolver, client, sender, receiver)
    if result is not None:
        return result
    ip = client_address(client.addr)
    answers = _Answers()
    done = await _run(resolver, budget, ip, sender, client.helo, receiver, answers)
    if done[0] != "temperror" and answers.expiration < math.inf:
        resolver.remember(_kept(ip, sender, client.helo, receiver), done, answers.expiration)
    return _result(ip, sender, client.helo, done)


def known(resolver: Resolver, client: Client, sender: str, receiver: str) -> Result | None:
    """The check's Result without any lookup, or None: local mail, a feed session that could
    not name the client SES saw, no client address, or a result worked out for an earlier
    message while the answers pyspf read are fresh (the same senders repeat: pyspf is most of
    the check's cost with a warm cache)."""
    if client.local:
        return Result("spf", "none", "local mail, not checked", _props(sender, client.helo))
    if client.origin_unknown:  # the peer (and its HELO) is sync's, not the sender's server
        return Result("spf", "none", "feed without the client's address, not checked",
                      _props(sender, ""))
    ip = client_address(client.addr)
    if ip is None:
        return Result("spf", "none", "no client address", _props(sender, client.helo))
    done = resolver.recall(_kept(ip, sender, client.helo, receiver))
    return None if done is None else _result(ip, sender, client.helo, done)


def _kept(ip: str, sender: str, helo: str, receiver: str) -> tuple:
    """The key a result is kept under: everything pyspf's answer depends on."""
    return ("spf", ip, sender, helo, receiver)


def _result(ip: str, sender: str, helo: str, done: tuple[str, str]) -> Result:
    result, why = done
    domain = (sender.rpartition("@")[2] if sender else helo).rstrip(".").lower()
    comment = f"client {ip}: {why}" if why else f"client {ip}"
    return Result("spf", result, comment, _props(sender, helo),
                  domain if result == "pass" else "")


async def _run(resolver: Resolver, budget: Budget, ip: str, sender: str, helo: str,
               receiver: str, known: _Answers) -> tuple[str, str]:
    for _ in range(MAX_ROUNDS):
        token = _known.set((known, resolver))
        try:
            query = spf.query(i=ip, s=sender, h=helo, receiver=receiver)
            result, _code, explanation = query.check()
            return result, explanation if result in ("temperror", "permerror") else ""
        except _Missing as missing:
            await _fetch(resolver, budget, known, missing.name, missing.qtype,
                         "AAAA" if ":" in ip else "A")
        except spf.PermError as e:  # from the query's constructor: e.g. an unusable address
            return "permerror", str(e)
        # XXX pyspf parses what any domain publishes; should it crash on some record, retrying
        # cannot help (a 451 would defer that domain's mail for days): a permanent error.
        except Exception as e:  # noqa: BLE001
            log.exception("pyspf failed for %s", sender or helo)
            return "permerror", f"SPF evaluation failed: {type(e).__name__}"
        finally:
            _known.reset(token)
    return "temperror", "too many DNS lookups"


class _Answers(dict):
    """The answers pyspf read for one message, in its format, and when the first expires."""
    expiration = math.inf

    def add(self, key: tuple[str, str], answer: Answer) -> None:
        self[key] = _records(key[0], key[1], answer)
        self.expiration = min(self.expiration, answer.expiration)


def _records(name: str, qtype: str, answer: Answer) -> list:
    """pyspf's format: ((name, type), value) per record; TXT values are the record's strings."""
    return [((name, qtype), value) for value in answer.records]


async def _fetch(resolver: Resolver, budget: Budget, known: _Answers, name: str, qtype: str,
                 address_type: str) -> None:
    """One answer into `known`; for MX, the exchanges' addresses with it, all at once (pyspf
    asks for them next), so an mx mechanism costs one restart, not one per exchange."""
    try:
        answer = await resolver.lookup(name, qtype, budget)
    except DnsError as e:
        known[(name, qtype)] = f"DNS {e}"
        return
    known.add((name, qtype), answer)
    if qtype == "MX":
        hosts = {host.lower() for _, host in answer.records[:MAX_MX]
                 if (host.lower(), address_type) not in known}
        await asyncio.gather(*(_fetch(resolver, budget, known, host, address_type, address_type)
                               for host in hosts))
