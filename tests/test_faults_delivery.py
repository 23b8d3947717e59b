"""Delivery faults: Dovecot restarted, unreachable, silent, slow, full; the fallback's disk full.

Real `mailgate serve`, real Dovecot, and between them tests/faultproxy.py where a fault must be
placed exactly (a reply lost after the final dot, a reply that never comes). Replies are pinned
with literals; copies are counted by a token in the maildir files (docs/RELIABILITY.md).
"""
from __future__ import annotations

import os
import re
import resource
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from faultkit import (ALICE, BOB, CAROL, SENDER, Raw, assert_reply, big_body, copies,
                      maildir_files, message, send, smtp, token, written_by_dovecot)
from conftest import USERS
from peers import PASSWORD, VMAIL_GID, VMAIL_UID, wait_until


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
    lmtp = Raw(gate.lmtp)
    lmtp.to_data(ALICE, BOB, lmtp=True)
    lmtp.send_data(message(mark))
    assert_reply(lmtp.reply(), "451 4.3.0")
    assert_reply(lmtp.reply(), "451 4.3.0")
    lmtp.close()
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
    lmtp = Raw(gate.lmtp)
    lmtp.to_data(ALICE, BOB, lmtp=True)
    lmtp.send_data(data)
    assert_reply(lmtp.reply(), "250 2.0.0")
    assert_reply(lmtp.reply(), "552 5.2.2")
    lmtp.close()
    assert_reply(send(gate, [BOB], data)[1], "552 5.2.2")
    assert copies(dovecot, ALICE, mark) == 1
    assert maildir_files(dovecot, BOB, "new", "cur", "tmp") == []
    assert "relay=maildir" not in gate.log_text()


# ---------------------------------------------------------------- the fallback's disk

@pytest.fixture
def small_tmpfs(dovecot):
    """alice's maildir on a 128 KB tmpfs (skipped where mounting is not permitted)."""
    path = dovecot.maildir(ALICE)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k,mode=0700,uid=5000,gid=5000",
                              "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); "
                    "the RLIMIT_FSIZE case stands for a full disk")
    try:
        for sub in ("cur", "new", "tmp"):
            (path / sub).mkdir(mode=0o700)
            os.chown(path / sub, VMAIL_UID, VMAIL_GID)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("full", ["fsize", "tmpfs"])
def test_disk_full_under_the_fallback_is_451_and_leaves_nothing(dovecot, mailgate_factory,
                                                                request, full):
    dovecot.stop()
    gate = mailgate_factory()
    unlimited = resource.RLIM_INFINITY
    if full == "fsize":  # mailgate may write no file past 64 KB (EFBIG, as a full disk)
        resource.prlimit(gate.pid, resource.RLIMIT_FSIZE, (64 * 1024, unlimited))
    else:
        request.getfixturevalue("small_tmpfs")
    mark = token()
    data = message(mark, body=big_body(300 * 1024))
    assert_reply(send(gate, [ALICE], data)[1], "451 4.3.0")
    assert maildir_files(dovecot, ALICE, "new", "cur", "tmp") == []
    gate.wait_log(rf"to=<{ALICE}>, relay=maildir, .*status=deferred .*"
                  r"(File too large|No space left on device)")

    if full == "fsize":
        resource.prlimit(gate.pid, resource.RLIMIT_FSIZE, (unlimited, unlimited))
        assert_reply(send(gate, [ALICE], data)[1], "250 2.0.0")
        assert copies(dovecot, ALICE, mark) == 1


def test_two_fallback_deliveries_in_the_same_second_are_distinct_files(dovecot,
                                                                       mailgate_factory):
    dovecot.stop()
    gate = mailgate_factory()
    for _ in range(5):  # bounded: two back-to-back deliveries nearly always share a second
        marks = [token(), token()]
        with smtp(gate) as client:
            for mark in marks:
                client.sendmail(SENDER, [ALICE], message(mark))
        names = [f.name for f in maildir_files(dovecot, ALICE, "new")
                 if any(m.encode() in f.read_bytes() for m in marks)]
        if len({name.split(".")[0] for name in names}) == 1:
            break
    else:
        pytest.fail("no two deliveries fell in the same second in 5 tries")
    assert len(names) == len(set(names)) == 2
    assert [copies(dovecot, ALICE, m) for m in marks] == [1, 1]


# ---------------------------------------------------------------- slow peers, large mail

def test_slow_5mb_upload_while_dovecot_answers_slowly_is_never_cut(dovecot, fault_proxy,
                                                                   mailgate_factory):
    """command_timeout 1 s; the upload takes seconds (gaps under 1 s), Dovecot's reply 2.5 s:
    neither is idleness; the message arrives whole."""
    gate = mailgate_factory({"listen": {"command_timeout": 1},
                             "delivery": {"lmtp": fault_proxy.target}})
    fault_proxy.mode, fault_proxy.delay = "delay", 2.5
    mark = token()
    data = message(mark, body=big_body(5 << 20, dots_every=50))
    session = Raw(gate.smtp)
    session.to_data(ALICE)
    stuffed = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in data.split(b"\r\n"))
    pieces = [stuffed[i:i + (1 << 18)] for i in range(0, len(stuffed), 1 << 18)]
    for piece in pieces:
        session.sock.sendall(piece)
        time.sleep(0.15)  # the slow client under test, not a wait for a result
    session.sock.sendall(b".\r\n")
    assert_reply(session.reply(), "250 2.0.0")
    session.close()
    [stored] = [f.read_bytes() for f in maildir_files(dovecot, ALICE) if mark.encode() in f.read_bytes()]
    assert stored.endswith(data.replace(b"\r\n", b"\n"))  # Dovecot stores LF line endings


@pytest.mark.parametrize("path", ["dovecot", "fallback"])
def test_large_message_arrives_byte_for_byte(dovecot, mailgate_factory, path):
    """Invariant 4 across the windows the body is sent and written in: every line of the
    first half starts with a dot (stuffed in every window), the second half has none."""
    if path == "fallback":
        dovecot.stop()
    gate = mailgate_factory()
    mark = token()
    data = message(mark, body=big_body(3 << 19, dots_every=1) + big_body(3 << 19) + b".\r\n")
    assert_reply(send(gate, [ALICE], data)[1], "250 2.0.0")
    [stored] = [f.read_bytes() for f in maildir_files(dovecot, ALICE) if mark.encode() in f.read_bytes()]
    body = data.replace(b"\r\n", b"\n")
    assert stored.endswith(body)
    added = stored[:-len(body)].decode().splitlines()
    assert {line.split(":")[0] for line in added if line[:1] not in " \t"} <= {
        "Return-Path", "Delivered-To", "Received"}, added


# ---------------------------------------------------------------- the client goes away

def test_client_leaving_before_the_reply_neither_loses_nor_doubles(dovecot, fault_proxy,
                                                                   mailgate_factory):
    """The client disconnects while Dovecot is delivering: delivery finishes (shielded from the
    session), is remembered, and the client's retry is answered 250 without a second copy."""
    gate = mailgate_factory({"delivery": {"lmtp": fault_proxy.target}})
    fault_proxy.mode, fault_proxy.delay = "delay", 1.5
    mark = token()
    session = Raw(gate.smtp)
    session.to_data(ALICE)
    session.send_data(message(mark))
    wait_until(lambda: fault_proxy.dots == 1, 10, what="the message at Dovecot")
    session.close()  # before our reply
    gate.wait_log(rf"to=<{ALICE}>, {dovecot_relay(gate)}, .*status=sent")
    fault_proxy.mode = "pass"

    assert_reply(send(gate, [ALICE], message(mark))[1], "250 2.0.0")
    assert copies(dovecot, ALICE, mark) == 1
    gate.wait_log(rf"to=<{ALICE}>, relay=none, .*already delivered")
