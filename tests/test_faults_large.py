"""Large and slow messages: a slow 5 MB upload while Dovecot answers slowly, 3 MB byte for byte
through both paths, a line over 1000 octets. What arrives is what was sent (invariant 4).
"""
from __future__ import annotations

import time

import pytest

from faultkit import (ALICE, Raw, assert_reply, big_body, lmtp, maildir_files, message, send,
                      token)


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


def test_a_line_over_1000_octets_is_delivered_not_refused(dovecot, mailgate_factory):
    """Invariants 2 and 4: aiosmtpd answered 500 after DATA for such a line, a 5xx for mail
    Postfix had queued (Postfix takes long lines); now it arrives as sent."""
    gate = mailgate_factory()
    mark = token()
    data = message(mark, body=b"x" * 5000 + b"\r\n.a dot line\r\n")
    [reply] = lmtp(gate, [ALICE], data)
    assert_reply(reply, "250 2.0.0")
    [stored] = [f.read_bytes() for f in maildir_files(dovecot, ALICE) if mark.encode() in f.read_bytes()]
    assert stored.endswith(data.replace(b"\r\n", b"\n"))
