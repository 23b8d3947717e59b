"""Mail mailgate sends itself (forwards, auto-replies, bounce notices) through `[relay]`.

SMTP to the local Postfix by default (it queues and retries; STARTTLS and AUTH optional), or the
SES API (`send_raw_email`). Blocking clients run in a small thread pool of their own, bounded by
`relay.timeout`. Per recipient the relay's answer comes back as a Reply: our own trouble
(connection, TLS, login, throttling) is temporary, only the relay's 5xx for a recipient or for
the content is permanent. An address that is not ASCII goes with SMTPUTF8 (RFC 6531) when the
relay offers it; when it does not (SES never does), that copy fails for good: 553 5.6.7 (§3.5).
With dry_run (`mailgate explain`) nothing is sent.
"""
from __future__ import annotations

import asyncio
import logging
import re
import smtplib
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from mailgate import metrics
from mailgate.config import Config, parse_hostport
from mailgate.verdict import Reply

if TYPE_CHECKING:
    from mailgate.resources import Resources

log = logging.getLogger("mailgate.outbound")
THREADS = 4  # sends in flight; a hung relay cannot starve the loop's default pool
IDLE_SECONDS = 20.0  # a relay connection idle longer is closed, not reused (smtpd waits 300 s)
_STATUS = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")


@dataclass(frozen=True)
class OutboundMail:
    """A message a filter wants sent once `after`'s copy is durable (an auto-reply)."""
    after: str                    # the envelope recipient whose delivery must succeed first
    sender: str                   # envelope sender; "" = the null sender
    recipients: tuple[str, ...]
    data: bytes                   # the whole message, CRLF line endings
    kind: str = "auto-reply"      # for the log
    once: str = ""                # a state key claimed just before sending: one per once_ttl
    once_ttl: float = 0.0


@dataclass(frozen=True)
class Sent:
    replies: dict[str, Reply]     # the relay's answer per recipient
    relay: str                    # relay[host:port], ses, dry-run
    message_id: str = ""          # SES's id for what it accepted

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.replies.values())


def relay_reply(code: int, text: bytes | str) -> Reply:
    """A relay's reply as a Reply; the enhanced status is derived from the code if missing."""
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    text = " ".join(text.split())
    match = _STATUS.match(text)
    if match:
        return Reply(code, match.group(1), text[match.end():])
    return Reply(code, f"{code // 100}.0.0", text)


def _quit(smtp: smtplib.SMTP) -> None:
    """QUIT, ignoring its answer: what the relay accepted before stays accepted."""
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


# RFC 6531 §3.5: a non-ASCII address the next hop cannot take (no SMTPUTF8) is a permanent failure.
NO_SMTPUTF8 = Reply(553, "5.6.7", "the relay does not offer SMTPUTF8, needed for a non-ASCII "
                                  "address")


def our_failure(what: str) -> Reply:
    """A failure on our side of the relay (no answer, TLS, login): temporary."""
    return Reply(451, "4.4.0", what)


class Outbound:
    def __init__(self, config: Config, dry_run: bool = False):
        self.settings = config.relay
        self.hostname = config.hostname
        self.dry_run = dry_run
        self.pool = ThreadPoolExecutor(THREADS, thread_name_prefix="outbound")
        self._ses = None
        self._password: str | None = None
        self._idle: list[tuple[float, smtplib.SMTP]] = []  # open relay connections, for reuse
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "ses" if self.settings.ses else f"relay[{self.settings.smtp}]"

    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> Sent:
        """Hand one message to the relay; never raises for the relay's or the network's trouble."""
        if self.dry_run:
            return Sent({r: Reply(250, "2.0.0", "not sent (dry run)") for r in recipients},
                        "dry-run")
        work = self._ses_send if self.settings.ses else self._smtp_send
        loop = asyncio.get_running_loop()
        try:
            # Each SMTP command is bounded by relay.timeout; this bounds the whole exchange.
            # XXX past it the thread runs on, and a relay that then accepts sends a copy the
            # sender's retry sends again: a duplicate, never a loss.
            replies, message_id = await asyncio.wait_for(
                loop.run_in_executor(self.pool, work, sender, list(recipients), data),
                self.settings.timeout * 4)
        except TimeoutError:
            replies, message_id = self._all(recipients, our_failure("relay timed out")), ""
        return Sent(replies, self.name, message_id)

    @staticmethod
    def _all(recipients: Sequence[str], reply: Reply) -> dict[str, Reply]:
        return {r: reply for r in recipients}

    # -- SMTP (runs in the pool) -------------------------------------------------------------
    def _smtp_send(self, sender: str, recipients: list[str],
                   data: bytes) -> tuple[dict[str, Reply], str]:
        unsent: dict[str, Reply] = {}  # non-ASCII addresses the relay cannot take
        try:
            smtp = self._take()
            options = [] if data.isascii() or not smtp.has_extn("8bitmime") else ["BODY=8BITMIME"]
            if not (sender.isascii() and all(r.isascii() for r in recipients)):
                if smtp.has_extn("smtputf8"):
                    options.append("SMTPUTF8")  # smtplib then writes the commands in UTF-8
                else:  # an ASCII sender's ASCII recipients still go
                    unsent = {r: NO_SMTPUTF8 for r in recipients
                              if not (sender.isascii() and r.isascii())}
                    recipients = [r for r in recipients if r not in unsent]
            try:
                refused = smtp.sendmail(sender, recipients, data, options) if recipients else {}
            except smtplib.SMTPRecipientsRefused:
                self._give_back(smtp)  # smtplib has sent RSET: the connection is fine
                raise
            except BaseException:
                _quit(smtp)
                raise
            self._give_back(smtp)
        except smtplib.SMTPRecipientsRefused as e:
            refused = e.recipients
        except smtplib.SMTPDataError as e:  # the content, for every recipient
            return {**self._all(recipients, relay_reply(e.smtp_code, e.smtp_error)), **unsent}, ""
        except (smtplib.SMTPException, OSError, ValueError) as e:
            # XXX a refused sender, a failed STARTTLS or login is our setup, not the recipient's
            # fault: temporary, so the operator can fix it while the senders retry.
            log.warning("relay %s: %s", self.settings.smtp, e)
            failure = our_failure(f"relay: {type(e).__name__}: {e}")
            return {**self._all(recipients, failure), **unsent}, ""
        ok = Reply(250, "2.0.0", "Ok")
        return {**{r: relay_reply(*refused[r]) if r in refused else ok for r in recipients},
                **unsent}, ""

    def _take(self) -> smtplib.SMTP:
        """An idle relay connection that still answers NOOP, or a new one."""
        while True:
            with self._lock:
                since, smtp = self._idle.pop() if self._idle else (0.0, None)
            if smtp is None:
                return self._smtp_session()
            try:
                if time.monotonic() - since < IDLE_SECONDS and smtp.noop()[0] == 250:
                    return smtp
            except (smtplib.SMTPException, OSError):
                pass  # the relay closed it meanwhile
            smtp.close()

    def _give_back(self, smtp: smtplib.SMTP) -> None:
        with self._lock:
            if len(self._idle) < THREADS:
                self._idle.append((time.monotonic(), smtp))
                return
        _quit(smtp)

    def _smtp_session(self) -> smtplib.SMTP:
        host, port = parse_hostport(self.settings.smtp, "relay.smtp")
        smtp = smtplib.SMTP(host, port, local_hostname=self.hostname,
                            timeout=self.settings.timeout)
        try:
            smtp.ehlo()
            if self.settings.tls:
                smtp.starttls(context=ssl.create_default_context(
                    cafile=self.settings.tls_ca_file or None))
                smtp.ehlo()
            if self.settings.username:
                smtp.login(self.settings.username, self._read_password())
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _read_password(self) -> str:
        if self._password is None:
            path = self.settings.password_file
            with open(path, encoding="utf-8") as f:  # OSError: reported as our failure
                self._password = f.read().strip()
        return self._password

    # -- SES (runs in the pool) --------------------------------------------------------------
    def _ses_send(self, sender: str, recipients: list[str],
                  data: bytes) -> tuple[dict[str, Reply], str]:
        from botocore.exceptions import BotoCoreError, ClientError
        if not (sender.isascii() and all(r.isascii() for r in recipients)):
            return self._all(recipients, NO_SMTPUTF8), ""  # SES takes ASCII addresses only
        args = {"Destinations": recipients, "RawMessage": {"Data": data}}
        if sender:  # the null sender: SES takes the From header's address
            args["Source"] = sender
        try:
            answer = self._ses_client().send_raw_email(**args)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            text = f"ses: {code}: {e.response.get('Error', {}).get('Message', '')}"
            reply = Reply(554, "5.7.1", text) if code == "MessageRejected" else our_failure(text)
            return self._all(recipients, reply), ""
        except BotoCoreError as e:
            return self._all(recipients, our_failure(f"ses: {e}")), ""
        ok = Reply(250, "2.0.0", f"Ok: ses id {answer['MessageId']}")
        return self._all(recipients, ok), answer["MessageId"]

    def _ses_client(self):
        if self._ses is None:
            import boto3
            from botocore.config import Config as BotoConfig
            self._ses = boto3.session.Session().client(
                "ses", region_name=self.settings.region or None,
                endpoint_url=self.settings.endpoint_url or None,
                config=BotoConfig(connect_timeout=min(2.0, self.settings.timeout),
                                  read_timeout=self.settings.timeout,
                                  retries={"max_attempts": 2, "mode": "standard"}))
        return self._ses

    async def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            idle, self._idle = self._idle, []
        for _, smtp in idle:
            smtp.close()  # no QUIT: close runs on the event loop and must not block
        if self._ses is not None:
            self._ses.close()


async def send_after_delivery(mail: OutboundMail, resources: Resources, queue_id: str) -> None:
    """Send an auto-reply whose recipient's copy is durable: at most once per `mail.once` key
    (claimed in the store, so hosts sharing the store share the memory); logged, never raised."""
    from mailgate.store import StoreUnavailable
    try:
        if mail.once and not await resources.store.claim(mail.once, mail.once_ttl):
            log.info("%s: %s for <%s> not sent: one went to <%s> within the period", queue_id,
                     mail.kind, mail.after, ", ".join(mail.recipients))
            return _count(mail.kind, "suppressed")
    except StoreUnavailable as e:
        log.warning("%s: %s for <%s> not sent: store unavailable (%s)", queue_id, mail.kind,
                    mail.after, e)
        return _count(mail.kind, "store_unavailable")
    sent = await resources.outbound.send(mail.sender, mail.recipients, mail.data)
    for rcpt, reply in sent.replies.items():
        log.info("%s: %s for <%s>: to=<%s>, relay=%s, dsn=%s, status=%s (%s)", queue_id,
                 mail.kind, mail.after, rcpt, sent.relay, reply.status,
                 "sent" if reply.ok else "failed", reply)
    _count(mail.kind, "sent" if sent.ok else "failed")
    if not sent.ok and mail.once:  # a later message may try again
        try:
            await resources.store.forget(mail.once)
        except StoreUnavailable:
            pass  # the claim expires on its own


def _count(kind: str, result: str) -> None:
    metrics.child(metrics.OUTBOUND, kind, result).inc()
