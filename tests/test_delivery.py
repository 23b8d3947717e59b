"""Delivery end to end: Dovecot over LMTP, the maildir fallback, and no duplicate on a retry.

Real Dovecot, real `mailgate serve`; replies are checked against the named verdict constants,
mail is read back from the maildir and over IMAP, and the per-recipient log lines are matched.
A test about file permissions runs mailgate as vmail: root ignores permissions.
"""
from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import socketserver
import stat
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from peers import VMAIL_UID, Dovecot, Mailgate, free_port, lmtp_send, make_maildir
from mailgate.verdict import (DELIVERED, DELIVERY_DEFERRED, OUTCOME_UNKNOWN, RCPT_OK, UNKNOWN_USER,
                              USERDB_UNAVAILABLE, Reply)

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"
DAVE = "dave@example.test"  # never a Dovecot user, never a maildir
SENDER = "sender@remote.test"
REPLY_BOUND = 15.0  # seconds any reply may take here, hung peers included


# ---------------------------------------------------------------- helpers

def message(mark: str, to: str = ALICE) -> bytes:
    """A message in wire form (CRLF), with a line that needs dot-stuffing."""
    return (f"From: <{SENDER}>\r\nTo: <{to}>\r\nSubject: delivery {mark}\r\n"
            f"Message-ID: <{mark}@remote.test>\r\n\r\nbody {mark}\r\n"
            f".a line that starts with a dot\r\n").encode()


def mark() -> str:
    return uuid.uuid4().hex


def expect(reply: tuple[int, str | bytes], want: Reply, text: bool = True) -> None:
    """`reply` is `want`: same code and enhanced status, and (unless text=False) its words."""
    code, words = reply
    words = words.decode("utf-8", "replace") if isinstance(words, bytes) else words
    assert (code, words.split(" ", 1)[0]) == (want.code, want.status), reply
    if text:
        assert want.text.split("{")[0] in words, reply


class SMTPResult:
    def __init__(self) -> None:
        self.rcpt: dict[str, tuple[int, bytes]] = {}
        self.data: tuple[int, bytes] | None = None


def smtp_send(gate: Mailgate, rcpts: list[str], data: bytes, sender: str = SENDER,
              raw_rcpt: bool = False) -> SMTPResult:
    """One SMTP transaction; DATA only when a RCPT was accepted. raw_rcpt: send the text as is."""
    out = SMTPResult()
    with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=REPLY_BOUND) as s:
        s.ehlo()
        assert s.mail(sender)[0] == 250
        for rcpt in rcpts:
            out.rcpt[rcpt] = s.docmd("RCPT", f"TO:<{rcpt}>") if raw_rcpt else s.rcpt(rcpt)
        if any(code == 250 for code, _ in out.rcpt.values()):
            out.data = s.data(data)
    return out


def files(maildir: Path, *subs: str) -> list[Path]:
    return [f for sub in subs or ("new", "cur", "tmp") if (maildir / sub).is_dir()
            for f in sorted((maildir / sub).iterdir())]


def tree(root: Path, skip: tuple[str, ...] = ()) -> set[Path]:
    """Every non-directory below `root` (links not followed), except top-level names in `skip`."""
    found = set()
    for top, dirs, names in os.walk(root):
        if Path(top) == root:
            dirs[:] = [d for d in dirs if d not in skip]
        found.update(Path(top) / n for n in names)
        found.update(Path(top) / d for d in dirs if (Path(top) / d).is_symlink())
    return found


def delivery_line(gate: Mailgate, rcpt: str, relay: str, status: str) -> str:
    """The log line for one recipient (waited for, bounded)."""
    return gate.wait_log(rf"to=<{re.escape(rcpt)}>, relay={relay}, .*status={status} .*$").group(0)


def added_headers(delivered: bytes, original: bytes) -> list[str]:
    """Names of the header fields in front of `original` inside `delivered` (CRLF forms)."""
    assert delivered.endswith(original), "the delivered bytes do not end with what was sent"
    prefix = delivered[:len(delivered) - len(original)].decode()
    assert prefix == "" or prefix.endswith("\r\n")
    return [line.split(":", 1)[0] for line in prefix.splitlines() if line[:1] not in (" ", "\t")]


def assert_like_dovecot(path: Path) -> None:
    """A fallback file: 0600 and owned by the maildir's owner (vmail), as Dovecot writes them."""
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
    assert (info.st_uid, info.st_gid) == (VMAIL_UID, VMAIL_UID)


def as_vmail(mailgate_factory, overrides=None) -> Mailgate:
    """A mailgate running as vmail (checked: its real and effective uid are vmail's)."""
    gate = mailgate_factory(overrides, user="vmail")
    uids = Path(f"/proc/{gate.pid}/status").read_text().split("Uid:")[1].split("\n")[0].split()
    assert {int(u) for u in uids} == {VMAIL_UID}, uids
    return gate


@pytest.fixture
def unwritable(dovecot: Dovecot):
    """chmod(mode) a maildir subdirectory for the test; restored afterwards."""
    changed: list[Path] = []

    def chmod(addr: str, sub: str, mode: int) -> Path:
        path = dovecot.maildir(addr) / sub
        path.chmod(mode)
        changed.append(path)
        return path
    yield chmod
    for path in changed:
        if path.exists():
            path.chmod(0o700)


# ---------------------------------------------------------------- a fake Dovecot that hangs

class _HangingHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: HangingLMTP = self.server  # type: ignore[assignment]
        if server.mode == "silent":  # accepts the connection, never greets
            self.rfile.read()
            return
        self.wfile.write(b"220 fake.test LMTP ready\r\n")
        in_data, rcpts = False, []
        for line in self.rfile:
            if in_data:
                if line == b".\r\n":
                    if not self.end_of_data(server, rcpts):
                        self.rfile.read()  # hangs: waits until mailgate gives up and closes
                        return
                    in_data = False
                continue
            verb = line[:4].upper()
            if verb == b"LHLO":
                self.wfile.write(b"250-fake.test\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go ahead\r\n")
                in_data = True
            elif verb == b"QUIT":
                self.wfile.write(b"221 2.0.0 Bye\r\n")
                return
            else:  # MAIL, RCPT, RSET: every user exists here
                if verb == b"MAIL":
                    rcpts = []
                elif verb == b"RCPT":
                    rcpts.append(line[9:].strip().strip(b"<>").decode())
                self.wfile.write(b"250 2.1.5 OK\r\n")

    def end_of_data(self, server: HangingLMTP, rcpts: list[str]) -> bool:
        """Answer what the mode says after DATA; False: hang from here on."""
        server.transactions.append(rcpts)
        server.got_data.set()
        if server.mode == "after-data":
            return False
        if server.mode == "421-after-data":  # shutting down, as Dovecot says it: then gone
            self.wfile.write(b"421 4.3.2 fake.test Shutting down\r\n")
            return False
        answered = rcpts[:1] if len(server.transactions) == 1 else rcpts  # "first-then-hang"
        for rcpt in answered:
            self.wfile.write(f"250 2.0.0 <{rcpt}> fake Saved\r\n".encode())
        return answered == rcpts


class HangingLMTP(socketserver.ThreadingTCPServer):
    """An "LMTP server" on loopback that greets and then never answers after DATA ("after-data"),
    never even greets ("silent"), says 421 where the first recipient's reply is due
    ("421-after-data"), or in its first transaction answers for the first recipient only and
    then hangs, answering every later one in full ("first-then-hang")."""
    daemon_threads = True
    block_on_close = False

    def __init__(self, mode: str):
        self.mode = mode
        self.got_data = threading.Event()
        self.transactions: list[list[str]] = []  # recipients of each DATA that reached us
        super().__init__(("127.0.0.1", 0), _HangingHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


# ---------------------------------------------------------------- per-recipient LMTP replies

def lmtp_three(gate: Mailgate, mark_: str) -> list[tuple[int, str]]:
    rcpt_replies, data_replies = lmtp_send(*gate.lmtp, SENDER, [ALICE, BOB, CAROL],
                                           message(mark_), timeout=REPLY_BOUND)
    for rcpt in (ALICE, BOB, CAROL):
        expect(rcpt_replies[rcpt], RCPT_OK)
    return data_replies


def test_lmtp_one_recipient_failing_at_dovecot_no_fallback(dovecot, mailgate_factory,
                                                          unwritable) -> None:
    gate = mailgate_factory({"delivery": {"maildir": ""}})
    unwritable(BOB, "tmp", 0o000)
    replies = lmtp_three(gate, mark())

    # Without a fallback the client hears Dovecot's own reply for bob (451 4.2.0).
    assert [code for code, _ in replies] == [DELIVERED.code, 451, DELIVERED.code]
    assert replies[1][1].startswith("4.2.0 ") and f"<{BOB}>" in replies[1][1]
    assert len(dovecot.maildir_messages(ALICE)) == len(dovecot.maildir_messages(CAROL)) == 1
    assert files(dovecot.maildir(BOB)) == []
    assert "451 4.2.0" in delivery_line(gate, BOB, re.escape(f"dovecot[{gate.config['delivery']['lmtp']}]"),
                                        "deferred")


def test_lmtp_fallback_as_root_writes_the_failed_recipient(dovecot, mailgate_factory,
                                                          unwritable) -> None:
    gate = mailgate_factory()
    unwritable(BOB, "tmp", 0o000)
    m = mark()
    replies = lmtp_three(gate, m)

    assert [code for code, _ in replies] == [DELIVERED.code] * 3
    expect(replies[1], DELIVERED)  # ours (the fallback), not Dovecot's "Saved"
    [written] = files(dovecot.maildir(BOB))
    assert written.parent.name == "new"
    assert_like_dovecot(written)
    assert f"body {m}".encode() in written.read_bytes()
    assert "delivered to maildir" in delivery_line(gate, BOB, "maildir", "sent")
    unwritable(BOB, "tmp", 0o700)
    [over_imap] = dovecot.fetch_imap(BOB)  # Dovecot reads what the fallback wrote
    assert over_imap.endswith(message(m))


def with_quota(dovecot: Dovecot, address: str, rule: str, *settings: str) -> None:
    """Dovecot with the quota plugin (and `settings`), `address` a new user with `rule`."""
    dovecot.stop()  # stopped, Dovecot reads its config and users afresh when it starts
    with open(dovecot.conf, "a") as conf:
        conf.write("mail_plugins = $mail_plugins quota\n" + "".join(f"{x}\n" for x in settings)
                   + "plugin {\n  quota = maildir:User quota\n}\n")
    dovecot.add_user(address)
    text = dovecot.users_file.read_text()
    line = next(x for x in text.splitlines() if x.startswith(f"{address}:"))
    dovecot.users_file.write_text(text.replace(line, line + f"userdb_quota_rule={rule}"))
    dovecot.start()


def test_a_full_mailbox_is_deferred_as_dovecot_says_never_written_around_its_quota(
        dovecot, mailgate_factory) -> None:
    """Dovecot's quota with quota_full_tempfail: 452 4.2.2 for the full mailbox. The fallback
    is for a Dovecot that cannot take mail, not for one that decided not to."""
    full = "full@example.test"
    with_quota(dovecot, full, "*:storage=1K", "quota_full_tempfail = yes")
    gate = mailgate_factory()
    m = mark()
    rcpt_replies, [reply] = lmtp_send(*gate.lmtp, SENDER, [full],
                                      message(m, to=full) + (b"x" * 70 + b"\r\n") * 30,
                                      timeout=REPLY_BOUND)
    expect(rcpt_replies[full], RCPT_OK)
    assert (reply[0], reply[1].split()[0]) == (452, "4.2.2")
    assert files(dovecot.maildir(full)) == []
    assert "452 4.2.2" in delivery_line(gate, full, re.escape(
        f"dovecot[{gate.config['delivery']['lmtp']}]"), "deferred")


def test_a_full_mailbox_checked_at_rcpt_is_full_not_unknown(dovecot, mailgate_factory) -> None:
    """lmtp_rcpt_check_quota: Dovecot refuses the RCPT of a full mailbox (552 5.2.2). The
    sender must hear that, not "550 5.1.1 User unknown". Postfix's lookup says NOTFOUND: the
    mail is refused in Postfix's own session, never accepted and then bounced."""
    full = "quota@example.test"
    with_quota(dovecot, full, "*:messages=1", "lmtp_rcpt_check_quota = yes")
    _, [stored] = lmtp_send("127.0.0.1", dovecot.lmtp_port, SENDER, [full],
                            message(mark(), to=full), timeout=REPLY_BOUND)
    assert stored[0] == 250   # the one message the quota allows
    gate = mailgate_factory({"listen": {"lookup": f"127.0.0.1:{free_port()}"}})
    with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=REPLY_BOUND) as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        code, text = s.rcpt(full)
    assert (code, text.split()[0]) == (552, b"5.2.2"), text
    with socket.create_connection(gate.lookup, timeout=REPLY_BOUND) as sock:
        query = f"recipients {full}".encode()
        sock.sendall(b"%d:%s," % (len(query), query))
        assert sock.recv(200) == b"9:NOTFOUND ,"


def test_lmtp_fallback_as_vmail_cannot_write_either(dovecot, mailgate_factory,
                                                   unwritable) -> None:
    gate = as_vmail(mailgate_factory)
    unwritable(BOB, "tmp", 0o000)
    replies = lmtp_three(gate, mark())

    assert [code for code, _ in replies] == [DELIVERED.code, DELIVERY_DEFERRED.code, DELIVERED.code]
    expect(replies[1], DELIVERY_DEFERRED)
    assert files(dovecot.maildir(BOB)) == []
    line = delivery_line(gate, BOB, "maildir", "deferred")
    assert "Permission denied" in line
    assert len(dovecot.maildir_messages(ALICE)) == 1


# ---------------------------------------------------------------- Dovecot stopped: the fallback

def test_dovecot_stopped_fallback_then_visible_over_imap(dovecot, mailgate_factory) -> None:
    dovecot.stop()
    gate = mailgate_factory()
    m = mark()
    sent = smtp_send(gate, [ALICE], message(m))

    expect(sent.rcpt[ALICE], RCPT_OK)  # Dovecot cannot be asked; alice's maildir exists
    expect(sent.data, DELIVERED)
    [written] = files(dovecot.maildir(ALICE))
    assert written.parent.name == "new"
    assert_like_dovecot(written)
    assert "delivered to maildir" in delivery_line(gate, ALICE, "maildir", "sent")
    dovecot.start()
    [over_imap] = dovecot.fetch_imap(ALICE)
    assert set(added_headers(over_imap, message(m))) <= {"Return-Path", "Delivered-To", "Received"}
    assert "Received" in added_headers(over_imap, message(m))


def test_dovecot_stopped_recipient_without_maildir_is_deferred_at_rcpt(dovecot,
                                                                       mailgate_factory) -> None:
    dovecot.stop()
    gate = mailgate_factory()
    sent = smtp_send(gate, [DAVE], message(mark()))

    expect(sent.rcpt[DAVE], USERDB_UNAVAILABLE)
    assert sent.data is None
    gate.wait_log(rf"NOQUEUE: reject: RCPT .*451 4\.4\.3 <{re.escape(DAVE)}>")


@pytest.mark.parametrize("sub", ["tmp", "new"])
def test_dovecot_stopped_unwritable_maildir_defers_and_writes_nothing(dovecot, mailgate_factory,
                                                                      unwritable, sub) -> None:
    dovecot.stop()
    gate = as_vmail(mailgate_factory)
    unwritable(ALICE, sub, 0o500)
    before = tree(dovecot.root, skip=("dovecot", "mailgate-0"))
    sent = smtp_send(gate, [ALICE], message(mark()))

    expect(sent.rcpt[ALICE], RCPT_OK)
    expect(sent.data, DELIVERY_DEFERRED)
    assert files(dovecot.maildir(ALICE)) == []  # no half-written file left in tmp/ either
    assert tree(dovecot.root, skip=("dovecot", "mailgate-0")) == before
    assert "Permission denied" in delivery_line(gate, ALICE, "maildir", "deferred")


def test_fallback_never_creates_a_maildir(dovecot, mailgate_factory) -> None:
    dovecot.stop()
    gate = mailgate_factory()
    carol_dir = dovecot.maildir(CAROL)
    shutil.rmtree(carol_dir)  # a Dovecot user whose maildir does not exist (yet)

    sent = smtp_send(gate, [CAROL, DAVE], message(mark()))
    expect(sent.rcpt[CAROL], USERDB_UNAVAILABLE)
    expect(sent.rcpt[DAVE], USERDB_UNAVAILABLE)
    assert not carol_dir.exists() and not dovecot.maildir(DAVE).exists()

    # The maildir vanishes between RCPT (accepted: it existed) and DATA: still nothing created.
    with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=REPLY_BOUND) as s:
        s.ehlo()
        s.mail(SENDER)
        expect(s.rcpt(BOB), RCPT_OK)
        shutil.rmtree(dovecot.maildir(BOB))
        expect(s.data(message(mark())), DELIVERY_DEFERRED)
    assert not dovecot.maildir(BOB).exists()
    assert "no maildir" in delivery_line(gate, BOB, "maildir", "deferred")
    assert sorted(p.name for p in dovecot.maildir(ALICE).parent.iterdir()) == ["alice"]


# ---------------------------------------------------------------- a retry is not a duplicate

def test_retry_after_partial_failure_is_not_delivered_twice(dovecot, mailgate_factory,
                                                           unwritable) -> None:
    gate = mailgate_factory({"delivery": {"maildir": ""}})
    tmp = unwritable(BOB, "tmp", 0o000)
    data = message(mark())

    first = smtp_send(gate, [ALICE, BOB], data)
    assert first.data[0] == 451 and first.data[1].startswith(b"4.2.0 "), first.data  # Dovecot's
    assert len(dovecot.maildir_messages(ALICE)) == 1 and files(dovecot.maildir(BOB)) == []

    tmp.chmod(0o700)
    second = smtp_send(gate, [ALICE, BOB], data)
    expect(second.data, DELIVERED)
    assert len(dovecot.maildir_messages(ALICE)) == 1
    assert len(dovecot.maildir_messages(BOB)) == 1
    assert dovecot.maildir_messages(ALICE)[0].endswith(data.replace(b"\r\n", b"\n"))
    line = delivery_line(gate, ALICE, "none", "sent")
    assert "already delivered (retry after a partial failure)" in line


# ---------------------------------------------------------------- delivery modes

def test_pooled_connection_dropped_by_dovecot_is_replaced(dovecot, mailgate_factory) -> None:
    """Dovecot restarts under an idle pooled connection: the next message still goes to
    Dovecot over a fresh connection, neither to the fallback nor deferred."""
    gate = mailgate_factory()
    expect(smtp_send(gate, [ALICE], message(mark())).data, DELIVERED)
    dovecot.restart()
    second = mark()
    expect(smtp_send(gate, [ALICE], message(second)).data, DELIVERED)
    relay = re.escape(f"dovecot[{gate.config['delivery']['lmtp']}]")
    assert gate.log_text().count(f"to=<{ALICE}>, relay=dovecot[") == 2
    delivery_line(gate, ALICE, relay, "sent")
    assert "relay=maildir" not in gate.log_text()
    assert [m for m in dovecot.fetch_imap(ALICE) if second.encode() in m]


def test_a_transaction_dovecot_refused_leaves_the_connection_fit_for_the_next(
        dovecot, mailgate_factory) -> None:
    """Carol is known at RCPT (cached) but gone from Dovecot's userdb by delivery: Dovecot
    refuses her and with her the whole transaction, a small one sent at once (BDAT LAST). The
    next message goes over the same pooled connection and must find no transaction still open
    there (Dovecot: "503 5.5.0 MAIL already given", a permanent refusal of good mail)."""
    gate = mailgate_factory({"delivery": {"maildir": "", "lmtp_connections": 1}})
    expect(smtp_send(gate, [ALICE, CAROL], message(mark(), to=CAROL)).data, DELIVERED)  # cached
    dovecot.remove_user(CAROL)

    refused = smtp_send(gate, [CAROL], message(mark(), to=CAROL))
    expect(refused.rcpt[CAROL], RCPT_OK)
    assert refused.data[0] == 550, refused.data  # Dovecot's own refusal, passed on
    # One refused and one taken in the same transaction: a reply each, over LMTP.
    mixed = mark()
    _, replies = lmtp_send(*gate.lmtp, SENDER, [CAROL, ALICE], message(mixed),
                           timeout=REPLY_BOUND)
    assert [code for code, _ in replies] == [550, DELIVERED.code], replies
    second = mark()
    expect(smtp_send(gate, [ALICE], message(second)).data, DELIVERED)
    for m in (mixed, second):
        assert len([s for s in dovecot.fetch_imap(ALICE) if m.encode() in s]) == 1


def test_lmtp_over_dovecot_unix_socket(dovecot, mailgate_factory) -> None:
    target = f"unix:{dovecot.lmtp_socket}"
    gate = mailgate_factory({"delivery": {"lmtp": target}})
    m = mark()
    sent = smtp_send(gate, [ALICE, DAVE], message(m))

    expect(sent.rcpt[ALICE], RCPT_OK)
    expect(sent.rcpt[DAVE], UNKNOWN_USER)  # asked over the socket too
    expect(sent.data, DELIVERED)
    assert "Saved" in delivery_line(gate, ALICE, re.escape(f"dovecot[{target}]"), "sent")
    [over_imap] = dovecot.fetch_imap(ALICE)
    assert over_imap.endswith(message(m))


def test_maildir_only_mode(dovecot, mailgate_factory) -> None:
    gate = mailgate_factory({"delivery": {"lmtp": ""}})
    m = mark()
    sent = smtp_send(gate, [ALICE, DAVE], message(m))

    expect(sent.rcpt[ALICE], RCPT_OK)  # the maildirs are the user database
    expect(sent.rcpt[DAVE], UNKNOWN_USER)
    expect(sent.data, DELIVERED)
    [written] = files(dovecot.maildir(ALICE))
    assert written.parent.name == "new"
    assert_like_dovecot(written)
    delivery_line(gate, ALICE, "maildir", "sent")
    assert not dovecot.maildir(DAVE).exists()
    [over_imap] = dovecot.fetch_imap(ALICE)
    assert over_imap.endswith(message(m))


# ---------------------------------------------------------------- path safety

HOSTILE = ['"../../etc"@example.test', "a/b@example.test", "..@example.test",
           '"..%2f..%2fetc"@example.test', '"alice/../bob"@example.test', ".@example.test",
           "alice@example.test/../..", '"alice\\/x"@example.test']


@pytest.mark.parametrize("dovecot_up", [False, True], ids=["fallback", "dovecot"])
def test_hostile_local_parts_are_never_written_outside_the_mail_root(dovecot, mailgate_factory,
                                                                     dovecot_up) -> None:
    if not dovecot_up:
        dovecot.stop()
    root = dovecot.root
    # Decoys: where a naive path join would land, a maildir exists and would be "found".
    decoys = [make_maildir(root / "etc"), make_maildir(dovecot.maildir("a@example.test") / "b"),
              make_maildir(dovecot.mail_root), make_maildir(dovecot.maildir(ALICE) / "x")]
    gate = mailgate_factory()
    before = tree(root, skip=("dovecot", "mailgate-0"))

    sent = smtp_send(gate, [*HOSTILE, ALICE], message(mark()), raw_rcpt=True)
    for rcpt in HOSTILE:
        assert sent.rcpt[rcpt][0] >= 400, (rcpt, sent.rcpt[rcpt])
    expect(sent.rcpt[ALICE], RCPT_OK)
    expect(sent.data, DELIVERED)

    new = tree(root, skip=("dovecot", "mailgate-0")) - before
    assert all(dovecot.maildir(ALICE) in path.parents for path in new), new  # Dovecot's indexes
    [written] = files(dovecot.maildir(ALICE), "new")
    assert written in new
    for decoy in decoys:
        assert files(decoy) == [], decoy


@pytest.mark.parametrize("level", ["user", "domain"])
def test_symlinked_maildir_is_not_written_through(dovecot, mailgate_factory, level) -> None:
    dovecot.stop()
    outside = dovecot.root / "outside"
    link = dovecot.maildir(ALICE) if level == "user" else dovecot.maildir(ALICE).parent
    real = link.with_name(link.name + ".real")
    make_maildir(outside if level == "user" else outside / "alice")

    def to_link() -> None:
        link.rename(real)
        link.symlink_to(outside)

    def to_real() -> None:
        link.unlink()
        real.rename(link)

    gate = mailgate_factory()
    to_link()
    sent = smtp_send(gate, [ALICE], message(mark()))
    expect(sent.rcpt[ALICE], USERDB_UNAVAILABLE)
    to_real()

    # Accepted while it was a directory, a link by the time DATA comes: still not followed.
    with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=REPLY_BOUND) as s:
        s.ehlo()
        s.mail(SENDER)
        expect(s.rcpt(ALICE), RCPT_OK)
        to_link()
        expect(s.data(message(mark())), DELIVERY_DEFERRED)
    delivery_line(gate, ALICE, "maildir", "deferred")
    assert tree(outside) == set()
    to_real()
    assert files(dovecot.maildir(ALICE)) == []


# ---------------------------------------------------------------- Dovecot slow or hung

@pytest.fixture
def hanging_lmtp(request):
    server = HangingLMTP(request.param)
    yield server
    server.close()


@pytest.mark.parametrize("hanging_lmtp", ["after-data"], indirect=True)
def test_no_reply_after_data_defers_and_never_falls_back(dovecot, mailgate_factory,
                                                         hanging_lmtp) -> None:
    gate = mailgate_factory({"delivery": {"lmtp": hanging_lmtp.target, "lmtp_timeout": 1}})
    started = time.monotonic()
    sent = smtp_send(gate, [ALICE, BOB], message(mark()))

    expect(sent.rcpt[ALICE], RCPT_OK)
    expect(sent.data, OUTCOME_UNKNOWN)
    assert time.monotonic() - started < 10
    assert hanging_lmtp.got_data.is_set()  # DATA went out: Dovecot may hold the message
    line = delivery_line(gate, ALICE, re.escape(f"dovecot[{hanging_lmtp.target}]"), "deferred")
    assert "outcome unknown" in line and "no reply from Dovecot in time" in line
    # No fallback copy: a duplicate is worse than a retry.
    assert files(dovecot.maildir(ALICE)) == [] and files(dovecot.maildir(BOB)) == []
    assert "relay=maildir" not in gate.log_text()

    _, lmtp_replies = lmtp_send(*gate.lmtp, SENDER, [ALICE, BOB], message(mark()),
                                timeout=REPLY_BOUND)
    for reply in lmtp_replies:
        expect(reply, OUTCOME_UNKNOWN)
    assert len(lmtp_replies) == 2
    assert files(dovecot.maildir(ALICE)) == []


@pytest.mark.parametrize("hanging_lmtp", ["421-after-data"], indirect=True)
def test_a_421_after_data_is_an_unknown_outcome_never_a_fallback(dovecot, mailgate_factory,
                                                                 hanging_lmtp) -> None:
    """421 (RFC 5321 §3.8: the service is closing) where a recipient's delivery reply is due
    says nothing about that delivery: Dovecot may have saved it, so no fallback copy."""
    gate = mailgate_factory({"delivery": {"lmtp": hanging_lmtp.target, "lmtp_timeout": 5}})
    sent = smtp_send(gate, [ALICE], message(mark()))

    expect(sent.rcpt[ALICE], RCPT_OK)
    expect(sent.data, OUTCOME_UNKNOWN)
    assert hanging_lmtp.got_data.is_set()
    assert "outcome unknown" in delivery_line(
        gate, ALICE, re.escape(f"dovecot[{hanging_lmtp.target}]"), "deferred")
    assert files(dovecot.maildir(ALICE)) == []


@pytest.mark.parametrize("hanging_lmtp", ["first-then-hang"], indirect=True)
def test_retry_after_a_reply_lost_midway_skips_who_already_has_it(dovecot, mailgate_factory,
                                                                 hanging_lmtp) -> None:
    gate = mailgate_factory({"delivery": {"lmtp": hanging_lmtp.target, "lmtp_timeout": 1}})
    data = message(mark())
    relay = re.escape(f"dovecot[{hanging_lmtp.target}]")

    first = smtp_send(gate, [ALICE, BOB], data)
    expect(first.data, OUTCOME_UNKNOWN)
    assert f"<{BOB}>".encode() in first.data[1]
    delivery_line(gate, ALICE, relay, "sent")
    assert "outcome unknown" in delivery_line(gate, BOB, relay, "deferred")

    second = smtp_send(gate, [ALICE, BOB], data)
    expect(second.data, DELIVERED)
    assert hanging_lmtp.transactions == [[ALICE, BOB], [BOB]]  # alice was not sent again
    assert "already delivered" in delivery_line(gate, ALICE, "none", "sent")
    assert files(dovecot.maildir(ALICE)) == [] and files(dovecot.maildir(BOB)) == []


@pytest.mark.parametrize("hanging_lmtp", ["silent"], indirect=True)
def test_no_greeting_falls_back_to_the_maildir(dovecot, mailgate_factory, hanging_lmtp) -> None:
    gate = mailgate_factory({"delivery": {"lmtp": hanging_lmtp.target, "lmtp_timeout": 1}})
    started = time.monotonic()
    sent = smtp_send(gate, [ALICE], message(mark()))

    expect(sent.rcpt[ALICE], RCPT_OK)  # Dovecot cannot be asked in time; the maildir exists
    expect(sent.data, DELIVERED)       # nothing reached "Dovecot": the fallback is safe
    assert time.monotonic() - started < 10
    assert not hanging_lmtp.got_data.is_set()
    delivery_line(gate, ALICE, "maildir", "sent")
    gate.wait_log(rf"Dovecot did not take {re.escape(ALICE)} \(.*no reply from Dovecot in time")
    [written] = files(dovecot.maildir(ALICE))
    assert written.parent.name == "new"


@pytest.mark.parametrize("hanging_lmtp", ["silent"], indirect=True)
def test_rcpts_waiting_for_a_hung_dovecot_wait_one_timeout_not_one_each(dovecot, mailgate_factory,
                                                                        hanging_lmtp) -> None:
    """One pooled connection, Dovecot never greets, three clients ask about three recipients
    at once: each RCPT is answered within about one lmtp_timeout (2 s), not after the others'
    timeouts one by one (6 s for the last)."""
    gate = mailgate_factory({"delivery": {"lmtp": hanging_lmtp.target, "lmtp_timeout": 2,
                                          "lmtp_connections": 1}})

    def rcpt(address: str) -> tuple[int, float]:
        with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=REPLY_BOUND) as s:
            s.ehlo()
            assert s.mail(SENDER)[0] == 250
            started = time.monotonic()
            code, _ = s.rcpt(address)
            return code, time.monotonic() - started

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(rcpt, [ALICE, BOB, CAROL]))
    assert [code for code, _ in answers] == [250] * 3   # their maildirs exist: the fallback
    assert max(seconds for _, seconds in answers) < 4.5, answers


# ---------------------------------------------------------------- concurrency

@pytest.mark.parametrize("dovecot_up", [True, False], ids=["dovecot", "fallback"])
def test_concurrent_sessions_deliver_each_message_once(dovecot, mailgate_factory,
                                                       dovecot_up) -> None:
    if not dovecot_up:
        dovecot.stop()
    gate = mailgate_factory()
    marks = [mark() for _ in range(20)]

    def session(batch: list[str]) -> list[tuple[int, bytes]]:
        out = []
        with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=REPLY_BOUND) as s:
            s.ehlo()
            for m in batch:
                s.mail(SENDER)
                s.rcpt(ALICE)
                s.rcpt(BOB)
                out.append(s.data(message(m)))
        return out

    with ThreadPoolExecutor(4) as pool:
        replies = [r for batch in pool.map(session, [marks[i::4] for i in range(4)]) for r in batch]

    for reply in replies:
        expect(reply, DELIVERED)
    for addr in (ALICE, BOB):
        stored = dovecot.maildir_messages(addr)
        assert len(stored) == 20
        for m in marks:
            assert sum(f"body {m}".encode() in body for body in stored) == 1
        assert files(dovecot.maildir(addr), "tmp") == []


# ---------------------------------------------------------------- duplicate recipients

def lmtp_each(gate: Mailgate, rcpts: list[str], data: bytes) -> list[tuple[int, str]]:
    """One LMTP transaction with every RCPT as given (duplicates too): the replies after DATA."""
    with smtplib.LMTP(*gate.lmtp, local_hostname="client.test", timeout=REPLY_BOUND) as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        for rcpt in rcpts:
            expect(s.rcpt(rcpt), RCPT_OK)
        s.putcmd("DATA")
        assert s.getreply()[0] == 354
        s.send(re.sub(rb"(?m)^\.", b"..", data) + b".\r\n")
        return [(code, text.decode()) for code, text in (s.getreply() for _ in rcpts)]


def test_duplicate_recipients_over_lmtp_get_one_copy_and_a_reply_each(dovecot,
                                                                      mailgate_factory) -> None:
    """As Postfix's cleanup: an address named twice, in any case, is delivered once; every
    accepted RCPT still gets its reply, in order (RFC 2033)."""
    gate = mailgate_factory()
    m = mark()
    replies = lmtp_each(gate, [BOB, "BOB@example.test", ALICE, BOB], message(m))

    for reply in replies:
        expect(reply, DELIVERED, text=False)
    assert [sum(f"body {m}".encode() in body for body in dovecot.maildir_messages(addr))
            for addr in (ALICE, BOB)] == [1, 1]
    gate.wait_log(r"to=<BOB@example\.test>, relay=dovecot.*status=sent "
                  r"\(duplicate of <bob@example\.test>\)")


def test_duplicate_recipient_in_the_fallback_is_written_once(dovecot, mailgate_factory) -> None:
    dovecot.stop()
    gate = mailgate_factory()
    m = mark()
    with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=REPLY_BOUND) as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        expect(s.rcpt(ALICE), RCPT_OK)
        expect(s.rcpt(ALICE), RCPT_OK)
        expect(s.data(message(m)), DELIVERED)

    [written] = files(dovecot.maildir(ALICE))
    assert written.parent.name == "new" and f"body {m}".encode() in written.read_bytes()
    assert "delivered to maildir" in delivery_line(gate, ALICE, "maildir", "sent")


KELVIN = "\u212aate@example.test"  # U+212A KELVIN SIGN: str.lower() makes it "kate"


def test_an_address_that_only_unicode_folds_to_a_user_is_not_that_user(dovecot,
                                                                       mailgate_factory) -> None:
    """kate is known (and cached); "\u212aate" is another name, which Dovecot refuses. Neither
    the RCPT cache (Dovecot up) nor the maildir check and fallback (Dovecot down) may take it
    for kate's: with Dovecot down it is not known, so 451, and kate's mailbox gets nothing."""
    kate = "kate@example.test"
    dovecot.add_user(kate)
    gate = mailgate_factory({"delivery": {"recipient_cache": 600}})
    m = mark()
    with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=REPLY_BOUND) as s:
        s.ehlo()
        assert s.mail(SENDER, ["SMTPUTF8"])[0] == 250
        expect(s.rcpt(kate), RCPT_OK)
        up = s.rcpt(KELVIN)
    assert up[0] >= 500, up  # Dovecot refuses the name (not kate's cached 250)
    dovecot.stop()
    with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=REPLY_BOUND) as s:
        s.ehlo()
        assert s.mail(SENDER, ["SMTPUTF8"])[0] == 250
        down = s.rcpt(KELVIN)
        if down[0] == 250:
            s.data(message(m, kate))
    expect(down, USERDB_UNAVAILABLE)
    assert [body for body in dovecot.maildir_messages(kate) if m.encode() in body] == []
