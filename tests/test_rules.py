"""The `rules` filter and forwarding, end to end: mailgate + Dovecot + a relay sink + the store.

Each case runs on SQLite and on DynamoDB (moto in server mode). Asserted: the per-recipient
LMTP replies, what is in each maildir, what the relay received (envelope and bytes), the log.
"""
from __future__ import annotations

import re

import pytest
import srslib

from mailgate.store import Rule
from peers import PASSWORD, Dovecot, lmtp_send, wait_until
from policy import (ALICE, BOB, CAROL, FRIEND, SENDER, backend, cli, copies,  # noqa: F401
                    gates, lmtp, mark, message, moto_server, smtp, status, store_call)
from relaysink import RelaySink

DMARC_REJECT_SENDER = "ceo@dmarc-reject.test"  # a domain whose DMARC policy is p=reject
FULL = "full@example.test"  # a mailbox over its quota (over_quota)


def alice_forwards(gates, *targets: str, keep_copy: bool = False):
    """A mailgate with `rules` on, where alice forwards to `targets`."""
    gate = gates()
    store_call(gate, "set_rule", Rule(ALICE, forward=targets, keep_copy=keep_copy))
    return gate


def test_forward_without_copy_rewrites_the_envelope_only(gates, dove: Dovecot,
                                                         relay: RelaySink) -> None:
    gate = alice_forwards(gates, FRIEND)
    m = mark()
    original = message(m, sender=DMARC_REJECT_SENDER)
    assert status(lmtp(gate, [ALICE], original, sender=DMARC_REJECT_SENDER)[0]) == (250, "2.0.0")
    [got] = relay.wait_for(1)
    # SPF is checked against the envelope sender: ours now, reversible to the original.
    assert re.fullmatch(r"SRS0=[^@]+@example\.test", got.sender), got.sender
    secret = (gate.root / "data" / "srs-secret").read_text().strip()
    assert srslib.SRS(secret).reverse(got.sender) == DMARC_REJECT_SENDER
    assert got.recipients == (FRIEND,)
    # From is unchanged and DKIM-signed bytes are intact: our lines only go on top.
    assert got.data.startswith(b"Delivered-To: alice@example.test\r\nReceived: from ")
    assert got.data.endswith(original)
    assert copies(dove, ALICE, m) == []
    gate.wait_log(rf"to=<{ALICE}>, relay=relay\[{re.escape(relay.address)}\].*status=sent")


def test_bounce_to_the_srs_address_goes_back_to_the_original_sender(gates, dove: Dovecot,
                                                                    relay: RelaySink) -> None:
    gate = alice_forwards(gates, FRIEND)
    assert status(lmtp(gate, [ALICE], message(mark()))[0]) == (250, "2.0.0")
    srs = relay.wait_for(1)[0].sender
    m = mark()
    bounce = (f"From: MAILER-DAEMON@elsewhere.test\r\nTo: {srs}\r\nSubject: Undelivered {m}"
              f"\r\n\r\n{FRIEND}: mailbox full\r\n").encode()
    assert status(lmtp(gate, [srs], bounce, sender="")[0]) == (250, "2.0.0")
    back = relay.wait_for(2)[1]
    assert (back.sender, back.recipients) == ("", (SENDER,)) and back.data.endswith(bounce)
    # Only bounces (null sender), only our own hash: anything else is an unknown user.
    forged = re.sub(r"^SRS0=[^=]+=", "SRS0=AAAA=", srs)
    short = re.sub(r"^SRS0=([^=])[^=]*=", r"SRS0=\1=", srs)
    for address, sender in ((srs, SENDER), (forged, ""), (short, "")):
        rcpt_replies, _ = lmtp_send(*gate.lmtp, sender, [address], b"x\r\n")
        assert status(rcpt_replies[address]) == (550, "5.1.1"), (address, sender)


def test_a_forward_to_another_recipient_of_the_same_message_gives_it_one_copy(
        gates, dove: Dovecot) -> None:
    """alice forwards to bob; a message to alice AND bob: bob gets it once (Postfix's alias
    expansion and cleanup's duplicate removal would give one copy too), and alice is answered
    250 for the copy that went."""
    gate = alice_forwards(gates, BOB)
    m = mark()
    replies = lmtp(gate, [ALICE, BOB], message(m, to=f"{ALICE}>, <{BOB}"))
    assert [status(r) for r in replies] == [(250, "2.0.0")] * 2
    assert copies(dove, ALICE, m) == []
    [got] = copies(dove, BOB, m)
    assert b"Delivered-To: alice" not in got  # bob's own copy, not the forwarded one
    gate.wait_log(rf"to=<{ALICE}>, .*status=sent")


def test_two_forwards_to_one_target_send_it_one_copy(gates, dove: Dovecot,
                                                     relay: RelaySink) -> None:
    """alice and bob both forward to friend@elsewhere: one message to both is one copy there."""
    gate = alice_forwards(gates, FRIEND)
    store_call(gate, "set_rule", Rule(BOB, forward=(FRIEND.upper(),), keep_copy=False))
    m = mark()
    replies = lmtp(gate, [ALICE, BOB], message(m))
    assert [status(r) for r in replies] == [(250, "2.0.0")] * 2
    # each recipient was answered after its copies went: all that is sent is at the sink
    [got] = relay.received()
    assert got.recipients == (FRIEND,) and m.encode() in got.data
    assert copies(dove, ALICE, m) == [] and copies(dove, BOB, m) == []


def test_forward_with_keep_copy(gates, dove: Dovecot, relay: RelaySink) -> None:
    gate = alice_forwards(gates, FRIEND, keep_copy=True)
    m = mark()
    assert status(lmtp(gate, [ALICE, BOB], message(m))[0]) == (250, "2.0.0")
    [got] = relay.wait_for(1)
    assert got.recipients == (FRIEND,) and m.encode() in got.data
    assert len(copies(dove, ALICE, m)) == 1 and len(copies(dove, BOB, m)) == 1


def test_forward_to_a_local_address_never_leaves(gates, dove: Dovecot, relay: RelaySink) -> None:
    gate = alice_forwards(gates, BOB)
    m = mark()
    assert status(lmtp(gate, [ALICE], message(m))[0]) == (250, "2.0.0")
    [stored] = copies(dove, BOB, m)  # Dovecot stores LF line endings
    assert b"\nDelivered-To: alice@example.test\nReceived: from client.test " in stored
    assert copies(dove, ALICE, m) == []
    assert relay.received() == []


def test_no_forward_to_itself(gates, dove: Dovecot, relay: RelaySink) -> None:
    gate = gates()
    store_call(gate, "set_rule", Rule(ALICE, forward=(ALICE.upper(),), keep_copy=False))
    m = mark()
    assert status(lmtp(gate, [ALICE], message(m))[0]) == (250, "2.0.0")
    assert len(copies(dove, ALICE, m)) == 1
    assert relay.received() == []


def test_no_forward_to_an_address_already_in_delivered_to(gates, dove: Dovecot,
                                                          relay: RelaySink) -> None:
    gate = alice_forwards(gates, FRIEND)
    m = mark()
    looped = message(m, head=f"Delivered-To: {FRIEND}\r\n")
    assert status(lmtp(gate, [ALICE], looped)[0]) == (250, "2.0.0")
    assert len(copies(dove, ALICE, m)) == 1  # delivered here instead: never dropped
    gate.wait_log(rf"not forwarding <{ALICE}> to {FRIEND}: already in Delivered-To \(loop\)")
    assert relay.received() == []


def test_forward_loop_through_another_host_ends_here(gates, dove: Dovecot,
                                                     relay: RelaySink) -> None:
    """friend@elsewhere forwards back to alice: the second arrival is kept, not sent again."""
    gate = alice_forwards(gates, FRIEND)
    m = mark()
    assert status(lmtp(gate, [ALICE], message(m))[0]) == (250, "2.0.0")
    [first] = relay.wait_for(1)
    back = first.data  # what the other host sends back, our Delivered-To line included
    assert status(lmtp(gate, [ALICE], back, sender=first.sender)[0]) == (250, "2.0.0")
    assert len(copies(dove, ALICE, m)) == 1
    assert len(relay.received()) == 1


def test_relay_down_defers_only_the_forwarding_recipient(gates, dove: Dovecot,
                                                         relay: RelaySink) -> None:
    gate = alice_forwards(gates, FRIEND, keep_copy=True)
    relay.stop()
    m = mark()
    data = message(m)
    alice, bob = lmtp(gate, [ALICE, BOB], data)
    assert status(alice) == (451, "4.4.0") and status(bob) == (250, "2.0.0")
    assert len(copies(dove, ALICE, m)) == 1 and len(copies(dove, BOB, m)) == 1
    relay.start()
    # Postfix retries the deferred recipient only, with the same message.
    assert status(lmtp(gate, [ALICE], data)[0]) == (250, "2.0.0")
    [got] = relay.wait_for(1)
    assert got.recipients == (FRIEND,) and m.encode() in got.data
    assert len(copies(dove, ALICE, m)) == 1  # the local copy was not delivered twice


def test_restart_between_the_relay_failure_and_the_retry(gates, dove: Dovecot,
                                                         relay: RelaySink) -> None:
    gate = alice_forwards(gates, FRIEND, keep_copy=True)
    relay.stop()
    m = mark()
    data = message(m)
    assert status(lmtp(gate, [ALICE], data)[0]) == (451, "4.4.0")
    gate.restart()  # what was delivered is remembered in the store, not only in memory
    relay.start()
    assert status(lmtp(gate, [ALICE], data)[0]) == (250, "2.0.0")
    assert len(relay.wait_for(1)) == 1
    assert len(copies(dove, ALICE, m)) == 1


def test_relay_down_over_smtp_retry_delivers_nothing_twice(gates, dove: Dovecot,
                                                           relay: RelaySink) -> None:
    gate = alice_forwards(gates, FRIEND, CAROL, keep_copy=True)
    relay.refuse_rcpt = "451 4.3.0 try again later"
    m = mark()
    data = message(m)
    assert status(smtp(gate, [ALICE, BOB], data)) == (451, "4.4.0")
    relay.refuse_rcpt = ""
    assert smtp(gate, [ALICE, BOB], data)[0] == 250
    assert len(relay.wait_for(1)) == 1
    for addr in (ALICE, BOB, CAROL):
        assert len(copies(dove, addr, m)) == 1, addr


def test_target_refused_for_good_keeps_the_message_here(gates, dove: Dovecot,
                                                        relay: RelaySink) -> None:
    gate = alice_forwards(gates, FRIEND)
    relay.refuse_rcpt = "550 5.1.1 no such user here"
    m = mark()
    assert status(lmtp(gate, [ALICE], message(m))[0]) == (250, "2.0.0")
    assert len(copies(dove, ALICE, m)) == 1
    gate.wait_log(rf"forward for <{ALICE}> refused by {FRIEND}: keeping it in <{ALICE}>'s")


def test_refused_forward_kept_in_a_mailbox_another_forward_filled_gives_one_copy(
        gates, dove: Dovecot, relay: RelaySink) -> None:
    """alice forwards to friend@elsewhere, who refuses for good; bob forwards to alice. A
    message to both: alice's mailbox already has bob's forward of it, so keeping alice's
    refused forward there must not add a second copy."""
    gate = alice_forwards(gates, FRIEND)
    store_call(gate, "set_rule", Rule(BOB, forward=(ALICE,), keep_copy=False))
    relay.refuse_rcpt = "550 5.1.1 no such user here"
    m = mark()
    replies = lmtp(gate, [ALICE, BOB], message(m, to=f"{ALICE}>, <{BOB}"))
    assert [status(r) for r in replies] == [(250, "2.0.0")] * 2
    [kept] = copies(dove, ALICE, m)
    assert b"\nDelivered-To: bob@example.test\n" in kept
    assert copies(dove, BOB, m) == []
    gate.wait_log(rf"forward for <{ALICE}> refused by {FRIEND}: <{ALICE}>'s mailbox has it")


def test_rule_cleared_means_local_delivery(gates, dove: Dovecot, relay: RelaySink) -> None:
    gate = alice_forwards(gates, FRIEND)
    assert store_call(gate, "clear_rule", ALICE)
    m = mark()
    gate.stop()  # a fresh process: no cached rule
    gate.start()
    assert status(lmtp(gate, [ALICE], message(m))[0]) == (250, "2.0.0")
    assert len(copies(dove, ALICE, m)) == 1
    assert relay.received() == []


@pytest.mark.parametrize("backend", ["dynamodb"], indirect=True)
def test_store_restart_costs_nothing(gates, dove: Dovecot, relay: RelaySink, backend) -> None:
    """Invariant 8: DynamoDB going away and coming back costs the mail that arrives after it
    is back nothing, also for an address never read (no 4xx for the fail-fast window)."""
    gate = gates(overrides={"store": {"timeout": 30}})  # a window no restart fits in
    store_call(gate, "set_rule", Rule(BOB, forward=(FRIEND,), keep_copy=False))
    assert status(lmtp(gate, [BOB], message(mark(), to=BOB))[0]) == (250, "2.0.0")
    relay.wait_for(1)
    backend.moto.stop()
    assert status(lmtp(gate, [CAROL], message(mark(), to=CAROL))[0]) == (451, "4.3.0")
    backend.moto.start()
    cli(gate, "store", "init")  # moto forgets its tables when it stops; DynamoDB does not
    store_call(gate, "set_rule", Rule(ALICE, forward=(FRIEND,), keep_copy=False))
    m = mark()
    assert status(lmtp(gate, [ALICE], message(m))[0]) == (250, "2.0.0")
    assert len(relay.wait_for(2)) == 2 and copies(dove, ALICE, m) == []


@pytest.mark.parametrize("backend", ["dynamodb"], indirect=True)
def test_store_down_defers_unread_addresses_until_the_outage_budget(gates, dove: Dovecot,
                                                                    relay: RelaySink,
                                                                    backend) -> None:
    gate = gates(overrides={"store": {"outage_budget": 3}})
    store_call(gate, "set_rule", Rule(BOB, forward=(FRIEND,), keep_copy=False))
    m = mark()
    assert status(lmtp(gate, [BOB], message(m, to=BOB))[0]) == (250, "2.0.0")  # bob is read
    relay.wait_for(1)
    backend.moto.stop()
    m2 = mark()
    alice, bob = lmtp(gate, [ALICE, BOB], message(m2))
    assert status(alice) == (451, "4.3.0")  # never read: her redirect is not ignored
    assert status(bob) == (250, "2.0.0")    # read before: his rule keeps serving him
    assert len(relay.wait_for(2)) == 2 and copies(dove, ALICE, m2) == []
    # The sender retries; past the budget the message is delivered here, and that is logged.
    wait_until(lambda: lmtp(gate, [ALICE], message(m2))[0][0] == 250, 15, interval=0.5,
               what="alice delivered once store.outage_budget has passed")
    assert len(copies(dove, ALICE, m2)) == 1
    gate.wait_log(rf"past store.outage_budget\): <{ALICE}> delivered locally")


def over_quota(dove: Dovecot, address: str) -> None:
    """Dovecot with the quota plugin, and `address` a new user with 1 KB (every message of
    over 1 KB exceeds it: 552 5.2.2). The others keep no quota."""
    dove.stop()  # stopped, Dovecot reads the users file afresh when it starts
    if "quota = maildir" not in dove.conf.read_text():
        with open(dove.conf, "a") as conf:
            conf.write("mail_plugins = $mail_plugins quota\nplugin {\n"
                       "  quota = maildir:User quota\n}\n")
    dove.add_user(address)
    dove.users_file.write_text(dove.users_file.read_text().replace(
        f"{address}:{{PLAIN}}{PASSWORD}::::::\n",
        f"{address}:{{PLAIN}}{PASSWORD}::::::userdb_quota_rule=*:storage=1K\n"))
    dove.start()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_own_copy_refused_for_good_is_told_though_the_forward_went(gates, dove: Dovecot,
                                                                    relay: RelaySink) -> None:
    """keep_copy: the forward goes, the mailbox is full: the sender hears 552, not 250."""
    over_quota(dove, FULL)
    gate = gates()
    store_call(gate, "set_rule", Rule(FULL, forward=(FRIEND,), keep_copy=True))
    m = mark()
    data = message(m, to=FULL) + (b"x" * 70 + b"\r\n") * 30  # over the 1 KB quota
    [reply] = lmtp(gate, [FULL], data)
    assert status(reply) == (552, "5.2.2")
    assert len(relay.wait_for(1)) == 1  # the forward went once: remembered, not sent again
    assert copies(dove, FULL, m) == []
    gate.wait_log(rf"<{FULL}>: own mailbox refused for good, 1 of 2 copies delivered")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_forward_refused_for_good_with_a_copy_kept_is_delivered_and_logged(
        gates, dove: Dovecot, relay: RelaySink) -> None:
    """keep_copy: the mailbox has it, the target refuses for good: 250 (a 5xx would make
    Postfix bounce delivered mail to a sender who may be forged), logged; a second try does not
    put a second copy in the mailbox."""
    gate = alice_forwards(gates, FRIEND, keep_copy=True)
    relay.refuse_rcpt = "550 5.1.1 no such user here"
    m = mark()
    data = message(m)
    [reply] = lmtp(gate, [ALICE], data)
    assert status(reply) == (250, "2.0.0")
    assert len(copies(dove, ALICE, m)) == 1
    gate.wait_log(rf"<{ALICE}>: <{FRIEND}> refused for good, 1 of 2 copies delivered")


@pytest.mark.parametrize("backend", ["dynamodb"], indirect=True)
def test_store_down_defers_no_one_who_was_read_before(gates, dove: Dovecot, relay: RelaySink,
                                                      backend) -> None:
    """Every recipient read before the outage: served from what was read, none deferred."""
    gate = gates()
    store_call(gate, "set_rule", Rule(BOB, forward=(FRIEND,), keep_copy=False))
    assert [status(r) for r in lmtp(gate, [BOB, CAROL], message(mark(), to=BOB))] == \
        [(250, "2.0.0")] * 2  # bob and carol are read: bob forwards, carol has no rule
    relay.wait_for(1)
    backend.moto.stop()
    gate.restart()  # nothing in memory: what was read comes from the local copy (last_read)
    m = mark()
    assert status(lmtp(gate, [BOB], message(m, to=BOB))[0]) == (250, "2.0.0")
    assert len(relay.wait_for(2)) == 2 and copies(dove, BOB, m) == []
    assert status(lmtp(gate, [CAROL], message(m, to=CAROL))[0]) == (250, "2.0.0")
    assert len(copies(dove, CAROL, m)) == 1
