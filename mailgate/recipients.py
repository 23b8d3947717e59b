"""Who we take mail for, decided at RCPT time so that no bounce is generated later.

Domain not served: 550 5.7.1. Unknown user: 550 5.1.1, as Dovecot's userdb says (asked over the
LMTP pool with MAIL/RCPT/RSET, answers cached briefly). A mailbox that exists but that Dovecot
refuses now (full with lmtp_rcpt_check_quota, disabled, its policy): Dovecot's own reply, not
cached (Postfix's lookup refuses it in its session all the same: lookup.py). When Dovecot cannot
be asked, a recipient whose maildir exists is accepted (the fallback will take it); anyone else,
or a file system that does not answer within lmtp_timeout, gets 451 4.4.3.
"""
from __future__ import annotations

import asyncio
import time

from mailgate import maildir
from mailgate.address import fold
from mailgate.deliver import decided
from mailgate.config import Config
from mailgate.lmtppool import Pool
from mailgate.verdict import RCPT_OK, RELAY_DENIED, UNKNOWN_USER, USERDB_UNAVAILABLE, Reply


class Recipients:
    def __init__(self, config: Config, pool: Pool | None):
        self.pool = pool
        self.domains = config.domains
        self.template = config.maildir_template()
        self.ttl = config.delivery.recipient_cache
        self.lookup_timeout = config.delivery.lmtp_timeout
        self.cache: dict[str, tuple[float, Reply]] = {}

    async def check(self, address: str) -> Reply:
        domain = fold(address.rpartition("@")[2])
        if domain not in self.domains:
            return RELAY_DENIED
        key = fold(address)
        hit = self.cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        reply = await self._ask(address)
        if reply is RCPT_OK or reply is UNKNOWN_USER:  # who exists; not how full they are
            if len(self.cache) > 50_000:
                self.cache.clear()
            self.cache[key] = (time.monotonic() + self.ttl, reply)
        return reply

    async def _ask(self, address: str) -> Reply:
        if self.pool is None:  # maildir only: the maildirs are the user database
            exists = await self._has_maildir(address)
            return USERDB_UNAVAILABLE if exists is None else RCPT_OK if exists else UNKNOWN_USER
        answer = await self.pool.probe(address)
        if answer is not None and answer.code == 250:
            return RCPT_OK
        if answer is not None and answer.code >= 500 and answer.split()[0].startswith("5.1."):
            return UNKNOWN_USER
        if answer is not None and (answer.code >= 500 or decided(answer)):
            return Reply(answer.code, *answer.split())  # e.g. 552 5.2.2: full, not unknown
        return RCPT_OK if await self._has_maildir(address) else USERDB_UNAVAILABLE

    async def _has_maildir(self, address: str) -> bool | None:
        """Off the event loop: a slow or hung file system must not stall every session; one
        that does not answer within lmtp_timeout is "cannot say" (None), as Dovecot would be."""
        if not self.template:
            return False
        try:
            async with asyncio.timeout(self.lookup_timeout):
                return await asyncio.to_thread(maildir.exists, self.template, address,
                                               self.domains)
        except TimeoutError:
            return None
