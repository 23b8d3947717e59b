"""Queue ids and the Received header (RFC 5321 §4.4) mailgate prepends to every message."""
from __future__ import annotations

import email.utils
import itertools
import os
import re
import time

from mailgate.message import Client

_sequence = itertools.count()
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")


def queue_id() -> str:
    """Postfix-like: hex, unique per process and time, sortable within a second."""
    return f"{int(time.time()) & 0xFFFFF:05X}{os.getpid() & 0xFFF:03X}{next(_sequence) & 0xFFFFF:05X}"


def protocol_word(listener: str, client_proto: str, smtputf8: bool) -> str:
    """The Received "with" word: LMTP, or the client's (E)SMTP; UTF8 forms per RFC 6531 §3.7.3."""
    word = "LMTP" if listener == "LMTP" else client_proto
    return f"UTF8{word.removeprefix('E')}" if smtputf8 and word in ("ESMTP", "LMTP") else word


def _clean(text: str, limit: int = 255) -> str:
    return _UNPRINTABLE.sub("?", text)[:limit]


def received(client: Client, hostname: str, proto: str, queue_id: str,
             recipients: tuple[str, ...]) -> bytes:
    helo = _clean(client.helo) or "unknown"
    line = (f"Received: from {helo} ({_clean(client.name)} [{_clean(client.addr, 64)}])\r\n"
            f"\tby {hostname} (mailgate) with {proto} id {queue_id}")
    if len(recipients) == 1:
        line += f"\r\n\tfor <{_clean(recipients[0], 320)}>"
    return f"{line}; {_date()}\r\n".encode()


_date_cache: list = [-1, ""]


def _date() -> str:
    """RFC 5322 date of now, formatted once per second (it showed in the profile)."""
    second = int(time.time())
    if second != _date_cache[0]:
        _date_cache[:] = [second, email.utils.formatdate(second, localtime=True)]
    return _date_cache[1]
