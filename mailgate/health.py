"""GET /health and GET /domains for monitoring, on their own small HTTP server thread.

/health answers 200 when mailgate is live and Dovecot's LMTP greets within 2 s (or delivery is
maildir-only), and 503 with the same JSON when Dovecot does not answer (mail then goes to the maildir fallback, if any), so
`curl -f` fails exactly when an operator should look.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mailgate import __version__
from mailgate.config import Config, parse_hostport

PROBE_TIMEOUT = 2.0


def dovecot_answers(target: str, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Connect to Dovecot's LMTP and read its greeting (blocking; called off the event loop)."""
    if not target:
        return False, "LMTP delivery disabled (maildir only)"
    try:
        if target.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(target[5:])
        else:
            sock = socket.create_connection(parse_hostport(target), timeout=timeout)
        with sock:
            greeting = sock.recv(512).decode("utf-8", "replace").strip()
            sock.sendall(b"QUIT\r\n")
    except OSError as e:
        return False, f"{target}: {e.strerror or e}"
    return greeting.startswith("220"), greeting[:120]


def report(config: Config, started: float, reload_error: str = "",
           lmtp: str | None = None) -> dict:
    """`lmtp`: the Dovecot delivery actually uses (the pool's); config.delivery.lmtp if None."""
    lmtp = config.delivery.lmtp if lmtp is None else lmtp
    ok, detail = dovecot_answers(lmtp)
    healthy = ok or not lmtp  # maildir-only mode has no Dovecot to ask
    return {
        "status": "ok" if healthy else "degraded",
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - started, 3),
        "listeners": {"smtp": config.listen.smtp, "lmtp": config.listen.lmtp},
        "dovecot": {"target": lmtp, "answers": ok, "detail": detail},
        "maildir_fallback": bool(config.delivery.maildir),
        # the last SIGHUP's refusal ("" when the running config is the file's): mail flows on
        # the old config, but a restart would fail the same way
        "config": {"reload_error": reload_error},
    }


class _Handler(BaseHTTPRequestHandler):
    server_version = f"mailgate/{__version__}"
    config: Config
    started: float
    lmtp: str | None = None   # the pool's target: a reload does not rebuild the pool
    reload_error = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            body = report(self.config, self.started, self.reload_error, self.lmtp)
            self._send(200 if body["status"] == "ok" else 503, body)
        elif self.path == "/domains":
            self._send(200, {"domains": list(self.config.domains)})
        else:
            self._send(404, {"error": "not found", "paths": ["/health", "/domains"]})

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - keep probes out of mail.log
        pass


def serve(config: Config, lmtp: str | None = None) -> ThreadingHTTPServer | None:
    if not config.health.listen:
        return None
    handler = type("Handler", (_Handler,), {"config": config, "started": time.monotonic(),
                                            "lmtp": lmtp})
    host, port = parse_hostport(config.health.listen, "health.listen")
    httpd = _server_class(host, port)((host, port), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="health", daemon=True).start()
    return httpd


def _server_class(host: str, port: int) -> type[ThreadingHTTPServer]:
    """ThreadingHTTPServer in the address family of `host` (it is AF_INET only, so "[::1]:P"
    failed), as prometheus_client picks it for metrics.listen. A name that does not resolve
    raises socket.gaierror, an OSError."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                flags=socket.AI_PASSIVE)[0][0]
    return type("HTTPServer", (ThreadingHTTPServer,), {"address_family": family})
