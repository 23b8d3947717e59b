"""A tiny filter for the operations tests: pipeline.filters = ["filters_for_ops:Gatekeeper"].

It rejects mail for local parts listed in GATEKEEPER_REJECT (default "carol") and accepts the
rest, so a test knows exactly which verdicts the per-filter metrics must count.
"""
from __future__ import annotations

import os

from mailgate.pipeline import FilterResult
from mailgate.verdict import Action, Verdict


class Gatekeeper:
    name = "gatekeeper"
    needs_headers = False

    def __init__(self, config, resources=None) -> None:
        self.reject = set(os.environ.get("GATEKEEPER_REJECT", "carol").split(","))

    async def check(self, message) -> FilterResult:
        verdicts = {}
        for rcpt in message.envelope.recipients:
            if rcpt.partition("@")[0] in self.reject:
                verdicts[rcpt] = Verdict(Action.REJECT, "gatekeeper says no")
            else:
                verdicts[rcpt] = Verdict(Action.ACCEPT, "gatekeeper says yes")
        return FilterResult(verdicts)
