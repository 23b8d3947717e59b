"""A filter the SES feed tests load as "sync_filters:ShowFeed" (tests/ on PYTHONPATH).

It makes visible, as a header, which verdicts the listener put on the Envelope: the feed's
(method, result) pairs reach the pipeline only from a session that proved the secret.
"""
from __future__ import annotations

from mailgate.message import Message
from mailgate.pipeline import FilterResult


class ShowFeed:
    name = "show-feed"
    needs_headers = False

    def __init__(self, config: object, resources: object = None):
        self.config = config

    async def check(self, message: Message) -> FilterResult:
        pairs = "; ".join(f"{m}={r}" for m, r in message.envelope.feed_verdicts) or "none"
        return FilterResult(headers=(f"X-Test-Feed: {pairs}\r\n".encode(),))
