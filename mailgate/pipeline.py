"""The filter chain: built from `[pipeline] filters`, run in order for every message.

A filter is a small object with `async check(message) -> FilterResult`. The pipeline bounds each
filter in time and turns a filter that raises or times out into DEFER for every recipient
(451 4.3.0): our own failure is temporary, never a bounce and never a silent pass. What a filter
found (`findings`, e.g. auth's spf=fail) is handed to the filters after it on the message.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from mailgate import metrics
from mailgate.config import Config, ConfigError, Pipeline
from mailgate.message import Message
from mailgate.verdict import TEMP_FAILURE, Action, Verdict

if TYPE_CHECKING:
    from mailgate.outbound import OutboundMail
    from mailgate.resources import Resources

log = logging.getLogger("mailgate.pipeline")


@dataclass(frozen=True)
class FilterResult:
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # per recipient; absent = CONTINUE
    headers: tuple[bytes, ...] = ()   # complete header lines ("Name: value\r\n") to prepend
    # (start, end) byte spans of whole header fields of message.raw to remove before delivery:
    # only `auth` uses it, for forged Authentication-Results (RFC 8601 §5).
    drop: tuple[tuple[int, int], ...] = ()
    outbound: tuple[OutboundMail, ...] = ()  # sent once the recipient's copy is durable
    # (method, result) pairs for the filters after this one (Message.findings): auth's
    # ("spf", "fail"), ("dmarc", "fail"), ("quarantine", "dmarc"), ...
    findings: tuple[tuple[str, str], ...] = ()


class Filter(Protocol):
    """Built as `cls(config, resources)`; `resources` holds what filters share (DNS, store)."""
    name: str
    needs_headers: bool   # False: runs even when the message could not be parsed

    async def check(self, message: Message) -> FilterResult: ...


# Built-in filters by config name, imported only when configured. The usual order is
# auth (record verdicts first) -> bounce -> blocklist -> rules -> vacation (reply last).
FILTERS: dict[str, str] = {
    "auth": "mailgate.filters.auth:Auth",
    "bounce": "mailgate.filters.bounce:Bounce",
    "blocklist": "mailgate.filters.blocklist:Blocklist",
    "rules": "mailgate.filters.rules:Rules",
    "vacation": "mailgate.filters.vacation:Vacation",
}


def resolve_filters(names: tuple[str, ...]) -> list[type]:
    """Filter classes for the configured names; an unknown name is a config error."""
    return [_resolve(name) for name in names]


DNS_ROOM = 1.0  # seconds a filter keeps after its DNS budget, to work on the answers


def validate(config: Config) -> Config:
    """The config, once its filter names resolve: what mailgate.config (pure data) cannot check."""
    classes = resolve_filters(config.pipeline.filters)
    if any(getattr(cls, "uses_dns", False) for cls in classes):
        budget, timeout = config.dns.budget, config.pipeline.filter_timeout
        if budget + DNS_ROOM > timeout:
            raise ConfigError(f"dns.budget: {budget:g} s leaves no room inside pipeline."
                              f"filter_timeout ({timeout:g} s); keep it {DNS_ROOM:g} s shorter")
    return config


def _resolve(name: str) -> type:
    module, sep, attr = FILTERS.get(name, name).partition(":")
    if not sep:
        raise ConfigError(f"pipeline.filters: unknown filter {name!r} "
                          f"(known: {', '.join(sorted(FILTERS))}; or module:Class)")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"pipeline.filters: cannot load {name!r}: {e}") from None


@dataclass(frozen=True)
class Outcome:
    verdicts: dict[str, Verdict]      # final verdict per recipient
    headers: tuple[bytes, ...]
    drop: tuple[tuple[int, int], ...] = ()  # header spans of the raw message to remove
    outbound: tuple[OutboundMail, ...] = ()


class Chain:
    def __init__(self, filters: list[Filter], settings: Pipeline,
                 resources: Resources | None = None):
        self.filters = filters
        self.resources = resources  # for what the gateway does after the chain: forwards, replies
        self.timeout = settings.filter_timeout
        self.needs_parse = any(getattr(f, "needs_headers", True) for f in filters)

    @classmethod
    def from_config(cls, config: Config, resources: Resources) -> Chain:
        return cls([f(config, resources) for f in resolve_filters(config.pipeline.filters)],
                   config.pipeline, resources)

    async def run(self, message: Message) -> Outcome:
        verdicts = {r: Verdict(Action.CONTINUE) for r in message.envelope.recipients}
        headers: list[bytes] = []
        drop: set[tuple[int, int]] = set()
        outbound: list[OutboundMail] = []
        for position, flt in enumerate(self.filters, 1):
            if message.headers is None and getattr(flt, "needs_headers", True):
                log.info("%s: filter=%s skipped: %s", message.envelope.queue_id, flt.name,
                         message.parse_error)
                continue
            result = await self._run_one(flt, message)
            headers.extend(result.headers)
            drop.update(result.drop)
            outbound.extend(result.outbound)
            if result.findings and position < len(self.filters):  # Message is frozen: the
                # later filters get a new one (none is built after the last filter)
                message = dataclasses.replace(message, findings=message.findings + result.findings)
            for rcpt, verdict in result.verdicts.items():
                if rcpt in verdicts and verdict.action > verdicts[rcpt].action:
                    verdicts[rcpt] = verdict
        return Outcome(verdicts, tuple(headers), tuple(sorted(drop)), tuple(outbound))

    async def _run_one(self, flt: Filter, message: Message) -> FilterResult:
        started = time.perf_counter()
        try:  # asyncio.timeout, not wait_for: no extra task per filter and message (3.11)
            async with asyncio.timeout(self.timeout):
                result = await flt.check(message)
        except TimeoutError:
            result = self.defer_all(message, f"filter {flt.name} timed out")
        # XXX a filter bug must become a retry (451), never a 5xx nor a pass: catch all here.
        except Exception as e:  # noqa: BLE001
            log.exception("%s: filter=%s failed", message.envelope.queue_id, flt.name)
            result = self.defer_all(message, f"filter {flt.name} failed: {type(e).__name__}")
        metrics.observe_filter(flt.name, result, time.perf_counter() - started)
        return result

    @staticmethod
    def defer_all(message: Message, reason: str) -> FilterResult:
        """Every recipient deferred (451 4.3.0) for `reason`: a filter that failed or ran out
        of time (explain shows the same)."""
        verdict = Verdict(Action.DEFER, reason, TEMP_FAILURE)
        return FilterResult({r: verdict for r in message.envelope.recipients})

    async def check_recipient(self, sender: str, rcpt: str) -> Verdict | None:
        """At RCPT: the first refusal of a filter that can decide before DATA (an optional
        `check_recipient(sender, rcpt)`). A filter failing here only means "decide after DATA"."""
        for flt in self.filters:
            early = getattr(flt, "check_recipient", None)
            if early is None:
                continue
            try:
                async with asyncio.timeout(self.timeout):
                    verdict = await early(sender, rcpt)
            except TimeoutError:
                continue
            # XXX a filter bug at RCPT must not refuse anyone: its check after DATA still runs.
            except Exception:  # noqa: BLE001
                log.exception("filter=%s failed at RCPT for <%s>", flt.name, rcpt)
                continue
            if verdict is not None and verdict.action is Action.REJECT:
                metrics.child(metrics.FILTER_VERDICTS, flt.name, "reject").inc()
                return verdict
        return None
