"""Log lines an operator can grep like Postfix's: queue id first, then key=value fields.

    4F2A1C9B07: client=localhost[127.0.0.1]
    4F2A1C9B07: from=<a@x.test>, size=2048, nrcpt=2
    4F2A1C9B07: from=<a@x.test>, to=<b@example.test>, relay=dovecot[127.0.0.1:24],
        delay=0.02, dsn=2.0.0, status=sent (250 2.0.0 <b@example.test> xyz Saved)
    NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 550 5.1.1 <x@example.test>: ...

Under systemd (JOURNAL_STREAM) journald adds the time and tag; with log.syslog the lines go to
facility mail (mail.log, next to Postfix's) and not also to stderr, so the journal has each once.
"""
from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import socket
import sys
import time
from typing import TYPE_CHECKING

from mailgate import metrics
from mailgate.commands import printable
from mailgate.config import Log

if TYPE_CHECKING:
    from mailgate.deliver import Result
    from mailgate.message import Envelope

log = logging.getLogger("mailgate")


# RFC 5424 severities: journald reads "<N>" at the start of a stderr line as the priority.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _Format(logging.Formatter):
    """Postfix's "warning:" / "error:" prefixes; the time text is made once per second.

    `stamp`: the time and "mailgate[pid]:" in front, as in a maillog file. Under journald the
    journal adds both itself, so a line carries only its priority ("<6>") and the message.
    """

    def __init__(self, stamp: bool, tag: bool = True, priority: bool = False):
        super().__init__()
        self.stamp, self.tag, self.priority = stamp, tag, priority
        self._second, self._stamp = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno > logging.INFO:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.tag:
            text = f"mailgate[{record.process}]: {text}"
        if self.priority:
            text = f"<{_PRIORITY.get(record.levelno, 6)}>{text}"
        return f"{self._time(record.created)} {text}" if self.stamp else text

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%b %d %H:%M:%S", time.localtime(second))
        return self._stamp


def under_journal(stream=None) -> bool:
    """True when `stream` (stderr) is the journal stream systemd gave us (JOURNAL_STREAM=dev:ino),
    not a file or pipe it was redirected to later (sd_journal_stream_fd(3))."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup(settings: Log) -> None:
    """Where lines go. Under systemd with syslog on: syslog only, since journald keeps what
    reaches /dev/log too; a copy on stderr would stand twice in the journal."""
    # The logging HOWTO's "Optimization": no caller's frame, thread or multiprocessing name
    # looked up for every record; our lines show none of them (5 of the 19 µs a line costs).
    logging._srcfile = None
    logging.logThreads = logging.logMultiprocessing = False
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    journal = under_journal()
    syslog, problem = _syslog(settings) if settings.syslog else (None, "")
    if syslog is None or not journal:
        # XXX lines are written on the event loop, as Postfix writes to syslog: a journald that
        # stops reading would stall mailgate. A QueueListener thread would cost a hand-off per line.
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(_Format(stamp=not journal, tag=not journal, priority=journal))
        root.addHandler(stderr)
    if syslog is not None:
        root.addHandler(syslog)
    root.setLevel(settings.level.upper())
    if problem:
        log.warning("syslog: cannot write to %s (%s): logging to stderr only",
                    settings.syslog_socket, problem)


def _syslog(settings: Log) -> tuple[logging.Handler | None, str]:
    """A handler for facility mail, or None and why: the stdlib handler ignores a socket it
    cannot reach at start (as openlog(3) does), and lines would then go nowhere."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            probe.connect(settings.syslog_socket)
        handler = logging.handlers.SysLogHandler(
            settings.syslog_socket, facility=logging.handlers.SysLogHandler.LOG_MAIL)
    except OSError as e:
        return None, e.strerror or str(e)
    handler.setFormatter(_Format(stamp=False))  # syslog stamps its own time
    return handler, ""


# What a client said (HELO name, XFORWARD attributes, addresses) goes through printable() on the
# way into a line: forwarded.py and the path parser already refuse or replace control
# characters, this keeps a line one line whatever a later change lets through.
def client_text(name: str, addr: str) -> str:
    return printable(f"{name}[{addr}]")


def delivery(queue_id: str, sender: str, recipient: str, relay: str, delay: float,
             dsn: str, status: str, detail: str) -> None:
    log.info("%s: from=<%s>, to=<%s>, relay=%s, delay=%s, dsn=%s, status=%s (%s)",
             queue_id, printable(sender), printable(recipient), relay, delay_text(delay), dsn,
             status, printable(detail))


def delay_text(seconds: float) -> str:
    """A delay as Postfix logs it: whole seconds from 10 on, else two significant digits and at
    most two after the point (delay_logging_resolution_limit = 2); never an exponent, which
    log parsers written for Postfix do not expect (0.00009 s is "0", not "9e-05")."""
    if seconds >= 10:
        return f"{seconds:.0f}"
    return f"{float(f'{seconds:.2g}'):.2f}".rstrip("0").rstrip(".") or "0"


def reject(stage: str, client: str, reply: object, sender: str | None, recipient: str,
           proto: str, helo: str) -> None:
    log.info("NOQUEUE: reject: %s from %s: %s; from=<%s> to=<%s> proto=%s helo=<%s>",
             stage, printable(client), printable(str(reply)), printable(sender or ""),
             printable(recipient), printable(proto), printable(helo))


def received(env: Envelope, size: int) -> None:
    """A message's first lines, as soon as it has its queue id (client, from), so that what the
    filters and delivery log about it comes after them, as in Postfix's log."""
    qid = env.queue_id
    # orig_queue_id= as Postfix's smtpd logs it: grep one id to follow a message through both.
    log.info("%s: client=%s%s", qid, client_text(env.client.name, env.client.addr),
             f", orig_queue_id={printable(env.client.ident)}" if env.client.ident else "")
    log.info("%s: from=<%s>, size=%d, nrcpt=%d", qid, printable(env.sender), size,
             len(env.recipients))


def transaction(env: Envelope, size: int, results: list[Result], listener: str) -> None:
    """A message's lines once it is answered (one per recipient), and its counts."""
    qid = env.queue_id
    delay = asyncio.get_running_loop().time() - env.received_at
    for r in results:
        delivery(qid, env.sender, r.recipient, r.relay, delay, r.reply.status, r.status,
                 r.detail or str(r.reply))
        metrics.child(metrics.RECIPIENTS, r.status).inc()
    metrics.MESSAGE_BYTES.observe(size)
    metrics.MESSAGE_SECONDS.observe(delay)
    ok = sum(r.ok for r in results)
    outcome = ("delivered" if ok == len(results) else "partial" if ok else
               "rejected" if all(r.reply.permanent for r in results) else "deferred")
    metrics.child(metrics.MESSAGES, listener, outcome).inc()
