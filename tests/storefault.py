"""An HTTP proxy on loopback in front of moto's DynamoDB that answers chosen requests itself.

Point store.endpoint_url at `proxy.endpoint`. `fail(action, text)`: from then on, each request
whose X-Amz-Target ends with `.action` (PutItem, GetItem, ...) and whose body holds `text` is
answered 500 InternalServerError, as DynamoDB does when it is in trouble (botocore retries it),
and never reaches moto; `failed` counts them. Everything else passes through. `close()` stops it.
"""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

UPSTREAM_TIMEOUT = 30.0  # seconds moto may take to answer one request
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}
ERROR = b'{"__type":"com.amazonaws.dynamodb.v20120810#InternalServerError","message":"test"}'


class StoreFault:
    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream).netloc
        self.rules: list[tuple[str, bytes]] = []
        self.failed = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, action: str, text: str) -> None:
        with self.lock:
            self.rules.append((f".{action}", text.encode()))

    def refuses(self, target: str, body: bytes) -> bool:
        with self.lock:
            hit = any(target.endswith(a) and t in body for a, t in self.rules)
            self.failed += hit
            return hit

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _handler(proxy: StoreFault) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"   # botocore keeps its connections

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if proxy.refuses(self.headers.get("X-Amz-Target", ""), body):
                self._answer(500, {"Content-Type": "application/x-amz-json-1.0"}, ERROR)
                return
            upstream = http.client.HTTPConnection(proxy.upstream, timeout=UPSTREAM_TIMEOUT)
            try:
                upstream.request("POST", self.path, body, dict(self.headers.items()))
                reply = upstream.getresponse()
                self._answer(reply.status, dict(reply.getheaders()), reply.read())
            finally:
                upstream.close()

        def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass  # moto's own log has every request

    return Handler
