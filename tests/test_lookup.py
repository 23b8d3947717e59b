"""The lookup server Postfix asks at RCPT (socketmap), against a real Dovecot and mailgate.

What is asserted is what Postfix reads: the socketmap answer for each address (the protocol's
words OK, NOTFOUND, TEMP, PERM), on one connection kept open as Postfix keeps it, and that the
answers come from the same cache the listener uses at RCPT.
"""
from __future__ import annotations

import re
import smtplib
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailgate.store import Rule
from peers import Dovecot, Mailgate, lmtp_send, wait_until
from policy import (FRIEND, backend, gates, lmtp, mark, message, moto_server,  # noqa: F401
                    status, store_call)
from relaysink import RelaySink

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"
NOBODY = "nobody@example.test"
NO_FALLBACK = {"delivery": {"maildir": ""}}  # so only Dovecot can say who exists


class Socketmap:
    """A socketmap client as Postfix's dict_sockmap speaks it: netstrings, one connection."""

    def __init__(self, gate: Mailgate):
        self.sock = socket.create_connection(gate.lookup, timeout=20)
        self.file = self.sock.makefile("rb")

    def send(self, payload: bytes) -> None:
        self.sock.sendall(b"%d:%s," % (len(payload), payload))

    def ask(self, key: str, name: str = "recipients") -> str:
        self.send(f"{name} {key}".encode())
        return self.read()

    def read(self) -> str:
        head = b""
        while not head.endswith(b":"):
            byte = self.file.read(1)
            assert byte and len(head) < 10, f"bad netstring length {head!r}"
            head += byte
        body = self.file.read(int(head[:-1]) + 1)
        assert body.endswith(b","), body
        return body[:-1].decode()

    def closed_by_server(self) -> bool:
        return self.file.read(1) == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def rcpt(gate: Mailgate, address: str) -> int:
    with smtplib.SMTP(*gate.smtp, local_hostname="client.lookup.test", timeout=20) as client:
        client.ehlo()
        client.mail("sender@remote.test")
        return client.rcpt(address)[0]


def test_known_unknown_foreign_and_catch_all_on_one_connection(dovecot, mailgate_factory) -> None:
    gate = mailgate_factory()
    client = Socketmap(gate)
    try:
        assert client.ask(ALICE).startswith("OK ")
        assert client.ask(NOBODY) == "NOTFOUND "
        # Postfix asks "@domain" after a miss (catch-all) and bare local parts: never ours.
        assert client.ask("@example.test") == "NOTFOUND "
        assert client.ask("alice") == "NOTFOUND "
        assert client.ask("someone@elsewhere.test") == "NOTFOUND "
        assert client.ask("a b>\r\nRSET@example.test") == "NOTFOUND "
        assert client.ask(BOB).startswith("OK ")
    finally:
        client.close()
    assert lookups_counted(gate) == {"ok": 2, "notfound": 5}


def lookups_counted(gate: Mailgate) -> dict[str, float]:
    """mailgate_lookups_total by answer, scraped from /metrics."""
    host, port = gate.address("metrics", "listen")
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        families = text_string_to_metric_families(response.read().decode())
        return {s.labels["result"]: s.value for f in families for s in f.samples
                if s.name == "mailgate_lookups_total"}


def test_dovecot_down_is_temporary_never_notfound(dovecot, mailgate_factory) -> None:
    gate = mailgate_factory(NO_FALLBACK)
    client = Socketmap(gate)
    try:
        dovecot.stop()
        assert client.ask(ALICE).startswith("TEMP ")   # a known user nobody could verify
        assert client.ask(NOBODY).startswith("TEMP ")  # nor an unknown one
        dovecot.start()
        assert client.ask(ALICE).startswith("OK ")
        assert client.ask(NOBODY) == "NOTFOUND "
    finally:
        client.close()
    gate.wait_log(r"warning: lookup nobody@example\.test: TEMP: 451 4\.4\.3 ")
    assert lookups_counted(gate) == {"temp": 2, "ok": 1, "notfound": 1}


def test_dovecot_down_with_fallback_takes_users_whose_maildir_exists(dovecot,
                                                                     mailgate_factory) -> None:
    gate = mailgate_factory()  # fallback on: the maildir will take alice's mail
    dovecot.stop()
    client = Socketmap(gate)
    try:
        assert client.ask(ALICE).startswith("OK ")
        assert client.ask(NOBODY).startswith("TEMP ")  # no maildir: cannot tell, never "unknown"
    finally:
        client.close()


def test_answers_share_the_listeners_cache(dovecot, mailgate_factory) -> None:
    gate = mailgate_factory({"delivery": {"maildir": "", "recipient_cache": 300}})
    assert rcpt(gate, ALICE) == 250          # the listener asks Dovecot once ...
    client = Socketmap(gate)
    try:
        assert client.ask(CAROL).startswith("OK ")   # ... and the lookup asks about carol
        assert client.ask(NOBODY) == "NOTFOUND "
        dovecot.stop()
        assert client.ask(ALICE).startswith("OK ")   # the listener's answer, from the cache
        assert client.ask(NOBODY) == "NOTFOUND "     # a cached "unknown" stays unknown
        assert client.ask(BOB).startswith("TEMP ")   # never asked: Dovecot is needed
    finally:
        client.close()
    assert rcpt(gate, CAROL) == 250          # the lookup's answer serves the listener


def test_cached_answer_expires(dovecot, mailgate_factory) -> None:
    gate = mailgate_factory({"delivery": {"maildir": "", "recipient_cache": 1}})
    client = Socketmap(gate)
    try:
        assert client.ask(ALICE).startswith("OK ")
        dovecot.stop()
        wait_until(lambda: client.ask(ALICE).startswith("TEMP "), 10,
                   what="the cached answer expired")
    finally:
        client.close()


def test_unknown_map_and_malformed_requests(dovecot, mailgate_factory) -> None:
    gate = mailgate_factory()
    client = Socketmap(gate)
    try:
        assert client.ask(ALICE, name="virtual").startswith("PERM ")
        client.sock.sendall(b"3:abcd,")  # no comma where the length says one is due
        assert client.closed_by_server()
    finally:
        client.close()
    gate.wait_log(r"warning: lookup: malformed request from 127\.0\.0\.1:\d+: ")
    other = Socketmap(gate)  # the server itself goes on
    try:
        assert other.ask(ALICE).startswith("OK ")
    finally:
        other.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_valid_srs_address_of_ours_is_ok_for_postfix(gates, dove: Dovecot,
                                                       relay: RelaySink) -> None:
    """A bounce of a forward comes back to the SRS address it went out with. Both Postfix
    modes ask this map at RCPT: anything but OK for it, and Postfix refuses the bounce with
    550 5.1.1 before mailgate sees it."""
    gate = gates()
    store_call(gate, "set_rule", Rule(ALICE, forward=(FRIEND,), keep_copy=False))
    assert status(lmtp(gate, [ALICE], message(mark()))[0]) == (250, "2.0.0")
    srs = relay.wait_for(1)[0].sender
    assert srs.startswith("SRS0=")
    forged = re.sub(r"^SRS0=[^=]+=", "SRS0=AAAA=", srs)
    socketmap = Socketmap(gate)
    try:
        assert socketmap.ask(srs) == f"OK {srs}"
        assert socketmap.ask(forged) == "NOTFOUND "  # not our hash: an unknown user
    finally:
        socketmap.close()
    # mailgate's own listener takes it too, from the null sender only
    rcpt_replies, _ = lmtp_send(*gate.lmtp, "", [srs], f"Subject: bounce\r\n\r\n{srs}\r\n")
    assert rcpt_replies[srs][0] == 250
