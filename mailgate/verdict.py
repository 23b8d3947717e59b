"""Verdicts a filter can reach, and the one table that turns outcomes into SMTP/LMTP replies.

Every reply mailgate sends is a named `Reply` from this module; tests import the same names.
Replies carry RFC 3463 enhanced status codes, because mailgate advertises ENHANCEDSTATUSCODES.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    status: str  # RFC 3463 enhanced status code, e.g. "4.3.0"
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.status, text)

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def ok(self) -> bool:
        return self.code < 400


# The reply table, by severity within each class. Texts follow Postfix where it has one.
DATA_GO_AHEAD = Reply(354, "", "End data with <CR><LF>.<CR><LF>")  # no status: not final
OK = Reply(250, "2.0.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
DELIVERED = Reply(250, "2.0.0", "Ok: queued as {queue_id}")
DISCARDED = Reply(250, "2.0.0", "Ok: discarded")
XFORWARD_OK = Reply(250, "2.0.0", "Ok")
FEED_OK = Reply(250, "2.0.0", "Ok: feed session")
CLOSING = Reply(221, "2.0.0", "Bye")

SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_SESSIONS = Reply(421, "4.3.2", "Too many connections, try again later")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
TEMP_FAILURE = Reply(451, "4.3.0", "Error: temporary failure, try again later")
MESSAGE_TIMEOUT = Reply(451, "4.4.7", "Error: message processing took too long, try again later")
DELIVERY_DEFERRED = Reply(451, "4.3.0", "Error: delivery failed, try again later")
OUTCOME_UNKNOWN = Reply(451, "4.4.2", "Error: Dovecot did not confirm delivery, try again later")
USERDB_UNAVAILABLE = Reply(451, "4.4.3", "Recipient address verification unavailable, try again later")
FILTER_DEFERRED = Reply(451, "4.7.1", "Try again later")
FORWARD_DEFERRED = Reply(451, "4.4.0", "Error: forwarding failed, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")

BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
BAD_ARGUMENTS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_SEQUENCE = Reply(503, "5.5.1", "Error: bad sequence of commands")
FEED_DENIED = Reply(535, "5.7.8", "Error: feed authentication failed")
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: User unknown")
RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
XFORWARD_DENIED = Reply(550, "5.7.0", "Error: insufficient authorization")
BARE_NEWLINE = Reply(550, "5.5.2", "Error: bare <CR> or <LF> received")
FILTER_REJECTED = Reply(550, "5.7.1", "Message rejected")
DMARC_REJECTED = Reply(550, "5.7.1", "Message rejected: the From domain's DMARC policy says reject")
SENDER_BLOCKED = Reply(550, "5.7.1", "Sender address rejected: blocked by the recipient")
TOO_BIG = Reply(552, "5.3.4", "Error: message file too big")
BAD_PARAMETER = Reply(555, "5.5.4", "Unsupported option")

# Some replies are written as plain text without an enhanced status code; this gives them one.
_ENHANCED_BY_CODE = {
    "221": "2.0.0", "250": "2.0.0", "252": "2.0.0", "421": "4.3.0", "451": "4.3.0",
    "454": "4.7.0",  # STARTTLS: "TLS not available" (we never offer it; RFC 3207 §4)
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "550": "5.0.0", "552": "5.3.4", "553": "5.1.3", "554": "5.0.0",
    "555": "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}\b")


def enhance(line: str) -> str:
    """Give one reply line an enhanced status code if it has none (RFC 2034 §3)."""
    if _HAS_ENHANCED.match(line):
        return line
    status = _ENHANCED_BY_CODE.get(line[:3])
    if status is None or line[3:4] not in (" ", "-", ""):
        return line
    if line[:3] == "552":  # size refusals: one wording, ours
        return str(TOO_BIG)
    return f"{line[:3]}{line[3:4] or ' '}{status} {line[4:]}".rstrip()


class Action(enum.IntEnum):
    """What a filter decided for one recipient; higher values win when filters disagree."""
    CONTINUE = 0   # no opinion: the next filter decides
    ACCEPT = 1     # deliver; later filters still run (they may annotate)
    REDIRECT = 2   # deliver to other addresses instead (or as well: keep_copy)
    DISCARD = 3    # accept and drop, logged (e.g. a blocklisted sender)
    DEFER = 4      # 4xx: the sender retries
    REJECT = 5     # 5xx: the sender bounces


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: str = ""
    reply: Reply | None = None      # overrides the default reply for DEFER/REJECT
    redirect_to: tuple[str, ...] = ()  # REDIRECT: local mailboxes or external addresses
    keep_copy: bool = False         # REDIRECT: the recipient's own mailbox gets a copy too
    content: bytes | None = None    # REDIRECT: deliver these bytes instead (a rewritten bounce)

    def default_reply(self) -> Reply:
        if self.reply is not None:
            return self.reply
        if self.action is Action.REJECT:
            return FILTER_REJECTED
        if self.action is Action.DEFER:
            return FILTER_DEFERRED
        if self.action is Action.DISCARD:
            return DISCARDED
        return OK


CONTINUE = Verdict(Action.CONTINUE)
