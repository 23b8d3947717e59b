"""`bounce`: an SES bounce (a DSN, RFC 3464) for a message we sent becomes a readable notice.

The DSN's returned Message-ID gives the SES message id; the outbound table says who sent that
message. The notice (which recipient failed, why, when; the DSN attached) goes to that sender
in place of the DSN. A DSN that matches nothing we sent, or one read while the store is
unreachable, is delivered as it is. Parsing uses the stdlib's report support.
"""
from __future__ import annotations

import email.errors
import email.message
import email.parser
import email.policy
import email.utils
import logging
import re
from dataclasses import dataclass

from mailgate.config import Config
from mailgate.filters.vacation import clean, decoded
from mailgate.message import Message
from mailgate.pipeline import FilterResult
from mailgate.store import StoreUnavailable
from mailgate.verdict import Action, Verdict

log = logging.getLogger("mailgate.bounce")
MSGID = re.compile(r"<([^<>@\s]+)@([^<>\s]+)>")


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
    when = blocks[0].get("Arrival-Date", "")
    failures = tuple(_failure(b, when) for b in blocks[1:] if b.get("Final-Recipient"))
    returned = returned or email.message.Message()
    return Report(failures, clean(blocks[0].get("Reporting-MTA", "")),
                  clean(str(returned.get("Message-ID", ""))),
                  clean(decoded(returned.get("Subject"))))


def _failure(block: email.message.Message, arrival: str) -> Failure:
    def field(name: str) -> str:
        value = clean(str(block.get(name, "")))
        return value.split(";", 1)[1].strip() if ";" in value and name != "Action" else value
    return Failure(field("Final-Recipient"), field("Action").lower(), field("Status"),
                   field("Diagnostic-Code"), clean(str(block.get("Last-Attempt-Date") or arrival)))


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

    async def check(self, message: Message) -> FilterResult:
        report = read_report(message.headers)
        if report is None:
            return FilterResult()
        recipients = message.envelope.recipients
        try:
            found = await self._find(report)
        except StoreUnavailable as e:
            return self._as_is(recipients, f"store unavailable ({e})")
        if found is None:
            return self._as_is(recipients, f"no message we sent has id {report.message_id or '?'}")
        key, item = found
        to = original_sender(item) or recipients[0]
        try:
            notice = build_notice(report, item, to, message.raw, self.hostname, self.domain)
        except (ValueError, TypeError, email.errors.MessageError) as e:
            return self._as_is(recipients, f"cannot build the notice ({type(e).__name__}: {e})")
        reason = f"bounce: SES message {key} from <{to}>: notice instead of the DSN"
        first = Verdict(Action.REDIRECT, reason, redirect_to=(to,), content=notice)
        return FilterResult({recipients[0]: first})

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
