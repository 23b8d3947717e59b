"""What the session does at moments no socket can be made to reach on cue: EOF arriving while
our replies back up, and a file system that never answers a RCPT check. A transport that
records what it is asked stands in for the socket; the file system's hang is a blocked call."""
import asyncio
import threading

from mailgate import config, maildir
from mailgate.config import Config, build
from mailgate.recipients import Recipients
from mailgate.resources import Resources
from mailgate.server import SMTPServer
from mailgate.service import make_gateway
from mailgate.verdict import USERDB_UNAVAILABLE


class Transport(asyncio.Transport):
    def __init__(self, protocol: asyncio.Protocol):
        super().__init__()
        self.protocol, self.out, self.backlog = protocol, bytearray(), 0
        self.closing = self.aborted = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data) -> None:
        self.out += data

    def get_write_buffer_size(self) -> int:
        return self.backlog  # what the client has not taken yet

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_eof_while_our_replies_back_up_still_answers_everything():
    """The client sent its last commands and shut its side, and reads our replies slowly:
    they are all written once it catches up, then the session closes (not aborted)."""
    async def run():
        cfg = config.load(None, {"MAILGATE_DATA_DIR": "/nonexistent"})
        session = SMTPServer(make_gateway(cfg, Resources(cfg)), "smtp")
        transport = Transport(session)
        session.connection_made(transport)
        session.data_received(b"EHLO client.test\r\n")
        transport.backlog = 1 << 20
        session.pause_writing()
        session.data_received(b"NOOP\r\nRSET\r\nQUIT\r\n")
        session.eof_received()
        assert not transport.closing, "closed with replies still owed"
        transport.backlog = 0
        session.resume_writing()
        return transport
    transport = asyncio.run(run())
    replies = bytes(transport.out).split(b"\r\n")
    assert replies[-4:] == [b"250 2.0.0 Ok", b"250 2.0.0 Ok", b"221 2.0.0 Bye", b""]
    assert transport.closing and not transport.aborted


def test_file_system_that_never_answers_is_451_4_4_3_after_lmtp_timeout(tmp_path, monkeypatch):
    """Maildir-only delivery (the maildirs are the user database) on a hung file system."""
    cfg = build(Config, {"hostname": "mx.example.test", "domains": ["example.test"],
                         "data_dir": str(tmp_path),
                         "delivery": {"lmtp": "", "maildir": str(tmp_path / "%d/%n"),
                                      "lmtp_timeout": 0.2}}, "")
    hung = threading.Event()
    monkeypatch.setattr(maildir, "exists", lambda *args: hung.wait(10))

    async def check():
        try:
            return await Recipients(cfg, None).check("alice@example.test")
        finally:
            hung.set()  # the file system comes back, so the worker thread can end
    assert asyncio.run(check()) is USERDB_UNAVAILABLE
