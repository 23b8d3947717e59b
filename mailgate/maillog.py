"""Log lines an operator can grep like Postfix's: queue id first, then key=value fields.

    4F2A1C9B07: client=localhost[127.0.0.1]
    4F2A1C9B07: from=<a@x.test>, size=2048, nrcpt=2
    4F2A1C9B07: from=<a@x.test>, to=<b@example.test>, relay=dovecot[127.0.0.1:24],
        delay=0.02, dsn=2.0.0, status=sent (250 2.0.0 <b@example.test> xyz Saved)
    NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 550 5.1.1 <x@example.test>: ...
"""
from __future__ import annotations

import logging
import logging.handlers
import sys
import time

from mailgate.config import Log

log = logging.getLogger("mailgate")


class _Format(logging.Formatter):
    """Postfix's "warning:" / "error:" prefixes; the time text is made once per second."""

    def __init__(self, with_time: bool):
        super().__init__()
        self.with_time = with_time
        self._second, self._stamp = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno > logging.INFO:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        text = f"mailgate[{record.process}]: {text}"
        return f"{self._time(record.created)} {text}" if self.with_time else text

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%b %d %H:%M:%S", time.localtime(second))
        return self._stamp


def setup(settings: Log) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    # XXX lines are written on the event loop, as Postfix writes to syslog: a journald that
    # stops reading would stall mailgate. A QueueListener thread would cost a hand-off per line.
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(_Format(with_time=True))
    root.addHandler(stderr)
    if settings.syslog:
        syslog = logging.handlers.SysLogHandler(
            settings.syslog_socket, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        syslog.setFormatter(_Format(with_time=False))  # syslog stamps its own time
        root.addHandler(syslog)
    root.setLevel(settings.level.upper())
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter


def client_text(name: str, addr: str) -> str:
    return f"{name}[{addr}]"


def delivery(queue_id: str, sender: str, recipient: str, relay: str, delay: float,
             dsn: str, status: str, detail: str) -> None:
    log.info("%s: from=<%s>, to=<%s>, relay=%s, delay=%.3g, dsn=%s, status=%s (%s)",
             queue_id, sender, recipient, relay, delay, dsn, status, detail)


def reject(stage: str, client: str, reply: object, sender: str | None, recipient: str,
           proto: str, helo: str) -> None:
    log.info("NOQUEUE: reject: %s from %s: %s; from=<%s> to=<%s> proto=%s helo=<%s>",
             stage, client, reply, sender or "", recipient, proto, helo)
