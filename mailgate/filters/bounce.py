"""`bounce`: an SES bounce (a DSN, RFC 3464) for a message we sent becomes a readable notice.

The DSN's returned Message-ID gives the SES message id; the outbound table says who sent that
message. Only a real bounce of it is acted on: null envelope sender (RFC 5321 §4.5.5; or
MAILER-DAEMON@, as a feed may report it), sent to where bounces of our mail arrive
(`rules.bounce_address`, an SRS address of ours for that sender, the forwarding recipient, the
sender itself), and only for Final-Recipients the message went to whose `Action` is `failed`
(a delay warning or a success report is no bounce), each told once (claimed in the store). The
notice (which recipient failed, why, when; the DSN attached) goes to that sender in place of
the DSN. Anything else, a DSN we cannot read, or one read while the store is unreachable, is
delivered as it is. Parsing uses the stdlib's report support.
"""
from __future__ import annotations

import email.errors
import email.message
import email.parser
import email.policy
import email.utils
import logging
import re
from dataclasses import dataclass, replace

from mailgate.config import Config
from mailgate.filters.vacation import clean, decoded, header_text
from mailgate.message import Message
from mailgate.pipeline import FilterResult
from mailgate.srs import SenderRewriter
from mailgate.store import StoreUnavailable
from mailgate.verdict import Action, Verdict

log = logging.getLogger("mailgate.bounce")
MSGID = re.compile(r"<([^<>@\s]+)@([^<>\s]+)>")
TOLD_TTL = 30 * 86400.0  # seconds a notice is remembered: as long as the outbound item lives


@dataclass(frozen=True)
class Failure:
    recipient: str
    action: str       # failed, delayed, ...
    status: str       # RFC 3463, e.g. 5.1.1
    diagnostic: str   # the remote server's words
    when: str


@dataclass(frozen=True)
class Report:
    failures: tuple[Failure, ...]
    reporting_mta: str
    message_id: str   # of the message that bounced, as returned in the DSN
    subject: str


def read_report(headers: email.message.Message) -> Report | None:
    """The delivery report in a multipart/report DSN; None for anything else."""
    if headers.get_content_type() != "multipart/report" or \
            str(headers.get_param("report-type", "")).lower() != "delivery-status":
        return None
    blocks: list[email.message.Message] = []
    returned: email.message.Message | None = None
    for part in headers.walk():
        kind = part.get_content_type()
        if kind == "message/delivery-status" and isinstance(part.get_payload(), list):
            blocks = part.get_payload()
        elif kind == "message/rfc822" and isinstance(part.get_payload(), list) and returned is None:
            returned = part.get_payload()[0]
        elif kind == "text/rfc822-headers" and returned is None:
            text = part.get_payload(decode=True) or b""
            returned = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
                text, headersonly=True)
    if not blocks:
        return None
    when = header_text(blocks[0], "Arrival-Date")
    failures = tuple(_failure(b, when) for b in blocks[1:] if b.get("Final-Recipient"))
    returned = returned or email.message.Message()
    return Report(failures, clean(header_text(blocks[0], "Reporting-MTA")),
                  clean(header_text(returned, "Message-ID")),
                  clean(decoded(header_text(returned, "Subject"))))


def _failure(block: email.message.Message, arrival: str) -> Failure:
    def field(name: str) -> str:
        value = clean(header_text(block, name))
        return value.split(";", 1)[1].strip() if ";" in value and name != "Action" else value
    return Failure(field("Final-Recipient"), field("Action").lower(), field("Status"),
                   field("Diagnostic-Code"),
                   clean(header_text(block, "Last-Attempt-Date") or arrival))


def dsn_sender(sender: str) -> bool:
    """A DSN's envelope sender: null (RFC 5321 §4.5.5), or MAILER-DAEMON@ where a hop wrote one
    in (a feed that reports the null sender so)."""
    return not sender or sender.partition("@")[0].lower() == "mailer-daemon"


def candidate_ids(message_id: str) -> list[str]:
    """Keys to look up: the SES message id (the local part of an amazonses.com Message-ID),
    then the Message-ID itself."""
    match = MSGID.search(message_id)
    if match is None:
        return []
    local, domain = match.groups()
    ses = [local] if domain.lower().endswith("amazonses.com") else []
    return ses + [f"{local}@{domain}"]


def original_sender(item: dict) -> str:
    for name in ("original_sender", "sender", "source"):
        if isinstance(item.get(name), str) and "@" in item[name]:
            return item[name]
    return ""


def build_notice(report: Report, item: dict, to: str, dsn: bytes, hostname: str,
                 domain: str) -> bytes:
    """What a person reads: which recipient failed, why and when; the DSN itself attached."""
    notice = email.message.EmailMessage(policy=email.policy.SMTP)
    subject = clean(str(item.get("subject") or report.subject))
    # From one of our domains: those are what SES has verified, when the notice goes through it
    notice["From"] = f"Mail Delivery System <MAILER-DAEMON@{domain}>"
    notice["To"] = to
    notice["Subject"] = f"Undelivered: {subject}"[:200].rstrip() if subject else "Undelivered mail"
    notice["Date"] = email.utils.formatdate(localtime=True)
    notice["Message-ID"] = email.utils.make_msgid(domain=hostname)
    if MSGID.search(report.message_id):
        notice["In-Reply-To"] = MSGID.search(report.message_id).group(0)
    notice["Auto-Submitted"] = "auto-replied"
    lines = [f"Your message{' ' + repr(subject) if subject else ''}"
             f"{', sent ' + clean(str(item['sent_at'])) if item.get('sent_at') else ''},"
             " could not be delivered to every recipient.", ""]
    for f in report.failures:
        lines += [f"  Recipient: {f.recipient}", f"  Result:    {f.action or 'failed'}"
                  f"{' (status ' + f.status + ')' if f.status else ''}",
                  f"  Reason:    {f.diagnostic or 'not given'}",
                  f"  When:      {f.when or 'not given'}", ""]
    lines.append(f"Reported by {report.reporting_mta or 'the sending service'}; "
                 "its report is attached.")
    body = "\n".join(lines) + "\n"
    notice.set_content(body, cte="7bit" if body.isascii() else "quoted-printable")
    # message/rfc822 must not be base64-encoded (RFC 2046 §5.2.1): 7bit or 8bit, as it is
    notice.add_attachment(dsn, maintype="message", subtype="rfc822",
                          cte="7bit" if dsn.isascii() else "8bit")
    return notice.as_bytes()


class Bounce:
    name = "bounce"
    needs_headers = True

    def __init__(self, config: Config, resources):
        self.store = resources.store
        self.hostname = config.hostname
        self.domain = config.domains[0]
        self.bounce_address = config.rules.bounce_address.lower()
        self.senders = SenderRewriter(config)

    async def check(self, message: Message) -> FilterResult:
        recipients = message.envelope.recipients
        try:
            report = read_report(message.headers)
            if report is None:
                return FilterResult()
            if not dsn_sender(message.envelope.sender):  # anyone else wrote this one
                return self._as_is(recipients, f"not a bounce: sender <{message.envelope.sender}>"
                                               " is not null")
            return await self._notice(message, report)
        except StoreUnavailable as e:
            return self._as_is(recipients, f"store unavailable ({e})")
        # XXX a report the stdlib or we cannot read must reach its mailbox, never be deferred:
        # raised, the pipeline would answer 451 to every retry of it.
        except Exception as e:  # noqa: BLE001
            log.exception("%s: bounce: cannot read the report", message.envelope.queue_id)
            return self._as_is(recipients, f"cannot read it ({type(e).__name__})")

    async def _notice(self, message: Message, report: Report) -> FilterResult:
        recipients = message.envelope.recipients
        found = await self._find(report)
        if found is None:
            return self._as_is(recipients, f"no message we sent has id {report.message_id or '?'}")
        key, item = found
        rcpt = next((r for r in recipients if self._ours(r, item)), None)
        if rcpt is None:
            return self._as_is(recipients, f"not sent to where bounces of SES message {key} "
                                           "arrive")
        went_to = {a.lower() for a in item.get("recipients") or () if isinstance(a, str)}
        # an item that does not list its recipients (another writer of the table): the other
        # checks (null sender, our address, once) still keep forgeries out
        failures = [f for f in report.failures if not went_to or f.recipient.lower() in went_to]
        if not failures:
            return self._as_is(recipients, f"no Final-Recipient is one SES message {key} went to")
        # Only a failure is a bounce (RFC 3464 §2.3.3): a delay warning or a success report
        # (delayed, delivered, relayed, expanded) arrives as it is and claims nothing, so the
        # real failure later still gets its notice.
        failures = [f for f in failures if f.action == "failed"]
        if not failures:
            return self._as_is(recipients, f"SES message {key}: the report names no failure")
        # One notice per message and failed recipient: a repeated (or replayed) DSN arrives as
        # it is. Claimed before delivery: a notice lost to a retry leaves the DSN, not nothing.
        fresh = [f for f in failures
                 if await self.store.claim(f"bounce:{key}:{f.recipient.lower()}", TOLD_TTL)]
        if not fresh:
            return self._as_is(recipients, f"the sender of SES message {key} was told before")
        to = original_sender(item) or rcpt
        try:
            notice = build_notice(replace(report, failures=tuple(fresh)), item, to, message.raw,
                                  self.hostname, self.domain)
        except (ValueError, TypeError, email.errors.MessageError) as e:
            return self._as_is(recipients, f"cannot build the notice ({type(e).__name__}: {e})")
        reason = f"bounce: SES message {key} from <{to}>: notice instead of the DSN"
        return FilterResult({rcpt: Verdict(Action.REDIRECT, reason, redirect_to=(to,),
                                           content=notice)})

    def _ours(self, rcpt: str, item: dict) -> bool:
        """Whether `rcpt` is where bounces of the item's message arrive: our bounce address,
        the forwarding recipient, the sender itself (mail sent through SES by our users), or
        an SRS address of ours that stands for that sender."""
        address, sender = rcpt.lower(), original_sender(item).lower()
        if address in (self.bounce_address, str(item.get("forwarded_for") or "").lower(), sender):
            return True
        original = self.senders.reverse(rcpt)
        return original is not None and original.lower() == sender != ""

    async def _find(self, report: Report) -> tuple[str, dict] | None:
        for key in candidate_ids(report.message_id):
            item = await self.store.outbound(key)
            if item:
                return key, item
        return None

    @staticmethod
    def _as_is(recipients: tuple[str, ...], why: str) -> FilterResult:
        return FilterResult({r: Verdict(Action.CONTINUE, f"bounce: delivered as it is: {why}")
                             for r in recipients})
