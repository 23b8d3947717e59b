"""What the fault-injection tests (test_faults_*.py) share: clients, literal reply checks, counts.

Expected replies are literals from the standards and the contract ("451", "4.3.0"), never
names from mailgate.verdict: a wrong entry in the reply table must fail these tests. Copies are
counted by a unique token in the maildir files themselves, whoever wrote them.
"""
from __future__ import annotations

import smtplib
import uuid
from pathlib import Path

from peers import Dovecot, Mailgate, _dot_stuff, _Session, lmtp_send, smtp_client, smtp_send

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"
SENDER = "sender@remote.test"
REPLY_BOUND = 20.0  # seconds any one reply may take here, hung peers included


def token() -> str:
    return uuid.uuid4().hex


def message(mark: str, to: str = ALICE, body: bytes = b"") -> bytes:
    """A message in wire form (CRLF) carrying `mark`; `body` (CRLF lines) is appended."""
    return (f"From: <{SENDER}>\r\nTo: <{to}>\r\nSubject: fault {mark}\r\n"
            f"Message-ID: <{mark}@remote.test>\r\n\r\ntoken {mark}\r\n").encode() + body


def big_body(size: int, dots_every: int = 0) -> bytes:
    """About `size` bytes of 78-byte lines (base64-like); every `dots_every`-th line starts
    with a dot, so dot-stuffing runs across the whole message."""
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3\r\n"
    lines = [line] * (size // len(line))
    if dots_every:
        for i in range(0, len(lines), dots_every):
            lines[i] = b"." + line[1:]
    return b"".join(lines)


def is_reply(reply: tuple[int, bytes | str], literal: str) -> bool:
    """`reply` (code, text after it) starts with `literal`, e.g. "451 4.3.0"."""
    code, text = reply
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return f"{code} {text}".startswith(literal)


def assert_reply(reply: tuple[int, bytes | str], literal: str) -> None:
    assert is_reply(reply, literal), (reply, literal)


def smtp(gate: Mailgate, timeout: float = REPLY_BOUND) -> smtplib.SMTP:
    return smtp_client(gate.smtp, timeout=timeout)


def send(gate: Mailgate, rcpts: list[str], data: bytes) -> tuple[dict, tuple[int, bytes] | None]:
    """One SMTP transaction: {rcpt: reply} and the DATA reply (None when no RCPT passed)."""
    return smtp_send(gate.smtp, SENDER, rcpts, data, timeout=REPLY_BOUND)


class Raw(_Session):
    """peers' raw SMTP/LMTP client, for what smtplib hides (LMTP, a client that vanishes)."""

    def __init__(self, address: tuple[str, int], timeout: float = REPLY_BOUND):
        super().__init__(*address, timeout)

    def to_data(self, *rcpts: str, lmtp: bool = False) -> None:
        """Greeting, hello, MAIL, the RCPTs (each must pass), up to DATA's 354."""
        assert self.reply()[0] == 220
        assert self.command(f"{'LHLO' if lmtp else 'EHLO'} client.test")[0] == 250
        assert_reply(self.command(f"MAIL FROM:<{SENDER}>"), "250 2.1.0")
        for rcpt in rcpts:
            assert_reply(self.command(f"RCPT TO:<{rcpt}>"), "250 2.1.5")
        assert self.command("DATA")[0] == 354

    def send_data(self, data: bytes) -> None:
        """The message, dot-stuffed, and the final "."."""
        self.sock.sendall(_dot_stuff(data))

    def close(self) -> None:
        """Gone, without QUIT (a client that vanishes)."""
        self.file.close()
        self.sock.close()


def lmtp(gate: Mailgate, rcpts: list[str], data: bytes) -> list[tuple[int, str]]:
    """One LMTP transaction whose RCPTs all pass: the reply for each recipient after DATA."""
    rcpt_replies, data_replies = lmtp_send(*gate.lmtp, SENDER, rcpts, data, timeout=REPLY_BOUND)
    for reply in rcpt_replies.values():
        assert_reply(reply, "250 2.1.5")
    return data_replies


def maildir_files(dovecot: Dovecot, addr: str, *subs: str) -> list[Path]:
    root = dovecot.maildir(addr)
    return [f for sub in subs or ("new", "cur") if (root / sub).is_dir()
            for f in sorted((root / sub).iterdir()) if f.is_file()]


def copies(dovecot: Dovecot, addr: str, mark: str) -> int:
    """How many messages in addr's maildir (new/ and cur/) carry `mark`, whoever wrote them."""
    return sum(f"token {mark}".encode() in f.read_bytes() for f in maildir_files(dovecot, addr))


def written_by_dovecot(path: Path) -> bool:
    """Dovecot's maildir names carry the virtual size (",W="); mailgate's fallback's do not."""
    return ",W=" in path.name
