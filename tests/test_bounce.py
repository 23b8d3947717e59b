"""The `bounce` filter end to end: an SES bounce DSN for a message we sent becomes a readable
notice for its sender, once per failed recipient; anything else (a forged DSN too) arrives as
it is. Real mailgate, Dovecot and store (both
backends); the outbound table's items are written through the store, as mailgate writes them.
"""
from __future__ import annotations

import email
import email.policy
import json
import re
import urllib.request

import pytest

from mailgate.store import Rule
from peers import Dovecot
from policy import (ALICE, BOB, CAROL, FRIEND, SENDER, backend, copies, gates,  # noqa: F401
                    lmtp, mark, message, moto_server, status, store_call)
from relaysink import RelaySink


def dsn(m: str, ses_id: str, to: str = ALICE) -> bytes:
    """A bounce as SES's mailer sends it (RFC 3464), for the message SES knows as `ses_id`."""
    return f"""From: MAILER-DAEMON@amazonses.com
To: {to}
Subject: Delivery Status Notification (Failure)
Message-ID: <dsn-{m}@email.amazonses.com>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b-{m}"

--b-{m}
Content-Type: text/plain; charset=UTF-8

An error occurred while trying to deliver the mail to the following recipients:
{FRIEND}
--b-{m}
Content-Type: message/delivery-status

Reporting-MTA: dns; a8-52.smtp-out.amazonses.com
Arrival-Date: Mon, 1 Jul 2024 10:00:00 +0000

Final-Recipient: rfc822; {FRIEND}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <{FRIEND}>: Recipient address rejected: User unknown
Last-Attempt-Date: Mon, 1 Jul 2024 10:00:05 +0000

--b-{m}
Content-Type: text/rfc822-headers

From: {ALICE}
To: {FRIEND}
Subject: Lunch {m}?
Message-ID: <{ses_id}@email.amazonses.com>

--b-{m}--
""".replace("\n", "\r\n").encode()


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def test_matched_bounce_becomes_a_notice_for_the_sender(gates, dove: Dovecot) -> None:
    gate = gates(("bounce",))
    m = mark()
    ses_id = f"0100019{m}-000000"
    store_call(gate, "put_outbound", ses_id, {"original_sender": ALICE, "subject": f"Lunch {m}?",
                                              "recipients": [FRIEND],
                                              "sent_at": "2024-07-01T09:59:58+00:00"})
    assert status(lmtp(gate, [ALICE], dsn(m, ses_id), sender="")[0]) == (250, "2.0.0")
    [stored] = copies(dove, ALICE, m)
    notice = parsed(stored)
    assert notice["Subject"] == f"Undelivered: Lunch {m}?"
    assert notice["Auto-Submitted"] == "auto-replied"
    text = notice.get_body(("plain",)).get_content()
    for words in (FRIEND, "550 5.1.1", "User unknown", "Mon, 1 Jul 2024 10:00:05 +0000",
                  "2024-07-01T09:59:58+00:00"):
        assert words in text, words
    [attached] = notice.iter_attachments()
    assert attached.get_content_type() == "message/rfc822"
    assert f"<{ses_id}@email.amazonses.com>" in attached.as_string()


def test_notice_goes_to_the_sender_not_the_bounce_mailbox(gates, dove: Dovecot) -> None:
    gate = gates(("bounce",), {"rules": {"bounce_address": CAROL}})
    m = mark()
    ses_id = f"0100019{m}-000000"
    store_call(gate, "put_outbound", ses_id, {"original_sender": BOB, "recipients": [FRIEND]})
    assert status(lmtp(gate, [CAROL], dsn(m, ses_id, to=CAROL), sender="")[0]) == (250, "2.0.0")
    [stored] = copies(dove, BOB, m)
    assert parsed(stored)["Subject"] == f"Undelivered: Lunch {m}?"
    assert copies(dove, CAROL, m) == []


FORWARD = {"original_sender": BOB, "recipients": [FRIEND], "forwarded_for": ALICE}


@pytest.mark.parametrize("sender, rcpt, item", [
    (SENDER, ALICE, FORWARD),                                    # not a bounce: a sender
    ("", CAROL, FORWARD),                                        # not where our bounces arrive
    ("", ALICE, {**FORWARD, "recipients": ["other@elsewhere.test"]}),  # FRIEND never sent to
], ids=["sender-not-null", "not-our-bounce-address", "final-recipient-not-sent-to"])
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_forged_bounce_is_delivered_as_it_is(gates, dove: Dovecot, relay: RelaySink,
                                             sender: str, rcpt: str, item: dict) -> None:
    """Knowing an SES message id is not enough to make us write to its sender (bob)."""
    gate = gates(("bounce",))
    m = mark()
    ses_id = f"0100019{m}-000000"
    store_call(gate, "put_outbound", ses_id, item)
    forged = dsn(m, ses_id, to=rcpt)
    assert status(lmtp(gate, [rcpt], forged, sender=sender)[0]) == (250, "2.0.0")
    [stored] = copies(dove, rcpt, m)
    assert stored.endswith(forged.replace(b"\r\n", b"\n"))
    assert copies(dove, BOB, m) == [] and relay.received() == []


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_an_item_that_does_not_list_its_recipients_still_gets_its_notice(gates,
                                                                        dove: Dovecot) -> None:
    """Another writer of the outbound table may store no recipients: null sender, our address
    and once are checked all the same."""
    gate = gates(("bounce",))
    m = mark()
    ses_id = f"0100019{m}-000000"
    store_call(gate, "put_outbound", ses_id, {"original_sender": ALICE, "subject": f"Lunch {m}?"})
    assert status(lmtp(gate, [ALICE], dsn(m, ses_id), sender="")[0]) == (250, "2.0.0")
    [notice] = copies(dove, ALICE, m)
    assert parsed(notice)["Subject"] == f"Undelivered: Lunch {m}?"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_bounce_whose_sender_a_feed_wrote_as_mailer_daemon_is_still_one(gates,
                                                                         dove: Dovecot) -> None:
    gate = gates(("bounce",))
    m = mark()
    ses_id = f"0100019{m}-000000"
    store_call(gate, "put_outbound", ses_id, FORWARD)
    assert status(lmtp(gate, [ALICE], dsn(m, ses_id),
                       sender="MAILER-DAEMON@amazonses.com")[0]) == (250, "2.0.0")
    [notice] = copies(dove, BOB, m)
    assert parsed(notice)["Subject"] == f"Undelivered: Lunch {m}?"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_notice_in_place_of_a_feed_dsn_leaves_with_the_null_sender(gates, dove: Dovecot,
                                                                     relay: RelaySink) -> None:
    """A DSN as the SES feed reports it (envelope sender MAILER-DAEMON@...) for a forward alice
    made of SENDER's mail: the notice goes to SENDER through the relay with the null sender
    (RFC 5321 4.5.5, RFC 3464 2), never an SRS address of MAILER-DAEMON@amazonses.com that an
    auto-responder would answer and a bounce of the notice would go back to."""
    gate = gates(("bounce",))
    m = mark()
    ses_id = f"0100019{m}-000000"
    store_call(gate, "put_outbound", ses_id, {"original_sender": SENDER, "recipients": [FRIEND],
                                              "forwarded_for": ALICE})
    assert status(lmtp(gate, [ALICE], dsn(m, ses_id),
                       sender="MAILER-DAEMON@amazonses.com")[0]) == (250, "2.0.0")
    [notice] = relay.wait_for(1)
    assert notice.recipients == (SENDER,)
    assert parsed(notice.data)["Subject"] == f"Undelivered: Lunch {m}?"
    assert notice.sender == "", f"the notice left with envelope sender <{notice.sender}>"
    assert copies(dove, ALICE, m) == []


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_one_notice_per_message_and_recipient(gates, dove: Dovecot) -> None:
    """The same bounce again (a replay, or the remote MTA's second report) arrives as it is."""
    gate = gates(("bounce",))
    m = mark()
    ses_id = f"0100019{m}-000000"
    store_call(gate, "put_outbound", ses_id, FORWARD)
    first = dsn(m, ses_id)
    assert status(lmtp(gate, [ALICE], first, sender="")[0]) == (250, "2.0.0")
    [notice] = copies(dove, BOB, m)
    assert parsed(notice)["Subject"] == f"Undelivered: Lunch {m}?"
    assert copies(dove, ALICE, m) == []
    again = first.replace(b"Message-ID: <dsn-", b"Message-ID: <dsn-again-")
    assert status(lmtp(gate, [ALICE], again, sender="")[0]) == (250, "2.0.0")
    [stored] = copies(dove, ALICE, m)
    assert stored.endswith(again.replace(b"\r\n", b"\n"))
    assert len(copies(dove, BOB, m)) == 1


def report(m: str, ses_id: str, action: str, code: str) -> bytes:
    """`dsn`, with another Action and Status for its one recipient."""
    return re.sub(rb"Diagnostic-Code: [^\r]*", f"Diagnostic-Code: smtp; {code} ok".encode(),
                  dsn(m, ses_id).replace(b"Action: failed", f"Action: {action}".encode())
                  .replace(b"Status: 5.1.1", f"Status: {code}".encode()))


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("action, code", [("delayed", "4.4.7"), ("delivered", "2.0.0"),
                                          ("relayed", "2.0.0"), ("expanded", "2.0.0")])
def test_a_dsn_that_reports_no_failure_is_delivered_as_it_is(gates, dove: Dovecot,
                                                             action: str, code: str) -> None:
    """A delay warning or a success report (RFC 3464 Action: delayed / delivered / relayed /
    expanded) is not a bounce: no 'Undelivered' notice, the report itself arrives."""
    gate = gates(("bounce",))
    m = mark()
    ses_id = f"0100019{m}-000000"
    store_call(gate, "put_outbound", ses_id, {"original_sender": ALICE,
                                              "subject": f"Lunch {m}?", "recipients": [FRIEND]})
    warning = report(m, ses_id, action, code)
    assert status(lmtp(gate, [ALICE], warning, sender="")[0]) == (250, "2.0.0")
    [stored] = copies(dove, ALICE, m)
    assert parsed(stored)["Subject"] != f"Undelivered: Lunch {m}?", \
        f"Action: {action} turned into an 'Undelivered' notice"
    assert stored.endswith(warning.replace(b"\r\n", b"\n"))


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_real_failure_after_a_delay_warning_still_gets_its_notice(gates,
                                                                      dove: Dovecot) -> None:
    """The delay warning claims nothing: the failure that follows is told as a notice."""
    gate = gates(("bounce",))
    m = mark()
    ses_id = f"0100019{m}-000000"
    store_call(gate, "put_outbound", ses_id, {"original_sender": ALICE,
                                              "subject": f"Lunch {m}?", "recipients": [FRIEND]})
    assert status(lmtp(gate, [ALICE], report(m, ses_id, "delayed", "4.4.7"), sender="")[0]) \
        == (250, "2.0.0")
    assert status(lmtp(gate, [ALICE], dsn(m, ses_id), sender="")[0]) == (250, "2.0.0")
    stored = copies(dove, ALICE, m)
    assert len(stored) == 2
    notices = [parsed(s) for s in stored if parsed(s)["Subject"] == f"Undelivered: Lunch {m}?"]
    assert len(notices) == 1, "the real bounce arrived as a raw DSN"
    assert "550 5.1.1" in notices[0].get_body(("plain",)).get_content()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_8bit_dsn_is_delivered_as_it_is_not_deferred(gates, dove: Dovecot) -> None:
    """Raw UTF-8 in the report (RFC 6533): read as text, never a 451 retried for ever; a DSN
    with 8-bit bytes cannot be attached to a notice, so it arrives as it is."""
    gate = gates(("bounce",))
    m = mark()
    ses_id = f"0100019{m}-000000"
    store_call(gate, "put_outbound", ses_id, FORWARD)
    raw = dsn(m, ses_id).replace(b"a8-52.smtp-out.amazonses.com", "mx.ëxample.test".encode())
    assert status(lmtp(gate, [ALICE], raw, sender="")[0]) == (250, "2.0.0")
    [stored] = copies(dove, ALICE, m)
    assert stored.endswith(raw.replace(b"\r\n", b"\n"))
    assert copies(dove, BOB, m) == []


def test_unmatched_bounce_is_delivered_as_it_is(gates, dove: Dovecot) -> None:
    gate = gates(("bounce",))
    m = mark()
    original = dsn(m, "0100019-never-sent-000000")
    assert status(lmtp(gate, [ALICE], original, sender="")[0]) == (250, "2.0.0")
    [stored] = copies(dove, ALICE, m)
    assert stored.endswith(original.replace(b"\r\n", b"\n"))  # Dovecot stores LF endings


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_plain_mail_passes_untouched(gates, dove: Dovecot) -> None:
    gate = gates(("bounce",))
    m = mark()
    original = message(m)
    assert status(lmtp(gate, [ALICE], original)[0]) == (250, "2.0.0")
    [stored] = copies(dove, ALICE, m)
    assert stored.endswith(original.replace(b"\r\n", b"\n"))


def ses_sent(endpoint: str) -> list[dict]:
    with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=10) as r:
        return json.load(r)["ses"]["RawMessage"]


@pytest.mark.parametrize("backend", ["dynamodb"], indirect=True)
def test_forward_through_ses_then_its_bounce_reaches_the_original_sender(
        gates, dove: Dovecot, relay: RelaySink, backend) -> None:
    """alice forwards to friend@elsewhere through SES; SES bounces it to our bounce mailbox
    (carol); the notice goes to the original, external sender, through SES again."""
    moto = backend.moto
    moto.client("ses").verify_domain_identity(Domain="example.test")
    gate = gates(("bounce", "rules"), {"relay": {"ses": True, "region": "us-east-1",
                                                 "endpoint_url": moto.endpoint},
                                       "rules": {"bounce_address": CAROL}})
    store_call(gate, "set_rule", Rule(ALICE, forward=(FRIEND,), keep_copy=False))
    m = mark()
    assert status(lmtp(gate, [ALICE], message(m))[0]) == (250, "2.0.0")
    [forward] = ses_sent(moto.endpoint)
    assert forward["source"] == CAROL and m in forward["raw_data"]
    assert status(lmtp(gate, [CAROL], dsn(m, forward["id"], to=CAROL), sender="")[0]) == \
        (250, "2.0.0")
    notice = ses_sent(moto.endpoint)[1]
    assert SENDER in notice["destinations"]
    assert f"Undelivered: Lunch {m}?" in notice["raw_data"]
    assert copies(dove, CAROL, m) == [] and relay.received() == []
