"""Prometheus metrics (prometheus-client), named per Prometheus conventions, with units.

Every filter is measured by the pipeline itself (verdicts and duration by filter name), so a
filter added later needs no wiring here. Exposition runs in prometheus-client's own thread.
"""
from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from mailgate.pipeline import FilterResult

SIZE_BUCKETS = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20)

SESSIONS = Counter("mailgate_sessions_total", "Client sessions by listener and outcome",
                   ["listener", "result"])
SESSIONS_ACTIVE = Gauge("mailgate_sessions_active", "Client sessions open now", ["listener"])
MESSAGES = Counter("mailgate_messages_total", "Messages after DATA by outcome "
                   "(delivered, partial, deferred, rejected)", ["listener", "result"])
RECIPIENTS = Counter("mailgate_recipients_total", "Recipients by outcome (sent, deferred, "
                     "bounced, discarded; rejected = refused at RCPT)", ["result"])
MESSAGE_BYTES = Histogram("mailgate_message_size_bytes", "Size of received messages",
                          buckets=SIZE_BUCKETS)
MESSAGE_SECONDS = Histogram("mailgate_message_processing_seconds",
                            "From end of DATA to the reply (filters and delivery)")
DELIVERY_SECONDS = Histogram("mailgate_delivery_duration_seconds",
                             "Time spent handing a message to Dovecot or the maildir", ["relay"])
LMTP_IN_USE = Gauge("mailgate_lmtp_connections_in_use", "LMTP pool connections in use")
LMTP_POOL_SIZE = Gauge("mailgate_lmtp_connections_max", "LMTP pool size")
FALLBACK = Counter("mailgate_fallback_deliveries_total", "Maildir fallback attempts by result",
                   ["result"])
FILTER_VERDICTS = Counter("mailgate_filter_verdicts_total", "Per-recipient verdicts by filter",
                          ["filter", "action"])
FILTER_SECONDS = Histogram("mailgate_filter_duration_seconds", "Time each filter took", ["filter"])
AUTH_RESULTS = Counter("mailgate_auth_results_total", "Authentication results by method (spf, "
                       "dkim per signature, dmarc, arc) and RFC 8601 result", ["method", "result"])
AUTH_FORGED = Counter("mailgate_auth_forged_headers_removed_total",
                      "Incoming Authentication-Results claiming our authserv-id, removed")
DNS_SECONDS = Histogram("mailgate_dns_lookup_seconds", "DNS queries sent (cache misses) by type",
                        ["type"], buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
DNS_FAILURES = Counter("mailgate_dns_failures_total", "DNS lookups without an answer "
                       "(timeout, error: SERVFAIL/REFUSED, budget: the message's budget spent)",
                       ["reason"])
DNS_CACHE = Counter("mailgate_dns_cache_total", "DNS lookups answered from the cache or not",
                    ["result"])
OUTBOUND = Counter("mailgate_outbound_total", "Mail mailgate sent itself (auto-reply, forward, "
                   "bounce-notice) by result", ["kind", "result"])
STORE_UNAVAILABLE = Counter("mailgate_store_unavailable_total", "Recipients a filter could not "
                            "look up in the store, by what it did instead", ["filter", "outcome"])
PARSE_FAILURES = Counter("mailgate_parse_failures_total", "Messages delivered unparsed")
LOOKUPS = Counter("mailgate_lookups_total", "Postfix socketmap lookups by answer (ok, notfound, "
                  "temp, perm)", ["result"])
ERRORS = Counter("mailgate_errors_total", "Internal errors turned into 451", ["where"])
LOOP_TICK = 0.01  # seconds between the event loop's heartbeats
EVENT_LOOP_LAG = Histogram("mailgate_event_loop_lag_seconds",
                           "How late a 10 ms timer on the event loop fires: work that holds the "
                           "loop delays every session by as much",
                           buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


@functools.lru_cache(maxsize=512)
def child(metric, *labels: str):
    """metric.labels(*labels), looked up once: labels() showed in the benchmark's profile."""
    return metric.labels(*labels)


def observe_filter(name: str, result: FilterResult, seconds: float) -> None:
    child(FILTER_SECONDS, name).observe(seconds)
    for verdict in result.verdicts.values():
        child(FILTER_VERDICTS, name, verdict.action.name.lower()).inc()


async def watch_event_loop() -> None:
    """Observe the event loop's lag every LOOP_TICK until cancelled."""
    while True:
        started = time.monotonic()
        await asyncio.sleep(LOOP_TICK)
        EVENT_LOOP_LAG.observe(max(0.0, time.monotonic() - started - LOOP_TICK))


def serve(address: str) -> None:
    """Start the exposition server in a daemon thread ("" = off)."""
    if address:
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]"))
