"""The install guide's Postfix wiring, end to end: swaks → Postfix → mailgate → Dovecot.

Postfix gets the shipped snippets (postfix/main.cf.*, and mode B's content_filter from
master.cf.content-filter), with the test's ports in place of the shipped ones. In both modes an
unknown user is refused by Postfix at RCPT (no queue file, so no bounce can follow), a known one
is delivered once, and with Dovecot down an address nobody can verify gets a 4xx at RCPT.
"""
from __future__ import annotations

import re
import uuid

import pytest

from peers import REPO, Dovecot, Mailgate, Postfix, swaks, wait_until

pytestmark = pytest.mark.slow

ALICE, NOBODY, DAVE = "alice@example.test", "nobody@example.test", "dave@example.test"
POSTMASTER = "postmaster@example.test"
SENDER = "sender@remote.test"


def shipped(name: str, gate: Mailgate, dovecot: Dovecot) -> str:
    """A shipped Postfix snippet with the test's addresses in place of the guide's."""
    text = (REPO / "postfix" / name).read_text().replace("example.org", "example.test")
    for shipped_port, port in (("10027", gate.lookup[1]), ("10024", gate.lmtp[1]),
                               ("10025", gate.smtp[1]), ("24", dovecot.lmtp_port)):
        text = re.sub(rf"(127\.0\.0\.1\]?):{shipped_port}\b", rf"\g<1>:{port}", text)
    return text


def main_params(text: str) -> dict[str, str]:
    """The active "name = value" lines of a main.cf snippet."""
    pairs = (line.partition("=") for line in text.splitlines()
             if line.strip() and not line.startswith(("#", " ", "\t")))
    return {name.strip(): value.strip() for name, _, value in pairs}


def install(postfix: Postfix, mode: str, gate: Mailgate, dovecot: Dovecot) -> None:
    postfix.set_main(**main_params(shipped(f"main.cf.{mode}", gate, dovecot)))
    if mode == "content-filter":  # the -o lines of the snippet's public smtpd entry
        master = shipped("master.cf.content-filter", gate, dovecot)
        entry = re.search(r"(?m)^smtp\s+inet\s.*\n((?:[ \t]+-o .*\n)+)", master).group(1)
        postfix.set_service(postfix.public, **dict(
            o.split("=", 1) for o in re.findall(r"-o (\S+)", entry)))
    # The guide's aliases: postmaster@ a served domain goes to a real mailbox.
    postfix.set_main(virtual_alias_maps=f"inline:{{ {POSTMASTER}={ALICE} }}")


@pytest.fixture(params=["lmtp-transport", "content-filter"])
def wired(request, postfix: Postfix, dovecot: Dovecot, mailgate_factory) -> Mailgate:
    """mailgate, and Postfix in front of it as the guide's mode A or B sets it up, started."""
    gate = mailgate_factory()
    install(postfix, request.param, gate, dovecot)
    postfix.start()
    return gate


def send(postfix: Postfix, rcpt: str, mark: str = "") -> str:
    out = swaks("--server", f"127.0.0.1:{postfix.smtpd_port}", "--from", SENDER, "--to", rcpt,
                "--header", f"Subject: operator {mark or uuid.uuid4().hex}")
    return out.stdout + out.stderr


def rcpt_reply(transcript: str, rcpt: str) -> str:
    """The server's reply to RCPT TO:<rcpt> in a swaks transcript."""
    lines = transcript.splitlines()
    index = next(i for i, line in enumerate(lines) if line.endswith(f"RCPT TO:<{rcpt}>"))
    return lines[index + 1][4:].strip()


def with_mark(dovecot: Dovecot, addr: str, mark: str) -> list[bytes]:
    return [m for m in dovecot.maildir_messages(addr) if mark.encode() in m]


def test_unknown_user_refused_at_rcpt_known_delivered(wired: Mailgate, postfix: Postfix,
                                                      dovecot: Dovecot) -> None:
    refused = send(postfix, NOBODY)
    assert rcpt_reply(refused, NOBODY).startswith(
        "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"), refused
    postfix.wait_log(r"NOQUEUE: reject: RCPT from \S+: 550 5\.1\.1 <nobody@example\.test>")

    mark = uuid.uuid4().hex
    accepted = send(postfix, ALICE, mark)
    assert rcpt_reply(accepted, ALICE).startswith("250 "), accepted
    queue_id = re.search(r"queued as (\w+)", accepted).group(1)
    wait_until(lambda: with_mark(dovecot, ALICE, mark), 20, what="alice's message delivered")
    # Postfix's queue id travels in XFORWARD: one grep finds the message in both logs.
    wired.wait_log(rf": client=\S+, orig_queue_id={queue_id}$")

    alias_mark = uuid.uuid4().hex
    assert rcpt_reply(send(postfix, POSTMASTER, alias_mark), POSTMASTER).startswith("250 ")
    wait_until(lambda: with_mark(dovecot, ALICE, alias_mark), 20, what="postmaster's message")
    wait_until(postfix.queue_empty, 20, what="postfix's queue empty")
    assert len(with_mark(dovecot, ALICE, mark)) == 1
    assert "status=bounced" not in postfix.log_text()
    assert "to=<nobody@example.test>" not in wired.log_text()  # never reached mailgate


def test_dovecot_down_defers_unverifiable_recipient_at_rcpt(wired: Mailgate, postfix: Postfix,
                                                            dovecot: Dovecot) -> None:
    dovecot.stop()
    deferred = send(postfix, DAVE)  # not a user, no maildir: nobody can say
    assert rcpt_reply(deferred, DAVE).startswith("451 4.3.0 <dave@example.test>:"), deferred
    postfix.wait_log(r"NOQUEUE: reject: RCPT from \S+: 451 4\.3\.0 <dave@example\.test>")
    assert postfix.queue_empty()  # nothing queued: no bounce can follow
    assert "status=bounced" not in postfix.log_text()
