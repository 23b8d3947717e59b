"""What the fault-injection tests (test_faults_*.py) share: clients, literal reply checks, counts.

Expected replies are literals from the standards and the contract ("451", "4.3.0"), never
names from mailgate.verdict: a wrong entry in the reply table must fail these tests. Copies are
counted by a unique token in the maildir files themselves, whoever wrote them.
"""
from __future__ import annotations

import smtplib
import socket
import uuid
from pathlib import Path

from peers import Dovecot, Mailgate

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
    client = smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=timeout)
    client.ehlo()
    return client


def send(gate: Mailgate, rcpts: list[str], data: bytes) -> tuple[dict, tuple[int, bytes] | None]:
    """One SMTP transaction: {rcpt: reply} and the DATA reply (None when no RCPT passed)."""
    with smtp(gate) as client:
        client.mail(SENDER)
        answers = {r: client.rcpt(r) for r in rcpts}
        if not any(code == 250 for code, _ in answers.values()):
            return answers, None
        return answers, client.data(data)


class Raw:
    """A raw SMTP or LMTP session, for what smtplib hides (LMTP, a client that vanishes)."""

    def __init__(self, address: tuple[str, int], timeout: float = REPLY_BOUND):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.file = self.sock.makefile("rb")

    def reply(self) -> tuple[int, str]:
        """One reply, lines joined by newline; (0, "") once the server has closed."""
        texts = []
        while True:
            line = self.file.readline()
            if not line:
                return 0, "\n".join(texts)
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            texts.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), "\n".join(texts)

    def command(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

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
        stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line
                               for line in data.split(b"\r\n"))
        self.sock.sendall(stuffed + (b"" if stuffed.endswith(b"\r\n") else b"\r\n") + b".\r\n")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


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
