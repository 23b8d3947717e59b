"""blocklist: senders each recipient has blocked (`*@spam.test`, `*.bad.test`, `eve@x.test`).

Matched case-insensitively, an internationalized domain in its ASCII form (A-labels) on both
sides, so `*@bücher.test` blocks `eve@xn--bcher-kva.test` and the reverse.

A blocked recipient's copy is discarded (250: no backscatter; logged with the pattern) or, with
`[blocklist] action = "reject"`, refused with 550 5.7.1 — at RCPT already, so an SMTP client
gets the refusal per recipient. One batch read per message. The store unreachable for an
address never read: that recipient is not checked, its mail delivered (fails open), logged.
"""
from __future__ import annotations

import functools
import logging
import re

from mailgate import metrics
from mailgate.address import a_labels
from mailgate.config import Config
from mailgate.message import Message
from mailgate.pipeline import FilterResult
from mailgate.store import StoreUnavailable
from mailgate.verdict import SENDER_BLOCKED, Action, Verdict

log = logging.getLogger("mailgate.filters.blocklist")
_FORBIDDEN = re.compile(r"[\s<>,;\"()\[\]\\\x00-\x1f\x7f]")


def check_pattern(pattern: str) -> str:
    """The pattern as stored (lower case; `@domain`, Postfix's access-map form, as
    `*@domain`), or ValueError saying what is wrong with it."""
    pattern = pattern.strip().lower()
    if not pattern or _FORBIDDEN.search(pattern):
        raise ValueError(f"{pattern!r}: a pattern is an address with * wildcards, no spaces")
    if "@" not in pattern and not pattern.startswith("*."):
        raise ValueError(f"{pattern!r}: use *@domain, *.domain or an address")
    if pattern.startswith("@"):
        pattern = "*" + pattern
    if "@" in pattern and not pattern.rpartition("@")[2].strip("."):
        raise ValueError(f"{pattern!r}: no domain after the @")
    if not pattern.strip("*@."):
        raise ValueError(f"{pattern!r} would block every sender")
    return pattern


def glob_match(pattern: str, text: str) -> bool:
    """Whether `text` is `pattern`, where `*` is any run of characters (dots and @ too) and
    everything else is literal. Two pointers, going back only to the last `*`: at most
    len(pattern) x len(text) steps, whatever the pattern (a regex of several `.*` backtracks
    for seconds, on the event loop, on a sender the attacker chooses)."""
    p = t = 0
    star, resume = -1, 0   # the last * seen, and where in text it next resumes
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star, resume = p, t
            p += 1
        elif p < len(pattern) and pattern[p] == text[t]:
            p += 1
            t += 1
        elif star >= 0:    # let the last * take one more character
            resume += 1
            p, t = star + 1, resume
        else:
            return False
    return pattern[p:].strip("*") == ""


def comparable(address: str) -> str:
    """A sender or a pattern as they are compared: lower case, the domain in A-labels."""
    local, at, domain = address.lower().rpartition("@")
    return local + at + a_labels(domain)


@functools.lru_cache(maxsize=4096)
def _comparable_pattern(pattern: str) -> str:
    return comparable(pattern)


def first_match(sender: str, patterns: tuple[str, ...]) -> str | None:
    """The first pattern the sender matches (case-insensitively, an internationalized domain in
    either form); the null sender <> matches none."""
    if not sender:
        return None
    sender = comparable(sender)
    return next((p for p in patterns if glob_match(_comparable_pattern(p), sender)), None)


class Blocklist:
    name = "blocklist"
    needs_headers = False   # the envelope sender is all it reads

    def __init__(self, config: Config, resources):
        self.store = resources.store
        self.reject = config.blocklist.action == "reject"

    async def check(self, message: Message) -> FilterResult:
        env = message.envelope
        try:
            found, unread = await self.store.blocked(env.recipients), frozenset()
        except StoreUnavailable as e:
            found = e.known
            unread = e.unread if e.unread is not None else frozenset(env.recipients) - set(found)
            for rcpt in unread:
                self._unchecked(env.queue_id, rcpt, e)
        verdicts = {rcpt: self._verdict(env.sender, rcpt, patterns)
                    for rcpt, patterns in found.items()}
        verdicts.update({rcpt: Verdict(Action.CONTINUE, "blocklist: not checked: store "
                                       "unavailable, address never read") for rcpt in unread})
        return FilterResult(verdicts)

    async def check_recipient(self, sender: str, rcpt: str) -> Verdict | None:
        """At RCPT, with action = reject: the refusal before DATA (None: decide after DATA)."""
        if not self.reject:
            return None
        try:
            patterns = (await self.store.blocked([rcpt])).get(rcpt, ())
        except StoreUnavailable as e:
            patterns = e.known.get(rcpt, ())
        verdict = self._verdict(sender, rcpt, patterns)
        if verdict.action is not Action.REJECT:
            return None
        log.info("%s: refused at RCPT", verdict.reason)
        return verdict

    def _verdict(self, sender: str, rcpt: str, patterns: tuple[str, ...]) -> Verdict:
        pattern = first_match(sender, patterns)
        if pattern is None:
            return Verdict(Action.CONTINUE, f"blocklist: <{sender}> matches none of "
                                            f"{len(patterns)} pattern(s) of <{rcpt}>")
        reason = f"blocklist: <{sender}> matches {pattern} blocked by <{rcpt}>"
        if self.reject:
            return Verdict(Action.REJECT, reason, SENDER_BLOCKED)
        return Verdict(Action.DISCARD, reason)

    @staticmethod
    def _unchecked(queue_id: str, rcpt: str, error: StoreUnavailable) -> None:
        log.warning("%s: blocklist: <%s> not checked, delivered: %s (address never read)",
                    queue_id, rcpt, error)
        metrics.child(metrics.STORE_UNAVAILABLE, "blocklist", "failed_open").inc()
