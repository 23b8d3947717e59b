"""mailgate sync's own Prometheus metrics, served on sync.metrics (serve has its own port).

Their own registry: the CLI imports serve's modules (and so serve's metrics) to validate the
config, and those would show here as zeros. Counted by outcome, never by message id.
"""
from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Histogram, PlatformCollector,
                               ProcessCollector, start_http_server)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

LAG_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

MESSAGES = Counter("mailgate_sync_messages_total", "SQS messages handled, by queue and outcome "
                   "(delivered, deferred, dead_letter, redrive, skipped)", ["queue", "result"],
                   registry=REGISTRY)
RECIPIENTS = Counter("mailgate_sync_recipients_total", "Recipients by outcome (delivered, "
                     "duplicate, refused, deferred, foreign)", ["result"], registry=REGISTRY)
HEADER_RECIPIENTS = Counter("mailgate_sync_header_recipients_total",
                            "Messages whose recipients came from header To/Cc (last resort)",
                            registry=REGISTRY)
QUEUE_LAG = Histogram("mailgate_sync_queue_lag_seconds", "From SQS SentTimestamp to receive",
                      ["queue"], buckets=LAG_BUCKETS, registry=REGISTRY)
S3_BYTES = Counter("mailgate_sync_s3_bytes_total", "Bytes read from S3", registry=REGISTRY)
INJECT_SECONDS = Histogram("mailgate_sync_injection_seconds",
                           "One SMTP transaction into mailgate serve", registry=REGISTRY)
ERRORS = Counter("mailgate_sync_errors_total", "Failures by where they happened "
                 "(s3, sqs, store, tag, internal)", ["where"], registry=REGISTRY)

def serve(host: str, port: int) -> None:
    """Exposition in prometheus-client's own thread."""
    start_http_server(port, addr=host, registry=REGISTRY)
