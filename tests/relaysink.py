"""A real SMTP relay for tests: aiosmtpd on a loopback port, keeping every message it accepts.

Stands in for the local Postfix that mailgate hands forwards and auto-replies to. A test can make
it refuse (`refuse_rcpt = "451 4.3.0 ..."`), stop and start it on the same port (relay down),
require STARTTLS and AUTH, or not offer SMTPUTF8 (`smtputf8=False`). Plain class, no pytest: a benchmark can use it too.
"""
from __future__ import annotations

import datetime
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from peers import free_port, port_open, wait_until


@dataclass(frozen=True)
class Received:
    sender: str                 # MAIL FROM, "" for <>
    recipients: tuple[str, ...]
    data: bytes                 # as the client sent it (dot-unstuffed), CRLF
    tls: bool
    login: str                  # the AUTH user, "" without AUTH


class _Handler:
    def __init__(self, sink: RelaySink):
        self.sink = sink

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.sink.refuse_rcpt:
            return self.sink.refuse_rcpt
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        login = session.auth_data.login.decode() if session.auth_data else ""
        with self.sink.lock:
            self.sink.messages.append(Received(
                envelope.mail_from if envelope.mail_from != "<>" else "",
                tuple(envelope.rcpt_tos), envelope.original_content,
                session.ssl is not None, login))
        return "250 2.0.0 Ok: queued"


class RelaySink:
    def __init__(self, tls_cert: tuple[Path, Path] | None = None,
                 login: tuple[str, str] | None = None, smtputf8: bool = True):
        self.port = free_port()
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self.refuse_rcpt = ""          # e.g. "451 4.3.0 try later": every RCPT gets it
        self.login = login
        self.tls_cert = tls_cert
        self.smtputf8 = smtputf8
        self.controller: Controller | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RelaySink:
        extra = {}
        if self.tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*map(str, self.tls_cert))
            extra.update(tls_context=context, require_starttls=True)
        if self.login:
            extra.update(authenticator=self._authenticate, auth_required=True,
                         auth_require_tls=bool(self.tls_cert))
        self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port,
                                     server_hostname="relay.test",
                                     enable_SMTPUTF8=self.smtputf8, **extra)
        self.controller.start()
        return self

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and \
            (auth_data.login.decode(), auth_data.password.decode()) == self.login
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None
            wait_until(lambda: not port_open(self.port), 10, what="relay sink port closed")

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.messages)

    def wait_for(self, count: int, timeout: float = 15) -> list[Received]:
        """The first `count` messages, once that many have arrived."""
        return wait_until(lambda: len(self.received()) >= count and self.received()[:count],
                          timeout, what=f"{count} message(s) at the relay sink")


def self_signed(directory: Path, name: str = "relay.test") -> tuple[Path, Path]:
    """A certificate for `name` and 127.0.0.1 and its key (the certificate is its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "relay.crt", directory / "relay.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
