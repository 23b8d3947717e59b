"""Crash points and injected bugs: MAILGATE_FAULT=<point> kills the real process (SIGKILL) at
that point, <point>:raise raises there (mailgate/faults.py).

After a crash the client retries as an MTA does, against a restarted mailgate, and the copies
are counted (invariant 3: a duplicate only between Dovecot's or the maildir's commit and our
reply, RFC 1047's window; nowhere else, and never a loss). A bug is a 451 4.3.0, never a 5xx.
"""
from __future__ import annotations

import re
import signal
import smtplib

import pytest

from faultkit import (ALICE, BOB, SENDER, Raw, assert_reply, copies, lmtp, maildir_files,
                      message, send, smtp, token)
from peers import PeerError, swaks, wait_until

# point, whether Dovecot is up (else the maildir fallback delivers), copies after the retry
CRASHES = [
    ("after-data", True, 1),
    ("before-lmtp-dot", True, 1),
    ("after-lmtp-250", True, 2),           # inside the window
    ("before-reply", True, 2),             # inside the window
    ("before-fallback-rename", False, 1),  # the file is in tmp/ only: invisible, no copy
    ("after-fallback-rename", False, 2),   # inside the window
]


@pytest.mark.parametrize("point, dovecot_up, expected", CRASHES, ids=[c[0] for c in CRASHES])
def test_crash_then_retry_loses_nothing_and_doubles_only_in_the_window(
        dovecot, mailgate_factory, point, dovecot_up, expected):
    if not dovecot_up:
        dovecot.stop()
    gate = mailgate_factory(env={"MAILGATE_FAULT": point})
    mark = token()
    with pytest.raises(smtplib.SMTPServerDisconnected):  # never a 250 from the dying process
        send(gate, [ALICE], message(mark))
    assert gate.proc.wait(10) == -signal.SIGKILL
    assert copies(dovecot, ALICE, mark) == expected - 1

    gate.env = {}
    gate.start()
    assert_reply(send(gate, [ALICE], message(mark))[1], "250 2.0.0")
    assert copies(dovecot, ALICE, mark) == expected
    leftovers = maildir_files(dovecot, ALICE, "tmp")
    assert len(leftovers) == (point == "before-fallback-rename")  # Dovecot sweeps tmp/ later


def test_bug_at_rcpt_is_451_4_3_0_and_the_session_goes_on(dovecot, mailgate_factory):
    """An exception while a RCPT is checked is our failure: 451, and the session goes on."""
    gate = mailgate_factory(env={"MAILGATE_FAULT": "rcpt:raise"})
    with smtp(gate) as client:
        client.mail(SENDER)
        assert_reply(client.rcpt(ALICE), "451 4.3.0")
        assert client.noop()[0] == 250
    session = Raw(gate.lmtp)
    assert session.reply()[0] == 220
    assert session.command("LHLO client.test")[0] == 250
    assert_reply(session.command(f"MAIL FROM:<{SENDER}>"), "250 2.1.0")
    assert_reply(session.command(f"RCPT TO:<{ALICE}>"), "451 4.3.0")
    session.close()
    gate.wait_log(r"error: internal error, answered 451 4\.3\.0")


def test_bug_at_mail_is_451_and_what_was_pipelined_after_it_is_answered(dovecot,
                                                                        mailgate_factory):
    """A command answered inside the session's read (no task): its bug must not stall the
    commands the client pipelined behind it until the client sends more."""
    gate = mailgate_factory(env={"MAILGATE_FAULT": "mail:raise"})
    session = Raw(gate.smtp)
    assert session.reply()[0] == 220
    assert session.command("EHLO client.test")[0] == 250
    session.sock.sendall(f"MAIL FROM:<{SENDER}>\r\nNOOP\r\nRSET\r\n".encode())
    assert_reply(session.reply(), "451 4.3.0")
    assert_reply(session.reply(), "250 2.0.0")
    assert_reply(session.reply(), "250 2.0.0")
    session.close()
    gate.wait_log(r"error: internal error, answered 451 4\.3\.0")


def test_bug_while_reading_the_message_is_451_and_the_end_of_the_session(dovecot,
                                                                        mailgate_factory):
    """Where the message ends is then unknown: what follows must never be taken for
    commands (the body here holds a whole transaction of its own)."""
    gate = mailgate_factory(env={"MAILGATE_FAULT": "data:raise"})
    mark = token()
    session = Raw(gate.smtp)
    session.to_data(ALICE)
    session.sock.sendall(f"Subject: {mark}\r\n\r\nRSET\r\nMAIL FROM:<evil@remote.test>\r\n"
                         f"RCPT TO:<{BOB}>\r\nDATA\r\nsmuggled {mark}\r\n.\r\n".encode())
    assert_reply(session.reply(), "451 4.3.0")
    with pytest.raises(PeerError, match="connection closed"):  # nothing more answered
        session.reply()
    session.close()
    gate.wait_log(r"error: internal error, answered 451 4\.3\.0")


@pytest.mark.parametrize("point, dovecot_up", [("after-data", True),
                                               ("before-fallback-rename", False)])
def test_bug_while_processing_is_451_4_3_0_per_recipient_and_leaves_nothing(
        dovecot, mailgate_factory, point, dovecot_up):
    if not dovecot_up:
        dovecot.stop()
    gate = mailgate_factory(env={"MAILGATE_FAULT": f"{point}:raise"})
    mark = token()
    assert_reply(send(gate, [ALICE], message(mark))[1], "451 4.3.0")
    for reply in lmtp(gate, [ALICE, BOB], message(mark)):
        assert_reply(reply, "451 4.3.0")
    for addr in (ALICE, BOB):
        assert maildir_files(dovecot, addr, "new", "cur", "tmp") == []
    gate.wait_log(r"internal error while processing")


@pytest.mark.slow
def test_postfix_defers_and_never_bounces_when_mailgate_fails_after_its_queue(
        postfix, dovecot, mailgate_factory):
    """Invariant 2, as Postfix sees it: mail it has queued meets a mailgate bug, is deferred
    (no bounce, no DSN), and is delivered once when mailgate is fixed and the queue flushed."""
    gate = mailgate_factory(env={"MAILGATE_FAULT": "after-data:raise"})
    postfix.use_virtual_lmtp(gate.lmtp[1])
    postfix.start()
    mark = token()
    sent = swaks("--server", f"127.0.0.1:{postfix.smtpd_port}", "--from", SENDER, "--to", ALICE,
                 "--header", f"Subject: fault {mark}", "--body", f"token {mark}")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    postfix.wait_log(rf"to=<{ALICE}>, relay=.*status=deferred .*451 4\.3\.0", timeout=20)
    assert [r["address"] for m in postfix.queue() for r in m["recipients"]] == [ALICE]

    gate.stop()
    gate.env = {}
    gate.start()
    postfix.flush()
    postfix.wait_log(rf"to=<{ALICE}>, relay=.*status=sent", timeout=20)
    wait_until(lambda: copies(dovecot, ALICE, mark) == 1, 10, what="alice's copy")
    assert not re.search(r"status=bounced|sender non-delivery notification", postfix.log_text())
