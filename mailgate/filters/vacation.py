"""`vacation`: out-of-office replies, as RFC 3834 and Dovecot Pigeonhole's vacation send them.

No reply to the null sender, to automatic or list mail, to system senders, nor to mail that does
not name the recipient in To/Cc/Bcc/Resent-*, nor to a sender `auth` found forged (SPF fail or
softfail, DMARC fail, quarantined) or mail SES found failing SPF, DMARC, spam or virus checks
(the SES feed's verdicts); at most one per sender per `[vacation] period`, claimed in
the store only once the recipient's copy is durable (hosts sharing the store share the memory).
The reply is built by the stdlib email package. Store unreachable or slow, or a message this
filter cannot read: no reply; the message is delivered as ever. This filter never changes a
verdict (CONTINUE, never a 451).
"""
from __future__ import annotations

import asyncio
import datetime
import email.errors
import email.header
import email.message
import email.policy
import email.utils
import hashlib
import logging
import re
import time

from mailgate import metrics
from mailgate.config import Config
from mailgate.message import Message
from mailgate.outbound import OutboundMail
from mailgate.pipeline import FilterResult
from mailgate.store import Rule, StoreUnavailable
from mailgate.verdict import Action, Verdict

log = logging.getLogger("mailgate.vacation")

DEFAULT_BODY = "I am away and will read your message when I am back.\n"
LIST_HEADERS = ("List-Id", "List-Help", "List-Subscribe", "List-Unsubscribe", "List-Post",
                "List-Owner", "List-Archive")
ADDRESS_HEADERS = ("To", "Cc", "Bcc", "Resent-To", "Resent-Cc", "Resent-Bcc")
# Senders that are programs (RFC 3834 §2, Pigeonhole's list, and the usual no-reply names).
SYSTEM_SENDER = re.compile(
    r"^(mailer-daemon([-+].*)?|listserv|majordomo|owner-.*|.*-request|.*-owner|"
    r"no[-_.]?reply([-+].*)?|do[-_.]?not[-_.]?reply([-+].*)?|bounces?([-+].*)?)@", re.IGNORECASE)
CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")
AUTO_KEYWORD = re.compile(r"[^\s;(]*")
MSGID = re.compile(r"<[^<>\s]+>")
SUBJECT_LIMIT = 200  # characters of the reply's subject, before encoding
REFERENCES_KEPT = 10
REMEMBERED = 300.0   # seconds a "replied already" answer from the store is reused here
REMEMBERED_MAX = 10_000
# What `auth` found (Message.findings) that makes the sender unproven: a reply would go to
# whoever the forger named (backscatter).
UNPROVEN = frozenset({("spf", "fail"), ("spf", "softfail"), ("dmarc", "fail"),
                      ("quarantine", "dmarc")})
# What SES vouched for on the feed (Envelope.feed_verdicts, set only for a trusted feed
# session): mail it found forged, spam or infected gets no reply either.
FEED_UNPROVEN = frozenset({("x-ses-spf", "fail"), ("x-ses-dmarc", "fail"),
                           ("x-ses-spam", "fail"), ("x-ses-virus", "fail")})
BUDGET_SHARE = 0.8   # of pipeline.filter_timeout: past it no reply, before the pipeline's 451


def why_not(message: Message, recipient: str) -> str:
    """Why no reply may go to this message's sender for `recipient`; "" when one may."""
    sender, headers = message.envelope.sender, message.headers
    if not sender:
        return "null sender"
    unproven = next((f"{m}={r}" for m, r in message.findings if (m, r) in UNPROVEN), "") or \
        next((f"{m}={r}" for m, r in message.envelope.feed_verdicts if (m, r) in FEED_UNPROVEN), "")
    if unproven:
        return f"sender not authenticated ({unproven})"
    auto = header_text(headers, "Auto-Submitted").strip()
    # RFC 3834 §5: the keyword, then parameters or a comment: "no (written by hand)" is no
    if auto and AUTO_KEYWORD.match(auto)[0].lower() != "no":
        return f"Auto-Submitted: {clean(auto)[:40]}"
    listed = next((h for h in LIST_HEADERS if h in headers), None)
    if listed:
        return f"list mail ({listed})"
    # the keyword, whatever its case and the comment or spaces around it ("Bulk (digest)")
    precedence = AUTO_KEYWORD.match(header_text(headers, "Precedence").strip())[0].lower()
    if precedence in ("bulk", "list", "junk"):
        return f"Precedence: {precedence}"
    if not sender.isascii():  # an SMTPUTF8 address cannot be written in a plain header
        return "internationalized sender address"
    if SYSTEM_SENDER.match(sender):
        return f"system sender <{sender}>"
    if sender.lower() == recipient.lower():
        return "sent by the recipient"
    named = {a.lower() for _, a in email.utils.getaddresses(
        [str(v) for h in ADDRESS_HEADERS for v in headers.get_all(h, [])])}
    if recipient.lower() not in named:
        return "recipient not in To/Cc/Bcc/Resent-*"
    return ""


def active(rule: Rule, now: datetime.datetime) -> bool:
    """Inside the rule's start/end (ISO 8601; a date alone covers that whole day, local time)."""
    start = _bound(rule.start, now, end=False)
    end = _bound(rule.end, now, end=True)
    return (start is None or start <= now) and (end is None or now < end)


def _bound(text: str, now: datetime.datetime, end: bool) -> datetime.datetime | None:
    if not text:
        return None
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        log.warning("vacation: unreadable date %r ignored", text)
        return None
    if end and len(text) == 10:  # a date: through the end of that day
        when += datetime.timedelta(days=1)
    return when if when.tzinfo else when.replace(tzinfo=now.tzinfo)


def clean(text: str) -> str:
    """One line of text: controls (CR, LF, NUL, ...) become spaces; whitespace collapsed."""
    return " ".join(CONTROLS.sub(" ", text).split())


def header_text(headers: email.message.Message, name: str) -> str:
    """A header's value as str, "" when absent. Raw 8-bit bytes (RFC 6532) are read as UTF-8:
    compat32 would give an email.header.Header object, which has no str methods."""
    value = headers.get(name)
    if value is None or isinstance(value, str):
        return value or ""
    # XXX compat32 keeps the raw bytes as surrogates and wraps them in a Header of charset
    # unknown-8bit, whose str() is mojibake: read the stored value back as bytes instead.
    raw = next((str(v) for k, v in headers.raw_items() if k.lower() == name.lower()), "")
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def decoded(value: str | None) -> str:
    """A header's text with RFC 2047 words decoded; undecodable words are kept as they are."""
    if not value:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(value))))
    except (email.errors.HeaderParseError, UnicodeError, LookupError, ValueError):
        return str(value)


def build_reply(message: Message, recipient: str, rule: Rule, hostname: str) -> bytes:
    """The auto-reply (RFC 3834 §3): headers set one by one, encoded by the email package."""
    headers = message.headers
    reply = email.message.EmailMessage(policy=email.policy.SMTP)
    reply["From"] = recipient
    reply["To"] = message.envelope.sender
    subject = clean(rule.subject) or "Auto: " + clean(decoded(header_text(headers, "Subject")))
    reply["Subject"] = subject[:SUBJECT_LIMIT].rstrip()
    reply["Date"] = email.utils.formatdate(localtime=True)
    reply["Message-ID"] = email.utils.make_msgid(domain=hostname)
    original = MSGID.findall(str(headers.get("Message-ID") or ""))[:1]
    if original:
        reply["In-Reply-To"] = original[0]
        earlier = MSGID.findall(str(headers.get("References") or headers.get("In-Reply-To") or ""))
        reply["References"] = " ".join((earlier + original)[-REFERENCES_KEPT:])
    reply["Auto-Submitted"] = "auto-replied (vacation)"
    body = rule.body or DEFAULT_BODY
    reply.set_content(body, cte="7bit" if body.isascii() else "quoted-printable")
    return reply.as_bytes()


def memory_key(recipient: str, sender: str, rule: Rule) -> str:
    """Per recipient, sender and notice: a changed notice answers everyone once more."""
    notice = hashlib.sha256(f"{rule.subject}\0{rule.body}\0{rule.start}\0{rule.end}".encode())
    return f"vacation:{recipient.lower()}:{sender.lower()}:{notice.hexdigest()[:12]}"


class Vacation:
    name = "vacation"
    needs_headers = True

    def __init__(self, config: Config, resources):
        self.store = resources.store
        self.hostname = config.hostname
        self.period = config.vacation.period
        self.budget = config.pipeline.filter_timeout * BUDGET_SHARE
        # "Replied already" stays true until the period ends, so it may be reused for a while:
        # a sender who writes often costs no store call per message. "Not yet" is never kept.
        self.replied: dict[str, float] = {}

    async def check(self, message: Message) -> FilterResult:
        """Never a 451: a slow store or a message this filter cannot read means no reply."""
        try:
            async with asyncio.timeout(self.budget):
                return await self._check(message)
        except TimeoutError:
            why = f"store slower than {self.budget:g} s"
            log.warning("%s: vacation: no reply to anyone: %s", message.envelope.queue_id, why)
        # XXX a bug reading an unusual message must cost the reply, not the delivery: raised,
        # the pipeline would defer every recipient, and the sender's retries meet it again.
        except Exception as e:  # noqa: BLE001
            why = f"failed ({type(e).__name__}: {e})"[:200]
            log.exception("%s: vacation: no reply to anyone: %s", message.envelope.queue_id, why)
        return FilterResult({r: Verdict(Action.CONTINUE, f"vacation: no reply: {why}")
                             for r in message.envelope.recipients})

    async def _check(self, message: Message) -> FilterResult:
        recipients = message.envelope.recipients
        try:
            rules = await self.store.rules(recipients)
        except StoreUnavailable as e:
            log.warning("%s: vacation: no reply to anyone: store unavailable (%s)",
                        message.envelope.queue_id, e)
            metrics.child(metrics.STORE_UNAVAILABLE, "vacation", "no_reply").inc()
            return FilterResult({r: Verdict(Action.CONTINUE, f"vacation: no reply: store "
                                            f"unavailable ({e})") for r in recipients})
        verdicts: dict[str, Verdict] = {}
        replies: list[OutboundMail] = []
        now = datetime.datetime.now().astimezone()
        away = [(rcpt, rule) for rcpt in recipients
                if (rule := rules.get(rcpt) or rules.get(rcpt.lower())) is not None
                and rule.vacation and active(rule, now)]
        if len(away) == 1:  # the usual case: no task
            answers = [await self._reply(message, *away[0])]
        else:  # each asks the store: at once, so many recipients take as long as one
            answers = await asyncio.gather(*(self._reply(message, *a) for a in away))
        for (rcpt, _), (why, mail) in zip(away, answers):
            log.info("%s: vacation for <%s>: %s", message.envelope.queue_id, rcpt, why)
            verdicts[rcpt] = Verdict(Action.CONTINUE, f"vacation: {why}")
            if mail is not None:
                replies.append(mail)
        return FilterResult(verdicts, outbound=tuple(replies))

    async def _replied(self, key: str) -> bool:
        now = time.monotonic()
        if self.replied.get(key, 0.0) > now:
            return True
        if not await self.store.seen(key):
            return False
        if len(self.replied) >= REMEMBERED_MAX:
            self.replied.clear()
        self.replied[key] = now + min(REMEMBERED, self.period)
        return True

    async def _reply(self, message: Message, rcpt: str,
                     rule: Rule) -> tuple[str, OutboundMail | None]:
        why = why_not(message, rcpt)
        if why:
            return f"no reply: {why}", None
        sender = message.envelope.sender
        key = memory_key(rcpt, sender, rule)
        try:
            if await self._replied(key):
                return f"no reply: one went to <{sender}> within the period", None
        except StoreUnavailable as e:
            return f"no reply: store unavailable ({e})", None
        try:
            data = build_reply(message, rcpt, rule, self.hostname)
        except (ValueError, TypeError, email.errors.MessageError) as e:
            # XXX a sender or subject the email package cannot encode: no reply, delivery goes on
            return f"no reply: cannot build it ({type(e).__name__}: {e})", None
        return f"reply to <{sender}> once delivered", OutboundMail(
            rcpt, "", (sender,), data, "auto-reply", key, self.period)
