"""DMARC (RFC 7489): does an SPF or DKIM pass align with the From domain, and what does the
From domain's owner ask for when none does?

The policy lookup (_dmarc.<From domain>, else _dmarc.<organizational domain>) asks both names at
once. The organizational domain comes from publicsuffixlist. A DNS failure is `temperror`; an
unusable record `permerror`; no record `none`. Nothing here rejects: the filter decides that.
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from mailgate.address import a_labels
from mailgate.dns import Budget, DnsError, Resolver
from mailgate.filters.auth.results import Result

POLICIES = ("none", "quarantine", "reject")


@functools.lru_cache(maxsize=1)
def _suffixes() -> PublicSuffixList:
    return PublicSuffixList()  # ~90 ms to load: once per process


def load() -> None:
    """Load the public suffix list now (at start), not on the first message."""
    _suffixes()


@functools.lru_cache(maxsize=4096)  # asked 3-4 times per message, for the same few domains
def org_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 §3.2): the registrable domain, or `domain` itself."""
    return _suffixes().privatesuffix(domain) or domain.lower()


@dataclass(frozen=True, slots=True)
class Policy:
    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@functools.lru_cache(maxsize=1024)  # a Policy is immutable: the same record, parsed once
def parse_record(text: str) -> Policy | None:
    """A DMARC record's tags; None when it is not usable (RFC 7489 §6.3, §6.6.3 step 6)."""
    tags = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags[name.strip().lower()] = value.strip()
    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()
    if p not in POLICIES or sp not in POLICIES:
        # §6.6.3 step 6: an invalid p= or sp= is no policy, or p=none if reports are asked for
        if "rua" not in tags:
            return None
        p = sp = "none"
    return Policy(p, sp, "s" if tags.get("adkim", "r").lower() == "s" else "r",
                  "s" if tags.get("aspf", "r").lower() == "s" else "r",
                  _percent(tags.get("pct", "100")))


def _percent(text: str) -> int:
    """pct= (0 to 100; anything else is 100, the default). Digits are counted before int():
    a record may hold thousands, past what int() takes (ValueError)."""
    digits = text.lstrip("0")
    if not (text.isascii() and text.isdigit()):
        return 100
    return int(digits or "0") if len(digits) <= 3 else 100


# RFC 7489 §6.4: "v" *WSP "=" *WSP "DMARC1", then the end or ";" (the "v" in any case, the
# version exactly as written)
_VERSION = re.compile(r"[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|\Z)")


def _records(answer) -> list[str]:
    texts = [b"".join(strings).decode("ascii", "replace") for strings in answer.records]
    return [t for t in texts if _VERSION.match(t)]


async def find_policy(resolver: Resolver, budget: Budget,
                      domain: str) -> tuple[Policy | None, bool, str]:
    """(policy, found at the organizational domain, problem); problem is "temperror" or
    "permerror: why" when there is no usable answer."""
    return _policy_in(await resolver.lookup_all(_queries(domain), budget))


def known_policy(resolver: Resolver, domain: str) -> tuple[Policy | None, bool, str] | None:
    """find_policy from the cache alone; None when an answer it needs is not there."""
    answers = resolver.cached_all(_queries(domain))
    return None if answers is None else _policy_in(answers)


def _queries(domain: str) -> list[tuple[str, str]]:
    org = org_domain(domain)
    return [(f"_dmarc.{domain}", "TXT")] + ([(f"_dmarc.{org}", "TXT")] if org != domain else [])


def _policy_in(answers: list) -> tuple[Policy | None, bool, str]:
    for at_org, answer in enumerate(answers):
        if isinstance(answer, DnsError):
            return None, False, "temperror"
        records = _records(answer)
        if len(records) > 1:
            return None, False, "permerror: several DMARC records"
        if records:
            policy = parse_record(records[0])
            return (policy, bool(at_org), "") if policy else (None, False, "permerror: bad record")
    return None, False, ""


def published(policy: Policy, at_org: bool, from_domain: str) -> str:
    """p=, or sp= for a subdomain whose policy came from its organizational domain."""
    return policy.sp if at_org and from_domain != org_domain(from_domain) else policy.p


def aligned(domain: str, from_domain: str, mode: str) -> bool:
    """RFC 7489 §3.1, an internationalized domain compared in its A-label form: SMTPUTF8 mail
    may name it in U-labels in MAIL FROM or d= (the From domain is already in A-labels)."""
    if not domain:
        return False
    domain, from_domain = a_labels(domain), a_labels(from_domain)
    if mode == "s":
        return domain == from_domain
    return org_domain(domain) == org_domain(from_domain)


def evaluate(from_domain: str, policy: Policy | None, at_org: bool, spf: Result,
             dkims: list[Result]) -> tuple[str, str]:
    """(dmarc result, requested disposition: none, quarantine or reject)."""
    if policy is None:
        return "none", "none"
    if aligned(spf.domain, from_domain, policy.aspf) or any(
            aligned(d.domain, from_domain, policy.adkim) for d in dkims):
        return "pass", "none"
    # §6.6.2: no aligned pass, but an aligned identifier's check failed for now: DMARC cannot
    # conclude, so no policy applies (a DNS timeout must never reject mail)
    if spf.result == "temperror" and aligned(_spf_domain(spf), from_domain, policy.aspf) or any(
            d.result == "temperror" and aligned(_prop(d, "d"), from_domain, policy.adkim)
            for d in dkims):
        return "temperror", "none"
    requested = published(policy, at_org, from_domain)
    if policy.pct < 100 and random.random() * 100 >= policy.pct:
        # §6.6.4: outside the sampled share, the next less strict policy applies
        requested = POLICIES[max(0, POLICIES.index(requested) - 1)]
    return "fail", requested


def _prop(result: Result, name: str) -> str:
    return next((value.lower() for _, prop, value in result.props if prop == name), "")


def _spf_domain(spf: Result) -> str:
    """The domain SPF checked: MAIL FROM's, or HELO's for the null sender (RFC 7489 §3.1.2)."""
    mailfrom = _prop(spf, "mailfrom")
    return mailfrom.rpartition("@")[2] if mailfrom else _prop(spf, "helo")


def judge(from_domain: str, from_problem: str, found: tuple[Policy | None, bool, str],
          spf: Result, dkims: list[Result]) -> tuple[Result, str]:
    """The dmarc Result and the disposition the From domain asks for; `found` is what
    find_policy returned (looked up while SPF and DKIM ran)."""
    if from_problem:
        return Result("dmarc", "permerror", from_problem), "none"
    policy, at_org, problem = found
    props = (("header", "from", from_domain),)
    if problem:
        word, _, why = problem.partition(": ")
        return Result("dmarc", word, why, props), "none"
    result, disposition = evaluate(from_domain, policy, at_org, spf, dkims)
    if policy is None:
        return Result("dmarc", result, "no policy", props), disposition
    return Result("dmarc", result, f"p={policy.p} sp={policy.sp} dis={disposition}",
                  props + (("policy", "dmarc", published(policy, at_org, from_domain)),)), \
        disposition
