"""The listener as a client meets it: a real `mailgate serve` subprocess in front of real Dovecot.

Asserted: reply codes and enhanced status codes (named constants from mailgate.verdict), the
bytes Dovecot stored (IMAP or the maildir), and mailgate's log lines. One Dovecot and one
mailgate per distinct config serve the whole module (each start costs about a second); every
test marks its message with a fresh marker, so what another test delivered never counts.
"""
from __future__ import annotations

import email.utils
import json
import re
import select
import smtplib
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import USERS, base_config, merge, register
from mailgate import verdict
from mailgate.verdict import Reply
from peers import Dovecot, Mailgate, wait_until

TESTS = Path(__file__).resolve().parent
ALICE, BOB, CAROL = USERS
NOBODY = "nobody@example.test"
TEST_FILTERS = {"PYTHONPATH": str(TESTS)}  # makes tests/filters_for_tests.py importable
REPLY_TIMEOUT = 10.0  # seconds any single reply may take before a test fails

GateFactory = Callable[..., Mailgate]


# ---------------------------------------------------------------- peers for the module

@pytest.fixture(scope="module")
def gates(module_root: Path, dove: Dovecot) -> Iterator[dict[str, Mailgate]]:
    started: dict[str, Mailgate] = {}
    yield started
    errors = []
    for gate in started.values():  # every one is stopped even if an earlier stop failed
        try:
            assert gate.stop(timeout=10) == 0, gate.log_text()
        except Exception as e:  # re-raised below, after the others are stopped
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def gate(gates: dict[str, Mailgate], module_root: Path, dove: Dovecot,
         request: pytest.FixtureRequest) -> GateFactory:
    """`gate(overrides=None) -> Mailgate`: started once per distinct config, shared after."""
    register(request, "dovecot", dove)

    def get(overrides: dict | None = None) -> Mailgate:
        key = json.dumps(overrides or {}, sort_keys=True)
        if key not in gates:
            root = module_root / f"mailgate-{len(gates)}"
            gates[key] = Mailgate(root, merge(base_config(root, dove), overrides or {}),
                                  env=TEST_FILTERS).start()
        register(request, gates[key].root.name, gates[key])
        return gates[key]
    return get


# ---------------------------------------------------------------- clients and checks

def marker() -> str:
    return uuid.uuid4().hex


def message(mark: str, to: str = ALICE, sender: str = "sender@remote.test",
            subject: str | None = None) -> bytes:
    subject = subject or f"listener {mark}"
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{mark}@remote.test>\r\n\r\nbody {mark}\r\n").encode()


def dot_stuff(data: bytes) -> bytes:
    """DATA as it goes on the wire: lines starting with "." doubled, then CRLF.CRLF."""
    return re.sub(rb"(?m)^\.", b"..", data) + b".\r\n"


def assert_reply(got: tuple[int, bytes | str], expected: Reply) -> str:
    """`got` (code, text after the code) is `expected`'s code and enhanced status; the text."""
    code, text = got
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    assert (code, text.partition(" ")[0]) == (expected.code, expected.status), (code, text)
    return text


def queue_id(text: str) -> str:
    return re.search(r"queued as (\w+)", text).group(1)


class Session:
    """A raw SMTP/LMTP session, for what smtplib hides: pipelining, bare LF, pacing, LMTP."""

    def __init__(self, address: tuple[str, int], timeout: float = REPLY_TIMEOUT):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def reply(self) -> tuple[int, str]:
        """One reply; multi-line replies joined by newline. (0, "") when the server closed."""
        texts = []
        while True:
            line = self.file.readline()
            if not line:
                return 0, "\n".join(texts)
            line = line.decode("utf-8", "replace").rstrip("\r\n")
            texts.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(texts)

    def command(self, line: str) -> tuple[int, str]:
        self.send(line + "\r\n")
        return self.reply()

    def to_data(self, *rcpts: str, hello: str = "EHLO client.test",
                mail: str = "MAIL FROM:<sender@remote.test>") -> None:
        """Greeting, hello, MAIL and an accepted RCPT for each of `rcpts`, up to DATA's 354."""
        assert self.reply()[0] == 220
        assert self.command(hello)[0] == 250
        assert_reply(self.command(mail), verdict.SENDER_OK)
        for rcpt in rcpts:
            assert_reply(self.command(f"RCPT TO:<{rcpt}>"), verdict.RCPT_OK)
        assert self.command("DATA")[0] == 354

    def closed(self) -> bool:
        """True once the server closed the connection (EOF within the socket timeout)."""
        return self.file.read(1) == b""


def smtp(gate: Mailgate) -> smtplib.SMTP:
    client = smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=REPLY_TIMEOUT)
    client.ehlo()
    return client


def stored(dove: Dovecot, addr: str, mark: str) -> list[bytes]:
    """Messages with `mark` in addr's INBOX, over IMAP (CRLF, as Dovecot serves them)."""
    return [m for m in dove.fetch_imap(addr) if mark.encode() in m]


def on_disk(dove: Dovecot, addr: str, mark: str) -> list[bytes]:
    return [m for m in dove.maildir_messages(addr) if mark.encode() in m]


# RFC 5321 §4.4: "from" Extended-Domain "by" Extended-Domain "with" protocol "id" ["for"] ";" date
RECEIVED = re.compile(
    rb"Received: from (?P<helo>\S+) \((?P<name>\S+) \[(?P<addr>[^\]\s]+)\]\)\r\n"
    rb"\tby mx\.example\.test \(mailgate\) with (?P<proto>[A-Z0-9]+) id (?P<qid>[0-9A-F]+)"
    rb"(?:\r\n\tfor <(?P<for>[^>\s]+)>)?; (?P<date>[^\r\n]+)\r\n")


def mailgate_received(data: bytes) -> re.Match:
    """mailgate's Received header in a stored message; it appears once, with a fresh date."""
    found = list(RECEIVED.finditer(data))
    assert len(found) == 1, data[:2000]
    date = email.utils.parsedate_to_datetime(found[0]["date"].decode())
    assert abs(datetime.now(timezone.utc) - date) < timedelta(minutes=5), found[0]["date"]
    return found[0]


def after_received(data: bytes) -> bytes:
    """What follows mailgate's Received header: the message as the client sent it."""
    match = mailgate_received(data)
    ahead = data[:match.start()].decode("utf-8", "replace")
    # Ahead of it only Dovecot's own lines: Return-Path, Delivered-To and its Received header.
    assert re.fullmatch(r"(Return-Path: [^\r\n]*\r\n|Delivered-To: [^\r\n]*\r\n|"
                        r"Received: [^\r\n]*(\r\n[ \t][^\r\n]*)*\r\n)*", ahead), ahead
    return data[match.end():]


def delivery_lines(gate: Mailgate, qid: str) -> list[str]:
    return re.findall(rf"(?m)^.*\b{qid}: from=<[^>]*>, to=<.*$", gate.log_text())


def wait_delivery_lines(gate: Mailgate, qid: str, count: int) -> list[str]:
    return wait_until(lambda: len(delivery_lines(gate, qid)) >= count and delivery_lines(gate, qid),
                      REPLY_TIMEOUT, what=f"{count} log lines for {qid}")


def qid_of_sender(gate: Mailgate, sender: str) -> str:
    """The queue id of the (one) message logged with from=<sender>."""
    match = gate.wait_log(rf"(?m)^.*\b([0-9A-F]+): from=<{re.escape(sender)}>, to=<")
    return match.group(1)


# ---------------------------------------------------------------- delivery and replies

def test_smtp_three_recipients_one_unknown(gate: GateFactory, dove: Dovecot) -> None:
    mg = gate()
    mark = marker()
    sender = f"s-{mark}@remote.test"
    with smtp(mg) as client:
        assert_reply(client.mail(sender), verdict.SENDER_OK)
        assert_reply(client.rcpt(ALICE), verdict.RCPT_OK)
        assert_reply(client.rcpt(NOBODY), verdict.UNKNOWN_USER)  # decided at RCPT
        assert_reply(client.rcpt(BOB), verdict.RCPT_OK)
        qid = queue_id(assert_reply(client.data(message(mark)), verdict.DELIVERED))

    for addr in (ALICE, BOB):
        [data] = stored(dove, addr, mark)
        received = mailgate_received(data)
        assert (received["helo"], received["name"], received["addr"]) == \
            (b"client.test", b"localhost", b"127.0.0.1")
        assert (received["proto"], received["qid"]) == (b"ESMTP", qid.encode())
        assert received["for"] is None  # several recipients: none is named to the others
        assert after_received(data) == message(mark)
    assert not dove.maildir(NOBODY).exists()

    lines = wait_delivery_lines(mg, qid, 2)
    assert len(lines) == 2, lines
    for addr, line in zip((ALICE, BOB), lines):
        assert re.search(rf"{qid}: from=<{sender}>, to=<{addr}>, relay=dovecot\[127\.0\.0\.1:"
                         rf"{dove.lmtp_port}\], delay=[0-9.e+-]+, dsn=2\.0\.0, status=sent \(",
                         line), line
    reject = mg.wait_log(rf"NOQUEUE: reject: RCPT from .*: (\d{{3}}) (\S+) <{NOBODY}>.*"
                         rf"from=<{sender}>")
    assert (int(reject[1]), reject[2]) == (verdict.UNKNOWN_USER.code, verdict.UNKNOWN_USER.status)


def test_lmtp_one_reply_per_accepted_recipient_in_order(gate: GateFactory, dove: Dovecot) -> None:
    mg = gate()
    mark = marker()
    # Raw rather than lmtp_send: after the per-recipient replies the next line must answer QUIT.
    with Session(mg.lmtp) as s:
        assert s.reply()[0] == 220
        assert s.command("LHLO client.test")[0] == 250
        assert_reply(s.command("MAIL FROM:<sender@remote.test>"), verdict.SENDER_OK)
        assert_reply(s.command(f"RCPT TO:<{ALICE}>"), verdict.RCPT_OK)
        assert_reply(s.command(f"RCPT TO:<{NOBODY}>"), verdict.UNKNOWN_USER)
        assert_reply(s.command(f"RCPT TO:<{CAROL}>"), verdict.RCPT_OK)
        assert s.command("DATA")[0] == 354
        s.send(dot_stuff(message(mark)))
        first, second = s.reply(), s.reply()
        assert_reply(s.command("QUIT"), verdict.CLOSING)
    assert_reply(first, verdict.DELIVERED)
    assert_reply(second, verdict.DELIVERED)
    assert f"<{ALICE}>" in first[1] and f"<{CAROL}>" in second[1]
    for addr in (ALICE, CAROL):
        [data] = stored(dove, addr, mark)
        assert mailgate_received(data)["proto"] == b"LMTP"


@pytest.mark.parametrize("tail, expected", [
    ((b"y" * 76 + b"\r\n") * 200, verdict.TOO_BIG),  # message_size is 10000
    (b"a bare\nLF\r\n", verdict.BARE_NEWLINE),
], ids=["too-big", "bare-lf"])
def test_lmtp_refusal_after_data_is_one_line_per_recipient(gate: GateFactory, dove: Dovecot,
                                                           tail: bytes, expected: Reply) -> None:
    mark = marker()
    with Session(gate({"limits": {"message_size": 10000}}).lmtp) as s:
        s.to_data(ALICE, BOB, hello="LHLO client.test")
        s.send(message(mark) + tail + b".\r\n")
        assert_reply(s.reply(), expected)
        assert_reply(s.reply(), expected)
        assert_reply(s.command("QUIT"), verdict.CLOSING)
    assert on_disk(dove, ALICE, mark) == [] and on_disk(dove, BOB, mark) == []


def test_relay_attempt_is_denied_at_rcpt(gate: GateFactory, dove: Dovecot) -> None:
    with smtp(gate()) as client:
        client.mail("sender@remote.test")
        assert_reply(client.rcpt("someone@elsewhere.test"), verdict.RELAY_DENIED)
        assert_reply(client.rcpt("alice@example.test.elsewhere.test"), verdict.RELAY_DENIED)
        assert_reply(client.rcpt(ALICE), verdict.RCPT_OK)


@pytest.mark.parametrize("address", [
    "<a@@b>", "<a@@example.test>", "<foo bar@example.test>", "<alice (comment)@example.test>",
    "<alice>", "alice@example.test>", "<>"])
def test_malformed_recipient_is_bad_syntax(gate: GateFactory, address: str) -> None:
    with Session(gate().smtp) as s:
        s.reply()
        s.command("EHLO client.test")
        assert_reply(s.command("MAIL FROM:<sender@remote.test>"), verdict.SENDER_OK)
        assert_reply(s.command(f"RCPT TO:{address}"), verdict.BAD_RECIPIENT)


@pytest.mark.parametrize("command, expected", [
    (b"MAIL FROM:<\xff@b.test> SMTPUTF8", verdict.BAD_SENDER),       # not UTF-8
    (b"MAIL FROM:<a\x00b@b.test>", verdict.BAD_SENDER),
    (b"MAIL FROM:<a@b.test\x7f>", verdict.BAD_SENDER),
    (b"RCPT TO:<\xff@example.test>", verdict.BAD_RECIPIENT),
    (b"RCPT TO:<alice\r@example.test>", verdict.BAD_RECIPIENT),      # not alice: refused
    (b"RCPT TO:<alice\x00@example.test>", verdict.BAD_RECIPIENT),
    (b"RCPT TO:<ali\x1bce@example.test>", verdict.BAD_RECIPIENT),
    (b'RCPT TO:<"ali\x01ce"@example.test>', verdict.BAD_RECIPIENT),
], ids=["mail-not-utf8", "mail-nul", "mail-del", "rcpt-not-utf8", "rcpt-cr", "rcpt-nul",
        "rcpt-esc", "rcpt-quoted-control"])
def test_path_with_a_control_character_or_not_utf8_is_bad_syntax(gate: GateFactory,
                                                                  dove: Dovecot, command: bytes,
                                                                  expected: Reply) -> None:
    """Refused at the command (501), not accepted and then lost to a 451 at every DATA, nor
    delivered to another address with the character dropped."""
    mark = marker()
    with Session(gate().smtp) as s:
        s.reply()
        s.command("EHLO client.test")
        if command.startswith(b"RCPT"):
            assert_reply(s.command("MAIL FROM:<sender@remote.test> SMTPUTF8"), verdict.SENDER_OK)
        s.send(command + b"\r\n")
        code, text = s.reply()
        assert (code, text.partition(" ")[0]) == (501, "5.1.7" if expected is verdict.BAD_SENDER
                                                  else "5.1.3"), (code, text)
        # the session goes on, and so does the transaction where there is one
        if command.startswith(b"MAIL"):
            assert_reply(s.command("MAIL FROM:<sender@remote.test>"), verdict.SENDER_OK)
        assert_reply(s.command(f"RCPT TO:<{BOB}>"), verdict.RCPT_OK)
        assert s.command("DATA")[0] == 354
        s.send(dot_stuff(message(mark, to=BOB)))
        assert_reply(s.reply(), verdict.DELIVERED)
    assert on_disk(dove, ALICE, mark) == [] and len(on_disk(dove, BOB, mark)) == 1


@pytest.mark.parametrize("address", ["postmaster", "PostMaster", "POSTMASTER"])
def test_postmaster_without_a_domain_is_accepted(gate: GateFactory, dove: Dovecot,
                                                 address: str) -> None:
    """RFC 5321 §4.5.1: a server MUST accept <postmaster> (any case); it is the postmaster of
    the first of `domains`."""
    postmaster = "postmaster@example.test"
    dove.add_user(postmaster)
    mg = gate()
    mark = marker()
    with Session(mg.smtp) as s:
        s.reply()
        s.command("EHLO client.test")
        assert_reply(s.command("MAIL FROM:<sender@remote.test>"), verdict.SENDER_OK)
        code, text = s.command(f"RCPT TO:<{address}>")
        assert (code, text.partition(" ")[0]) == (250, "2.1.5"), (code, text)
        assert s.command("DATA")[0] == 354
        s.send(dot_stuff(message(mark, to=address)))
        qid = queue_id(assert_reply(s.reply(), verdict.DELIVERED))
    assert len(stored(dove, postmaster, mark)) == 1
    [line] = wait_delivery_lines(mg, qid, 1)
    assert f"to=<{postmaster}>" in line and "status=sent" in line, line


def test_helo_reply_has_no_enhanced_status_code(gate: GateFactory) -> None:
    """RFC 2034 §3: no enhanced code on the replies to HELO or EHLO; on the next command, one."""
    with Session(gate().smtp) as s:
        s.reply()
        assert s.command("HELO client.test") == (250, "mx.example.test")
        assert s.command("HELO") == (501, "Syntax: HELO hostname")
        assert_reply(s.command("MAIL FROM:<sender@remote.test>"), verdict.SENDER_OK)
        assert s.command("EHLO client.test")[1].split("\n")[0] == "mx.example.test"


def test_starttls_is_refused_with_an_enhanced_status_code(gate: GateFactory) -> None:
    with Session(gate().smtp) as s:
        s.reply()
        s.command("EHLO client.test")
        assert s.command("STARTTLS") == (454, "4.7.0 TLS not available")


def test_size_parameter_that_is_not_ascii_digits_is_bad_syntax(gate: GateFactory) -> None:
    """"²".isdigit() is true in Python, int("²") fails: a 501, not a 451 with a traceback."""
    mg = gate()
    with Session(mg.smtp) as s:
        s.reply()
        s.command("EHLO client.test")
        for size in ("²", "١٢", "1x"):
            s.send(f"MAIL FROM:<sender@remote.test> SIZE={size}\r\n".encode())
            code, text = s.reply()
            assert (code, text.partition(" ")[0]) == (501, "5.5.4"), (size, code, text)
        assert_reply(s.command("MAIL FROM:<sender@remote.test> SIZE=100"), verdict.SENDER_OK)
    assert "internal error" not in mg.log_text()


def test_long_mail_command_after_ehlo_does_not_depend_on_other_sessions(gate: GateFactory) -> None:
    """After EHLO, MAIL may be longer than 512 octets (room for SIZE= and SMTPUTF8, RFC 1870
    and 6531); another client connecting in between must not take that away."""
    mg = gate()
    command = "MAIL FROM:<{}@remote.test>"
    command = command.format("x" * (540 - len(command.format(""))))
    assert len(command) == 540
    with Session(mg.smtp) as first:
        first.reply()
        assert first.command("EHLO client.test")[0] == 250
        with Session(mg.smtp) as second:
            assert second.reply()[0] == 220  # its session is set up
            assert_reply(first.command(command), verdict.SENDER_OK)
            assert second.command("EHLO other.test")[0] == 250
            assert_reply(second.command(command), verdict.SENDER_OK)


@pytest.mark.parametrize("listener", ["smtp", "lmtp"])
def test_bug_at_one_rcpt_leaves_the_transaction_standing(gate: GateFactory, dove: Dovecot,
                                                         listener: str) -> None:
    """Our bug at carol's RCPT is a 451 for carol only: MAIL and the recipients accepted
    before stand, a later RCPT is accepted, DATA goes ahead and both get the message."""
    mg = gate({"pipeline": {"filters": ["filters_for_tests:BugAtRcpt"]}})
    mark = marker()
    lmtp = listener == "lmtp"
    with Session(mg.lmtp if lmtp else mg.smtp) as s:
        s.reply()
        assert s.command("LHLO client.test" if lmtp else "EHLO client.test")[0] == 250
        assert_reply(s.command("MAIL FROM:<sender@remote.test>"), verdict.SENDER_OK)
        assert_reply(s.command(f"RCPT TO:<{ALICE}>"), verdict.RCPT_OK)
        code, text = s.command(f"RCPT TO:<{CAROL}>")
        assert (code, text.partition(" ")[0]) == (451, "4.3.0"), (code, text)
        assert_reply(s.command(f"RCPT TO:<{BOB}>"), verdict.RCPT_OK)
        assert s.command("DATA")[0] == 354
        s.send(dot_stuff(message(mark)))
        for _ in range(2 if lmtp else 1):
            assert_reply(s.reply(), verdict.DELIVERED)
        assert_reply(s.command("QUIT"), verdict.CLOSING)
    assert len(on_disk(dove, ALICE, mark)) == len(on_disk(dove, BOB, mark)) == 1
    assert on_disk(dove, CAROL, mark) == []
    mg.wait_log(r"error: internal error, answered 451 4\.3\.0")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


BLOCKED = 2.0  # seconds a sending client finds no room in before it counts as blocked
HELPS = b"HELP\r\n" * 20_000  # HELP: a long reply to a short command


def send_without_reading(mg: Mailgate, limit: int) -> tuple[socket.socket, int]:
    """A client that pipelines HELP and reads nothing: the socket, once its sends block (or
    the server drops it, or `limit` bytes went), and how many bytes went."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # replies back up soon
    sock.connect(mg.smtp)
    sock.setblocking(False)
    sent = 0
    try:
        while sent < limit and select.select([], [sock], [], BLOCKED)[1]:
            sent += sock.send(HELPS[sent % len(HELPS):])
    except ConnectionError:
        pass
    return sock, sent


def test_client_that_never_reads_its_replies_is_not_read_without_bound(gate: GateFactory) -> None:
    """A client that pipelines commands and never reads the replies: once they back up,
    mailgate stops reading it, so the client blocks and mailgate's memory stays put (it would
    otherwise hold all the client sends). Other clients are served meanwhile and after."""
    mg = gate()
    before, limit = rss_bytes(mg.proc.pid), 96 << 20
    sock, sent = send_without_reading(mg, limit)
    with sock:
        grown = rss_bytes(mg.proc.pid) - before
        assert sent < limit, "mailgate read all that a client that reads nothing sent"
        assert grown < 16 << 20, f"mailgate grew by {grown} bytes"
        with smtp(mg) as other:
            assert other.noop()[0] == 250
    with smtp(mg) as after:
        assert after.noop()[0] == 250


def test_client_that_never_reads_loses_its_session_at_the_idle_deadline(gate: GateFactory) -> None:
    """Its replies cannot be delivered, so closing politely would wait for ever and keep its
    slot under max_sessions: at the idle deadline it is cut off, and the next client is served."""
    mg = gate({"listen": {"max_sessions": 1, "command_timeout": 1}})
    sock, _ = send_without_reading(mg, 96 << 20)
    with sock:
        def greeted() -> bool:
            with Session(mg.smtp) as s:
                return s.reply()[0] == 220
        wait_until(greeted, REPLY_TIMEOUT, what="a session once the one that never reads is cut")


def test_unreadable_path_is_501_and_what_was_pipelined_after_it_is_answered(
        gate: GateFactory) -> None:
    """Paths the address parser fails on in other ways than a parse error ("<" is an
    IndexError inside it) are the client's syntax error, not our failure."""
    with Session(gate().smtp) as s:
        s.reply()
        assert s.command("EHLO client.test")[0] == 250
        s.send("MAIL FROM:<\r\nNOOP\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<\r\nVRFY <\r\n")
        assert_reply(s.reply(), verdict.BAD_SENDER)
        assert s.reply()[0] == 250
        assert_reply(s.reply(), verdict.SENDER_OK)
        assert_reply(s.reply(), verdict.BAD_RECIPIENT)
        assert s.reply()[0] == 502
        assert_reply(s.command("QUIT"), verdict.CLOSING)


def test_filter_leaking_cancellation_is_451_and_the_replies_stay_in_step(
        gate: GateFactory, dove: Dovecot) -> None:
    """asyncio.CancelledError from a filter is no Exception; with the client still there it
    is our bug all the same: that command gets 451, and what was pipelined after it gets its
    own reply, not the one before."""
    mg = gate({"pipeline": {"filters": ["filters_for_tests:Cancels"]}})
    mark = marker()
    with Session(mg.smtp) as s:
        s.reply()
        assert s.command("EHLO client.test")[0] == 250
        s.send(f"MAIL FROM:<s-{mark}@remote.test>\r\nRCPT TO:<{CAROL}>\r\n"
               f"RCPT TO:<{ALICE}>\r\nDATA\r\n")
        assert_reply(s.reply(), verdict.SENDER_OK)
        assert_reply(s.reply(), verdict.TEMP_FAILURE)
        assert_reply(s.reply(), verdict.RCPT_OK)
        assert s.reply()[0] == 354
        s.send(dot_stuff(message(mark)) + b"MAIL FROM:<again@remote.test>\r\n")
        assert_reply(s.reply(), verdict.TEMP_FAILURE)
        assert_reply(s.reply(), verdict.SENDER_OK)  # a new transaction: the old one ended
        assert_reply(s.command("QUIT"), verdict.CLOSING)
    assert on_disk(dove, ALICE, mark) == []
    mg.wait_log(r"error: internal error, answered 451 4\.3\.0")


def test_quoting_dots_do_not_count_against_the_size_limit(gate: GateFactory,
                                                         dove: Dovecot) -> None:
    """RFC 1870 §6: SIZE is the message as delivered. 1500 lines ".abc" are 9000 bytes of
    message and 10500 on the wire; the limit is 10000: delivered, as Postfix would."""
    mg = gate({"limits": {"message_size": 10000}})
    mark = marker()
    data = message(mark) + b".abc\r\n" * 1500
    assert len(data) <= 10000 < len(dot_stuff(data))
    with Session(mg.smtp) as s:
        s.reply()
        assert s.command("EHLO client.test")[0] == 250
        assert_reply(s.command(f"MAIL FROM:<sender@remote.test> SIZE={len(data)}"),
                     verdict.SENDER_OK)
        assert_reply(s.command(f"RCPT TO:<{ALICE}>"), verdict.RCPT_OK)
        assert s.command("DATA")[0] == 354
        s.send(dot_stuff(data))
        assert_reply(s.reply(), verdict.DELIVERED)
    assert on_disk(dove, ALICE, mark)[0].endswith(b".abc\n" * 1500)  # maildir: LF lines


def test_pipelined_rcpts_checked_for_longer_than_the_idle_deadline_are_answered(
        gate: GateFactory, dove: Dovecot) -> None:
    """The client is not idle while we owe it answers: three RCPTs pipelined, each checked
    for 1.5 s, against a 1 s command_timeout."""
    mg = gate({"listen": {"command_timeout": 1},
               "pipeline": {"filters": ["filters_for_tests:SlowAtRcpt"]}})
    mark = marker()
    with Session(mg.smtp) as s:
        s.reply()
        assert s.command("EHLO client.test")[0] == 250
        s.send(f"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<{ALICE}>\r\n"
               f"RCPT TO:<{BOB}>\r\nRCPT TO:<{CAROL}>\r\nDATA\r\n")
        assert_reply(s.reply(), verdict.SENDER_OK)
        for _ in range(3):
            assert_reply(s.reply(), verdict.RCPT_OK)
        assert s.reply()[0] == 354
        s.send(dot_stuff(message(mark)))
        assert_reply(s.reply(), verdict.DELIVERED)
    assert len(on_disk(dove, CAROL, mark)) == 1


def test_client_that_shuts_its_side_after_quit_gets_every_reply(gate: GateFactory,
                                                                dove: Dovecot) -> None:
    """The message, the final dot and QUIT, then the client's half-close (a client may do
    that): it is still answered, as Postfix's smtpd answers it, and then closed."""
    mg = gate()
    mark = marker()
    with Session(mg.smtp) as s:
        s.reply()
        assert s.command("EHLO client.test")[0] == 250
        s.send(f"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n")
        assert_reply(s.reply(), verdict.SENDER_OK)
        assert_reply(s.reply(), verdict.RCPT_OK)
        assert s.reply()[0] == 354
        s.send(dot_stuff(message(mark)) + b"QUIT\r\n")
        s.sock.shutdown(socket.SHUT_WR)
        assert_reply(s.reply(), verdict.DELIVERED)
        assert_reply(s.reply(), verdict.CLOSING)
        assert s.closed()
    assert len(on_disk(dove, ALICE, mark)) == 1


def test_refused_mail_leaves_no_parameter_for_the_next(gate: GateFactory) -> None:
    """SMTPUTF8 on a MAIL refused for another parameter does not make the next MAIL's
    UTF-8 path acceptable."""
    with Session(gate().smtp) as s:
        s.reply()
        assert s.command("EHLO client.test")[0] == 250
        assert_reply(s.command("MAIL FROM:<s@remote.test> SMTPUTF8 BODY=8BITMIME FOO=1"),
                     verdict.BAD_PARAMETER)
        assert_reply(s.command("MAIL FROM:<j\u00fcrgen@remote.test>"), verdict.BAD_SENDER)
        assert_reply(s.command("MAIL FROM:<j\u00fcrgen@remote.test> SMTPUTF8"), verdict.SENDER_OK)


def test_ehlo_advertises_extensions(gate: GateFactory) -> None:
    with smtp(gate({"limits": {"message_size": 10000}})) as client:
        features = client.esmtp_features
    assert features["size"] == "10000"
    for word in ("8bitmime", "smtputf8", "enhancedstatuscodes", "pipelining"):
        assert word in features, features
    assert set(features["xforward"].split()) >= {"NAME", "ADDR", "PROTO", "HELO"}


def test_size_parameter_over_the_limit_is_refused_at_mail(gate: GateFactory) -> None:
    with smtp(gate({"limits": {"message_size": 10000}})) as client:
        assert_reply(client.mail("sender@remote.test", ["SIZE=10001"]), verdict.TOO_BIG)
        assert_reply(client.mail("sender@remote.test", ["SIZE=9999"]), verdict.SENDER_OK)


def test_data_over_the_limit_is_refused_and_not_delivered(gate: GateFactory,
                                                          dove: Dovecot) -> None:
    mark = marker()
    big = message(mark) + (b"y" * 76 + b"\r\n") * 200  # about 15600 bytes
    with smtp(gate({"limits": {"message_size": 10000}})) as client:
        client.mail("sender@remote.test")  # no SIZE=: the limit is found while reading DATA
        client.rcpt(ALICE)
        assert_reply(client.data(big), verdict.TOO_BIG)
        # the session goes on: a message under the limit is taken
        client.mail("sender@remote.test")
        client.rcpt(BOB)
        assert_reply(client.data(message(mark, to=BOB)), verdict.DELIVERED)
    assert on_disk(dove, ALICE, mark) == []
    assert len(on_disk(dove, BOB, mark)) == 1


def test_postfix_parameters_are_accepted(gate: GateFactory, dove: Dovecot) -> None:
    mark = marker()
    with smtp(gate()) as client:
        assert_reply(client.mail("sender@remote.test", ["RET=HDRS", "ENVID=abc",
                                                        "BODY=8BITMIME"]), verdict.SENDER_OK)
        assert_reply(client.rcpt(ALICE, ["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{ALICE}"]),
                     verdict.RCPT_OK)
        assert_reply(client.rcpt(BOB, ["NOTIFY=NEVER", "ORCPT=rfc822;x@y"]), verdict.RCPT_OK)
        assert_reply(client.data(message(mark)), verdict.DELIVERED)
    assert len(stored(dove, ALICE, mark)) == 1 and len(stored(dove, BOB, mark)) == 1


def test_unknown_parameters_are_refused(gate: GateFactory) -> None:
    with smtp(gate()) as client:
        assert_reply(client.mail("sender@remote.test", ["FOO=bar"]), verdict.BAD_PARAMETER)
        assert_reply(client.mail("sender@remote.test"), verdict.SENDER_OK)
        assert_reply(client.rcpt(ALICE, ["FOO=bar"]), verdict.BAD_PARAMETER)
        assert_reply(client.rcpt(ALICE), verdict.RCPT_OK)


def test_null_sender_is_delivered(gate: GateFactory, dove: Dovecot) -> None:
    mark = marker()
    with Session(gate().smtp) as s:
        s.to_data(ALICE, mail="MAIL FROM:<>")
        s.send(dot_stuff(message(mark, sender="MAILER-DAEMON@remote.test")))
        assert_reply(s.reply(), verdict.DELIVERED)
    [data] = stored(dove, ALICE, mark)
    assert data.startswith(b"Return-Path: <>\r\n"), data[:200]


def test_smtputf8_sender_is_delivered(gate: GateFactory, dove: Dovecot) -> None:
    mark = marker()
    sender = "δοκιμή@example.test"
    mg = gate()
    with smtp(mg) as client:
        assert_reply(client.mail(sender, ["SMTPUTF8", "BODY=8BITMIME"]), verdict.SENDER_OK)
        assert_reply(client.rcpt(ALICE), verdict.RCPT_OK)
        data = message(mark, sender=sender, subject=f"Grüße {mark}")
        qid = queue_id(assert_reply(client.data(data), verdict.DELIVERED))
    [got] = stored(dove, ALICE, mark)
    assert after_received(got) == data
    assert f"with UTF8SMTP id {qid}".encode() in got  # RFC 6531 §3.7.3
    [line] = wait_delivery_lines(mg, qid, 1)
    assert f"from=<{sender}>, to=<{ALICE}>" in line and "status=sent" in line, line
    # XXX Dovecot 2.3's LMTP has no SMTPUTF8: it takes the UTF-8 sender and stores
    # "Return-Path: <>", so the stored message does not name the sender.


# ---------------------------------------------------------------- what arrives is what was sent

def test_dot_stuffing_folding_and_8bit_arrive_byte_identical(gate: GateFactory,
                                                             dove: Dovecot) -> None:
    mark = marker()
    original = (
        b"From: <sender@remote.test>\r\n"
        b"To: <alice@example.test>\r\n"
        b"Subject: odd  folding " + mark.encode() + b"\r\n"
        b"   \t continued with blanks \r\n"
        b"\tand a tab\r\n"
        b"X-No-Space:value\r\n"
        b"X-Empty:\r\n"
        b"X-8bit: caf\xc3\xa9 \xe2\x82\xac\r\n"
        b"\r\n"
        b".starts with a dot\r\n"
        b"..two dots\r\n"
        b".\r\n"
        b" . space dot\r\n"
        b"trailing blanks   \t\r\n"
        b"raw 8-bit: \xff\xfe\x80 latin1 caf\xe9\r\n"
        b"\r\n"
        b"\r\n"
        b"last line\r\n")
    with Session(gate().smtp) as s:
        s.to_data(ALICE, mail="MAIL FROM:<sender@remote.test> BODY=8BITMIME")
        s.send(dot_stuff(original))
        assert_reply(s.reply(), verdict.DELIVERED)

    [over_imap] = stored(dove, ALICE, mark)
    assert mailgate_received(over_imap)["for"] == ALICE.encode()  # one recipient: named
    assert after_received(over_imap) == original
    [in_maildir] = on_disk(dove, ALICE, mark)  # Dovecot stores LF line endings
    assert after_received(in_maildir.replace(b"\n", b"\r\n")) == original


def test_bare_lf_and_bare_cr_are_refused(gate: GateFactory, dove: Dovecot) -> None:
    mark = marker()
    with Session(gate().smtp) as s:
        s.reply()
        s.command("EHLO client.test")
        for bad in (b"a bare LF\nhere\r\n", b"a bare CR\rhere\r\n", b"LF CR\n\rhere\r\n"):
            assert_reply(s.command("MAIL FROM:<sender@remote.test>"), verdict.SENDER_OK)
            assert_reply(s.command(f"RCPT TO:<{ALICE}>"), verdict.RCPT_OK)
            assert s.command("DATA")[0] == 354
            s.send(message(mark) + bad + b".\r\n")
            assert_reply(s.reply(), verdict.BARE_NEWLINE)
        assert_reply(s.command("QUIT"), verdict.CLOSING)
    assert on_disk(dove, ALICE, mark) == []


@pytest.mark.parametrize("ending", [b"\n.\n", b"\r\n.\n", b"\n.\r\n.\n", b"\r.\r"])
def test_smuggled_second_message_never_reaches_dovecot(gate: GateFactory, dove: Dovecot,
                                                       ending: bytes) -> None:
    mark, evil = marker(), marker()
    smuggled = (b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                + message(evil, to=BOB) + b".\r\n")
    with Session(gate().smtp) as s:
        s.reply()
        s.command("EHLO client.test")
        s.send(f"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n")
        assert_reply(s.reply(), verdict.SENDER_OK)
        assert_reply(s.reply(), verdict.RCPT_OK)
        assert s.reply()[0] == 354
        s.send(message(mark) + b"innocent" + ending + smuggled)  # ends in the real CRLF.CRLF
        assert_reply(s.reply(), verdict.BARE_NEWLINE)
        assert_reply(s.command("QUIT"), verdict.CLOSING)  # no reply for a smuggled command
    assert on_disk(dove, ALICE, mark) == []
    assert on_disk(dove, BOB, evil) == [] and on_disk(dove, ALICE, evil) == []


def test_pipelined_transactions_each_get_their_replies(gate: GateFactory, dove: Dovecot) -> None:
    marks = [marker(), marker()]
    with Session(gate().smtp) as s:
        s.reply()
        s.command("EHLO client.test")
        for mark, rcpt in zip(marks, (ALICE, BOB)):
            s.send(f"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<{NOBODY}>\r\n"
                   f"RCPT TO:<{rcpt}>\r\nDATA\r\n")
            assert_reply(s.reply(), verdict.SENDER_OK)
            assert_reply(s.reply(), verdict.UNKNOWN_USER)
            assert_reply(s.reply(), verdict.RCPT_OK)
            assert s.reply()[0] == 354
            s.send(dot_stuff(message(mark, to=rcpt)))
            assert_reply(s.reply(), verdict.DELIVERED)
    assert len(stored(dove, ALICE, marks[0])) == 1 and len(stored(dove, BOB, marks[1])) == 1


# ---------------------------------------------------------------- XFORWARD

def test_xforward_from_a_trusted_peer_names_the_client(gate: GateFactory, dove: Dovecot) -> None:
    mark = marker()
    with smtp(gate()) as client:
        assert_reply(client.docmd("XFORWARD", "NAME=mail.remote.test ADDR=192.0.2.7 "
                                  "HELO=helo.remote.test PROTO=ESMTP"), verdict.XFORWARD_OK)
        client.mail("sender@remote.test")
        client.rcpt(ALICE)
        assert_reply(client.data(message(mark)), verdict.DELIVERED)
        # XFORWARD describes one transaction: the next one is the peer's own again
        later = marker()
        client.mail("sender@remote.test")
        client.rcpt(ALICE)
        assert_reply(client.data(message(later)), verdict.DELIVERED)
    [data] = stored(dove, ALICE, mark)
    assert data[mailgate_received(data).start():].startswith(
        b"Received: from helo.remote.test (mail.remote.test [192.0.2.7])\r\n")
    [data] = stored(dove, ALICE, later)
    assert mailgate_received(data)["addr"] == b"127.0.0.1"


def test_xforward_from_an_untrusted_peer_is_denied(gate: GateFactory, dove: Dovecot) -> None:
    mark = marker()
    with smtp(gate({"listen": {"trusted_networks": ["192.0.2.0/24"]}})) as client:
        assert "xforward" not in client.esmtp_features
        assert_reply(client.docmd("XFORWARD", "NAME=mail.remote.test ADDR=192.0.2.7"),
                     verdict.XFORWARD_DENIED)
        client.mail("sender@remote.test")
        client.rcpt(ALICE)
        assert_reply(client.data(message(mark)), verdict.DELIVERED)
    [data] = stored(dove, ALICE, mark)
    assert mailgate_received(data)["addr"] == b"127.0.0.1"
    assert b"192.0.2.7" not in data


# ---------------------------------------------------------------- limits and deadlines

def test_recipient_limit(gate: GateFactory, dove: Dovecot) -> None:
    mark = marker()
    with smtp(gate({"limits": {"max_recipients": 2}})) as client:
        client.mail("sender@remote.test")
        assert_reply(client.rcpt(ALICE), verdict.RCPT_OK)
        assert_reply(client.rcpt(BOB), verdict.RCPT_OK)
        assert_reply(client.rcpt(CAROL), verdict.TOO_MANY_RECIPIENTS)
        assert_reply(client.data(message(mark)), verdict.DELIVERED)
    assert [len(on_disk(dove, a, mark)) for a in (ALICE, BOB, CAROL)] == [1, 1, 0]


def test_session_cap(gate: GateFactory) -> None:
    mg = gate({"listen": {"max_sessions": 1}})

    def greeted() -> Session | None:
        """A session that got 220; an earlier one may take a moment to be counted as gone."""
        session = Session(mg.smtp)
        if session.reply()[0] == 220:
            return session
        session.__exit__()
        return None

    with wait_until(greeted, REPLY_TIMEOUT, what="the only session") as first:
        with Session(mg.smtp) as second:
            assert_reply(second.reply(), verdict.TOO_MANY_SESSIONS)
            assert second.closed()
        assert first.command("NOOP")[0] == 250  # the first one is untouched
    # once the first has gone, a new session is welcome again
    with wait_until(greeted, REPLY_TIMEOUT, what="a session after the first closed"):
        pass


def test_smtp_greeting_says_esmtp_lmtp_greeting_does_not(gate: GateFactory) -> None:
    """As Postfix greets ("220 host ESMTP Postfix"): clients such as smtp-source send EHLO,
    and so get 8BITMIME, SMTPUTF8 and SIZE, only when the greeting says ESMTP."""
    mg = gate()
    with Session(mg.smtp) as s:
        assert s.reply() == (220, "mx.example.test ESMTP mailgate")
    with Session(mg.lmtp) as s:
        assert s.reply() == (220, "mx.example.test mailgate")


def test_idle_session_gets_421_and_is_closed(gate: GateFactory) -> None:
    with Session(gate({"listen": {"command_timeout": 1}}).smtp, timeout=5) as s:
        s.reply()
        assert s.command("EHLO client.test")[0] == 250
        started = time.monotonic()
        assert_reply(s.reply(), verdict.IDLE_TIMEOUT)  # nothing sent: the server speaks first
        assert s.closed()
    assert time.monotonic() - started < 4


def test_client_stalling_inside_data_gets_421(gate: GateFactory, dove: Dovecot) -> None:
    mark = marker()
    with Session(gate({"listen": {"command_timeout": 1}}).smtp, timeout=5) as s:
        s.to_data(ALICE)
        s.send(message(mark))  # and then nothing: no end of data
        assert_reply(s.reply(), verdict.IDLE_TIMEOUT)
        assert s.closed()
    assert on_disk(dove, ALICE, mark) == []


# A client trickling DATA: gaps under the 1 s command_timeout, longer than 2 s in all.
TRICKLE_GAP = 0.5


def test_slow_upload_then_slow_pipeline_is_delivered(gate: GateFactory, dove: Dovecot) -> None:
    """command_timeout = 1 s, a filter that takes 1.5 s: neither the upload nor the processing
    is idleness, and after our reply the client has its full second again."""
    mg = gate({"listen": {"command_timeout": 1},
               "pipeline": {"filters": ["filters_for_tests:Slow"]}})
    first, second = marker(), marker()
    data = dot_stuff(message(first) + b"".join(b"line %d\r\n" % i for i in range(6)))
    size = len(data) // 6 + 1
    with Session(mg.smtp) as s:
        s.to_data(ALICE)
        started = time.monotonic()
        for i in range(0, len(data), size):
            time.sleep(TRICKLE_GAP)  # the slow client under test, not a wait for a result
            s.send(data[i:i + size])
        assert time.monotonic() - started > 2
        assert_reply(s.reply(), verdict.DELIVERED)

        # At once, a whole pipelined transaction; the filter takes longer than the timeout.
        s.send(f"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n".encode()
               + dot_stuff(message(second, to=BOB)))
        assert_reply(s.reply(), verdict.SENDER_OK)
        assert_reply(s.reply(), verdict.RCPT_OK)
        assert s.reply()[0] == 354
        assert_reply(s.reply(), verdict.DELIVERED)
        replied = time.monotonic()
        assert_reply(s.reply(), verdict.IDLE_TIMEOUT)
        assert time.monotonic() - replied > 0.9  # idle counts from our reply, not from DATA
        assert s.closed()
    assert len(stored(dove, ALICE, first)) == 1 and len(stored(dove, BOB, second)) == 1


# ---------------------------------------------------------------- filters that fail

def test_filter_that_raises_defers_smtp(gate: GateFactory, dove: Dovecot) -> None:
    mg = gate({"pipeline": {"filters": ["filters_for_tests:Boom"]}})
    mark = marker()
    sender = f"s-{mark}@remote.test"
    with smtp(mg) as client:
        client.mail(sender)
        client.rcpt(ALICE)
        client.rcpt(BOB)
        assert_reply(client.data(message(mark)), verdict.TEMP_FAILURE)
    assert on_disk(dove, ALICE, mark) == [] and on_disk(dove, BOB, mark) == []
    qid = qid_of_sender(mg, sender)
    mg.wait_log(rf"{qid}: filter=boom failed")
    for line in wait_delivery_lines(mg, qid, 2):
        assert f"dsn={verdict.TEMP_FAILURE.status}, status=deferred" in line, line


def test_redirect_verdict_delivers_to_the_new_mailbox(gate: GateFactory, dove: Dovecot) -> None:
    mg = gate({"pipeline": {"filters": ["filters_for_tests:RedirectCarolToBob"]}})
    mark = marker()
    with smtp(mg) as client:
        client.mail("sender@remote.test")
        assert_reply(client.rcpt(ALICE), verdict.RCPT_OK)
        assert_reply(client.rcpt(CAROL), verdict.RCPT_OK)
        qid = queue_id(assert_reply(client.data(message(mark)), verdict.DELIVERED))
    assert len(stored(dove, ALICE, mark)) == 1 and len(stored(dove, BOB, mark)) == 1
    assert on_disk(dove, CAROL, mark) == []
    lines = wait_delivery_lines(mg, qid, 2)
    # One line per envelope recipient; the copy's own address is in the detail.
    assert any(f"to=<{CAROL}>" in line and "status=sent" in line and f"to <{BOB}>: sent" in line
               for line in lines), lines


def test_filter_that_raises_defers_each_lmtp_recipient(gate: GateFactory, dove: Dovecot) -> None:
    mg = gate({"pipeline": {"filters": ["filters_for_tests:Boom"]}})
    mark = marker()
    with Session(mg.lmtp) as s:
        s.to_data(ALICE, BOB, hello="LHLO client.test")
        s.send(dot_stuff(message(mark)))
        replies = [s.reply(), s.reply()]
        assert_reply(s.command("QUIT"), verdict.CLOSING)
    for reply, addr in zip(replies, (ALICE, BOB)):
        assert_reply(reply, verdict.TEMP_FAILURE)
        assert f"<{addr}>" in reply[1]
    assert on_disk(dove, ALICE, mark) == [] and on_disk(dove, BOB, mark) == []


def test_filter_timeout_defers(gate: GateFactory, dove: Dovecot) -> None:
    mg = gate({"pipeline": {"filters": ["filters_for_tests:Slow"], "filter_timeout": 0.5}})
    mark = marker()
    sender = f"s-{mark}@remote.test"
    with smtp(mg) as client:
        client.mail(sender)
        client.rcpt(ALICE)
        started = time.monotonic()
        assert_reply(client.data(message(mark)), verdict.TEMP_FAILURE)
        assert time.monotonic() - started < 1.4  # cut at 0.5 s, not after the filter's 1.5 s
    assert on_disk(dove, ALICE, mark) == []
    qid = qid_of_sender(mg, sender)
    [line] = wait_delivery_lines(mg, qid, 1)
    assert "status=deferred (filter slow timed out)" in line, line


# ---------------------------------------------------------------- parsing never gates delivery

def nested_mime(mark: str, levels: int) -> bytes:
    head = [message(mark).split(b"\r\n\r\n")[0] + b"\r\nMIME-Version: 1.0\r\n"]
    for i in range(levels):
        head.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i))
    head.append(b"Content-Type: text/plain\r\n\r\nbody " + mark.encode() + b"\r\n")
    return b"".join(head) + b"".join(b"--b%d--\r\n" % i for i in reversed(range(levels)))


def test_parsed_message_gets_the_filter_header(gate: GateFactory, dove: Dovecot) -> None:
    mark = marker()
    with smtp(gate({"pipeline": {"filters": ["filters_for_tests:Tag"]}})) as client:
        client.mail("sender@remote.test")
        client.rcpt(ALICE)
        assert_reply(client.data(message(mark)), verdict.DELIVERED)
    [data] = stored(dove, ALICE, mark)
    rest = after_received(data)
    assert rest == f"X-Test-Tag: parsed listener {mark}\r\n".encode() + message(mark)


@pytest.mark.parametrize("levels, parse_depth, reason", [
    (200, 50, "MIME nesting deeper than limits.parse_depth"),   # refused before parsing
    (1000, 5000, "RecursionError"),                              # the stdlib parser fails
])
def test_unparsable_message_is_delivered_as_received(gate: GateFactory, dove: Dovecot,
                                                     levels: int, parse_depth: int,
                                                     reason: str) -> None:
    mg = gate({"pipeline": {"filters": ["filters_for_tests:Tag"]},
               "limits": {"parse_depth": parse_depth}})
    mark = marker()
    sender = f"s-{mark}@remote.test"
    original = nested_mime(mark, levels)
    with smtp(mg) as client:
        client.mail(sender)
        client.rcpt(ALICE)
        qid = queue_id(assert_reply(client.data(original), verdict.DELIVERED))
    [data] = stored(dove, ALICE, mark)
    assert after_received(data) == original  # no X-Test-Tag: the filter was skipped
    mg.wait_log(rf"{qid}: delivered unparsed: {re.escape(reason)}")
    mg.wait_log(rf"{qid}: filter=tag skipped")
