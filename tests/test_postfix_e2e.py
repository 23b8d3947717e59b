"""End to end with a real Postfix in front: swaks → Postfix → mailgate → Dovecot, both modes.

What is asserted is what an operator reads: Postfix's status= per recipient in its log, the mail in
the maildirs, mailgate's own log lines and the Received header it adds.
"""
from __future__ import annotations

import re
import uuid

import pytest

from peers import Dovecot, Postfix, swaks, wait_until
from mailgate.verdict import UNKNOWN_USER

pytestmark = pytest.mark.slow

ALICE, BOB, NOBODY = "alice@example.test", "bob@example.test", "nobody@example.test"
SENDER = "sender@remote.test"
SWAKS_HELO = "client.swaks-e2e.test"


def status_lines(postfix: Postfix, rcpt: str) -> list[tuple[str, str]]:
    """(status, rest of line) for every Postfix delivery line about `rcpt`."""
    return re.findall(rf"to=<{re.escape(rcpt)}>, relay=.*?status=(\w+) (.*)$", postfix.log_text(),
                      re.MULTILINE)


def wait_status(postfix: Postfix, rcpt: str, count: int = 1,
                timeout: float = 20) -> list[tuple[str, str]]:
    """The status lines for `rcpt` once there are at least `count` of them."""
    def enough() -> list[tuple[str, str]] | None:
        lines = status_lines(postfix, rcpt)
        return lines if len(lines) >= count else None
    return wait_until(enough, timeout, what=f"{count} postfix status line(s) for {rcpt}")


def queued(postfix: Postfix) -> set[str]:
    """Every recipient address still in Postfix's queue."""
    return {r["address"] for m in postfix.queue() for r in m.get("recipients", [])}


def subject_in(dovecot: Dovecot, addr: str, mark: str) -> list[bytes]:
    return [m for m in dovecot.maildir_messages(addr) if mark.encode() in m]


def send_via_postfix(postfix: Postfix, rcpts: list[str], mark: str) -> None:
    sent = swaks("--server", f"127.0.0.1:{postfix.smtpd_port}", "--helo", SWAKS_HELO,
                 "--from", SENDER, "--to", ",".join(rcpts), "--header", f"Subject: e2e {mark}")
    assert sent.returncode == 0, sent.stdout + sent.stderr


def test_lmtp_transport_sent_bounced_deferred_then_flushed(postfix: Postfix, dovecot: Dovecot,
                                                           mailgate_factory) -> None:
    # No fallback: bob's failure at Dovecot must reach Postfix as a deferral, not be hidden.
    gate = mailgate_factory({"delivery": {"maildir": ""}})
    postfix.use_virtual_lmtp(gate.lmtp[1])
    postfix.start()
    bob_tmp = dovecot.maildir(BOB) / "tmp"
    bob_tmp.chmod(0o000)
    mark = uuid.uuid4().hex
    try:
        send_via_postfix(postfix, [ALICE, NOBODY, BOB], mark)
        [(alice_status, _)] = wait_status(postfix, ALICE)
        [(nobody_status, nobody_text)] = wait_status(postfix, NOBODY)
        [(bob_status, bob_text)] = wait_status(postfix, BOB)
    finally:
        bob_tmp.chmod(0o700)
    assert (alice_status, nobody_status, bob_status) == ("sent", "bounced", "deferred")
    relay = f"relay=127.0.0.1[127.0.0.1]:{gate.lmtp[1]}"
    assert re.search(rf"to=<{ALICE}>, {re.escape(relay)}, .*status=sent", postfix.log_text())
    # mailgate refused nobody at RCPT with its own reply, which Postfix quotes in the bounce.
    assert f"{UNKNOWN_USER.code} {UNKNOWN_USER.status}" in nobody_text
    assert "RCPT TO" in nobody_text
    assert bob_text.startswith("(host 127.0.0.1[127.0.0.1] said: 4"), bob_text
    assert len(subject_in(dovecot, ALICE, mark)) == 1 and subject_in(dovecot, BOB, mark) == []
    gate.wait_log(rf"to=<{BOB}>, relay=dovecot\[127\.0\.0\.1:{dovecot.lmtp_port}\], "
                  r"delay=[\d.e-]+, dsn=4\.\d\.\d, status=deferred \(451 4\.2\.0 ")
    assert BOB in queued(postfix), postfix.queue()

    postfix.flush()
    statuses = wait_status(postfix, BOB, count=2)
    assert statuses[1][0] == "sent", statuses
    wait_until(lambda: subject_in(dovecot, BOB, mark), 10, what="bob's message in his maildir")
    assert len(subject_in(dovecot, BOB, mark)) == 1
    assert len(subject_in(dovecot, ALICE, mark)) == 1
    assert [s for s, _ in status_lines(postfix, ALICE)] == ["sent"]
    wait_until(lambda: BOB not in queued(postfix), 10, what="bob's message left postfix's queue")


def test_content_filter_received_header_shows_xforward_client(postfix: Postfix, dovecot: Dovecot,
                                                              mailgate_factory) -> None:
    gate = mailgate_factory()
    postfix.use_content_filter(gate.smtp[1])
    postfix.start()
    mark = uuid.uuid4().hex
    send_via_postfix(postfix, [ALICE, NOBODY], mark)

    [(alice_status, alice_text)] = wait_status(postfix, ALICE)
    [(nobody_status, nobody_text)] = wait_status(postfix, NOBODY)
    assert (alice_status, nobody_status) == ("sent", "bounced"), (alice_text, nobody_text)
    assert re.search(rf"to=<{ALICE}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{gate.smtp[1]}, .*"
                     r"status=sent", postfix.log_text())
    assert f"{UNKNOWN_USER.code} {UNKNOWN_USER.status}" in nobody_text
    queue_id = re.search(r"queued as (\w+)", alice_text).group(1)

    wait_until(lambda: subject_in(dovecot, ALICE, mark), 10, what="alice's message")
    [message] = subject_in(dovecot, ALICE, mark)
    headers = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode()  # Dovecot stores LF
    received = [h for h in re.split(r"\n(?![ \t])", headers) if h.startswith("Received:")]
    [ours] = [h for h in received if "(mailgate)" in h]
    # The original client, as XFORWARD told it: swaks's HELO and address, not Postfix's.
    assert re.match(rf"Received: from {re.escape(SWAKS_HELO)} \(\S+ \[127\.0\.0\.1\]\)", ours), ours
    assert f"id {queue_id}" in ours
    assert received.index(ours) < next(i for i, h in enumerate(received) if "(Postfix)" in h)
    # mailgate's log names the forwarded client: NAME is not "localhost" (the peer's own name).
    client = gate.wait_log(rf"^.*{queue_id}: client=(\S+)\[127\.0\.0\.1\], orig_queue_id=\w+$"
                           ).group(1)
    assert client != "localhost"
    gate.wait_log(rf"NOQUEUE: reject: RCPT from {re.escape(client)}\[127\.0\.0\.1\]: "
                  rf"550 5\.1\.1 <{NOBODY}>: .* helo=<{re.escape(SWAKS_HELO)}>")
    wait_until(lambda: ALICE not in queued(postfix), 10, what="alice's message left the queue")
