"""The outbound relay: what mailgate sends itself, over SMTP (plain, STARTTLS + AUTH) or SES.

Real peers only: an aiosmtpd relay sink on loopback (tests/relaysink.py) and moto in server mode
for SES (boto3 with endpoint_url; read back through moto's /moto-api/data.json). Outbound runs
in the test's own event loop: it is the unit under test, its peers are real.
"""
from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest

from mailgate.config import Config, Relay
from mailgate.outbound import Outbound
from peers import Moto
from relaysink import RelaySink, self_signed

MESSAGE = b"From: <a@remote.test>\r\nTo: <x@elsewhere.test>\r\nSubject: hi\r\n\r\nbody\r\n"


def send(relay: Relay, sender: str, recipients: list[str], data: bytes = MESSAGE,
         dry_run: bool = False):
    async def run():
        outbound = Outbound(Config(hostname="mx.example.test", relay=relay), dry_run=dry_run)
        try:
            return await outbound.send(sender, recipients, data)
        finally:
            await outbound.close()
    return asyncio.run(run())


def test_smtp_relay_gets_the_message_as_given(relay: RelaySink) -> None:
    sent = send(Relay(smtp=relay.address), "SRS0=x@example.test", ["x@elsewhere.test"])
    assert sent.ok and sent.relay == f"relay[{relay.address}]"
    [got] = relay.wait_for(1)
    assert (got.sender, got.recipients, got.data) == ("SRS0=x@example.test",
                                                      ("x@elsewhere.test",), MESSAGE)


def test_null_sender_goes_out_as_null(relay: RelaySink) -> None:
    assert send(Relay(smtp=relay.address), "", ["x@elsewhere.test"]).ok
    assert relay.wait_for(1)[0].sender == ""


def test_dry_run_sends_nothing(relay: RelaySink) -> None:
    sent = send(Relay(smtp=relay.address), "", ["x@elsewhere.test"], dry_run=True)
    assert sent.ok and sent.relay == "dry-run"
    assert relay.received() == []


@pytest.mark.parametrize("answer, code, status", [
    ("451 4.3.0 try again later", 451, "4.3.0"),
    ("550 5.1.1 no such user", 550, "5.1.1"),
    ("554 no enhanced code here", 554, "5.0.0"),
])
def test_relay_refusal_is_the_recipients_answer(relay: RelaySink, answer: str, code: int,
                                                status: str) -> None:
    relay.refuse_rcpt = answer
    sent = send(Relay(smtp=relay.address), "", ["x@elsewhere.test"])
    reply = sent.replies["x@elsewhere.test"]
    assert (reply.code, reply.status) == (code, status)
    assert relay.received() == []


def test_relay_down_is_temporary(relay: RelaySink) -> None:
    relay.stop()
    reply = send(Relay(smtp=relay.address, timeout=2), "", ["x@elsewhere.test"]).replies[
        "x@elsewhere.test"]
    assert (reply.code, reply.status) == (451, "4.4.0")


def secured_relay(tmp_path: Path) -> tuple[RelaySink, Relay]:
    cert, key = self_signed(tmp_path)
    (tmp_path / "password").write_text("s3cret\n")
    sink = RelaySink(tls_cert=(cert, key), login=("mailgate", "s3cret")).start()
    return sink, Relay(smtp=sink.address, tls=True, tls_ca_file=str(cert), username="mailgate",
                       password_file=str(tmp_path / "password"))


def test_starttls_and_auth(tmp_path: Path) -> None:
    sink, settings = secured_relay(tmp_path)
    try:
        assert send(settings, "", ["x@elsewhere.test"]).ok
        [got] = sink.wait_for(1)
        assert got.tls and got.login == "mailgate"
    finally:
        sink.stop()


def test_wrong_password_is_our_failure_not_a_bounce(tmp_path: Path) -> None:
    sink, settings = secured_relay(tmp_path)
    (tmp_path / "password").write_text("wrong\n")
    try:
        reply = send(settings, "", ["x@elsewhere.test"]).replies["x@elsewhere.test"]
        assert reply.code == 451 and reply.status == "4.4.0"
        assert sink.received() == []
    finally:
        sink.stop()


def test_untrusted_certificate_is_refused(tmp_path: Path) -> None:
    sink, settings = secured_relay(tmp_path)
    try:
        untrusted = Relay(**{**settings.__dict__, "tls_ca_file": ""})  # the system's CAs only
        reply = send(untrusted, "", ["x@elsewhere.test"]).replies["x@elsewhere.test"]
        assert reply.code == 451 and "CERTIFICATE_VERIFY_FAILED" in reply.text
        assert sink.received() == []
    finally:
        sink.stop()


def ses_sent(moto: Moto) -> list[dict]:
    with urllib.request.urlopen(f"{moto.endpoint}/moto-api/data.json", timeout=10) as r:
        return json.load(r)["ses"]["RawMessage"]


def ses_relay(moto: Moto) -> Relay:
    return Relay(ses=True, region="us-east-1", endpoint_url=moto.endpoint, timeout=5)


def test_ses_send_raw_email(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in moto.env.items():
        monkeypatch.setenv(name, value)
    moto.client("ses").verify_domain_identity(Domain="example.test")
    sent = send(ses_relay(moto), "bounces@example.test", ["x@elsewhere.test"])
    assert sent.ok and sent.relay == "ses" and sent.message_id
    [raw] = ses_sent(moto)
    assert raw["id"] == sent.message_id and raw["source"] == "bounces@example.test"
    assert raw["raw_data"].encode() == MESSAGE


def test_ses_rejection_is_permanent(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in moto.env.items():
        monkeypatch.setenv(name, value)
    # No verified identity: SES answers MessageRejected.
    reply = send(ses_relay(moto), "bounces@example.test", ["x@elsewhere.test"]).replies[
        "x@elsewhere.test"]
    assert (reply.code, reply.status) == (554, "5.7.1") and "MessageRejected" in reply.text
    assert ses_sent(moto) == []


def test_ses_unreachable_is_temporary(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in moto.env.items():
        monkeypatch.setenv(name, value)
    moto.stop()
    reply = send(ses_relay(moto), "bounces@example.test", ["x@elsewhere.test"]).replies[
        "x@elsewhere.test"]
    assert (reply.code, reply.status) == (451, "4.4.0")


def test_kept_connection_survives_a_relay_restart(relay: RelaySink) -> None:
    """Connections are reused between sends; one the relay dropped is replaced, not failed."""
    async def run() -> list:
        outbound = Outbound(Config(hostname="mx.example.test", relay=Relay(smtp=relay.address)))
        try:
            first = await outbound.send("", ["x@elsewhere.test"], MESSAGE)
            relay.stop()
            relay.start()  # same port; the kept connection is dead now
            second = await outbound.send("", ["y@elsewhere.test"], MESSAGE)
            return [first, second]
        finally:
            await outbound.close()
    first, second = asyncio.run(run())
    assert first.ok and second.ok
    assert [m.recipients for m in relay.wait_for(2)] == [("x@elsewhere.test",),
                                                        ("y@elsewhere.test",)]


UTF8_SENDER = "SRS0=PtNF=JO=remote.test=jörg@example.test"  # SRS of an SMTPUTF8 sender


def test_non_ascii_addresses_go_with_smtputf8(relay: RelaySink) -> None:
    sent = send(Relay(smtp=relay.address), UTF8_SENDER, ["frïend@elsewhere.test",
                                                         "x@elsewhere.test"])
    assert {r: (v.code, v.status) for r, v in sent.replies.items()} == {
        "frïend@elsewhere.test": (250, "2.0.0"), "x@elsewhere.test": (250, "2.0.0")}
    [got] = relay.wait_for(1)
    assert (got.sender, got.recipients, got.data) == (
        UTF8_SENDER, ("frïend@elsewhere.test", "x@elsewhere.test"), MESSAGE)


def test_relay_without_smtputf8_refuses_non_ascii_addresses_for_good() -> None:
    """RFC 6531 §3.5: 553 5.6.7 for what cannot go, never a 451 retried for ever; an ASCII
    sender's ASCII recipients still go."""
    sink = RelaySink(smtputf8=False).start()
    try:
        sent = send(Relay(smtp=sink.address), "SRS0=x@example.test",
                    ["frïend@elsewhere.test", "x@elsewhere.test"])
        assert {r: (v.code, v.status) for r, v in sent.replies.items()} == {
            "frïend@elsewhere.test": (553, "5.6.7"), "x@elsewhere.test": (250, "2.0.0")}
        assert sink.wait_for(1)[0].recipients == ("x@elsewhere.test",)
        sent = send(Relay(smtp=sink.address), UTF8_SENDER, ["x@elsewhere.test"])
        reply = sent.replies["x@elsewhere.test"]
        assert (reply.code, reply.status) == (553, "5.6.7")
        assert len(sink.received()) == 1
    finally:
        sink.stop()
