"""The `vacation` filter end to end: real mailgate, Dovecot, relay sink and store (both backends).

A reply is what reaches the relay sink; "no reply" is asserted once mailgate has logged its
decision for that message (the decision is taken before the recipient's reply, so nothing can
be sent after it).
"""
from __future__ import annotations

import email
import email.policy
import re
from typing import Iterator

import pytest

from dnsserver import DnsServer
from mailgate.store import Rule
from peers import Dovecot, lmtp_send
from policy import (ALICE, BOB, REPLY_BOUND, SENDER, backend, copies, gates,  # noqa: F401
                    lmtp, mark, message, moto_server, status, store_call)
from relaysink import RelaySink

AWAY = Rule(ALICE, vacation=True, subject="", body="Back on Monday.\n")


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def no_reply(gate, relay: RelaySink, why: str) -> None:
    gate.wait_log(rf"vacation for <{ALICE}>: no reply: {why}")
    assert relay.received() == []


def test_reply_goes_once_the_message_is_delivered(gates, dove: Dovecot, relay: RelaySink) -> None:
    gate = gates(("rules", "vacation"))
    store_call(gate, "set_rule", AWAY)
    m = mark()
    assert status(lmtp(gate, [ALICE], message(m))[0]) == (250, "2.0.0")
    assert len(copies(dove, ALICE, m)) == 1
    [got] = relay.wait_for(1)
    assert (got.sender, got.recipients) == ("", (SENDER,))  # null envelope sender
    reply = parsed(got.data)
    assert reply["Auto-Submitted"] == "auto-replied (vacation)"
    assert reply["From"] == ALICE and reply["To"] == SENDER
    assert reply["Subject"] == f"Auto: policy {m}"
    assert reply["In-Reply-To"] == f"<{m}@remote.test>"
    assert reply["References"] == f"<{m}@remote.test>"
    assert reply.get_content().splitlines() == ["Back on Monday."]


SUPPRESSED = [
    ("", "", "null sender"),
    ("Auto-Submitted: auto-generated\r\n", SENDER, "Auto-Submitted: auto-generated"),
    ("List-Id: <team.lists.test>\r\n", SENDER, r"list mail \(List-Id\)"),
    ("List-Unsubscribe: <mailto:leave@lists.test>\r\n", SENDER, r"list mail \(List-Unsubscribe\)"),
    ("Precedence: bulk\r\n", SENDER, "Precedence: bulk"),
    ("Precedence: list\r\n", SENDER, "Precedence: list"),
    ("Precedence: junk\r\n", SENDER, "Precedence: junk"),
    ("Precedence: Bulk (newsletter)\r\n", SENDER, "Precedence: bulk"),
    ("", "MAILER-DAEMON@remote.test", "system sender"),
    ("", "owner-team@lists.test", "system sender"),
    ("", "team-request@lists.test", "system sender"),
    ("", "noreply@shop.test", "system sender"),
    ("", "no-reply@shop.test", "system sender"),
    ("", "no-reply+orders@shop.test", "system sender"),
]


@pytest.mark.parametrize("head, sender, why", SUPPRESSED,
                         ids=[w.split(":")[0].split(" ")[0].replace("\\", "") + (s[:6] or "null")
                              for _, s, w in SUPPRESSED])
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # the store has no part in these
def test_no_reply(gates, dove: Dovecot, relay: RelaySink, head: str, sender: str,
                  why: str) -> None:
    gate = gates(("vacation",))
    store_call(gate, "set_rule", AWAY)
    m = mark()
    assert status(lmtp(gate, [ALICE], message(m, sender=sender, head=head), sender=sender)[0]) \
        == (250, "2.0.0")
    no_reply(gate, relay, why)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_no_reply_when_the_recipient_is_not_named(gates, dove: Dovecot, relay: RelaySink) -> None:
    gate = gates(("vacation",))
    store_call(gate, "set_rule", AWAY)
    m = mark()
    # A Bcc or a list: alice is in the envelope only.
    assert status(lmtp(gate, [ALICE], message(m, to="team@lists.test"))[0]) == (250, "2.0.0")
    no_reply(gate, relay, r"recipient not in To/Cc/Bcc/Resent-\*")


def test_one_reply_per_sender_per_period_across_two_hosts(gates, dove: Dovecot,
                                                          relay: RelaySink) -> None:
    first, second = gates(("vacation",)), gates(("vacation",))  # one store, two processes
    store_call(first, "set_rule", AWAY)
    assert status(lmtp(first, [ALICE], message(mark()))[0]) == (250, "2.0.0")
    relay.wait_for(1)
    m = mark()
    assert status(lmtp(second, [ALICE], message(m))[0]) == (250, "2.0.0")
    second.wait_log(rf"vacation for <{ALICE}>: no reply: one went to <{SENDER}> within the period")
    assert len(copies(dove, ALICE, m)) == 1 and len(relay.received()) == 1
    other = "someone.else@remote.test"  # another sender gets their own reply
    assert status(lmtp(second, [ALICE], message(mark(), sender=other), sender=other)[0]) == \
        (250, "2.0.0")
    assert relay.wait_for(2)[1].recipients == (other,)


def test_subject_injection_stays_in_the_subject(gates, dove: Dovecot, relay: RelaySink) -> None:
    gate = gates(("vacation",))
    store_call(gate, "set_rule", AWAY)
    evil = "=?utf-8?q?Hi=0D=0ABcc:_victim@evil.test=0D=0AX-Injected:_yes?="
    assert status(lmtp(gate, [ALICE], message(mark(), subject=evil))[0]) == (250, "2.0.0")
    [got] = relay.wait_for(1)
    assert got.recipients == (SENDER,)
    header_block = got.data.split(b"\r\n\r\n")[0]
    assert not re.search(rb"(?im)^(Bcc|X-Injected):", header_block), header_block
    assert parsed(got.data)["Subject"] == "Auto: Hi Bcc: victim@evil.test X-Injected: yes"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_vacation_outside_its_dates_sends_nothing(gates, dove: Dovecot, relay: RelaySink) -> None:
    gate = gates(("vacation",))
    store_call(gate, "set_rule", Rule(ALICE, vacation=True, start="2000-01-01", end="2000-01-02"))
    m = mark()
    assert status(lmtp(gate, [ALICE, BOB], message(m))[0]) == (250, "2.0.0")
    assert len(copies(dove, ALICE, m)) == 1
    gate.wait_log(rf"{re.escape(ALICE)}>, relay=dovecot")
    assert "vacation for" not in gate.log_text() and relay.received() == []


@pytest.mark.parametrize("backend", ["dynamodb"], indirect=True)
def test_store_down_delivers_and_sends_nothing(gates, dove: Dovecot, relay: RelaySink,
                                               backend) -> None:
    gate = gates(("rules", "vacation"))
    store_call(gate, "set_rule", AWAY)
    assert status(lmtp(gate, [ALICE], message(mark()))[0]) == (250, "2.0.0")  # alice is read
    relay.wait_for(1)
    backend.moto.stop()
    m = mark()
    other = "new.sender@remote.test"
    assert status(lmtp(gate, [ALICE], message(m, sender=other), sender=other)[0]) == \
        (250, "2.0.0")
    assert len(copies(dove, ALICE, m)) == 1
    gate.wait_log(rf"vacation for <{ALICE}>: no reply: store unavailable|"
                  rf"auto-reply for <{ALICE}> not sent: store unavailable")
    assert len(relay.received()) == 1


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_no_reply_while_the_message_is_not_delivered(gates, dove: Dovecot,
                                                     relay: RelaySink) -> None:
    """Dovecot cannot write alice's mailbox and there is no fallback: 451 and no reply. The
    next message is delivered: the one reply answers that one."""
    gate = gates(("vacation",), {"delivery": {"maildir": ""}})
    store_call(gate, "set_rule", AWAY)
    first, second = mark(), mark()
    tmp = dove.maildir(ALICE) / "tmp"
    tmp.chmod(0o000)  # Dovecot answers 451 4.2.0 after DATA (the recipe's fault injection)
    try:
        assert lmtp(gate, [ALICE], message(first))[0][0] == 451
    finally:
        tmp.chmod(0o700)
    assert status(lmtp(gate, [ALICE], message(second))[0]) == (250, "2.0.0")
    [reply] = relay.wait_for(1)
    assert parsed(reply.data)["In-Reply-To"] == f"<{second}@remote.test>"
    gate.wait_log(rf"auto-reply for <{ALICE}>: to=<{SENDER}>")
    assert gate.log_text().count("auto-reply for") == 1


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_8bit_auto_submitted_is_read_and_the_message_delivered(gates, dove: Dovecot,
                                                              relay: RelaySink) -> None:
    """Raw UTF-8 in a header (RFC 6532) is read as text: never a 451 retried for ever."""
    gate = gates(("vacation",))
    store_call(gate, "set_rule", AWAY)
    m = mark()
    data = message(m, head="Auto-Submitted: auto-généré\r\n")
    assert [status(r) for r in lmtp(gate, [ALICE, BOB], data)] == [(250, "2.0.0")] * 2
    assert len(copies(dove, ALICE, m)) == 1 and len(copies(dove, BOB, m)) == 1
    no_reply(gate, relay, "Auto-Submitted: auto-généré")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_8bit_precedence_and_subject_are_read_as_utf8(gates, dove: Dovecot,
                                                      relay: RelaySink) -> None:
    gate = gates(("vacation",))
    store_call(gate, "set_rule", AWAY)
    m = mark()
    data = message(m, head="Precedence: bulké\r\n", subject=f"café {m}")
    assert status(lmtp(gate, [ALICE], data)[0]) == (250, "2.0.0")
    [got] = relay.wait_for(1)  # "bulké" is not bulk: a person wrote it
    assert parsed(got.data)["Subject"] == f"Auto: café {m}"


# ---------------------------------------------------------------- with `auth` before it

INSIDE, OUTSIDE = "192.0.2.10", "203.0.113.99"  # inside / outside the senders' SPF records


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    server = DnsServer().start()
    try:
        server.txt("hard.test", "v=spf1 ip4:192.0.2.0/24 -all")
        server.txt("soft.test", "v=spf1 ip4:192.0.2.0/24 ~all")
        server.txt("_dmarc.strict.test", "v=DMARC1; p=quarantine")  # no SPF, no DKIM: fail
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("sender, client, why", [
    ("boss@hard.test", OUTSIDE, r"no reply: sender not authenticated \(spf=fail\)"),
    ("boss@soft.test", OUTSIDE, r"no reply: sender not authenticated \(spf=softfail\)"),
    ("boss@strict.test", OUTSIDE, r"no reply: sender not authenticated \(dmarc=fail\)"),
    ("boss@hard.test", INSIDE, "reply to <boss@hard.test> once delivered"),
], ids=["spf-fail", "spf-softfail", "dmarc-fail", "spf-pass"])
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_no_reply_to_a_sender_auth_found_forged(gates, dove: Dovecot, relay: RelaySink,
                                                dns: DnsServer, sender: str, client: str,
                                                why: str) -> None:
    """A forged sender gets no reply (backscatter): what auth found reaches vacation."""
    gate = gates(("auth", "vacation"), {"dns": {"nameservers": [dns.address], "timeout": 1.0,
                                                "budget": 2.0}})
    store_call(gate, "set_rule", AWAY)
    m = mark()
    _, replies = lmtp_send(*gate.lmtp, sender, [ALICE], message(m, sender=sender),
                           timeout=REPLY_BOUND, xforward=f"ADDR={client} HELO=mail.remote.test")
    assert [status(r) for r in replies] == [(250, "2.0.0")]
    assert len(copies(dove, ALICE, m)) == 1
    gate.wait_log(rf"vacation for <{ALICE}>: {why}")
    if client == INSIDE:
        assert relay.wait_for(1)[0].recipients == (sender,)
    else:
        assert relay.received() == []
