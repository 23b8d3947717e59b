"""mailgate sync's own Prometheus metrics, served on sync.metrics (serve has its own port).

Counted by outcome, never by message id: a queue's backlog shows as lag, not as new series.
"""
from __future__ import annotations

from prometheus_client import Counter, Histogram

LAG_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

MESSAGES = Counter("mailgate_sync_messages_total", "SQS messages handled, by queue and outcome "
                   "(delivered, partial, deferred, dead_letter, skipped)", ["queue", "result"])
RECIPIENTS = Counter("mailgate_sync_recipients_total", "Recipients by outcome (delivered, "
                     "duplicate, refused, deferred, foreign)", ["result"])
HEADER_RECIPIENTS = Counter("mailgate_sync_header_recipients_total",
                            "Messages whose recipients came from header To/Cc (last resort)")
QUEUE_LAG = Histogram("mailgate_sync_queue_lag_seconds", "From SQS SentTimestamp to receive",
                      ["queue"], buckets=LAG_BUCKETS)
S3_BYTES = Counter("mailgate_sync_s3_bytes_total", "Bytes read from S3")
INJECT_SECONDS = Histogram("mailgate_sync_injection_seconds",
                           "One SMTP transaction into mailgate serve")
ERRORS = Counter("mailgate_sync_errors_total", "Failures by where they happened "
                 "(s3, sqs, inject, store, tag)", ["where"])
