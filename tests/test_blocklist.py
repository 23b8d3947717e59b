"""The blocklist filter end to end: patterns set with the CLI, mail through mailgate to Dovecot.

Same cases on SQLite and on DynamoDB (moto in server mode). A blocked copy is discarded: the
client hears 250, the maildir stays empty, the log line names the pattern, the metric counts it.
"""
from __future__ import annotations

import smtplib
import uuid

import pytest

from backends import Backend, backend, cli, moto_server  # noqa: F401 (fixtures)
from conftest import USERS
from peers import Dovecot, Mailgate, lmtp_send
from test_operations import Scrape

ALICE, BOB, CAROL = USERS


def blocking_gate(mailgate_factory, backend: Backend, blocks: list[tuple[str, str]],
                  **overrides) -> Mailgate:
    config = {"pipeline": {"filters": ["blocklist"]}, "store": backend.store, **overrides}
    gate = mailgate_factory(config, env=backend.env, start=False)
    if backend.name == "dynamodb":
        cli(gate, "store", "init")
    for address, pattern in blocks:
        cli(gate, "block", "add", address, pattern)
    return gate.start()


def message(mark: str, sender: str) -> bytes:
    return (f"From: <{sender}>\r\nTo: <{ALICE}>\r\nSubject: blocklist {mark}\r\n"
            f"Message-ID: <{mark}@remote.test>\r\n\r\nbody {mark}\r\n").encode()


def got(dovecot: Dovecot, addr: str, mark: str) -> int:
    return sum(mark.encode() in m for m in dovecot.maildir_messages(addr))


def send(gate: Mailgate, sender: str, rcpts: list[str]) -> tuple[str, list[tuple[int, str]]]:
    mark = uuid.uuid4().hex
    rcpt_replies, replies = lmtp_send(*gate.lmtp, sender, rcpts, message(mark, sender))
    assert [code for code, _ in rcpt_replies.values()] == [250] * len(rcpts), rcpt_replies
    return mark, replies


def test_two_of_three_recipients_blocked_with_wildcards_and_case(dovecot, mailgate_factory,
                                                                 backend):
    gate = blocking_gate(mailgate_factory, backend,
                         [(ALICE, "*@Spam.Test"), ("Bob@Example.Test", "eve@spam.test")])
    before = Scrape(gate)
    mark, replies = send(gate, "Eve@SPAM.test", [ALICE, BOB, CAROL])
    assert [(code, text.split()[0]) for code, text in replies] == [(250, "2.0.0")] * 3
    assert (got(dovecot, ALICE, mark), got(dovecot, BOB, mark), got(dovecot, CAROL, mark)) == (0, 0, 1)
    gate.wait_log(rf"to=<{ALICE}>, .*status=discarded \(blocklist: <Eve@SPAM.test> matches "
                  rf"\*@spam.test blocked by <{ALICE}>\)")
    gate.wait_log(rf"to=<{BOB}>, .*status=discarded \(blocklist: .* matches eve@spam.test ")
    added = Scrape(gate).get("mailgate_filter_verdicts_total", filter="blocklist",
                             action="discard") - before.get(
        "mailgate_filter_verdicts_total", filter="blocklist", action="discard")
    assert added == 2


def test_domain_wildcards_match_subdomains_only_and_whole_names(dovecot, mailgate_factory,
                                                                backend):
    gate = blocking_gate(mailgate_factory, backend, [(ALICE, "*.bad.test"), (ALICE, "*@spam.test")])
    cases = {"x@mail.BAD.test": 0,          # a subdomain of bad.test
             "x@bad.test": 1,               # bad.test itself: *.bad.test does not say so
             "x@spam.test.example": 1,      # the pattern is the whole domain, not a prefix
             "x@notspam.test": 1,
             "": 1}                         # the null sender matches no pattern
    for sender, copies in cases.items():
        mark, _ = send(gate, sender, [ALICE])
        assert got(dovecot, ALICE, mark) == copies, sender


def test_an_at_domain_pattern_blocks_that_domain(dovecot, mailgate_factory, backend):
    """`@spam.test` (Postfix's access-map form) is `*@spam.test`: what the CLI says blocked is."""
    gate = blocking_gate(mailgate_factory, backend, [(ALICE, "@spam.test")])
    assert cli(gate, "block", "list", ALICE).stdout == "*@spam.test\n"
    mark, _ = send(gate, "eve@spam.test", [ALICE, CAROL])
    assert (got(dovecot, ALICE, mark), got(dovecot, CAROL, mark)) == (0, 1), \
        "'@spam.test' said blocked, and eve@spam.test got through"


def test_an_idn_pattern_blocks_the_same_domain_in_its_ascii_form(dovecot, mailgate_factory,
                                                                  backend):
    """`*@bücher.test` and `*@xn--bcher-kva.test` are one domain (IDNA); mail that is not
    SMTPUTF8 names it in the ASCII form, so the pattern as the user sees the domain blocks it."""
    gate = blocking_gate(mailgate_factory, backend, [(ALICE, "*@bücher.test")])
    mark, _ = send(gate, "eve@xn--bcher-kva.test", [ALICE, CAROL])
    assert (got(dovecot, ALICE, mark), got(dovecot, CAROL, mark)) == (0, 1), \
        "*@bücher.test did not block eve@xn--bcher-kva.test"
    gate.wait_log(r"blocklist: <eve@xn--bcher-kva.test> matches \*@bücher.test blocked by ")


def test_reject_refuses_at_rcpt_so_an_smtp_client_keeps_the_others(dovecot, mailgate_factory,
                                                                    backend):
    gate = blocking_gate(mailgate_factory, backend, [(ALICE, "*@spam.test")],
                         blocklist={"action": "reject"})
    mark = uuid.uuid4().hex
    with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=15) as s:
        s.ehlo()
        s.mail("eve@spam.test")
        refused = s.rcpt(ALICE)
        assert s.rcpt(CAROL)[0] == 250
        done = s.data(message(mark, "eve@spam.test"))
    assert refused[0] == 550 and refused[1].startswith(b"5.7.1 "), refused
    assert done[0] == 250, done
    assert (got(dovecot, ALICE, mark), got(dovecot, CAROL, mark)) == (0, 1)
    rcpt_replies, _ = lmtp_send(*gate.lmtp, "eve@spam.test", [ALICE], message(mark, "x"))
    assert rcpt_replies[ALICE][0] == 550 and rcpt_replies[ALICE][1].startswith("5.7.1 ")
    gate.wait_log(r"blocklist: <eve@spam.test> matches \*@spam.test blocked by .* refused at RCPT")


@pytest.mark.parametrize("backend", ["dynamodb"], indirect=True)  # SQLite's failure: test_store
def test_store_down_serves_what_was_read_and_fails_open_for_the_rest(dovecot, mailgate_factory,
                                                                     backend):
    gate = blocking_gate(mailgate_factory, backend, [(ALICE, "*@spam.test"), (CAROL, "*@spam.test")],
                         store={**backend.store, "cache_ttl": 0})
    mark, _ = send(gate, "eve@spam.test", [ALICE])   # alice is read before the outage
    assert got(dovecot, ALICE, mark) == 0
    backend.moto.stop()
    before = Scrape(gate)
    mark, replies = send(gate, "eve@spam.test", [ALICE, CAROL])
    assert [code for code, _ in replies] == [250, 250]
    assert (got(dovecot, ALICE, mark), got(dovecot, CAROL, mark)) == (0, 1)
    gate.wait_log(rf"blocklist: <{CAROL}> not checked, delivered: DynamoDB unavailable")
    assert Scrape(gate).get("mailgate_store_unavailable_total", filter="blocklist",
                            outcome="failed_open") - before.get(
        "mailgate_store_unavailable_total", filter="blocklist", outcome="failed_open") == 1
