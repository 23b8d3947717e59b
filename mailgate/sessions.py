"""The gateway's book of open sessions: the session cap, and a shutdown that lets mail finish.

Listeners report each session's opening, closing and end of transaction; shutdown closes idle
sessions at once and waits, up to its timeout, for transactions and tasks still in flight
(deliveries whose client left, auto-replies) before closing the rest.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from mailgate import metrics
from mailgate.message import Client

log = logging.getLogger("mailgate.gateway")


class Session(Protocol):
    """What the gateway needs of a client session; the listeners (server.py, lmtpserver.py)
    are the real ones.
    (The gateway does not import them: data flows from the listener down, never back up.)"""
    listener: str          # "smtp" | "lmtp", the config key's name
    protocol_name: str     # "SMTP" | "LMTP"
    busy: bool             # inside DATA: shutdown waits for it
    eof: bool              # the client shut its side: it may never read our reply
    transport: asyncio.BaseTransport | None
    envelope: Any          # server.Envelope, the transaction in progress

    def client(self) -> Client: ...
    def close_idle(self) -> None: ...


class Sessions:
    """Mixed into Gateway; `max_sessions` is read from its config."""
    max_sessions: int

    def __init__(self) -> None:
        self.sessions: set[Session] = set()
        self.inflight: set[asyncio.Task] = set()
        self.closing = False
        self.quiet = asyncio.Event()  # set when no session is inside a transaction

    def session_opened(self, server: Session) -> None:
        self.sessions.add(server)
        metrics.child(metrics.SESSIONS_ACTIVE, server.listener).inc()

    def session_closed(self, server: Session) -> None:
        if server in self.sessions:
            self.sessions.discard(server)
            metrics.child(metrics.SESSIONS_ACTIVE, server.listener).dec()

    def transaction_ended(self) -> None:
        if not any(s.busy for s in self.sessions):
            self.quiet.set()

    def over_session_limit(self, server: Session) -> bool:
        return len(self.sessions) > self.max_sessions

    def keep(self, task: asyncio.Future) -> asyncio.Future:
        """A task shutdown waits for."""
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        return task

    async def shutdown(self, timeout: float) -> None:
        """Stop idle sessions now; let messages in flight finish within `timeout`."""
        self.closing = True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        for server in list(self.sessions):
            if not server.busy:
                server.close_idle()
        if any(s.busy for s in self.sessions):
            self.quiet.clear()
            try:
                await asyncio.wait_for(self.quiet.wait(), timeout)
            except TimeoutError:
                log.warning("shutdown: %d transactions still running after %s s, closing them",
                            sum(s.busy for s in self.sessions), timeout)
        if self.inflight:
            await asyncio.wait(self.inflight, timeout=max(0.0, end - loop.time()))
        for server in list(self.sessions):
            server.close_idle()
