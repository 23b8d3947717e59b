"""The LMTP listener (RFC 2033): the SMTP session with LHLO for HELO/EHLO and one reply per
recipient after DATA, also for aiosmtpd's own DATA errors."""
from __future__ import annotations

from mailgate.server import SMTPServer
from mailgate.verdict import BAD_SYNTAX, enhance


class LMTPServer(SMTPServer):
    """LMTP (RFC 2033): LHLO instead of HELO/EHLO; the Gateway answers per recipient."""

    protocol_name = "LMTP"
    greeting = "mailgate"

    replies_due = 0  # recipients awaiting a reply after DATA

    async def smtp_DATA(self, arg: str | None) -> None:
        self.replies_due = 0 if arg else len(self.envelope.rcpt_tos)
        try:
            await super().smtp_DATA(arg)
        finally:
            self.replies_due = 0

    async def push(self, status) -> None:
        """aiosmtpd's own DATA errors (552, line too long) are one line: LMTP needs one each.
        The replies to DATA are given once; what follows them (421 at shutdown) is one line."""
        if self.replies_due and isinstance(status, str) and status[:1] in "245":
            if self.replies_due > 1 and "\r\n" not in status and status[:1] in "45":
                status = "\r\n".join([enhance(status)] * self.replies_due)
            self.replies_due = 0
        await super().push(status)

    async def smtp_LHLO(self, hostname: str) -> None:
        await self._ehlo(hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        await self.reply(BAD_SYNTAX.with_text('Error: command "HELO" not recognized'))

    async def smtp_EHLO(self, hostname: str) -> None:
        await self.reply(BAD_SYNTAX.with_text('Error: command "EHLO" not recognized'))
