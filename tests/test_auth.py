"""The `auth` filter as a user meets it: real DNS (tests/dnsserver.py), real Dovecot, a real
`mailgate serve`, messages signed here with dkimpy and sent over SMTP/LMTP with XFORWARD.

Asserted: the Authentication-Results header in the delivered message, parsed with authres
(literal RFC 8601 words), the reply codes, what the DNS server was asked, and the metrics.
One DNS server, one Dovecot and one mailgate per distinct config serve the whole module.
"""
from __future__ import annotations

import asyncio
import base64
import email
import gc
import hashlib
import json
import os
import re
import shutil
import smtplib
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterator

import authres
import dkim
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from prometheus_client.parser import text_string_to_metric_families

from conftest import USERS, base_config, merge, register
from dkimpy_state import restored
from dnsserver import DkimKey, DnsServer, dkim_key, hostile_record
from mailgate.config import Config, build
from mailgate.config.checks import validate
from mailgate.config.sections import Dns
from mailgate.dns import Resolver
from mailgate.filters.auth import Auth, bounded, fastverify, fields, signatures
from mailgate.resources import Resources
from peers import (REPO, VMAIL_GID, VMAIL_UID, Dovecot, Mailgate, Postfix, lmtp_send,
                   maildir_files, run, swaks, wait_until)

ALICE, BOB, _ = USERS
IN, OUT = "192.0.2.10", "203.0.113.99"   # inside / outside the senders' SPF records
HELO = "mail.pass.example"
TIMEOUT = 20.0
DNS_TIMEOUT, DNS_BUDGET = 1.0, 2.0

GateFactory = Callable[..., Mailgate]
# An RSA key record with one byte of its DER changed: dkimpy's ASN.1 reader asserts on it
CORRUPT_KEY = ("v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUBA4GNADCBiQKBgQDGkVlIUpw/fW8tvt+KJqcLD"
               "Pf9wD8kJJzn/OS1tkKWeBRF8XARfafHVdNCDmadylNhXLf5pVBnI9f7ah1aYg6mmRGqweCsDsVvQEsB67"
               "wYTxm6uRjrgn3qhC794BBmVBdcMaiQlM3Wr3DFKfVIi9A2t8eBNYQl++yAAVJ/hLK6BwIDAQAB")


# ---------------------------------------------------------------- keys and the zone

Key = DkimKey


@pytest.fixture(scope="module")
def key() -> Key:
    return dkim_key()


def zone(dns: DnsServer, key: Key) -> None:
    spf = {"pass.example": "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all",
           HELO: "v=spf1 ip4:192.0.2.0/24 -all",
           "soft.example": "v=spf1 ip4:192.0.2.0/24 ~all",
           "inc.example": "v=spf1 include:_spf.inc.example -all",
           "_spf.inc.example": "v=spf1 ip4:198.51.100.0/24 -all",
           "redir.example": "v=spf1 redirect=pass.example",
           "many.example": "v=spf1 " + " ".join(f"include:i{n}.many.example" for n in range(11))
                           + " -all",
           "signed.example": "v=spf1 ip4:192.0.2.0/24 -all",
           "bounce.signed.example": "v=spf1 ip4:192.0.2.0/24 -all",
           "other.example": "v=spf1 ip4:203.0.113.0/24 -all",
           "chain.example": "v=spf1 include:s1.chain.example -all",
           "s1.chain.example": "v=spf1 include:s2.chain.example -all",
           "s2.chain.example": "v=spf1 include:s3.chain.example -all",
           "s3.chain.example": "v=spf1 ip4:192.0.2.0/24 -all"}
    spf.update({f"i{n}.many.example": "v=spf1 -all" for n in range(11)})
    for name, text in spf.items():
        dns.txt(name, text)
    dns.a("nospf.example", "192.0.2.99")
    dns.txt("mx.example", "v=spf1 mx -all")
    for n, address in ((1, "198.51.100.1"), (2, IN)):
        dns.mx("mx.example", f"mx{n}.mx.example", 10 * n)
        dns.a(f"mx{n}.mx.example", address)
    for name in ("silent.example", "_dmarc.silent.example",
                 "silent._domainkey.signed.example", "silent.signed.example"):
        dns.silence(name)
    dns.txt("corrupt._domainkey.signed.example", CORRUPT_KEY)
    for name in ("s1.chain.example", "s2.chain.example", "s3.chain.example"):
        dns.delay(name, 0.8)   # three of them take longer than the budget
    for domain in ("signed.example", "other.example", "mail.strict.example"):
        dns.txt(f"sel._domainkey.{domain}", key.record)
    dns.txt("ttl._domainkey.signed.example", key.record, ttl=1)
    dns.txt("revoked._domainkey.signed.example", "v=DKIM1; k=rsa; p=")
    dns.txt("big._domainkey.signed.example", hostile_record(16384, 16383))
    dns.txt("fatexp._domainkey.signed.example", hostile_record(2048, 2047))
    dmarc = {"signed.example": "v=DMARC1; p=reject", "pass.example": "v=DMARC1; p=none",
             "orgfall.example": "v=DMARC1; p=reject; sp=quarantine",
             "strict.example": "v=DMARC1; p=reject; adkim=s; aspf=s",
             "quar.example": "v=DMARC1; p=quarantine",
             "upper.example": "V=DMARC1; p=reject", "spaced.example": "v = DMARC1 ; p=reject"}
    for domain, text in dmarc.items():
        dns.txt(f"_dmarc.{domain}", text)


@pytest.fixture(scope="module")
def dns(key: Key) -> Iterator[DnsServer]:
    server = DnsServer().start()
    try:
        zone(server, key)
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- mailgates for the module

def auth_config(dns: DnsServer, **auth: object) -> dict:
    return {"pipeline": {"filters": ["auth"]}, "auth": auth,
            "dns": {"nameservers": [dns.address], "timeout": DNS_TIMEOUT, "budget": DNS_BUDGET}}


@pytest.fixture(scope="module")
def gates(module_root: Path, dove: Dovecot) -> Iterator[dict[str, Mailgate]]:
    started: dict[str, Mailgate] = {}
    yield started
    for gate in started.values():
        gate.stop(timeout=10)


@pytest.fixture
def gate(gates: dict[str, Mailgate], module_root: Path, dove: Dovecot, dns: DnsServer,
         request: pytest.FixtureRequest) -> GateFactory:
    """`gate(dmarc_action=..., **overrides)`: one mailgate with auth on per distinct config."""
    register(request, "dovecot", dove)

    def get(overrides: dict | None = None, **auth: object) -> Mailgate:
        config = merge(auth_config(dns, **auth), overrides or {})
        config_key = json.dumps(config, sort_keys=True)
        if config_key not in gates:
            root = module_root / f"mailgate-{len(gates)}"
            gates[config_key] = Mailgate(root, merge(base_config(root, dove), config),
                                         env={"PYTHONPATH": str(Path(__file__).parent)}).start()
        register(request, gates[config_key].root.name, gates[config_key])
        return gates[config_key]
    return get


# ---------------------------------------------------------------- messages and what arrived

def message(mark: str, sender: str = "a@signed.example", headers: str = "",
            body: str = "") -> bytes:
    return (f"From: <{sender}>\r\nTo: <{ALICE}>\r\nSubject: auth {mark}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{mark}@test>\r\n{headers}"
            f"\r\n{body or 'Hello ' + mark}\r\n").encode()


def sign(data: bytes, key: Key, selector: str = "sel", domain: str = "signed.example") -> bytes:
    return dkim.sign(data, selector.encode(), domain.encode(), key.pem,
                     include_headers=[b"from", b"to", b"subject", b"message-id", b"date"]) + data


def send(gate: Mailgate, data: bytes, sender: str = "bounce@signed.example",
         xforward: str = f"ADDR={IN} HELO={HELO}", rcpts: tuple[str, ...] = (ALICE,)
         ) -> tuple[int, str]:
    """One SMTP transaction (XFORWARD first, as Postfix sends it): DATA's reply."""
    with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=TIMEOUT) as client:
        client.ehlo()
        if xforward:
            assert client.docmd("XFORWARD", xforward)[0] == 250
        client.mail(sender)
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(data)
        return code, text.decode()


def delivered(dove: Dovecot, mark: str, addr: str = ALICE) -> email.message.Message:
    found = wait_until(lambda: [m for m in dove.maildir_messages(addr) if mark.encode() in m],
                       TIMEOUT, what=f"message {mark} for {addr}")
    assert len(found) == 1
    return email.message_from_bytes(found[0])


def our_header(msg: email.message.Message) -> str:
    """The one Authentication-Results from mx.example.test, unfolded."""
    ours = [re.sub(r"\r?\n[ \t]", " ", v) for v in msg.get_all("Authentication-Results", [])
            if v.strip().lower().startswith("mx.example.test")]
    assert len(ours) == 1, msg.get_all("Authentication-Results")
    return ours[0]


def results(msg: email.message.Message) -> list:
    parsed = authres.all_features().parse(f"Authentication-Results: {our_header(msg)}")
    assert parsed.authserv_id == "mx.example.test"
    return parsed.results


def words(msg: email.message.Message) -> list[tuple[str, str]]:
    return [(r.method, r.result) for r in results(msg)]


def result(msg: email.message.Message, method: str):
    [found] = [r for r in results(msg) if r.method == method]
    return found


def metric(gate: Mailgate, name: str, **labels: str) -> float:
    host, port = gate.address("metrics", "listen")
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def mark() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------- SPF

@pytest.mark.parametrize("sender, xforward, expected", [
    ("a@pass.example", f"ADDR={IN} HELO={HELO}", "pass"),
    ("a@pass.example", f"ADDR={OUT} HELO={HELO}", "fail"),
    ("a@soft.example", f"ADDR={OUT} HELO={HELO}", "softfail"),
    ("a@nospf.example", f"ADDR={IN} HELO={HELO}", "none"),
    ("a@silent.example", f"ADDR={IN} HELO={HELO}", "temperror"),
    ("a@inc.example", f"ADDR=198.51.100.5 HELO={HELO}", "pass"),
    ("a@redir.example", f"ADDR={IN} HELO={HELO}", "pass"),
    ("a@mx.example", f"ADDR={IN} HELO={HELO}", "pass"),
    ("a@mx.example", f"ADDR={OUT} HELO={HELO}", "fail"),
    ("a@many.example", f"ADDR={IN} HELO={HELO}", "permerror"),
    ("a@pass.example", f"ADDR=IPv6:2001:db8::1 HELO={HELO}", "pass"),
    ("a@pass.example", f"ADDR=IPv6:2001:db9::1 HELO={HELO}", "fail"),
])
def test_spf_with_the_client_from_xforward(gate: GateFactory, dove: Dovecot, sender: str,
                                           xforward: str, expected: str) -> None:
    m = mark()
    code, _ = send(gate(), message(m, sender="a@pass.example"), sender, xforward)
    assert code == 250
    spf = result(delivered(dove, m), "spf")
    assert (spf.result, spf.smtp_mailfrom, spf.smtp_helo) == (expected, sender, HELO)


def test_spf_for_the_null_sender_checks_the_helo_name(gate: GateFactory, dove: Dovecot) -> None:
    m = mark()
    assert send(gate(), message(m), "", f"ADDR={IN} HELO={HELO}")[0] == 250
    spf = result(delivered(dove, m), "spf")
    assert (spf.result, spf.smtp_helo, spf.smtp_mailfrom) == ("pass", HELO, None)


def test_spf_results_are_kept_only_while_the_records_are_fresh(gate: GateFactory, dove: Dovecot,
                                                               dns: DnsServer) -> None:
    """A repeated sender's result is worked out once, but a record changed after its 1 s TTL
    changes the result: the kept result expires with the answers it came from."""
    g = gate()
    dns.txt("fresh.example", "v=spf1 ip4:192.0.2.0/24 -all", ttl=1)

    def spf_now() -> str:
        m = mark()
        assert send(g, message(m, "a@fresh.example"), "a@fresh.example")[0] == 250
        return result(delivered(dove, m), "spf").result
    assert spf_now() == "pass"
    with dns.zone.lock:
        dns.zone.records.pop("fresh.example")
    dns.txt("fresh.example", "v=spf1 -all", ttl=1)
    wait_until(lambda: spf_now() == "fail", 10, interval=0.2, what="the changed record's fail")


def test_local_mail_is_not_spf_checked_and_says_so(gate: GateFactory, dove: Dovecot) -> None:
    m = mark()
    assert send(gate(), message(m), "a@pass.example", xforward="")[0] == 250
    msg = delivered(dove, m)
    assert result(msg, "spf").result == "none"
    assert "spf=none (local mail, not checked)" in our_header(msg)


# ---------------------------------------------------------------- DKIM

def test_dkim_pass_names_domain_selector_and_signature(gate: GateFactory, dove: Dovecot,
                                                       key: Key) -> None:
    m = mark()
    data = sign(message(m), key)
    assert send(gate(), data)[0] == 250
    msg = delivered(dove, m)
    assert words(msg) == [("spf", "pass"), ("dkim", "pass"), ("dmarc", "pass"), ("arc", "none")]
    d = result(msg, "dkim")
    b = re.search(rb"\bb=([A-Za-z0-9+/]{8})", data.split(b"bh=", 1)[1]).group(1).decode()
    assert (d.header_d, d.header_s, d.header_b) == ("signed.example", "sel", b)


def altered_body(data: bytes) -> bytes:
    return data.replace(b"Hello", b"Hullo")


def altered_header(data: bytes) -> bytes:
    return data.replace(b"Subject: auth", b"Subject: AUTH")


@pytest.mark.parametrize("selector, alter, expected", [
    ("sel", altered_body, "fail"),
    ("sel", altered_header, "fail"),
    ("nokey", None, "permerror"),
    ("revoked", None, "permerror"),
    ("silent", None, "temperror"),
])
def test_dkim_failures(gate: GateFactory, dove: Dovecot, key: Key, selector: str,
                       alter: Callable | None, expected: str) -> None:
    m = mark()
    data = sign(message(m), key, selector)
    assert send(gate(), alter(data) if alter else data)[0] == 250
    assert result(delivered(dove, m), "dkim").result == expected


def test_ed25519_signature_as_rfc_8463_writes_it(gate: GateFactory, dove: Dovecot,
                                                 dns: DnsServer) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    public = private.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    dns.txt("ed._domainkey.signed.example",
            "v=DKIM1; k=ed25519; p=" + base64.b64encode(public).decode())
    seed = private.private_bytes(raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    m = mark()
    data = message(m)
    data = dkim.sign(data, b"ed", b"signed.example", base64.b64encode(seed),
                     include_headers=[b"from", b"subject"],
                     signature_algorithm=b"ed25519-sha256") + data
    assert send(gate(), data)[0] == 250
    d = result(delivered(dove, m), "dkim")
    assert (d.result, d.header_d, d.header_s) == ("pass", "signed.example", "ed")


def test_two_signatures_one_good(gate: GateFactory, dove: Dovecot, key: Key) -> None:
    m = mark()
    data = sign(message(m), key, "nokey", "other.example")
    data = sign(data, key)  # on top: signs the same headers; the other one stays as it was
    assert send(gate(), data)[0] == 250
    dkims = [r for r in results(delivered(dove, m)) if r.method == "dkim"]
    assert sorted((r.result, r.header_d, r.header_s) for r in dkims) == [
        ("pass", "signed.example", "sel"), ("permerror", "other.example", "nokey")]


def test_a_signature_dkimpy_cannot_read_leaves_the_others_their_result(gate: GateFactory,
                                                                       dove: Dovecot,
                                                                       key: Key) -> None:
    # bh= that is not base64: dkimpy raises binascii.Error from inside its verification
    m = mark()
    bad = (b"DKIM-Signature: v=1; a=rsa-sha256; d=signed.example; s=sel; h=from; bh=a===;"
           b" b=AAAA\r\n")
    assert send(gate(dmarc_action="reject"), bad + sign(message(m), key), "b@other.example",
                f"ADDR={OUT} HELO={HELO}")[0] == 250
    msg = delivered(dove, m)
    assert [r.result for r in results(msg) if r.method == "dkim"] == ["neutral", "pass"]
    assert result(msg, "dmarc").result == "pass"


def test_a_corrupt_key_is_a_permerror_not_a_retry(gate: GateFactory, dove: Dovecot,
                                                  key: Key) -> None:
    m = mark()
    assert send(gate(), sign(message(m), key, "corrupt"))[0] == 250
    assert result(delivered(dove, m), "dkim").result == "permerror"


def unsigned_from(mark: str, key: Key) -> bytes:
    """Signed by signed.example's key, h= without From (dkimpy refuses to sign that)."""
    data = message(mark, sender="anyone@signed.example")
    head, _, body = data.partition(b"\r\n\r\n")
    subject = next(line for line in head.split(b"\r\n") if line.startswith(b"Subject:"))
    bh = base64.b64encode(hashlib.sha256(body).digest()).decode()
    tags = (f"v=1; a=rsa-sha256; c=relaxed/simple; d=signed.example; s=sel; h=subject; "
            f"bh={bh}; b=")
    signed = (b"subject:" + subject.split(b":", 1)[1].strip() + b"\r\n"
              + b"dkim-signature:" + tags.encode())
    private = serialization.load_pem_private_key(key.pem, None)
    b = base64.b64encode(private.sign(signed, padding.PKCS1v15(), hashes.SHA256())).decode()
    return f"DKIM-Signature: {tags}{b}\r\n".encode() + data


def test_a_signature_that_leaves_from_unsigned_does_not_pass(gate: GateFactory, dove: Dovecot,
                                                             key: Key) -> None:
    m = mark()
    assert send(gate(), unsigned_from(m, key), "b@other.example",
                f"ADDR={OUT} HELO={HELO}")[0] == 250
    msg = delivered(dove, m)
    assert "dkim=permerror (From field not signed)" in our_header(msg)   # RFC 6376 §6.1.1
    assert result(msg, "dmarc").result == "fail"


def test_a_signature_too_costly_to_verify_is_not_verified(gate: GateFactory, dove: Dovecot,
                                                          key: Key) -> None:
    # 3000 header fields, h= naming 100: 300,000 steps of dkimpy's header search, in a thread
    # that cannot be stopped; 20,000 of each took 31 s
    m = mark()
    padding_fields = "".join(f"X-Pad-{n}: {n}\r\n" for n in range(3000))
    data = message(m, headers=padding_fields)
    data = dkim.sign(data, b"sel", b"signed.example", key.pem,
                     include_headers=[b"from"] + [f"x-pad-{n}".encode() for n in range(99)]) + data
    assert send(gate(), data)[0] == 250
    assert result(delivered(dove, m), "dkim").result == "policy"


@pytest.mark.parametrize("selector, reason", [
    ("big", "16384-bit key over auth.max_key_bits"),
    ("fatexp", "key exponent over 64 bits"),
])
def test_hostile_keys_are_refused_before_any_rsa_work(gate: GateFactory, dove: Dovecot,
                                                      dns: DnsServer, key: Key, selector: str,
                                                      reason: str) -> None:
    g = gate()
    for attempt in range(2):  # the second with the key cached: the refusal alone
        m = mark()
        fast = metric(g, "mailgate_filter_duration_seconds_bucket", filter="auth", le="0.1")
        assert send(g, sign(message(m), key, selector))[0] == 250
        msg = delivered(dove, m)
        assert result(msg, "dkim").result == "permerror"
        assert f"dkim=permerror ({reason})" in our_header(msg)
    # without the bound, the 16k key with its 16k exponent costs ~13 s of CPU per signature
    assert metric(g, "mailgate_filter_duration_seconds_bucket", filter="auth", le="0.1") \
        == fast + 1
    if selector == "big":  # 5.7 KB: truncated over UDP, fetched again over TCP
        transports = {q.transport for q in dns.queries("big._domainkey.signed.example")}
        assert transports == {"udp", "tcp"}


def test_verification_leaves_the_loop_running_for_large_messages(dns: DnsServer,
                                                                 key: Key) -> None:
    """Small messages are verified on the event loop (cheaper than a thread: bench/auth.py); a
    large one in a worker thread, with dkimpy's whole-message steps in pieces (bounded.py).
    Verifying this 6 MB message (relaxed/relaxed, blank-heavy) takes ~0.5 s here: a 10 ms
    heartbeat on the loop must keep beating meanwhile, never 100 ms late. In process, with
    mailgate's resolver and the module's DNS server."""
    data = message(mark(), body="a \t b  c\t\t d \r\n" * (6_000_000 // 16))
    data = dkim.sign(data, b"sel", b"signed.example", key.pem, canonicalize=(b"relaxed", b"relaxed"),
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + data
    resolver = Resolver(Dns(nameservers=(dns.address,)))
    beats: list[float] = []

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(0.01)
            beats.append(time.monotonic())

    async def check() -> tuple[str, list[float]]:
        await signatures.check(resolver, resolver.budget(), data, fields.read(data), 5, 4096)
        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.05)   # the key is cached now; the heartbeat is running
        beats.clear()
        started = time.monotonic()
        dkims, _ = await signatures.check(resolver, resolver.budget(), data, fields.read(data),
                                          5, 4096)
        times = [started, *beats, time.monotonic()]
        beat.cancel()
        return dkims[0].result, times
    with restored():   # the other tests sign with dkimpy as senders run it
        signatures.install()
        dkim_result, times = asyncio.run(check())
    assert dkim_result == "pass"
    assert max(b - a for a, b in zip(times, times[1:])) < 0.1


def test_the_filter_puts_mailgates_parts_into_dkimpy(dns: DnsServer, tmp_path: Path) -> None:
    """Importing the filter leaves dkimpy alone; the filter, once made, verifies with
    fastverify's and bounded's parts (what the test above and bench/auth.py measure)."""
    config = validate(build(Config, {"hostname": "mx.example.test", "domains": ["example.test"],
                                     "data_dir": str(tmp_path),
                                     "dns": {"nameservers": [dns.address]}}, ""))
    with restored():
        assert dkim.rfc822_parse is not bounded.rfc822_parse
        Auth(config, Resources(config))
        assert (dkim.rfc822_parse, dkim.RE_BTAG) == (bounded.rfc822_parse, fastverify.B_TAG)


def test_malformed_and_too_many_signatures(gate: GateFactory, dove: Dovecot, key: Key) -> None:
    m = mark()
    data = sign(message(m), key)
    bad = (b"DKIM-Signature: v=1; a=rsa-sha256; d=signed.example; this is not a tag list\r\n"
           b"DKIM-Signature: v=1; a=rsa-sha256; d=signed.example; i=signed.example; s=sel;\r\n"
           b"\th=from; bh=YWJj; b=YWJj\r\n")  # i= equal to d=: crashed dkimpy's checks
    assert send(gate(), bad + data)[0] == 250
    assert [r.result for r in results(delivered(dove, m)) if r.method == "dkim"] == \
        ["neutral", "neutral", "pass"]
    m = mark()
    data = sign(message(m), key)
    for _ in range(49):
        data = sign(data, key, "nokey")
    assert send(gate(), data)[0] == 250
    dkims = [r for r in results(delivered(dove, m)) if r.method == "dkim"]
    assert [r.result for r in dkims] == ["permerror"] * 5   # the top 5 (auth.max_signatures)


def arc_sealed(mark: str, key: Key) -> bytes:
    """As a forwarder (a mailing list) hands it on: its own results, sealed for us."""
    data = message(mark, headers="", body=f"Hello, forwarded {mark}").replace(
        b"From:", b"Authentication-Results: relay.other.example; spf=pass\r\nFrom:", 1)
    return b"".join(dkim.arc_sign(data, b"sel", b"other.example", key.pem,
                                  b"relay.other.example")) + data


@pytest.mark.parametrize("alter, expected", [(None, "pass"), (altered_body, "fail")])
def test_arc_chain(gate: GateFactory, dove: Dovecot, key: Key, alter: Callable | None,
                   expected: str) -> None:
    m = mark()
    data = arc_sealed(m, key)
    assert send(gate(), alter(data) if alter else data)[0] == 250
    msg = delivered(dove, m)
    assert result(msg, "arc").result == expected
    # the forwarder's own results are someone else's: kept
    assert "relay.other.example; spf=pass" in msg.get_all("Authentication-Results")


def test_keys_are_cached_across_messages_for_their_ttl(gate: GateFactory, dove: Dovecot,
                                                       dns: DnsServer, key: Key) -> None:
    g = gate()
    name = "sel._domainkey.signed.example"
    for _ in range(2):
        m = mark()
        assert send(g, sign(message(m), key))[0] == 250
        delivered(dove, m)
        asked = len(dns.queries(name))
    m = mark()
    assert send(g, sign(message(m), key))[0] == 250
    delivered(dove, m)
    assert len(dns.queries(name)) == asked   # 300 s TTL: not asked again

    def asked_again() -> bool:  # a TTL of 1 s: a later message asks again
        m = mark()
        assert send(g, sign(message(m), key, "ttl"))[0] == 250
        delivered(dove, m)
        return len(dns.queries("ttl._domainkey.signed.example")) >= 2
    wait_until(asked_again, 10, interval=0.2, what="the 1 s TTL key asked for again")


# ---------------------------------------------------------------- DMARC

@pytest.mark.parametrize("signer, sender, xforward, expected", [
    ("signed.example", "bounce@other.example", f"ADDR={OUT} HELO={HELO}", "pass"),  # DKIM only
    (None, "bounce@bounce.signed.example", f"ADDR={IN} HELO={HELO}", "pass"),       # SPF only
    ("other.example", "bounce@other.example", f"ADDR={OUT} HELO={HELO}", "fail"),  # misaligned
])
def test_dmarc_alignment(gate: GateFactory, dove: Dovecot, key: Key, signer: str | None,
                         sender: str, xforward: str, expected: str) -> None:
    m = mark()
    data = message(m)
    if signer:
        data = sign(data, key, domain=signer)
    assert send(gate(), data, sender, xforward)[0] == 250
    d = result(delivered(dove, m), "dmarc")
    assert (d.result, d.header_from, d.policy) == (expected, "signed.example", "reject")


@pytest.mark.parametrize("domain", ["upper.example", "spaced.example"])
def test_dmarc_record_with_the_version_tag_as_the_rfc_allows(gate: GateFactory, dove: Dovecot,
                                                             domain: str) -> None:
    m = mark()   # "V=DMARC1" and "v = DMARC1 ;" are valid (RFC 7489 §6.4): p=reject applies
    assert send(gate(), message(m, sender=f"a@{domain}"), "b@other.example",
                f"ADDR={OUT} HELO={HELO}")[0] == 250
    d = result(delivered(dove, m), "dmarc")
    assert (d.result, d.policy) == ("fail", "reject")


def test_dns_timeouts_never_turn_into_a_dmarc_rejection(gate: GateFactory, dove: Dovecot,
                                                        key: Key) -> None:
    # p=reject, action reject, good mail: SPF (bounce domain) and the DKIM key never answer,
    # both aligned with From. RFC 7489 §6.6.2: no conclusion, so no policy: delivered.
    m = mark()
    code, _ = send(gate(dmarc_action="reject"), sign(message(m), key, "silent"),
                   "b@silent.signed.example")
    assert code == 250
    assert words(delivered(dove, m)) == [("spf", "temperror"), ("dkim", "temperror"),
                                         ("dmarc", "temperror"), ("arc", "none")]


def test_dmarc_falls_back_to_the_organizational_domain(gate: GateFactory, dove: Dovecot) -> None:
    m = mark()
    assert send(gate(), message(m, sender="a@news.orgfall.example"), "b@orgfall.example",
                f"ADDR={OUT} HELO={HELO}")[0] == 250
    msg = delivered(dove, m)
    d = result(msg, "dmarc")
    assert (d.result, d.header_from, d.policy) == ("fail", "news.orgfall.example", "quarantine")
    assert msg["X-Mailgate-Quarantine"] is None   # annotate: the header only


def test_dmarc_strict_alignment(gate: GateFactory, dove: Dovecot, key: Key) -> None:
    m = mark()
    data = sign(message(m, sender="a@strict.example"), key, domain="mail.strict.example")
    assert send(gate(), data, "b@other.example", f"ADDR={OUT} HELO={HELO}")[0] == 250
    msg = delivered(dove, m)
    assert result(msg, "dkim").result == "pass"
    assert result(msg, "dmarc").result == "fail"


def test_reject_action_refuses_p_reject_failures_at_end_of_data(gate: GateFactory,
                                                                dove: Dovecot) -> None:
    g = gate(dmarc_action="reject")
    m = mark()
    code, text = send(g, message(m), "b@other.example", f"ADDR={OUT} HELO={HELO}",
                      rcpts=(ALICE, BOB))
    assert (code, text.split()[0]) == (550, "5.7.1")
    assert not [x for x in dove.maildir_messages(ALICE) + dove.maildir_messages(BOB)
                if m.encode() in x]


def test_reject_action_over_lmtp_answers_each_recipient(gate: GateFactory, dove: Dovecot) -> None:
    g = gate(dmarc_action="reject")
    m = mark()
    rcpt_replies, data_replies = lmtp_send(*g.lmtp, "b@other.example", [ALICE, BOB], message(m),
                                           xforward=f"ADDR={OUT} HELO={HELO}")
    assert [code for code, _ in rcpt_replies.values()] == [250, 250]
    assert [(code, text.split()[0]) for code, text in data_replies] == [(550, "5.7.1")] * 2


def test_reject_action_quarantines_p_quarantine_and_spares_local_mail(gate: GateFactory,
                                                                     dove: Dovecot) -> None:
    g = gate(dmarc_action="reject")
    m = mark()
    assert send(g, message(m, sender="a@quar.example"), "b@other.example",
                f"ADDR={OUT} HELO={HELO}")[0] == 250
    msg = delivered(dove, m)
    assert (result(msg, "dmarc").result, msg["X-Mailgate-Quarantine"]) == ("fail", "dmarc")
    m = mark()
    assert send(g, message(m), "b@other.example", xforward="")[0] == 250  # local: annotated
    msg = delivered(dove, m)
    assert (result(msg, "dmarc").result, msg["X-Mailgate-Quarantine"]) == ("fail", None)


def test_a_feed_session_without_xforward_is_not_local_mail(gate: GateFactory, dove: Dovecot,
                                                            module_root: Path) -> None:
    """mailgate sync's session (XFEED) carries mail SES received from the Internet: without
    XFORWARD (SES's Received line unreadable) it is still not local: SPF is none with a
    comment, never checked against sync's own address, and DMARC is acted on."""
    secret = module_root / "feed.secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    g = gate({"sync": {"secret_file": str(secret)}}, dmarc_action="reject")
    m = mark()
    with smtplib.SMTP(*g.smtp, local_hostname="mx.example.test", timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.docmd("XFEED", "SECRET=0123456789abcdef0123456789abcdef")[0] == 250
        client.sendmail("b@other.example", [ALICE], message(m, sender="a@quar.example"))
    msg = delivered(dove, m)
    assert "spf=none (feed without the client's address, not checked)" in our_header(msg)
    assert "local mail" not in our_header(msg) and "smtp.helo" not in our_header(msg)
    assert (result(msg, "dmarc").result, msg["X-Mailgate-Quarantine"]) == ("fail", "dmarc")


def test_quarantine_action_marks_failures_of_reject_domains(gate: GateFactory,
                                                            dove: Dovecot) -> None:
    m = mark()
    assert send(gate(dmarc_action="quarantine"), message(m), "b@other.example",
                f"ADDR={OUT} HELO={HELO}")[0] == 250
    msg = delivered(dove, m)
    assert (result(msg, "dmarc").result, msg["X-Mailgate-Quarantine"]) == ("fail", "dmarc")


# ---------------------------------------------------------------- forgery, bad input, DNS

def test_forged_results_with_our_id_are_removed_others_kept(gate: GateFactory,
                                                            dove: Dovecot) -> None:
    g = gate()
    before = metric(g, "mailgate_auth_forged_headers_removed_total")
    m = mark()
    forged = ("Authentication-Results: mx.example.test; spf=pass smtp.mailfrom=x@signed.example;"
              "\r\n\tdkim=pass header.d=signed.example; dmarc=pass\r\n"
              "Authentication-Results: (a \\) comment) \"mx.example\\.test\"; dkim=pass\r\n"
              "Authentication-Results: relay.other.example; spf=pass\r\n")
    assert send(g, message(m, headers=forged), "b@pass.example",
                f"ADDR={OUT} HELO={HELO}")[0] == 250
    msg = delivered(dove, m)
    assert words(msg) == [("spf", "fail"), ("dkim", "none"), ("dmarc", "fail"), ("arc", "none")]
    assert [v for v in msg.get_all("Authentication-Results")
            if not v.startswith("mx.example.test")] == ["relay.other.example; spf=pass"]
    assert b"dkim=pass header.d=signed.example" not in msg.as_bytes()
    assert b"comment)" not in msg.as_bytes()   # RFC 5322 reads that authserv-id as ours too
    assert metric(g, "mailgate_auth_forged_headers_removed_total") == before + 2
    g.wait_log(r"removed 2 Authentication-Results claiming to be ours")


@pytest.mark.parametrize("headers, dmarc_result", [
    ("", "permerror"),                                       # no From (replaced below)
    ("From: <b@other.example>\r\n", "permerror"),            # two From fields
    ("Sender: x\r\n", "permerror"),                          # From with no domain (below)
])
def test_bad_from_gets_a_defined_result_and_is_delivered(gate: GateFactory, dove: Dovecot,
                                                         headers: str, dmarc_result: str) -> None:
    m = mark()
    data = message(m, headers=headers)
    if not headers:
        data = data.replace(b"From: <a@signed.example>\r\n", b"")
    elif headers.startswith("Sender"):
        data = data.replace(b"From: <a@signed.example>", b"From: alice")
    assert send(gate(dmarc_action="reject"), data, "b@other.example",
                f"ADDR={OUT} HELO={HELO}")[0] == 250
    assert result(delivered(dove, m), "dmarc").result == dmarc_result


def test_message_no_parser_can_read_is_still_checked_and_delivered(gate: GateFactory,
                                                                   dove: Dovecot,
                                                                   key: Key) -> None:
    # MIME nested past limits.parse_depth: the pipeline gives up parsing (the Tag filter is
    # skipped), auth reads the raw bytes; a garbage header line makes dkimpy give up too.
    g = gate({"limits": {"parse_depth": 2},
              "pipeline": {"filters": ["auth", "filters_for_tests:Tag"]}})
    m = mark()
    body = "".join(f'Content-Type: multipart/mixed; boundary="b{n}"\r\n\r\n--b{n}\r\n'
                   for n in range(5))
    data = sign(message(m, headers="MIME-Version: 1.0\r\n", body=body), key)
    assert send(g, b"this line is no header field\r\n" + data)[0] == 250
    msg = delivered(dove, m)
    assert msg["X-Test-Tag"] is None
    assert words(msg) == [("spf", "pass"), ("dkim", "neutral"), ("dmarc", "pass"), ("arc", "none")]


def test_dns_that_never_answers_is_temperror_within_the_budget(gate: GateFactory, dove: Dovecot,
                                                               key: Key) -> None:
    g = gate()
    before = metric(g, "mailgate_dns_failures_total", reason="timeout")
    m = mark()
    started = time.monotonic()
    code, _ = send(g, sign(message(m, sender="a@silent.example"), key, "silent"),
                   "b@silent.example")
    assert code == 250
    assert time.monotonic() - started < DNS_BUDGET + 2
    assert words(delivered(dove, m)) == [("spf", "temperror"), ("dkim", "temperror"),
                                         ("dmarc", "temperror"), ("arc", "none")]
    assert metric(g, "mailgate_dns_failures_total", reason="timeout") >= before + 3


def test_slow_dns_spends_no_more_than_the_message_budget(gate: GateFactory,
                                                         dove: Dovecot) -> None:
    # Three includes answered 0.8 s late, one after the other: 2.4 s, more than the 2 s budget.
    g = gate()
    before = metric(g, "mailgate_dns_failures_total", reason="budget")
    m = mark()
    started = time.monotonic()
    assert send(g, message(m), "b@chain.example")[0] == 250
    assert time.monotonic() - started < DNS_BUDGET + 1.5
    assert result(delivered(dove, m), "spf").result == "temperror"
    assert metric(g, "mailgate_dns_failures_total", reason="budget") >= before + 1


def test_dns_server_restart_costs_nothing(gate: GateFactory, dove: Dovecot, key: Key) -> None:
    """Invariant 8: the resolver restarting between two messages costs the second nothing."""
    first = DnsServer().start()
    try:
        zone(first, key)
        g = gate({"dns": {"nameservers": [first.address]}})
        m = mark()
        assert send(g, sign(message(m), key))[0] == 250
        assert words(delivered(dove, m))[:3] == [("spf", "pass"), ("dkim", "pass"),
                                                 ("dmarc", "pass")]
    finally:
        first.stop()
    again = DnsServer(first.port).start()  # the same address, names never asked before
    try:
        zone(again, key)
        m = mark()
        data = sign(message(m, sender="a@other.example"), key, domain="other.example")
        assert send(g, data, "b@other.example", "ADDR=203.0.113.7 HELO=mail.other.example")[0] == 250
        assert words(delivered(dove, m))[:2] == [("spf", "pass"), ("dkim", "pass")]
    finally:
        again.stop()


def test_results_are_counted_per_method_and_result(gate: GateFactory, dove: Dovecot,
                                                   key: Key) -> None:
    g = gate()
    before = metric(g, "mailgate_auth_results_total", method="dkim", result="pass")
    m = mark()
    assert send(g, sign(message(m), key))[0] == 250
    delivered(dove, m)
    assert metric(g, "mailgate_auth_results_total", method="dkim", result="pass") == before + 1
    assert metric(g, "mailgate_dns_lookup_seconds_count") > 0


# ---------------------------------------------------------------- the shipped Sieve script

@pytest.fixture
def sieve_dovecot(peer_root: Path) -> Iterator[Dovecot]:
    """A Dovecot with dovecot/90-mailgate-quarantine.conf and its script, set up as the
    snippet's comment says (script compiled once with sievec)."""
    server = Dovecot(peer_root, [ALICE])
    sieve = peer_root / "sieve"
    sieve.mkdir()
    shutil.copy(REPO / "dovecot" / "mailgate-quarantine.sieve", sieve)
    run(["sievec", str(sieve / "mailgate-quarantine.sieve")])
    snippet = (REPO / "dovecot" / "90-mailgate-quarantine.conf").read_text()
    server.conf.write_text(server.conf.read_text() +
                           snippet.replace("/etc/dovecot/sieve/", f"{sieve}/"))
    for path in (sieve, *sieve.iterdir()):
        os.chown(path, VMAIL_UID, VMAIL_GID)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_shipped_sieve_files_quarantined_mail_into_junk(sieve_dovecot: Dovecot, dns: DnsServer,
                                                         key: Key, peer_root: Path,
                                                         request: pytest.FixtureRequest) -> None:
    root = peer_root / "mailgate"
    gate = Mailgate(root, merge(base_config(root, sieve_dovecot),
                                auth_config(dns, dmarc_action="quarantine")))
    register(request, "mailgate", gate)
    register(request, "dovecot", sieve_dovecot)
    try:
        gate.start()
        failed, good = mark(), mark()
        assert send(gate, message(failed), "b@pass.example", f"ADDR={OUT} HELO={HELO}")[0] == 250
        assert send(gate, sign(message(good), key))[0] == 250
        junk = sieve_dovecot.maildir(ALICE) / ".Junk"
        wait_until(lambda: any(failed.encode() in m for m in maildir_files(junk)), TIMEOUT,
                   what="the quarantined message in Junk")
        inbox = wait_until(lambda: [m for m in sieve_dovecot.maildir_messages(ALICE)
                                    if good.encode() in m or failed.encode() in m], TIMEOUT,
                           what="the good message in the inbox")
        assert len(inbox) == 1 and good.encode() in inbox[0]
        assert not any(good.encode() in m for m in maildir_files(junk))
    finally:
        gate.stop(timeout=10)


# ---------------------------------------------------------------- through the real Postfix

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["content_filter", "lmtp"])
def test_signed_message_relayed_through_postfix_still_verifies(
        postfix: Postfix, dovecot: Dovecot, mailgate_factory, dns: DnsServer, key: Key,
        tmp_path: Path, mode: str) -> None:
    gate = mailgate_factory(auth_config(dns))
    if mode == "lmtp":
        postfix.use_virtual_lmtp(gate.lmtp[1])
        postfix.set_main(lmtp_send_xforward_command="yes")
    else:
        postfix.use_content_filter(gate.smtp[1])
    postfix.start()
    m = mark()
    eml = tmp_path / "signed.eml"
    eml.write_bytes(sign(message(m, body="line one\r\n.dot line\r\n" + "x" * 990), key))
    sent = swaks("--server", f"127.0.0.1:{postfix.smtpd_port}", "--helo", HELO,
                 "--from", "bounce@signed.example", "--to", ALICE, "--data", str(eml))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    msg = delivered(dovecot, m)
    assert words(msg)[1:3] == [("dkim", "pass"), ("dmarc", "pass")]
    # XFORWARD told mailgate the client swaks connected from, not Postfix's own address
    assert "(client 127.0.0.1)" in our_header(msg)


# ---------------------------------------------------------------- found in review (11-25)

OURS = "mx.example.test"


def claimed_ids(msg) -> list[str]:
    """The authserv-id of every Authentication-Results, as authres reads it (unfolded)."""
    ids = []
    for value in msg.get_all("Authentication-Results", []):
        unfolded = " ".join(value.replace("\r\n", "\n").split("\n"))
        try:
            ids.append(authres.AuthenticationResultsHeader.parse(
                "Authentication-Results: " + unfolded).authserv_id.lower())
        except authres.core.AuthResError:
            ids.append("<unparseable>")
    return ids


def test_a_forged_result_padded_past_4096_characters_is_removed(gate: GateFactory,
                                                                 dove: Dovecot) -> None:
    # Folded white space (obs-FWS, every line under 998 octets) before our authserv-id: the
    # reader stops after 4096 characters, sees no id there and keeps the field.
    m = mark()
    padding = "".join("\r\n\t" + " " * 900 for _ in range(5))
    forged = (f"Authentication-Results:{padding}\r\n\t{OURS}; spf=pass "
              "smtp.mailfrom=x@signed.example; dkim=pass header.d=signed.example; dmarc=pass\r\n")
    assert send(gate(), message(m, headers=forged), "b@pass.example",
                f"ADDR={OUT} HELO={HELO}")[0] == 250
    msg = delivered(dove, m)
    assert claimed_ids(msg).count(OURS) == 1, claimed_ids(msg)


def test_a_dmarc_record_with_a_huge_pct_is_delivered_not_deferred(gate: GateFactory,
                                                                  dove: Dovecot,
                                                                  dns: DnsServer) -> None:
    # 5000 digits of pct= (a TXT record of 20 strings): int() raises ValueError in
    # parse_record, Auth.check fails, and every message from that domain is 451 for ever.
    dns.txt("_dmarc.hugepct.example", "v=DMARC1; p=none; pct=" + "0" * 4997 + "100")
    m = mark()
    code, text = send(gate(), message(m, sender="a@hugepct.example"), "b@pass.example")
    assert code == 250, (code, text)
    # read as p=none (the digits are 100 however many zeros lead): no alignment, so fail
    assert result(delivered(dove, m), "dmarc").result == "fail"


def test_an_invalid_sp_is_no_reason_to_reject_a_subdomain(gate: GateFactory, dove: Dovecot,
                                                          dns: DnsServer) -> None:
    # RFC 7489 §6.6.3 step 6: "sp" not valid and no rua=: no DMARC processing for the message.
    # mailgate reads the bad sp= as p=reject and refuses mail from every subdomain.
    dns.txt("_dmarc.badsp.example", "v=DMARC1; p=reject; sp=rejected")
    m = mark()
    code, text = send(gate(dmarc_action="reject"), message(m, sender="a@news.badsp.example"),
                      "b@other.example", f"ADDR={OUT} HELO={HELO}")
    assert code == 250, (code, text)
    assert result(delivered(dove, m), "dmarc").result != "fail"


def test_an_idn_sender_aligns_with_its_from_domain(gate: GateFactory, dove: Dovecot,
                                                    dns: DnsServer) -> None:
    # SMTPUTF8 mail: MAIL FROM in U-labels, From in U-labels (RFC 6532). SPF passes for
    # bücher.example (pyspf looks up the A-label); the From domain is turned into its A-label
    # but the SPF domain is not, so the two never align: dmarc=fail, and p=reject refuses
    # good mail (RFC 8616 §4: compare IDNs in one form).
    dns.txt("xn--bcher-kva.example", "v=spf1 ip4:192.0.2.0/24 -all")
    dns.txt("_dmarc.xn--bcher-kva.example", "v=DMARC1; p=reject")
    def send_utf8(g, m: str) -> tuple[int, bytes]:
        data = message(m).replace(b"From: <a@signed.example>", "From: <a@bücher.example>".encode())
        with smtplib.SMTP(*g.smtp, local_hostname="client.test", timeout=TIMEOUT) as client:
            client.ehlo()
            assert client.docmd("XFORWARD", f"ADDR={IN} HELO={HELO}")[0] == 250
            client.command_encoding = "utf-8"
            assert client.mail("b@bücher.example", ["SMTPUTF8"])[0] == 250
            assert client.rcpt(ALICE)[0] == 250
            return client.data(data)
    m = mark()
    assert send_utf8(gate(), m)[0] == 250
    msg = delivered(dove, m)
    assert (result(msg, "spf").result, result(msg, "dmarc").result) == ("pass", "pass")
    code, text = send_utf8(gate(dmarc_action="reject"), mark())
    assert code == 250, (code, text)


def test_a_header_of_megabytes_leaves_the_loop_running(dns: DnsServer, tmp_path: Path) -> None:
    """10 MB of short header fields (thousands of ARC-Seals, then a forged Authentication-
    Results): every field is read, so the forgery is still found, but not on the event loop
    in one go: a task that yields at every turn of the loop keeps getting turns. In process,
    with the module's DNS server. The loop's own CPU time between turns is measured, not wall
    time: under a parallel test run other processes stretch wall time, not the work done."""
    from mailgate.message import Client, Envelope, Message
    config = validate(build(Config, {"hostname": OURS, "domains": ["example.test"],
                                     "data_dir": str(tmp_path),
                                     "dns": {"nameservers": [dns.address]}}, ""))
    line = b"ARC-Seal: i=1; a=rsa-sha256; d=x.example; s=y; cv=none; b=abcd\r\n"
    forged = b"Authentication-Results: " + OURS.encode() + b"; dkim=pass header.d=x.example\r\n"
    raw = (line * (10 * 1024 * 1024 // len(line)) + forged
           + b"From: <a@x.example>\r\n\r\nbody\r\n")
    env = Envelope("Q1", "a@x.example", (ALICE,), Client(OUT, helo=HELO), 0.0)
    beats: list[float] = []

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(0)
            beats.append(time.thread_time())

    async def check():
        auth = Auth(config, Resources(config))
        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(0)   # the ticker has started
        beats.clear()
        started = time.thread_time()
        outcome = await auth.check(Message(env, raw))
        times = [started, *beats, time.thread_time()]
        beat.cancel()
        await auth.dns.close()
        return outcome, times
    # Not measured: the cyclic GC's own pauses (a full collection over the 160,000 fields
    # read, a quarter second in this pytest process), which any code that reads them pays.
    gc.disable()
    try:
        with restored():
            outcome, times = asyncio.run(check())
    finally:
        gc.enable()
    start = raw.index(forged)
    assert outcome.drop == ((start, start + len(forged)),)
    assert b"arc=fail" in b"".join(outcome.headers)
    gaps = sorted(((b - a, a - times[0]) for a, b in zip(times, times[1:])), reverse=True)
    assert gaps[0][0] < 0.1, gaps[:5]
