"""Where mailgate's log lines go under systemd: a real `mailgate serve` whose stderr is a file
that JOURNAL_STREAM names, as systemd names the journal's stream (sd_journal_stream_fd(3)).

Under the journal a line is the bare message with a "<N>" priority (journald adds time and tag);
with log.syslog on, lines go to syslog only, so the journal, which also keeps what reaches
/dev/log, has each line once. Outside the journal, lines keep Postfix's maillog form.
"""
from __future__ import annotations

import os
import re
import smtplib
import socket
from pathlib import Path

import pytest

from peers import Mailgate

ALICE = "alice@example.test"
SENDER = "sender@remote.test"
STAMP = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d ")  # a maillog file's time


def journal_stream(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def start_under_journal(factory, overrides: dict | None = None,
                        stream: str | None = None) -> Mailgate:
    """A mailgate whose stderr (its log file) is what JOURNAL_STREAM names, or `stream`."""
    gate = factory(overrides, start=False)
    gate.log_path.touch()
    gate.env["JOURNAL_STREAM"] = stream or journal_stream(gate.log_path)
    return gate.start()


def deliver(gate: Mailgate) -> str:
    """One message to alice; mailgate's queue id for it."""
    with smtplib.SMTP(*gate.smtp, local_hostname="client.log.test", timeout=20) as client:
        client.ehlo()
        client.sendmail(SENDER, [ALICE], b"Subject: log\r\n\r\nbody\r\n")  # raises unless 250
    return gate.wait_log(rf"(\w+): from=<{SENDER}>, to=<{ALICE}>, .*status=sent").group(1)


def test_under_the_journal_lines_are_bare_with_a_priority(dovecot, mailgate_factory) -> None:
    gate = start_under_journal(mailgate_factory)
    queue_id = deliver(gate)
    gate.wait_log(rf"^<6>{queue_id}: from=<{SENDER}>, to=<{ALICE}>, relay=dovecot\[127\.0\.0\.1:"
                  rf"{dovecot.lmtp_port}\], delay=[\d.]+, dsn=2\.0\.0, status=sent \(250 ")
    with socket.create_connection(gate.lookup, timeout=10) as s:  # a malformed lookup: a warning
        s.sendall(b"3:abcd,")
        s.recv(1)
    gate.wait_log(r"^<4>warning: lookup: malformed request from 127\.0\.0\.1:\d+: ")
    lines = gate.log_text().splitlines()
    assert lines and not any(STAMP.match(line) or "mailgate[" in line for line in lines), lines


def test_under_the_journal_with_syslog_each_line_is_written_once(dovecot, mailgate_factory,
                                                                 peer_root) -> None:
    path = peer_root / "syslog.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(path))
        syslog.settimeout(10)
        gate = start_under_journal(mailgate_factory, {"log": {"syslog": True,
                                                              "syslog_socket": str(path)}})
        with smtplib.SMTP(*gate.smtp, local_hostname="client.log.test", timeout=20) as client:
            client.sendmail(SENDER, [ALICE], b"Subject: log\r\n\r\nbody\r\n")
        wanted = f"<22>mailgate[{gate.pid}]: "
        for _ in range(50):  # bounded: the ready line, client=, from= come first
            datagram = syslog.recv(65536).decode().rstrip("\0")
            assert datagram.startswith(wanted), datagram
            if f"to=<{ALICE}>" in datagram and "status=sent" in datagram:
                break
        else:
            pytest.fail("no syslog line for alice's delivery")
        gate.stop()  # while the socket is there: the stopping lines go to it too
    assert gate.log_text() == "", gate.log_text()  # nothing on stderr: the journal has it once


def test_stderr_redirected_away_from_the_journal_keeps_the_maillog_form(dovecot,
                                                                        mailgate_factory) -> None:
    gate = start_under_journal(mailgate_factory, stream="1:1")  # inherited, but not our stderr
    queue_id = deliver(gate)
    gate.wait_log(rf"^[A-Z][a-z]{{2}} [ \d]\d \d\d:\d\d:\d\d mailgate\[{gate.pid}\]: {queue_id}: "
                  rf"from=<{SENDER}>, to=<{ALICE}>, ")


def test_syslog_socket_missing_falls_back_to_stderr(dovecot, mailgate_factory, peer_root) -> None:
    gate = mailgate_factory({"log": {"syslog": True,
                                     "syslog_socket": str(peer_root / "no-such.sock")}})
    gate.wait_log(rf"mailgate\[{gate.pid}\]: warning: syslog: cannot write to "
                  rf"{re.escape(str(peer_root))}/no-such\.sock \(.*\): logging to stderr only$")
    deliver(gate)


def test_what_a_client_says_cannot_forge_log_lines(dovecot, mailgate_factory) -> None:
    """XFORWARD values are xtext ("+0A" is a newline) and a HELO name may hold a bare CR: the
    client= and orig_queue_id= fields and the reject line's helo= show them with "?" for each
    control character, as Postfix's printable() does, never as lines of the client's choosing."""
    gate = mailgate_factory()
    forged = "FORGED+3A+20to=<bob@example.test>,+20status=sent"
    with smtplib.SMTP(*gate.smtp, local_hostname="client.log.test", timeout=20) as client:
        client.ehlo()
        code, _ = client.docmd("XFORWARD", f"NAME=mail.example.net+0A{forged} ADDR=192.0.2.7 "
                                           f"IDENT=ABC+0D+0A{forged} HELO=h+0A{forged}")
        assert code == 250
        client.mail(SENDER)
        assert client.rcpt("nobody@example.test")[0] == 550    # the reject line: helo=
        assert client.rcpt(ALICE)[0] == 250
        code, text = client.data(b"Subject: hi\r\n\r\nhello\r\n")
        assert code == 250
    queue_id = text.decode().rsplit(" ", 1)[1]
    gate.wait_log(rf"{queue_id}: from=<{SENDER}>, to=<{ALICE}>")
    with socket.create_connection(gate.smtp, timeout=20) as s:   # a bare CR in EHLO
        reader = s.makefile("rb")
        reader.readline()
        s.sendall(b"EHLO h\rFORGED: to=<x>\r\nMAIL FROM:<" + SENDER.encode() + b">\r\n"
                  b"RCPT TO:<nobody@example.test>\r\n")
        while not reader.readline().startswith(b"550"):
            pass
    gate.wait_log(r"NOQUEUE: reject: RCPT from localhost\[127\.0\.0\.1\]: 550 .*"
                  r"helo=<h\?FORGED: to=<x>>$")
    text = gate.log_text()
    assert f"{queue_id}: client=mail.example.net?FORGED: to=<bob@example.test>, status=sent" \
           f"[192.0.2.7], orig_queue_id=ABC??FORGED: to=<bob@example.test>, status=sent" in text
    assert "helo=<h?FORGED: to=<bob@example.test>, status=sent>" in text
    assert [line for line in text.splitlines() if line.startswith("FORGED")] == []
