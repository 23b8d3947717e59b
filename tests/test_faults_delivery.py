"""Delivery faults at Dovecot: restarted, unreachable, a reply lost or late, quota full.

Real `mailgate serve`, real Dovecot, and between them tests/faultproxy.py where a fault must be
placed exactly (a reply lost after the final dot, a reply that never comes). Replies are pinned
with literals; copies are counted by a token in the maildir files (docs/RELIABILITY.md).
"""
from __future__ import annotations

import re
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import USERS
from faultkit import (ALICE, BOB, CAROL, SENDER, Raw, assert_reply, big_body, copies, lmtp,
                      maildir_files, message, send, smtp, token, written_by_dovecot)
from peers import PASSWORD, wait_until


def dovecot_relay(gate) -> str:
    return re.escape(f"relay=dovecot[{gate.config['delivery']['lmtp']}]")


# ---------------------------------------------------------------- a peer's restart costs nothing

def test_dovecot_restart_with_every_pooled_connection_open_costs_nothing(dovecot, fault_proxy,
                                                                        mailgate_factory):
    """Invariant 8: Dovecot restarts under N pooled connections; the next N messages, at
    once, are all asked about (RCPT) and delivered over fresh connections: no 4xx at all."""
    n = 4
    gate = mailgate_factory({"delivery": {"lmtp": fault_proxy.target, "maildir": "",
                                          "lmtp_connections": n, "recipient_cache": 0.01}})
    fault_proxy.mode, fault_proxy.delay = "delay", 0.5  # n deliveries overlap: n connections
    with ThreadPoolExecutor(n) as pool:
        for _, reply in pool.map(lambda _: send(gate, [ALICE], message(token())), range(n)):
            assert_reply(reply, "250 2.0.0")
    wait_until(lambda: fault_proxy.open == n, 10, what=f"{n} pooled connections")
    fault_proxy.mode = "pass"
    dovecot.restart()
    wait_until(lambda: fault_proxy.open == 0, 10, what="Dovecot closed every pooled connection")

    marks = [token() for _ in range(n)]
    ready = threading.Barrier(n, timeout=10)

    def one(mark: str) -> tuple[tuple, tuple]:
        with smtp(gate) as client:
            client.mail(SENDER)
            ready.wait()  # every RCPT at once: each probe takes a different stale connection
            return client.rcpt(ALICE), client.data(message(mark))
    with ThreadPoolExecutor(n) as pool:
        for rcpt, data in pool.map(one, marks):
            assert_reply(rcpt, "250 2.1.5")
            assert_reply(data, "250 2.0.0")
    assert [copies(dovecot, ALICE, m) for m in marks] == [1] * n
    assert len(re.findall(rf"to=<{ALICE}>, {dovecot_relay(gate)}, .*status=sent",
                          gate.log_text())) == 2 * n


def test_dovecot_restart_under_an_idle_connection_costs_the_next_message_nothing(
        dovecot, fault_proxy, mailgate_factory):
    """Invariant 8 with nothing asked first: the recipient is cached, so the next message meets
    the pooled connection Dovecot closed. A small message goes out with its envelope in one
    write (BDAT LAST): nothing may go out on the dead connection, and a fresh one takes it."""
    gate = mailgate_factory({"delivery": {"lmtp": fault_proxy.target, "maildir": ""}})
    assert_reply(send(gate, [ALICE], message(token()))[1], "250 2.0.0")
    wait_until(lambda: fault_proxy.open == 1, 10, what="the pooled connection")
    dovecot.restart()
    wait_until(lambda: fault_proxy.open == 0, 10, what="Dovecot closed the pooled connection")

    mark = token()
    assert_reply(send(gate, [ALICE], message(mark))[1], "250 2.0.0")
    assert copies(dovecot, ALICE, mark) == 1
    assert fault_proxy.connections == 2
    assert fault_proxy.chunked == fault_proxy.dots == 2  # each message once, as BDAT LAST


def test_dovecot_unreachable_defers_then_its_return_costs_nothing(dovecot, fault_proxy,
                                                                 mailgate_factory):
    """No fallback: Dovecot's port closed is 451 4.3.0 after DATA (recipient known from the
    cache) or 451 4.4.3 at RCPT (unknown); once it listens again mail flows, no 4xx."""
    gate = mailgate_factory({"delivery": {"lmtp": fault_proxy.target, "maildir": ""}})
    assert_reply(send(gate, [ALICE, BOB], message(token()))[1], "250 2.0.0")  # both cached
    fault_proxy.refuse()
    fault_proxy.reset_all()

    mark = token()
    answers, reply = send(gate, [ALICE, CAROL], message(mark))
    assert_reply(answers[ALICE], "250 2.1.5")
    assert_reply(answers[CAROL], "451 4.4.3")
    assert_reply(reply, "451 4.3.0")
    for reply in lmtp(gate, [ALICE, BOB], message(mark)):
        assert_reply(reply, "451 4.3.0")
    assert copies(dovecot, ALICE, mark) == copies(dovecot, BOB, mark) == 0

    fault_proxy.accept()
    back = token()
    answers, reply = send(gate, [ALICE, CAROL], message(back))
    assert_reply(answers[CAROL], "250 2.1.5")
    assert_reply(reply, "250 2.0.0")
    assert copies(dovecot, ALICE, back) == copies(dovecot, CAROL, back) == 1


# ---------------------------------------------------------------- RFC 1047: the reply lost

@pytest.mark.parametrize("how", ["drop", "reset"])
def test_reply_lost_after_the_final_dot_defers_and_never_falls_back(dovecot, fault_proxy,
                                                                   mailgate_factory, how):
    """Invariant 3: Dovecot got the whole message and delivered it, its 250 never reached
    us: 451 4.4.2, no fallback copy; the sender's retry makes the one duplicate, and only it."""
    gate = mailgate_factory({"delivery": {"lmtp": fault_proxy.target}})  # fallback on
    fault_proxy.mode = how
    mark = token()
    assert_reply(send(gate, [ALICE], message(mark))[1], "451 4.4.2")
    wait_until(lambda: copies(dovecot, ALICE, mark) == 1, 10, what="Dovecot's copy")
    assert all(map(written_by_dovecot, maildir_files(dovecot, ALICE))), "a fallback copy"
    assert "relay=maildir" not in gate.log_text()

    fault_proxy.mode = "pass"
    assert_reply(send(gate, [ALICE], message(mark))[1], "250 2.0.0")
    assert copies(dovecot, ALICE, mark) == 2


@pytest.mark.parametrize("listener", ["smtp", "lmtp"])
def test_dovecot_slower_than_the_message_budget(dovecot, fault_proxy, mailgate_factory,
                                                listener):
    """Invariant 6: Dovecot's reply would come after 700 s, lmtp_timeout is 60 s; the message
    budget (3 s) bounds the wait: 451 4.4.2 per recipient, well before Postfix's 600 s."""
    gate = mailgate_factory({"delivery": {"lmtp": fault_proxy.target, "lmtp_timeout": 60},
                             "limits": {"message_timeout": 3}})
    fault_proxy.mode = "hang"
    mark = token()
    session = Raw(getattr(gate, listener))
    session.to_data(ALICE, BOB, lmtp=listener == "lmtp")
    started = time.monotonic()
    session.send_data(message(mark))
    for _ in range(2 if listener == "lmtp" else 1):
        assert_reply(session.reply(), "451 4.4.2")
    assert time.monotonic() - started < 10
    session.close()
    assert fault_proxy.dots == 1
    assert "relay=maildir" not in gate.log_text()  # Dovecot may have it: never a second copy


def quota_full(dovecot, full: str) -> None:
    """Restart Dovecot with the quota plugin; `full` gets a 1 KB quota (every message exceeds it)."""
    dovecot.stop()
    with open(dovecot.conf, "a") as conf:
        conf.write("mail_plugins = $mail_plugins quota\nplugin {\n  quota = maildir:User quota\n}\n")
    dovecot.users_file.write_text("".join(
        f"{u}:{{PLAIN}}{PASSWORD}::::::{'userdb_quota_rule=*:storage=1K' if u == full else ''}\n"
        for u in USERS))
    dovecot.start()


def test_quota_full_is_552_5_2_2_for_that_recipient_never_the_fallback(dovecot,
                                                                       mailgate_factory):
    quota_full(dovecot, BOB)
    gate = mailgate_factory()  # fallback on: a permanent answer must not be routed around
    mark = token()
    data = message(mark, body=big_body(4096))
    alice, bob = lmtp(gate, [ALICE, BOB], data)
    assert_reply(alice, "250 2.0.0")
    assert_reply(bob, "552 5.2.2")
    assert_reply(send(gate, [BOB], data)[1], "552 5.2.2")
    assert copies(dovecot, ALICE, mark) == 1
    assert maildir_files(dovecot, BOB, "new", "cur", "tmp") == []
    assert "relay=maildir" not in gate.log_text()


# ---------------------------------------------------------------- the client goes away

@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_leaving_before_the_reply_neither_loses_nor_doubles(dovecot, fault_proxy,
                                                                   mailgate_factory, how):
    """The client disconnects while Dovecot is delivering: delivery finishes (shielded from the
    session, which a reset ends at once), is remembered, and the client's retry is answered
    250 without a second copy."""
    gate = mailgate_factory({"delivery": {"lmtp": fault_proxy.target}})
    fault_proxy.mode, fault_proxy.delay = "delay", 1.5
    mark = token()
    session = Raw(gate.smtp)
    session.to_data(ALICE)
    session.send_data(message(mark))
    wait_until(lambda: fault_proxy.dots == 1, 10, what="the message at Dovecot")
    if how == "reset":  # RST, not FIN: the session ends now, its task is cancelled
        session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    session.close()  # before our reply
    gate.wait_log(rf"to=<{ALICE}>, {dovecot_relay(gate)}, .*status=sent")
    fault_proxy.mode = "pass"

    assert_reply(send(gate, [ALICE], message(mark))[1], "250 2.0.0")
    assert copies(dovecot, ALICE, mark) == 1
    gate.wait_log(rf"to=<{ALICE}>, relay=none, .*already delivered")
