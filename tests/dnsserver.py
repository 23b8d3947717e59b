"""A small authoritative DNS server for tests and benchmarks (dnslib), on a loopback port.

UDP and TCP on the same port; an answer over 512 bytes (or the client's EDNS size) goes back
truncated over UDP and whole over TCP, as real servers do (a 16k-bit DKIM key is ~5.7 KB, more
than dnsmasq can hold). Names can be made silent (never answered) or slow (answered late). Every
query is recorded, so a test can see what mailgate asked, and over which transport.
"""
from __future__ import annotations

import base64
import secrets
import threading
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from dnslib import A, AAAA, MX, QTYPE, RCODE, RR, SOA, TXT, DNSLabel, DNSRecord
from dnslib.server import DNSError, DNSHandler, DNSLogger, DNSServer

from peers import free_port

SOA_RECORD = SOA("ns.test.", "hostmaster.test.", (1, 3600, 600, 86400, 60))
NEGATIVE_TTL = 60


@dataclass(frozen=True)
class Query:
    name: str      # lower case, no trailing dot
    qtype: str     # "TXT", "A", ...
    transport: str  # "udp" or "tcp"


class _Silent(DNSError):
    """Raised for a silent name: dnslib's handler then sends nothing."""


class _Handler(DNSHandler):
    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        packed = reply.pack()
        if self.protocol == "udp":
            limit = max([512] + [rr.edns_len for rr in request.ar if rr.rtype == QTYPE.OPT])
            if len(packed) > limit:  # (dnslib's own truncate() drops the question, which
                truncated = request.reply()  # resolvers then ignore): question kept, TC set
                truncated.header.tc = 1
                packed = truncated.pack()
        return packed


class Zone:
    """The records, the silent names and the query log; thread-safe (dnslib's server threads)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.records: dict[str, list[RR]] = {}
        self.silent: set[str] = set()
        self.slow: dict[str, float] = {}   # name -> seconds before the answer
        self.queries: list[Query] = []

    def add(self, name: str, rdata, ttl: int = 300) -> None:
        key = name.rstrip(".").lower()
        rr = RR(key + ".", getattr(QTYPE, type(rdata).__name__), rdata=rdata, ttl=ttl)
        with self.lock:
            self.records.setdefault(key, []).append(rr)

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append(Query(name, qtype, handler.protocol))
            if name in self.silent:
                raise _Silent(name)
            found = self.records.get(name)
            answers = [rr for rr in found or [] if rr.rtype == request.q.qtype]
            delay = self.slow.get(name, 0.0)
        if delay:
            time.sleep(delay)  # a slow authoritative server, on purpose (one thread per query)
        reply = request.reply()
        for rr in answers:
            reply.add_answer(rr)
        if not answers:  # NXDOMAIN or no such record: the SOA says how long to cache that
            if found is None:
                reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(RR(DNSLabel("test."), QTYPE.SOA, rdata=SOA_RECORD, ttl=NEGATIVE_TTL))
        return reply


class _QuietLogger(DNSLogger):
    def __init__(self):
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data")


class DnsServer:
    """`DnsServer().start()`; records with txt()/a()/mx(); `stop()` closes both sockets."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.zone = Zone()
        self._servers = [DNSServer(self.zone, port=self.port, address="127.0.0.1", tcp=tcp,
                                   logger=_QuietLogger(), handler=_Handler)
                         for tcp in (False, True)]

    @property
    def address(self) -> str:
        """For mailgate's `[dns] nameservers`."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> DnsServer:
        for server in self._servers:
            server.start_thread()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()

    def txt(self, name: str, text: str, ttl: int = 300) -> None:
        """A TXT record; long text split into strings of 255 bytes (RFC 7208 §3.3)."""
        data = text.encode()
        self.zone.add(name, TXT([data[i:i + 255] for i in range(0, len(data), 255)] or [b""]),
                      ttl)

    def a(self, name: str, address: str, ttl: int = 300) -> None:
        self.zone.add(name, AAAA(address) if ":" in address else A(address), ttl)

    def mx(self, name: str, exchange: str, preference: int = 10, ttl: int = 300) -> None:
        self.zone.add(name, MX(exchange, preference), ttl)

    def silence(self, name: str) -> None:
        with self.zone.lock:
            self.zone.silent.add(name.rstrip(".").lower())

    def delay(self, name: str, seconds: float) -> None:
        with self.zone.lock:
            self.zone.slow[name.rstrip(".").lower()] = seconds

    def queries(self, name: str | None = None) -> list[Query]:
        with self.zone.lock:
            return [q for q in self.zone.queries if name is None or q.name == name.lower()]


# ---------------------------------------------------------------- DKIM keys to publish

@dataclass(frozen=True)
class DkimKey:
    pem: bytes      # private key (PKCS#1 PEM), for dkimpy's sign
    record: str     # the TXT record that publishes the public key


def _record(public_key) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def dkim_key(bits: int = 2048) -> DkimKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return DkimKey(private.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption()),
                   _record(private.public_key()))


def hostile_record(modulus_bits: int, exponent_bits: int) -> str:
    """A key only to be refused: random modulus and exponent of the given sizes."""
    n = secrets.randbits(modulus_bits) | (1 << (modulus_bits - 1)) | 1
    e = secrets.randbits(exponent_bits) | (1 << (exponent_bits - 1)) | 1
    return _record(rsa.RSAPublicNumbers(e, n).public_key())
