"""Pure parts of the policy filters: vacation's suppression rules and reply, forwarding's loop
rules and copies, the bounce report reader and notice, the relay's reply parsing, SRS."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import email
import email.parser
import email.policy
import os
import stat

from types import SimpleNamespace

import pytest
import srslib

from mailgate.config import Config, Pipeline, Rules
from mailgate.filters.bounce import build_notice, candidate_ids, read_report
from mailgate.filters.rules import delivered_to, forwarding
from mailgate.filters.vacation import Vacation, active, build_reply, memory_key, why_not
from mailgate.forward import plan
from mailgate.srs import SenderRewriter, read_secret
from mailgate.message import Client, Envelope, Message
from mailgate.outbound import relay_reply
from mailgate.pipeline import Chain, FilterResult
from mailgate.store import Rule
from mailgate.verdict import Action, Verdict

ALICE = "alice@example.test"
SENDER = "bob@remote.test"


def message(head: str, sender: str = SENDER, rcpt: str = ALICE, body: str = "hi\r\n") -> Message:
    raw = (head.replace("\n", "\r\n") + "\r\n" + body).encode()
    env = Envelope("Q1", sender, (rcpt,), Client("127.0.0.1"), 0.0)
    return Message(env, raw, email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw))


PLAIN = f"From: Bob <{SENDER}>\nTo: Alice <{ALICE}>\nSubject: Lunch\nMessage-ID: <m1@remote.test>\n"


# ---------------------------------------------------------------- vacation: who gets no reply

@pytest.mark.parametrize("head, sender, reason", [
    (PLAIN, "", "null sender"),
    (PLAIN + "Auto-Submitted: auto-replied\n", SENDER, "Auto-Submitted: auto-replied"),
    (PLAIN + "Auto-Submitted: auto-generated; x=y\n", SENDER, "Auto-Submitted"),
    (PLAIN + "List-Id: <team.lists.test>\n", SENDER, "list mail (List-Id)"),
    (PLAIN + "List-Unsubscribe: <mailto:u@lists.test>\n", SENDER, "list mail (List-Unsubscribe)"),
    (PLAIN + "List-Post: <mailto:p@lists.test>\n", SENDER, "list mail (List-Post)"),
    (PLAIN + "Precedence: bulk\n", SENDER, "Precedence: bulk"),
    (PLAIN + "Precedence: List\n", SENDER, "Precedence: list"),
    (PLAIN + "Precedence: junk\n", SENDER, "Precedence: junk"),
    (PLAIN + "Precedence: bulk (newsletter)\n", SENDER, "Precedence: bulk"),
    (PLAIN + "Precedence:   LIST  \n", SENDER, "Precedence: list"),
    (PLAIN + "Precedence: Junk;x\n", SENDER, "Precedence: junk"),
    (PLAIN, "MAILER-DAEMON@remote.test", "system sender"),
    (PLAIN, "owner-team@lists.test", "system sender"),
    (PLAIN, "team-request@lists.test", "system sender"),
    (PLAIN, "noreply@shop.test", "system sender"),
    (PLAIN, "no-reply@shop.test", "system sender"),
    (PLAIN, "no-reply+orders@shop.test", "system sender"),
    (PLAIN, "noreply-orders@shop.test", "system sender"),
    (PLAIN, "donotreply+x@shop.test", "system sender"),
    (PLAIN, "do-not-reply@shop.test", "system sender"),
    (PLAIN, "donotreply@shop.test", "system sender"),
    (PLAIN, "MAILER-DAEMON+bounces@shop.test", "system sender"),
    (PLAIN + "Auto-Submitted: auto-generated (by a robot)\n", SENDER, "Auto-Submitted"),
    (PLAIN, ALICE.upper(), "sent by the recipient"),
    (PLAIN.replace(f"To: Alice <{ALICE}>", "To: team@lists.test"), SENDER,
     "recipient not in To/Cc/Bcc/Resent-*"),
])
def test_vacation_suppressed(head: str, sender: str, reason: str) -> None:
    assert reason in why_not(message(head, sender), ALICE)


@pytest.mark.parametrize("verdicts, replied", [
    ((("x-ses-spf", "fail"),), False), ((("x-ses-dmarc", "fail"),), False),
    ((("x-ses-spam", "fail"),), False), ((("x-ses-virus", "fail"),), False),
    ((("x-ses-spf", "pass"), ("x-ses-dmarc", "pass"), ("x-ses-spam", "pass")), True),
])
def test_vacation_heeds_what_ses_found_on_the_feed(verdicts, replied) -> None:
    """Mail from the SES feed is local to auth (no SPF of its own): SES's verdicts decide."""
    msg = message(PLAIN)
    msg = Message(dataclasses.replace(msg.envelope, feed_verdicts=verdicts), msg.raw,
                  msg.headers)
    reason = why_not(msg, ALICE)
    assert (reason == "") is replied, reason
    assert replied or reason.startswith("sender not authenticated (x-ses-")


@pytest.mark.parametrize("head", [
    PLAIN,
    PLAIN + "Auto-Submitted: no\n",
    PLAIN + "Auto-Submitted: no (written by hand)\n",   # RFC 3834 §5: a comment may follow
    PLAIN + "Auto-Submitted: No;x=y\n",
    PLAIN.replace(f"To: Alice <{ALICE}>", f"To: x@y.test\nCc: ALICE@example.test"),
    PLAIN.replace(f"To: Alice <{ALICE}>", f"To: x@y.test\nResent-To: {ALICE}"),
    PLAIN.replace(f"To: Alice <{ALICE}>", f"To: x@y.test\nBcc: {ALICE}"),
])
def test_vacation_replies(head: str) -> None:
    assert why_not(message(head), ALICE) == ""


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def test_reply_headers_per_rfc_3834() -> None:
    head = PLAIN + "References: <r0@remote.test>\n"
    reply = parsed(build_reply(message(head), ALICE, Rule(ALICE, vacation=True),
                               "mx.example.test"))
    assert reply["From"] == ALICE and reply["To"] == SENDER
    assert reply["Subject"] == "Auto: Lunch"
    assert reply["Auto-Submitted"] == "auto-replied (vacation)"
    assert reply["In-Reply-To"] == "<m1@remote.test>"
    assert reply["References"] == "<r0@remote.test> <m1@remote.test>"
    assert reply["Message-ID"].endswith("@mx.example.test>")
    assert "I am away" in reply.get_content()


def test_reply_subject_injection_stays_one_header() -> None:
    # An encoded word that decodes to CR LF and a Bcc line, and a rule subject with raw CR LF.
    head = PLAIN.replace("Subject: Lunch",
                         "Subject: =?utf-8?q?Hi=0D=0ABcc:_victim@evil.test=0D=0A?=")
    data = build_reply(message(head), ALICE, Rule(ALICE, vacation=True), "mx.example.test")
    header_block = data.split(b"\r\n\r\n")[0]
    assert b"\r\nBcc:" not in header_block and not header_block.startswith(b"Bcc:")
    assert parsed(data)["Subject"] == "Auto: Hi Bcc: victim@evil.test"
    rule = Rule(ALICE, vacation=True, subject="Away\r\nBcc: victim@evil.test\x00")
    data = build_reply(message(PLAIN), ALICE, rule, "mx.example.test")
    assert b"\r\nBcc:" not in data.split(b"\r\n\r\n")[0]
    assert parsed(data)["Subject"] == "Away Bcc: victim@evil.test"


def test_reply_non_ascii_subject_is_rfc_2047_encoded() -> None:
    rule = Rule(ALICE, vacation=True, subject="Abwesend – zurück am Montag", body="Grüße\n")
    data = build_reply(message(PLAIN), ALICE, rule, "mx.example.test")
    assert data.isascii()  # encoded words and quoted-printable: no 8-bit byte on the wire
    assert b"Subject: Abwesend =?utf-8?b?4oCTIHp1csO8Y2s=?= am Montag\r\n" in data
    reply = parsed(data)
    assert reply["Subject"] == "Abwesend – zurück am Montag"
    assert reply.get_content().splitlines() == ["Grüße"]


def test_vacation_window() -> None:
    now = datetime.datetime(2024, 7, 10, 12, tzinfo=datetime.timezone.utc)
    assert active(Rule(ALICE, vacation=True), now)
    assert active(Rule(ALICE, vacation=True, start="2024-07-01", end="2024-07-10"), now)
    assert not active(Rule(ALICE, vacation=True, start="2024-07-11"), now)
    assert not active(Rule(ALICE, vacation=True, end="2024-07-09"), now)
    assert not active(Rule(ALICE, vacation=True, end="2024-07-10T11:00:00+00:00"), now)


def test_memory_key_changes_with_the_notice() -> None:
    one = memory_key(ALICE, SENDER, Rule(ALICE, vacation=True, subject="a"))
    assert one == memory_key(ALICE.upper(), SENDER.upper(), Rule(ALICE, vacation=True, subject="a"))
    assert one != memory_key(ALICE, SENDER, Rule(ALICE, vacation=True, subject="b"))


# ---------------------------------------------------------------- forwarding

def test_delivered_to_read_from_the_header_block_only() -> None:
    raw = (b"Delivered-To: Alice@Example.test\r\nDELIVERED-TO: <x@ext.test>\r\nSubject: s\r\n\r\n"
           b"Delivered-To: body@not.header\r\n")
    assert delivered_to(raw) == {"alice@example.test", "x@ext.test"}


def test_forward_drops_self_and_loops() -> None:
    rule = Rule(ALICE, forward=("x@ext.test", ALICE.upper(), "y@ext.test"), keep_copy=False)
    verdict, looped = forwarding(ALICE, rule, {"y@ext.test"})
    assert verdict.action is Action.REDIRECT and verdict.redirect_to == ("x@ext.test",)
    assert verdict.keep_copy  # naming itself as a target means keeping a copy
    assert looped == ["y@ext.test"]


def test_recipient_in_delivered_to_is_not_forwarded_again() -> None:
    verdict, _ = forwarding(ALICE, Rule(ALICE, forward=("x@ext.test",)), {ALICE})
    assert verdict.action is Action.ACCEPT and "before" in verdict.reason


def test_plan_copies() -> None:
    verdict = Verdict(Action.REDIRECT, redirect_to=("bob@example.test", "x@ext.test",
                                                    "X@ext.test"), keep_copy=True)
    copies = plan(ALICE, verdict, ("example.test",))
    assert [(c.target, c.own, c.local) for c in copies] == [
        (ALICE, True, True), ("bob@example.test", False, True), ("x@ext.test", False, False)]


def test_sender_rewriting(tmp_path) -> None:
    config = Config(domains=("example.test",), data_dir=str(tmp_path))
    rewriter = SenderRewriter(config)
    assert rewriter.rewrite("") == ""
    assert rewriter.rewrite("carol@example.test") == "carol@example.test"
    srs = rewriter.rewrite("bob@dmarc-reject.test")
    assert srs.startswith("SRS0=") and srs.endswith("@example.test")
    assert srslib.SRS(read_secret(str(tmp_path / "srs-secret"))).reverse(srs) == \
        "bob@dmarc-reject.test"
    assert stat.S_IMODE(os.stat(tmp_path / "srs-secret").st_mode) == 0o600
    fixed = Config(domains=("example.test",), rules=Rules(bounce_address="fwd@example.test"))
    assert SenderRewriter(fixed).rewrite("bob@remote.test") == "fwd@example.test"


# ---------------------------------------------------------------- bounce

SES_DSN = """From: MAILER-DAEMON@amazonses.com
To: alice@example.test
Subject: Delivery Status Notification (Failure)
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b1"

--b1
Content-Type: text/plain; charset=UTF-8

An error occurred while trying to deliver the mail to the following recipients:
x@elsewhere.test
--b1
Content-Type: message/delivery-status

Reporting-MTA: dns; a8-52.smtp-out.amazonses.com
Arrival-Date: Mon, 1 Jul 2024 10:00:00 +0000

Final-Recipient: rfc822; x@elsewhere.test
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <x@elsewhere.test>: Recipient address rejected: User unknown
Last-Attempt-Date: Mon, 1 Jul 2024 10:00:05 +0000

--b1
Content-Type: text/rfc822-headers

From: alice@example.test
To: x@elsewhere.test
Subject: Lunch?
Message-ID: <0100019-abc-000000@email.amazonses.com>

--b1--
"""


def test_read_ses_report() -> None:
    report = read_report(message(SES_DSN, sender="").headers)
    assert report is not None
    [failure] = report.failures
    assert failure.recipient == "x@elsewhere.test" and failure.status == "5.1.1"
    assert failure.diagnostic.startswith("550 5.1.1 <x@elsewhere.test>")
    assert failure.when == "Mon, 1 Jul 2024 10:00:05 +0000"
    assert report.subject == "Lunch?"
    assert candidate_ids(report.message_id) == ["0100019-abc-000000",
                                                "0100019-abc-000000@email.amazonses.com"]


def test_not_a_report() -> None:
    assert read_report(message(PLAIN).headers) is None


def test_notice_says_who_why_when() -> None:
    msg = message(SES_DSN, sender="")
    report = read_report(msg.headers)
    data = build_notice(report, {"subject": "Lunch?", "sent_at": "2024-07-01T09:59:58Z"}, ALICE,
                        msg.raw, "mx.example.test", "example.test")
    notice = parsed(data)
    assert notice["To"] == ALICE and notice["Subject"] == "Undelivered: Lunch?"
    assert notice["From"] == "Mail Delivery System <MAILER-DAEMON@example.test>"
    text = notice.get_body(("plain",)).get_content()
    for words in ("x@elsewhere.test", "550 5.1.1", "User unknown", "Mon, 1 Jul 2024 10:00:05",
                  "2024-07-01T09:59:58Z", "Lunch?"):
        assert words in text
    [attached] = list(notice.iter_attachments())
    assert attached.get_content_type() == "message/rfc822"
    assert b"Content-Transfer-Encoding: base64" not in data


# ---------------------------------------------------------------- relay replies

@pytest.mark.parametrize("code, text, status, words", [
    (451, b"4.3.0 try later", "4.3.0", "try later"),
    (550, "5.1.1 <x@y>: no such\r\n user", "5.1.1", "<x@y>: no such user"),
    (554, b"rejected", "5.0.0", "rejected"),
])
def test_relay_reply(code: int, text, status: str, words: str) -> None:
    reply = relay_reply(code, text)
    assert (reply.code, reply.status, reply.text) == (code, status, words)


# ---------------------------------------------------------------- vacation: never a 451

class SlowStore:
    """Every vacation rule on; each state read takes `delay` seconds (None: never answers)."""
    def __init__(self, delay: float | None):
        self.delay = delay

    async def rules(self, addresses):
        return {a: Rule(a, vacation=True) for a in addresses}

    async def seen(self, key: str) -> bool:
        await (asyncio.sleep(self.delay) if self.delay is not None else asyncio.Event().wait())
        return False


def vacation_chain(store, timeout: float = 1.0) -> Chain:
    config = Config(hostname="mx.example.test", pipeline=Pipeline(filter_timeout=timeout))
    return Chain([Vacation(config, SimpleNamespace(store=store))], config.pipeline)


AWAY = [f"u{i}@example.test" for i in range(4)]
TO_ALL = f"From: <{SENDER}>\nTo: {', '.join(AWAY)}\nSubject: hi\nMessage-ID: <m1@remote.test>\n"


def test_vacation_asks_the_store_for_all_recipients_at_once() -> None:
    """Four reads of 0.3 s fit in a filter_timeout of 1 s: together, not one after another."""
    msg = dataclasses.replace(message(TO_ALL), envelope=dataclasses.replace(
        message(TO_ALL).envelope, recipients=tuple(AWAY)))
    outcome = asyncio.run(vacation_chain(SlowStore(0.3)).run(msg))
    assert {v.action for v in outcome.verdicts.values()} == {Action.CONTINUE}
    assert sorted(m.after for m in outcome.outbound) == AWAY


def test_vacation_store_too_slow_means_no_reply_not_451(caplog) -> None:
    msg = dataclasses.replace(message(TO_ALL), envelope=dataclasses.replace(
        message(TO_ALL).envelope, recipients=tuple(AWAY)))
    outcome = asyncio.run(vacation_chain(SlowStore(None)).run(msg))
    assert {v.action for v in outcome.verdicts.values()} == {Action.CONTINUE}
    assert outcome.outbound == ()
    assert "Q1: vacation: no reply to anyone: store slower than 0.8 s" in caplog.text


class BrokenStore(SlowStore):
    async def rules(self, addresses):
        raise RuntimeError("a bug")


def test_vacation_failure_means_no_reply_not_451(caplog) -> None:
    outcome = asyncio.run(vacation_chain(BrokenStore(0)).run(message(PLAIN)))
    assert outcome.verdicts[ALICE].action is Action.CONTINUE and outcome.outbound == ()
    assert "Q1: vacation: no reply to anyone: failed (RuntimeError: a bug)" in caplog.text


class Finds:
    """What `auth` hands on: findings only."""
    name, needs_headers = "auth", False

    def __init__(self, *findings: tuple[str, str]):
        self.findings = findings

    async def check(self, message: Message) -> FilterResult:
        return FilterResult(findings=self.findings)


@pytest.mark.parametrize("findings, replied", [
    ((), True), ((("spf", "pass"), ("dmarc", "pass")), True), ((("spf", "fail"),), False),
    ((("spf", "softfail"),), False), ((("dmarc", "fail"),), False),
    ((("spf", "none"), ("quarantine", "dmarc")), False)])
def test_chain_hands_findings_to_later_filters(findings, replied) -> None:
    chain = vacation_chain(SlowStore(0))
    chain.filters.insert(0, Finds(*findings))
    outcome = asyncio.run(chain.run(message(PLAIN)))
    assert bool(outcome.outbound) is replied
