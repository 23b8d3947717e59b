"""Who the client is: the peer, or the original client a trusted Postfix names (XFORWARD), and
whether the session is mailgate sync's (XFEED, proved by the shared secret).

Both commands are refused (550 5.7.0) from outside `trusted_networks`, and only allowed after
EHLO and before MAIL; what they set lasts one transaction. A transaction without XFORWARD ADDR
from a trusted peer is local mail, unless it passed XFEED: the feed's mail came from the
Internet, whether or not sync could name the client SES saw.
"""
from __future__ import annotations

import hmac

from mailgate.commands import XFORWARD_ATTRS, parse_xfeed, printable, xtext_decode
from mailgate.message import Client
from mailgate.verdict import (BAD_ARGUMENTS, BAD_SEQUENCE, FEED_DENIED, FEED_OK, XFORWARD_DENIED,
                              XFORWARD_OK)


class Forwarded:
    """The session's XFORWARD and XFEED verbs and the Client they describe (mixed into
    SMTPServer, which provides session, envelope, gateway, trusted, xforward, reply and
    helo_needed)."""

    feed_verdicts: tuple[tuple[str, str], ...] = ()  # set by XFEED, for one transaction
    fed: bool = False                                  # XFEED passed, for one transaction

    def client(self) -> Client:
        peer = self.session.peer
        addr = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        name = "localhost" if addr in ("127.0.0.1", "::1") else "unknown"
        fwd = self.xforward
        if "ADDR" in fwd:  # the original client's name is only what XFORWARD says
            name = "unknown"
        named = "ADDR" in fwd
        return Client(addr=fwd.get("ADDR", addr), name=fwd.get("NAME", name),
                      helo=fwd.get("HELO", self.session.host_name or ""),
                      proto=fwd.get("PROTO", "ESMTP" if self.session.extended_smtp else "SMTP"),
                      local=self.trusted and not named and not self.fed,
                      ident=fwd.get("IDENT", ""), origin_unknown=self.fed and not named)

    def _before_mail(self, allowed: bool) -> bool:
        """What XFORWARD and XFEED share: an allowed client, after EHLO, before MAIL."""
        if not allowed:
            self.reply(XFORWARD_DENIED)
            return False
        if self.helo_needed("EHLO"):
            return False
        if self.envelope.mail_from is not None:
            self.reply(BAD_SEQUENCE)
            return False
        return True

    def smtp_XFORWARD(self, arg: str | None) -> None:
        if not self._before_mail(self.trusted):
            return
        attrs = {}
        for item in (arg or "").split():
            name, eq, value = item.partition("=")
            if not eq or name.upper() not in XFORWARD_ATTRS:
                self.reply(BAD_ARGUMENTS, f"Bad XFORWARD attribute {name!r}: ")
                return
            if value not in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):   # no control characters
                attrs[name.upper()] = printable(xtext_decode(value))
        if not attrs and not arg:
            self.reply(BAD_ARGUMENTS)
            return
        self.xforward.update(attrs)
        self.reply(XFORWARD_OK)

    def smtp_XFEED(self, arg: str | None) -> None:
        """mailgate sync's session: its SES verdicts count. Trusted by the shared secret
        (sync.secret_file) from a trusted network, never by anything in the message."""
        secret = self.gateway.feed_secret
        if not self._before_mail(self.trusted and bool(secret)):
            return
        parsed = parse_xfeed(arg or "")
        if parsed is None:
            self.reply(BAD_ARGUMENTS)
            return
        if not hmac.compare_digest(parsed[0].encode("utf-8", "surrogateescape"), secret):
            self.reply(FEED_DENIED)
            return
        self.feed_verdicts, self.fed = parsed[1], True
        self.reply(FEED_OK)
