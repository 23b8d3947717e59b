"""`rules`: forwarding per recipient, from the store (targets, with or without a local copy).

A recipient with forward targets gets a REDIRECT verdict; the gateway delivers it (forward.py).
No forward to the recipient itself or to an address already in a Delivered-To line (a loop);
a recipient whose address is already in one is not forwarded again. The store unreachable for
an address never read: 451 4.3.0 for that recipient (a user's redirect is never ignored) until
`[store] outage_budget` has passed since the outage began, then local delivery, logged.
"""
from __future__ import annotations

import email.utils
import logging
import re
import time

from mailgate import metrics
from mailgate.config import Config
from mailgate.message import Message
from mailgate.pipeline import FilterResult
from mailgate.store import Rule, StoreUnavailable
from mailgate.verdict import TEMP_FAILURE, Action, Verdict

log = logging.getLogger("mailgate.rules")
# Read from the raw header block, so forwarding also holds for mail too large to parse.
DELIVERED_TO = re.compile(rb"^Delivered-To:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)


def delivered_to(raw: bytes) -> set[str]:
    """The addresses in the message's Delivered-To lines, lower case."""
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[:end + 2]
    values = [v.decode("utf-8", "replace") for v in DELIVERED_TO.findall(head)]
    return {a.lower() for _, a in email.utils.getaddresses(values) if a}


def forwarding(recipient: str, rule: Rule, seen: set[str]) -> tuple[Verdict, list[str]]:
    """The verdict for a recipient with forward targets, and the targets left out as loops."""
    me = recipient.lower()
    if me in seen:
        return Verdict(Action.ACCEPT, f"rules: <{recipient}> forwarded this message before "
                                      "(Delivered-To): delivered here, not again"), []
    keep = rule.keep_copy or any(t.lower() == me for t in rule.forward)
    targets = [t for t in rule.forward if t.lower() != me]
    looped = [t for t in targets if t.lower() in seen]
    targets = [t for t in targets if t.lower() not in seen]
    if not targets:
        return Verdict(Action.ACCEPT, "rules: no forward target left: delivered here"), looped
    what = ", ".join(f"<{t}>" for t in targets) + (" and keep a copy" if keep else "")
    return Verdict(Action.REDIRECT, f"rules: forward to {what}", redirect_to=tuple(targets),
                   keep_copy=keep), looped


class Rules:
    name = "rules"
    needs_headers = False  # Delivered-To is read from the raw bytes

    def __init__(self, config: Config, resources):
        self.store = resources.store
        self.budget = config.store.outage_budget
        self.outage_since: float | None = None  # monotonic time of the first failed read

    async def check(self, message: Message) -> FilterResult:
        env = message.envelope
        error: Exception | None = None
        try:
            rules, unread = await self.store.rules(env.recipients), set()
            self.outage_since = None
        except StoreUnavailable as e:
            # What the store still knows (read before the outage) keeps serving those addresses.
            # An empty `unread` means every address was read before: none is deferred.
            rules = dict(getattr(e, "known", None) or {})
            told = getattr(e, "unread", None)
            unread = set(env.recipients if told is None else told)
            error = e
        verdicts: dict[str, Verdict] = {}
        seen: set[str] | None = None
        for rcpt in env.recipients:
            if rcpt in unread:
                verdicts[rcpt] = self._unread(env.queue_id, rcpt, error)
                continue
            rule = rules.get(rcpt) or rules.get(rcpt.lower())
            if rule is None or not rule.forward:
                continue
            seen = delivered_to(message.raw) if seen is None else seen
            verdicts[rcpt], looped = forwarding(rcpt, rule, seen)
            if looped:
                log.info("%s: rules: not forwarding <%s> to %s: already in Delivered-To (loop)",
                         env.queue_id, rcpt, ", ".join(looped))
        return FilterResult(verdicts)

    def _unread(self, queue_id: str, rcpt: str, error: Exception | None) -> Verdict:
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since = now
        if now - self.outage_since < self.budget:
            metrics.child(metrics.STORE_UNAVAILABLE, "rules", "deferred").inc()
            return Verdict(Action.DEFER, f"rules: store unavailable ({error}) and <{rcpt}> "
                                         "never read: try again later", TEMP_FAILURE)
        metrics.child(metrics.STORE_UNAVAILABLE, "rules", "delivered_locally").inc()
        log.warning("%s: rules: store unavailable for %.0f s (past store.outage_budget): "
                    "<%s> delivered locally, any forward rule not applied", queue_id,
                    now - self.outage_since, rcpt)
        return Verdict(Action.ACCEPT, "rules: store unavailable past outage_budget: "
                                      "delivered locally")
