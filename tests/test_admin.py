"""The admin CLI as an operator uses it: `mailgate block|rule|store`, on both backends.

Bad input is exit 2 with one line naming what is wrong, and writes nothing. What root creates
stays usable by the service user: a mailgate running as vmail reads and writes it afterwards.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from backends import Backend, backend, cli, moto_server, owner  # noqa: F401 (fixtures)
from conftest import USERS
from mailgate.config import load
from mailgate.store import open_store
from peers import VMAIL_UID, Dovecot, Mailgate, lmtp_send

ALICE, BOB, CAROL = USERS


@pytest.fixture
def gate(tmp_path: Path, backend: Backend) -> Mailgate:
    """A mailgate config (not started: these commands need no running mailgate)."""
    config = {"hostname": "mx.example.test", "domains": ["example.test"],
              "data_dir": str(tmp_path / "data"), "store": backend.store}
    made = Mailgate(tmp_path / "gate", config, env=backend.env)
    if backend.name == "dynamodb":
        cli(made, "store", "init")
    return made


def test_rule_set_show_clear(gate, tmp_path):
    body = tmp_path / "away.txt"
    body.write_text("Back on Monday.\nUrgent: call the desk.\n")
    shown = cli(gate, "rule", "set", "Alice@Example.Test", "--forward", "friend@elsewhere.test",
                "--forward", "bob@example.test", "--no-keep-copy").stdout
    assert "forward:   friend@elsewhere.test, bob@example.test" in shown
    # a later set changes only what it names
    cli(gate, "rule", "set", ALICE, "--vacation", "on", "--subject", "Away until Monday",
        "--body-file", str(body), "--start", "2030-01-01", "--end", "2030-01-31T18:00+01:00")
    assert cli(gate, "rule", "show", ALICE).stdout == (
        "address:   alice@example.test\n"
        "forward:   friend@elsewhere.test, bob@example.test\n"
        "keep-copy: no\n"
        "vacation:  on\n"
        "subject:   Away until Monday\n"
        "start:     2030-01-01\n"
        "end:       2030-01-31T18:00:00+01:00\n"
        "body:\n"
        "  Back on Monday.\n"
        "  Urgent: call the desk.\n")
    assert cli(gate, "rule", "clear", ALICE).stdout == "alice@example.test: rule cleared\n"
    gone = cli(gate, "rule", "show", ALICE, check=False)
    assert (gone.returncode, gone.stdout) == (1, "")
    assert cli(gate, "rule", "clear", ALICE, check=False).returncode == 1


def test_vacation_without_a_body_gets_the_default_one(gate):
    shown = cli(gate, "rule", "set", BOB, "--vacation", "on").stdout
    assert "vacation:  on" in shown
    assert "  I am away at the moment and will read your message when I am back." in shown


def test_block_add_list_remove(gate):
    assert cli(gate, "block", "add", ALICE, "*@Spam.Test").stdout == \
        "alice@example.test: *@spam.test blocked\n"
    assert "was blocked already" in cli(gate, "block", "add", ALICE, "*@spam.test").stdout
    assert cli(gate, "block", "add", ALICE, "@spam.test").stdout == \
        "alice@example.test: *@spam.test was blocked already\n"  # Postfix's form of *@spam.test
    cli(gate, "block", "add", ALICE, "*.bad.test")
    assert cli(gate, "block", "list", ALICE).stdout == "*.bad.test\n*@spam.test\n"
    assert cli(gate, "block", "list", BOB).stdout == ""
    assert cli(gate, "block", "remove", ALICE, "*@spam.test").stdout == \
        "alice@example.test: *@spam.test unblocked\n"
    missing = cli(gate, "block", "remove", ALICE, "*@spam.test", check=False)
    assert missing.returncode == 1 and "was not blocked" in missing.stderr
    assert cli(gate, "block", "list", ALICE).stdout == "*.bad.test\n"


def test_config_option_before_or_after_the_verb(gate):
    cli(gate, "block", "add", ALICE, "*@x.test", config_first=True)
    assert cli(gate, "block", "list", ALICE).stdout == "*@x.test\n"


BAD_INPUT = [
    (("block", "add", "alice", "*@spam.test"), "'alice' is not an address"),
    (("block", "add", "someone@elsewhere.test", "*@spam.test"), "elsewhere.test is not one of domains"),
    (("block", "add", ALICE, "spam.test"), "use *@domain, *.domain or an address"),
    (("block", "add", ALICE, "*@*"), "would block every sender"),
    (("block", "add", ALICE, "x@"), "no domain after the @"),
    (("block", "remove", ALICE, "a b@x.test"), "no spaces"),
    (("rule", "set", ALICE, "--forward", "not-an-address"), "'not-an-address' is not an address"),
    (("rule", "set", ALICE, "--forward", "Alice@example.test"), "cannot forward to itself"),
    (("rule", "set", ALICE, "--start", "next monday"), "--start 'next monday': not an ISO 8601 date"),
    (("rule", "set", ALICE, "--start", "2030-02-01", "--end", "2030-01-31"), "is before --start"),
    (("rule", "set", ALICE, "--body-file", "/nonexistent/away.txt"), "No such file or directory"),
    (("rule", "set", ALICE, "--subject", "Away\r\nBcc: victim@x.test"), "no control characters"),
]


@pytest.mark.parametrize("args, why", BAD_INPUT, ids=[" ".join(a[:2]) + f" {i}"
                                                      for i, (a, _) in enumerate(BAD_INPUT)])
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # checked before the store is asked
def test_bad_input_is_exit_2_with_one_line_and_writes_nothing(gate, args, why):
    proc = cli(gate, *args, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and why in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert cli(gate, "rule", "show", ALICE, check=False).returncode == 1
    assert cli(gate, "block", "list", ALICE).stdout == ""


@pytest.mark.parametrize("backend", ["dynamodb"], indirect=True)
def test_store_init_creates_missing_tables_and_prints_the_least_iam_policy(gate, backend):
    dynamodb = backend.moto.client("dynamodb")
    dynamodb.delete_table(TableName="email-rules")
    out = cli(gate, "store", "init").stdout
    assert out.startswith("created email-rules\n"), out
    assert sorted(dynamodb.list_tables()["TableNames"]) == [
        "email-blocked-senders", "email-rules", "mailgate-state", "ses-outbound-messages"]
    ttl = dynamodb.describe_time_to_live(TableName="mailgate-state")["TimeToLiveDescription"]
    assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "expires_at")
    service, admin = json.loads(out[out.index("{"):])["Statement"]
    assert set(service["Action"]) == {
        "dynamodb:BatchGetItem", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:DeleteItem",
        "dynamodb:Scan", "dynamodb:DescribeTable", "dynamodb:CreateTable",
        "dynamodb:UpdateTimeToLive"}
    assert "dynamodb:UpdateItem" in admin["Action"] and "dynamodb:Scan" not in admin["Action"]
    assert "dynamodb:GetItem" in admin["Action"]  # rule set's consistent read
    assert "arn:aws:dynamodb:us-east-1:*:table/mailgate-state" in service["Resource"]
    assert not cli(gate, "store", "init").stdout.startswith("created")


# ---------------------------------------------------------------- root writes, vmail uses

@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_what_root_creates_stays_usable_by_the_service_user(dovecot: Dovecot, mailgate_factory,
                                                            backend):
    gate = mailgate_factory({"pipeline": {"filters": ["blocklist"]}}, start=False, user="vmail")
    data = Path(gate.config["data_dir"])
    cli(gate, "block", "add", ALICE, "*@spam.test")            # root makes the file
    assert owner(data / "mailgate.sqlite3") == (VMAIL_UID, VMAIL_UID)

    async def root_holds_it_open() -> None:
        """root's own -wal and -shm while vmail works: SQLite gives them the file's owner."""
        store = open_store(load(str(gate.config_path), environ={}))
        try:
            await store.add_block(BOB, "*@spam.test")
            gate.start()
            mark = uuid.uuid4().hex
            lmtp_send(*gate.lmtp, "eve@spam.test", [ALICE, CAROL],
                      f"Subject: {mark}\r\n\r\n{mark}\r\n".encode())
            assert [mark.encode() in m for m in dovecot.maildir_messages(CAROL)] == [True]
            assert not any(mark.encode() in m for m in dovecot.maildir_messages(ALICE))
            cli(gate, "block", "add", CAROL, "*@other.test", user="vmail")   # vmail writes
            for name in ("mailgate.sqlite3", "mailgate.sqlite3-wal", "mailgate.sqlite3-shm"):
                assert owner(data / name) == (VMAIL_UID, VMAIL_UID), name
        finally:
            await store.close()
    asyncio.run(root_holds_it_open())
    assert cli(gate, "block", "list", CAROL).stdout == "*@other.test\n"
    assert "unavailable" not in gate.log_text()
