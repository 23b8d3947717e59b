"""The secret mailgate sync presents to serve's listener (XFEED), from sync.secret_file.

Both processes read the same file. A missing or short file means no feed session is trusted:
serve refuses XFEED, and sync injects without SES's verdicts (logged at start).
"""
from __future__ import annotations

import logging

log = logging.getLogger("mailgate.feed")
MIN_LENGTH = 16


def feed_secret(path: str) -> bytes:
    """The secret, or b"" (logged) when it is not configured or not usable."""
    if not path:
        return b""
    try:
        with open(path, "rb") as f:
            secret = f.read(4096).strip()
    except OSError as e:
        log.error("sync.secret_file: %s: %s; no feed session is trusted", path, e.strerror)
        return b""
    if len(secret) < MIN_LENGTH or not secret.isascii() or b" " in secret:
        log.error("sync.secret_file: %s: needs %d or more printable characters, no spaces",
                  path, MIN_LENGTH)
        return b""
    return secret
