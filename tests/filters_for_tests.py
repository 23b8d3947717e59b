"""Small filters the listener tests load as "filters_for_tests:Class" (tests/ on PYTHONPATH).

Each is the thing under test's neighbour, not test synchronisation: Slow is slow on purpose,
Boom is a filter bug, Tag shows whether the message was parsed.
"""
from __future__ import annotations

import asyncio

from mailgate.message import Message
from mailgate.pipeline import FilterResult
from mailgate.verdict import Action, Verdict

SLOW_SECONDS = 1.5


class _Filter:
    name = "test"
    needs_headers = False

    def __init__(self, config: object, resources: object = None):
        self.config = config


class Slow(_Filter):
    """Takes longer than a 1 s command_timeout, shorter than the default filter_timeout."""
    name = "slow"

    async def check(self, message: Message) -> FilterResult:
        await asyncio.sleep(SLOW_SECONDS)
        return FilterResult()


class SlowAtRcpt(_Filter):
    """Each RCPT check takes longer than a 1 s command_timeout (a slow store, say)."""
    name = "slow-at-rcpt"

    async def check(self, message: Message) -> FilterResult:
        return FilterResult()

    async def check_recipient(self, sender: str, rcpt: str) -> Verdict | None:
        await asyncio.sleep(SLOW_SECONDS)
        return None


class Boom(_Filter):
    name = "boom"

    async def check(self, message: Message) -> FilterResult:
        raise RuntimeError("boom: a filter bug, on purpose")


class Tag(_Filter):
    """Needs the parsed headers; says so in a header it adds."""
    name = "tag"
    needs_headers = True

    async def check(self, message: Message) -> FilterResult:
        subject = str(message.headers.get("Subject", ""))
        return FilterResult(headers=(f"X-Test-Tag: parsed {subject}\r\n".encode(),))


class RedirectCarolToBob(_Filter):
    """A forwarding rule in miniature: carol's copy goes to bob's mailbox instead."""
    name = "redirect"

    async def check(self, message: Message) -> FilterResult:
        return FilterResult({r: Verdict(Action.REDIRECT, "carol is away",
                                        redirect_to=("bob@example.test",))
                             for r in message.envelope.recipients if r == "carol@example.test"})


class BugAtRcpt(_Filter):
    """A bug that escapes at RCPT, for carol only: what it leaves of the transaction shows.
    (A filter's exception is caught there; a verdict that is not one is not.)"""
    name = "bug-at-rcpt"

    async def check(self, message: Message) -> FilterResult:
        return FilterResult()

    async def check_recipient(self, sender: str, rcpt: str) -> Verdict | None:
        return "not a verdict" if rcpt == "carol@example.test" else None  # type: ignore


class Cancels(_Filter):
    """A bug that leaks asyncio.CancelledError (not an Exception): at carol's RCPT, and in
    every message's check."""
    name = "cancels"

    async def check(self, message: Message) -> FilterResult:
        raise asyncio.CancelledError()

    async def check_recipient(self, sender: str, rcpt: str) -> Verdict | None:
        if rcpt == "carol@example.test":
            raise asyncio.CancelledError()
        return None


class FindsForgery(_Filter):
    """Finds what auth finds for a forged sender, and says so to the filters after it."""
    name = "finds"

    async def check(self, message: Message) -> FilterResult:
        return FilterResult(findings=(("spf", "fail"),))


class ShowsFindings(_Filter):
    """Says what the filters before it found (Message.findings)."""
    name = "shows"

    async def check(self, message: Message) -> FilterResult:
        seen = " ".join(f"{method}={result}" for method, result in message.findings) or "nothing"
        return FilterResult({r: Verdict(Action.CONTINUE, f"was told {seen}")
                             for r in message.envelope.recipients})
