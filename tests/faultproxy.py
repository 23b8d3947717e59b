"""A TCP proxy for tests, between mailgate and Dovecot, that delays, drops or resets on command.

It runs its own event loop in a thread. Point delivery.lmtp at `proxy.target` and choose what
happens once a message's end (DATA's final ".", or the last octet of BDAT ... LAST) has gone
upstream (Dovecot always gets it whole):
  "pass"   replies flow (the default)
  "delay"  the reply to the final "." is held for `proxy.delay` seconds
  "hang"   replies are never forwarded (Dovecot slower than any budget, the 700 s case)
  "drop"   mailgate's side is closed at once (FIN); Dovecot still delivers and answers
  "reset"  the same with a RST
`refuse()` closes the port (connections refused) and `accept()` opens it again; `reset_all()`
resets every open connection. Counters: `connections` accepted, `dots` forwarded (message ends,
either kind), `chunked` (those that were BDAT ... LAST), `open`.
"""
from __future__ import annotations

import asyncio
import re
import socket
import struct
import threading

END_OF_DATA = b"\r\n.\r\n"
BDAT = re.compile(rb"BDAT (\d+)( LAST)?\r\n", re.IGNORECASE)
CALL_TIMEOUT = 10.0  # seconds a command to the proxy's loop may take


class _Link:
    """One proxied connection: mailgate's side (client) and Dovecot's (upstream)."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter):
        self.client, self.upstream = client, upstream
        self.after_dot: str | None = None  # the mode for the reply now due, if a dot went up
        self.closed = asyncio.Event()

    def close_client(self, reset: bool = False) -> None:
        _close(self.client, reset)

    def close(self, reset: bool = False) -> None:
        _close(self.client, reset)
        _close(self.upstream, reset)
        self.closed.set()


def _close(writer: asyncio.StreamWriter, reset: bool) -> None:
    if reset:
        sock = writer.get_extra_info("socket")
        try:  # SO_LINGER 0: the close sends RST, not FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (AttributeError, OSError):
            pass  # already closed: nothing left to reset
        writer.transport.abort()
    else:
        writer.close()


class FaultProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        self.upstream = (host, upstream_port)
        self.mode = "pass"
        self.delay = 0.0
        self.connections = self.dots = self.chunked = 0
        self.links: set[_Link] = set()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="faultproxy",
                                       daemon=True)
        self.thread.start()
        self.accept()

    @property
    def target(self) -> str:
        """mailgate's delivery.lmtp for this proxy."""
        return f"127.0.0.1:{self.port}"

    @property
    def open(self) -> int:
        return len(self.links)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT)

    def accept(self) -> None:
        """Listen (again, on the same port)."""
        async def start() -> None:
            self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port,
                                                     reuse_address=True)
            self.port = self.server.sockets[0].getsockname()[1]
        self._call(start())

    def refuse(self) -> None:
        """Close the listening port: new connections are refused, open ones stay."""
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()
        self._call(stop())

    def reset_all(self) -> None:
        async def reset() -> None:
            for link in list(self.links):
                link.close(reset=True)
        self._call(reset())

    def close(self) -> None:
        self.refuse()
        self.reset_all()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CALL_TIMEOUT)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self.links.add(link)
        try:
            await asyncio.gather(self._up(link, reader), self._down(link, up_reader))
        finally:
            self.links.discard(link)
            link.close()

    async def _up(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """mailgate -> Dovecot, watching for the end of a message's data."""
        ends = _MessageEnds()
        while data := await _read(reader):
            link.upstream.write(data)
            if end := ends.found_in(data):
                self.dots += 1
                self.chunked += end == "BDAT"
                link.after_dot = self.mode
                if self.mode in ("drop", "reset"):
                    link.close_client(reset=self.mode == "reset")
        if link.after_dot in ("drop", "reset"):
            link.upstream.write(b"QUIT\r\n")  # Dovecot answers the message first, then closes
        else:
            link.close()

    async def _down(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Dovecot -> mailgate: the reply to a final "." as the mode says."""
        while data := await _read(reader):
            mode = link.after_dot
            if mode in ("delay", "hang", "pass"):
                link.after_dot = None
            if mode == "delay":
                await asyncio.sleep(self.delay)
            elif mode == "hang":
                await link.closed.wait()
                return
            if not link.client.is_closing():
                link.client.write(data)
        link.close()


class _MessageEnds:
    """Reads mailgate's side of LMTP as it passes: commands, DATA up to its final ".", and BDAT
    chunks by their octet counts (no dot there: a "." line inside is message text)."""

    def __init__(self) -> None:
        self.commands = b""    # an unfinished command line
        self.chunk = 0         # octets of a BDAT chunk still to come
        self.last = False      # that chunk ends the message
        self.in_data = False   # after DATA: until CRLF.CRLF
        self.tail = b""        # DATA's last bytes, for a CRLF.CRLF split across reads

    def found_in(self, data: bytes) -> str:
        """How a message that ended in `data` was sent ("DATA", "BDAT"); "" if none did."""
        found = ""
        while data:
            if self.chunk:
                taken, data = data[:self.chunk], data[self.chunk:]
                self.chunk -= len(taken)
                if not self.chunk and self.last:
                    found = "BDAT"
            elif self.in_data:
                window = self.tail + data
                end = window.find(END_OF_DATA)
                if end < 0:
                    self.tail, data = window[-4:], b""
                else:
                    data, self.in_data, found = window[end + len(END_OF_DATA):], False, "DATA"
            else:
                line, newline, data = (self.commands + data).partition(b"\n")
                if not newline:
                    self.commands = line
                    continue
                self.commands = b""
                if line.upper() == b"DATA\r":
                    self.in_data, self.tail = True, b"\r\n"
                elif bdat := BDAT.fullmatch(line + b"\n"):
                    self.chunk, self.last = int(bdat.group(1)), bool(bdat.group(2))
                    if self.chunk == 0 and self.last:
                        found = "BDAT"
        return found


async def _read(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(65536)
    except OSError:
        return b""
