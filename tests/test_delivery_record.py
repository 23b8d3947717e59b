"""The delivery record lives in the store: a restart between a partial failure and the sender's
retry does not deliver twice. Same case on SQLite and on DynamoDB (moto in server mode).
"""
from __future__ import annotations

from backends import backend, cli, moto_server  # noqa: F401 (fixtures)
from conftest import USERS
from test_delivery import delivery_line, expect, files, mark, message, smtp_send, unwritable  # noqa: F401
from mailgate.verdict import DELIVERED

ALICE, BOB, _ = USERS


def test_restart_between_partial_failure_and_retry_delivers_no_duplicate(
        dovecot, mailgate_factory, unwritable, backend) -> None:
    gate = mailgate_factory({"delivery": {"maildir": ""}, "store": backend.store},
                            env=backend.env)
    gate.wait_log(r"store: created .*state")   # serve made the state table itself
    tmp = unwritable(BOB, "tmp", 0o000)
    data = message(mark())

    first = smtp_send(gate, [ALICE, BOB], data)
    assert first.data[0] == 451, first.data   # alice has it, bob does not: one reply, 451
    assert len(dovecot.maildir_messages(ALICE)) == 1 and files(dovecot.maildir(BOB)) == []

    gate.restart()
    gate.wait_log(r"delivery record: 1 recipient\(s\) remembered from before the start")
    tmp.chmod(0o700)
    second = smtp_send(gate, [ALICE, BOB], data)
    expect(second.data, DELIVERED)
    assert len(dovecot.maildir_messages(ALICE)) == 1
    assert len(dovecot.maildir_messages(BOB)) == 1
    assert "already delivered (retry after a partial failure)" in delivery_line(
        gate, ALICE, "none", "sent")
