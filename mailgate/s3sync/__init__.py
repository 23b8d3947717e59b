"""`mailgate sync`: the SES feed. SQS notifications name mail SES stored in S3; sync fetches it,
injects it into mailgate serve over SMTP like any client, and acknowledges only after serve's
250 (or a final 5xx). Everything lives in the submodules; this one stays light, because serve
imports the shared secret's reader from here.
"""
from __future__ import annotations


def command(args, config) -> int:
    """`mailgate sync [--once]` and `mailgate sync replay ...` (dispatched from __main__)."""
    from mailgate.s3sync.service import run
    return run(args, config)
