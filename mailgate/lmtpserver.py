"""The LMTP listener (RFC 2033): the SMTP session with LHLO for HELO/EHLO and one reply per
recipient after DATA, also for the refusals the session itself gives there."""
from __future__ import annotations

from mailgate.server import SMTPServer


class LMTPServer(SMTPServer):
    """LMTP (RFC 2033): LHLO instead of HELO/EHLO; the Gateway answers per recipient."""

    protocol_name = "LMTP"
    greeting = "mailgate"

    # HELO and EHLO are no LMTP verbs: 500, as any unknown command
    verbs = {"LHLO": "smtp_LHLO", **{verb: name for verb, name in SMTPServer.verbs.items()
                                     if verb not in ("HELO", "EHLO")}}

    def replies_after_data(self) -> int:
        return max(len(self.envelope.rcpt_tos), 1)

    def smtp_LHLO(self, hostname: str | None) -> None:
        if not hostname:
            self.write("501 Syntax: LHLO hostname")
            return
        self.smtp_EHLO(hostname)
