"""The store's contract, the same cases on SQLite and on DynamoDB (moto in server mode).

Each test talks to the store the way filters and the CLI do (open_store on a config), and
checks what a user of the store sees: rules and patterns per address, first-claim-wins, expiry.
"""
from __future__ import annotations

import asyncio
import http.client
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from backends import moto_server  # noqa: F401 (fixture)
from mailgate.admin import change_rule, with_store
from mailgate.config import Config, Store as StoreSection
from mailgate.store import Rule, StoreUnavailable, open_store
from mailgate.store import sqlite as sqlite_store
from peers import AWS_TEST_ENV, REPO, Moto, wait_until
from storefault import StoreFault

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"


@pytest.fixture(params=["sqlite", "dynamodb"])
def config(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch) -> Config:
    if request.param == "sqlite":
        return Config(domains=("example.test",), data_dir=str(tmp_path),
                      store=StoreSection(path=str(tmp_path / "store.sqlite3")))
    moto: Moto = request.getfixturevalue("moto_server")
    moto.reset()
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    cfg = Config(domains=("example.test",), data_dir=str(tmp_path),
                 store=StoreSection(backend="dynamodb", endpoint_url=moto.endpoint,
                                    region="us-east-1", cache_ttl=0))
    run(cfg, lambda store: store.ensure_tables())
    return cfg


def run(config: Config, body: Callable[[Any], Awaitable[Any]]) -> Any:
    """body(store) on a store opened for this call and closed after it, as a CLI call does."""
    return with_store(config, body)


def test_rules_batch_read_keyed_as_asked_and_case_insensitive(config):
    rule = Rule("Alice@Example.Test", forward=("friend@elsewhere.test",), keep_copy=False,
                vacation=True, subject="Away", body="Back on Monday.\n",
                start="2030-01-01", end="2030-01-31T18:00:00+01:00")
    run(config, lambda s: s.set_rule(rule))
    found = run(config, lambda s: s.rules(["ALICE@example.test", BOB, CAROL]))
    assert list(found) == ["ALICE@example.test"]
    got = found["ALICE@example.test"]
    assert (got.forward, got.keep_copy, got.vacation) == (("friend@elsewhere.test",), False, True)
    assert (got.subject, got.body) == ("Away", "Back on Monday.\n")
    assert (got.start, got.end) == ("2030-01-01", "2030-01-31T18:00:00+01:00")


def test_rule_set_replaces_and_clear_removes(config):
    run(config, lambda s: s.set_rule(Rule(ALICE, forward=("a@x.test", "b@x.test"))))
    run(config, lambda s: s.set_rule(Rule(ALICE, vacation=True)))
    assert run(config, lambda s: s.rules([ALICE]))[ALICE] == Rule(ALICE, vacation=True)
    assert run(config, lambda s: s.clear_rule(ALICE)) is True
    assert run(config, lambda s: s.clear_rule(ALICE)) is False
    assert run(config, lambda s: s.rules([ALICE])) == {}


def test_rule_set_reads_the_rule_it_changes_consistently(config):
    """`rule set` reads the rule and writes the whole item back: on DynamoDB that read must be
    strongly consistent (an eventually consistent one may return the item as it was before the
    last write, and the write would undo that change). Seen in the requests boto3 sends."""
    run(config, lambda s: s.set_rule(Rule(ALICE, forward=("a@x.test",))))
    sent: list[tuple[str, Any]] = []

    async def change(store):
        if config.store.backend == "dynamodb":
            store.client().meta.events.register(
                "provide-client-params.dynamodb.*",
                lambda params, model, **_: sent.append((model.name, params.get("ConsistentRead"))))
        return await change_rule(store, ALICE, {"keep_copy": False})

    assert run(config, change) == Rule(ALICE, forward=("a@x.test",), keep_copy=False)
    if config.store.backend == "dynamodb":
        assert sent == [("GetItem", True), ("PutItem", None)], sent
    assert run(config, lambda s: s.rule(BOB)) is None


def test_blocked_patterns_per_address(config):
    async def body(s):
        assert await s.add_block(ALICE, "*@Spam.Test") is True
        assert await s.add_block(ALICE, "*@spam.test") is False   # the same, case aside
        assert await s.add_block(ALICE, "*.bad.test") is True
        assert await s.add_block(BOB, "eve@evil.test") is True
        return await s.blocked([ALICE, "Bob@Example.Test", CAROL])
    assert run(config, body) == {ALICE: ("*.bad.test", "*@spam.test"),
                                 "Bob@Example.Test": ("eve@evil.test",)}
    assert run(config, lambda s: s.remove_block(ALICE, "*@SPAM.test")) is True
    assert run(config, lambda s: s.remove_block(ALICE, "*@spam.test")) is False
    assert run(config, lambda s: s.remove_block(BOB, "eve@evil.test")) is True
    assert run(config, lambda s: s.blocked([ALICE, BOB])) == {ALICE: ("*.bad.test",)}


def test_claim_first_caller_wins_until_it_expires_or_is_forgotten(config):
    async def body(s):
        firsts = await asyncio.gather(*(s.claim("k:1", 60) for _ in range(5)))
        return firsts, await s.seen("k:1"), await s.seen("k:2")
    firsts, seen, unseen = run(config, body)
    assert sorted(firsts) == [False, False, False, False, True]
    assert (seen, unseen) == (True, False)
    run(config, lambda s: s.forget("k:1"))
    assert run(config, lambda s: s.seen("k:1")) is False
    assert run(config, lambda s: s.claim("k:1", 0.5)) is True
    wait_until(lambda: not run(config, lambda s: s.seen("k:1")), 5, what="claim expired")
    assert run(config, lambda s: s.claim("k:1", 60)) is True


def test_claims_are_shared_between_store_instances(config):
    async def body(_):
        one, two = open_store(config), open_store(config)
        try:
            return await one.claim("shared", 60), await two.claim("shared", 60), \
                await two.seen("shared")
        finally:
            await one.close()
            await two.close()
    assert run(config, body) == (True, False, True)


def test_keys_by_prefix_leave_out_expired_and_others(config):
    async def body(s):
        for key, ttl in (("delivered:a", 60), ("delivered:b", 60), ("delivered:c", 0),
                         ("vacation:a", 60)):   # ttl 0: expired as soon as written
            await s.claim(key, ttl)
        return sorted(await s.keys("delivered:"))
    assert run(config, body) == ["delivered:a", "delivered:b"]


def test_outbound_items_round_trip(config):
    item = {"original_sender": "me@example.test", "recipients": ["x@remote.test"],
            "sent_at": "2030-01-01T00:00:00+00:00"}
    run(config, lambda s: s.put_outbound("0100018c-abc", item))
    got = run(config, lambda s: s.outbound("0100018c-abc"))
    expires = got.pop("expires_at")   # the TTL attribute: 30 days on
    assert 29 * 86400 < expires - time.time() < 31 * 86400
    assert got == {**item, "message_id": "0100018c-abc"}
    assert run(config, lambda s: s.outbound("0100018c-none")) is None


def test_a_file_that_is_no_database_is_store_unavailable(tmp_path):
    path = tmp_path / "store.sqlite3"
    path.write_bytes(b"this is not an SQLite database, " * 100)
    config = Config(domains=("example.test",), data_dir=str(tmp_path),
                    store=StoreSection(path=str(path)))
    with pytest.raises(StoreUnavailable) as caught:
        run(config, lambda s: s.rules([ALICE, BOB]))
    assert caught.value.unread == {ALICE, BOB} and caught.value.known == {}
    with pytest.raises(StoreUnavailable):
        run(config, lambda s: s.claim("k", 60))


def test_new_sqlite_file_belongs_to_the_owner_of_its_directory(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 5000, 5000)   # the service user's state directory; we are root
    config = Config(domains=("example.test",), data_dir=str(data))
    run(config, lambda s: s.claim("k", 60))
    db = data / "mailgate.sqlite3"
    assert (db.stat().st_uid, db.stat().st_gid, db.stat().st_mode & 0o777) == (5000, 5000, 0o600)


# ---------------------------------------------------------------- the SQLite file under serve

def sqlite_site(tmp_path: Path, **store: Any) -> tuple[Config, Path]:
    """A config file as the CLI reads it, and the same config for the in-process store."""
    toml = tmp_path / "mailgate.toml"
    toml.write_text(f'domains = ["example.test"]\ndata_dir = "{tmp_path}"\n')
    return Config(domains=("example.test",), data_dir=str(tmp_path),
                  store=StoreSection(**store)), toml


def admin(toml: Path, *args: str) -> str:
    """`mailgate ARGS -c TOML` in its own process, as an operator runs it; its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "mailgate", *args, "-c", str(toml)], env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc
    return proc.stdout


@pytest.mark.parametrize("how", ["rm", "backup-moved-over"])
def test_serve_follows_the_file_the_cli_writes_after_it_was_removed_or_replaced(tmp_path, how):
    """As the README says to: the file removed or replaced together with its -wal and -shm."""
    config, toml = sqlite_site(tmp_path)
    db = tmp_path / "mailgate.sqlite3"

    async def body(serve):
        admin(toml, "block", "add", ALICE, "*@spam.test")
        assert await serve.blocked([ALICE]) == {ALICE: ("*@spam.test",)}
        assert await serve.claim("before", 60) is True
        if how == "backup-moved-over":
            with sqlite3.connect(db) as backup:
                backup.execute("VACUUM INTO ?", (str(tmp_path / "backup.sqlite3"),))
        for name in ("", "-wal", "-shm"):
            os.unlink(f"{db}{name}")
        if how == "backup-moved-over":
            os.rename(tmp_path / "backup.sqlite3", db)
        admin(toml, "block", "add", ALICE, "*@evil.test")
        listed = tuple(admin(toml, "block", "list", ALICE).split())
        assert "*@evil.test" in listed
        assert await serve.blocked([ALICE]) == {ALICE: listed}   # what the CLI sees, serve sees
        assert await serve.claim("after", 60) is True
    run(config, body)
    assert run(config, lambda s: s.seen("after")) is True   # written to the file at the path


def test_a_file_removed_under_serve_is_made_again_as_at_start(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 5000, 5000)   # the service user's state directory; we are root
    config, _ = sqlite_site(data)
    db = data / "mailgate.sqlite3"

    async def body(serve):
        assert await serve.claim("one", 60) is True
        for name in ("", "-wal", "-shm"):
            os.unlink(f"{db}{name}")
        assert await serve.claim("two", 60) is True
    run(config, body)
    assert (db.stat().st_uid, db.stat().st_gid, db.stat().st_mode & 0o777) == (5000, 5000, 0o600)
    assert [run(config, lambda s, k=k: s.seen(k)) for k in ("one", "two")] == [False, True]


def test_a_write_stuck_on_a_lock_holds_up_no_read_and_ends_by_the_deadline(tmp_path):
    """Another process holds the write lock: claims give up within store.deadline, reads of
    the same file go on at once (WAL), and a claim given up on is not written later."""
    config, _ = sqlite_site(tmp_path, path=str(tmp_path / "store.sqlite3"), timeout=1,
                            deadline=1.5)
    run(config, lambda s: s.set_rule(Rule(ALICE, vacation=True)))
    locker = subprocess.Popen([sys.executable, "-c", f"""if True:
        import sqlite3, sys
        db = sqlite3.connect({str(tmp_path / "store.sqlite3")!r}, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        print("locked", flush=True)
        sys.stdin.read()
        db.execute("ROLLBACK")"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline() == "locked\n"

        async def body(s):
            claims = [asyncio.ensure_future(s.claim(f"k{i}", 60)) for i in range(3)]
            await asyncio.sleep(0)   # not a wait: lets the claims queue before the read
            started = time.monotonic()
            rules = await s.rules([ALICE])
            read_took = time.monotonic() - started
            outcomes = await asyncio.gather(*claims, return_exceptions=True)
            return rules, read_took, outcomes, time.monotonic() - started
        rules, read_took, outcomes, took = run(config, body)
    finally:
        locker.communicate("")
    assert rules == {ALICE: Rule(ALICE, vacation=True)} and read_took < 0.5
    assert [type(o) for o in outcomes] == [StoreUnavailable] * 3 and took < 2.0
    assert [run(config, lambda s, i=i: s.seen(f"k{i}")) for i in range(3)] == [False] * 3


def test_a_write_given_up_on_is_not_in_the_store_and_one_reported_done_is(tmp_path):
    """A claim that runs past store.deadline (here: the purge of 600,000 expired rows that the
    first claim does) is interrupted and rolled back, or finishes and is reported: the caller
    never hears "failed" about a claim that went in (a vacation reply lost for a period)."""
    config, _ = sqlite_site(tmp_path, timeout=2.0, deadline=0.05)
    run(config, lambda s: s.seen("create"))
    with sqlite3.connect(tmp_path / "mailgate.sqlite3") as db:
        db.executemany("INSERT INTO state VALUES (?, ?)",
                       ((f"old{i}", 1.0) for i in range(600_000)))

    async def body(s):
        try:
            return await s.claim("vacation:alice:bob", 3600)
        except StoreUnavailable:
            return "failed"
    outcome = run(config, body)
    patient, _ = sqlite_site(tmp_path, timeout=2.0, deadline=30)
    assert run(patient, lambda s: s.seen("vacation:alice:bob")) is (outcome is True), outcome


def test_expired_outbound_records_are_deleted_from_the_file(tmp_path, monkeypatch):
    config, _ = sqlite_site(tmp_path)
    month_ago = time.time() - 31 * 86400
    monkeypatch.setattr(sqlite_store, "time", type("Clock", (), {"time": lambda: month_ago}))
    run(config, lambda s: s.put_outbound("old", {"original_sender": "me@example.test"}))
    monkeypatch.undo()
    run(config, lambda s: s.put_outbound("new", {"original_sender": "me@example.test"}))
    run(config, lambda s: s.claim("k", 60))   # expired state and records go with a claim
    with sqlite3.connect(tmp_path / "mailgate.sqlite3") as db:
        assert db.execute("SELECT message_id FROM outbound").fetchall() == [("new",)]


# ---------------------------------------------------------------- DynamoDB unreachable

def dynamo_config(moto: Moto, data_dir: Path, **store: Any) -> Config:
    return Config(domains=("example.test",), data_dir=str(data_dir),
                  store=StoreSection(backend="dynamodb", endpoint_url=moto.endpoint,
                                     region="us-east-1", **store))


def test_outage_serves_what_was_read_before_even_after_a_restart(moto, tmp_path, monkeypatch):
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    config = dynamo_config(moto, tmp_path, cache_ttl=0)
    run(config, lambda s: s.ensure_tables())
    run(config, lambda s: s.set_rule(Rule(ALICE, forward=("friend@elsewhere.test",))))
    run(config, lambda s: s.add_block(ALICE, "*@spam.test"))
    # alice (a rule) and bob (none) are read once; carol never
    assert list(run(config, lambda s: s.rules([ALICE, BOB]))) == [ALICE]
    assert list(run(config, lambda s: s.blocked([ALICE, BOB]))) == [ALICE]
    moto.stop()
    for _ in range(2):  # the second store is a restarted mailgate: the copy is on disk
        with pytest.raises(StoreUnavailable) as rules:
            run(config, lambda s: s.rules([ALICE, BOB, CAROL]))
        assert rules.value.known == {ALICE: Rule(ALICE, forward=("friend@elsewhere.test",))}
        assert rules.value.unread == {CAROL}
        with pytest.raises(StoreUnavailable) as blocked:
            run(config, lambda s: s.blocked([ALICE, BOB, CAROL]))
        assert (blocked.value.known, blocked.value.unread) == ({ALICE: ("*@spam.test",)}, {CAROL})
    with pytest.raises(StoreUnavailable):
        run(config, lambda s: s.claim("k", 60))


def test_a_silent_endpoint_fails_within_the_deadline(tmp_path, monkeypatch):
    """boto3's defaults would wait 60 s per attempt, 10 attempts; the store gives up in time."""
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    with socket.socket() as silent:   # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        config = Config(domains=("example.test",), data_dir=str(tmp_path), store=StoreSection(
            backend="dynamodb", endpoint_url=endpoint, region="us-east-1", timeout=0.5,
            deadline=1.5))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            run(config, lambda s: s.rules([ALICE]))
        assert time.monotonic() - started < 4
        assert caught.value.unread == {ALICE}


class LandsThenFails(StoreFault):
    """The first matching request reaches moto and is done there; its client hears 500 (the
    reply lost), so botocore sends it a second time."""

    def refuses(self, target: str, body: bytes) -> bool:
        if not super().refuses(target, body):
            return False
        with self.lock:
            self.rules.clear()
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            upstream.request("POST", "/", body, {  # moto tells the service by the scope
                "X-Amz-Target": target, "Content-Type": "application/x-amz-json-1.0",
                "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20300101/us-east-1/"
                                 "dynamodb/aws4_request, SignedHeaders=host, Signature=0"})
            reply = upstream.getresponse()
            assert (reply.status, reply.read()) == (200, b"{}")
        finally:
            upstream.close()
        return True


@pytest.mark.parametrize("action, text", [("PutItem", "vacation:"),
                                          ("UpdateItem", "*@spam.test")])
def test_a_write_whose_reply_was_lost_counts_as_done_by_its_writer(moto, tmp_path, monkeypatch,
                                                                    action, text):
    """botocore's second try finds the item its first try wrote: the claim is still won (and
    held against others), the pattern still reported added."""
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    run(dynamo_config(moto, tmp_path), lambda s: s.ensure_tables())
    proxy = LandsThenFails(moto.endpoint)
    try:
        proxy.fail(action, text)
        config = Config(domains=("example.test",), data_dir=str(tmp_path), store=StoreSection(
            backend="dynamodb", endpoint_url=proxy.endpoint, region="us-east-1", cache_ttl=0))
        if action == "PutItem":
            assert run(config, lambda s: s.claim("vacation:k", 60)) is True
            assert run(config, lambda s: s.claim("vacation:k", 60)) is False
        else:
            assert run(config, lambda s: s.add_block(ALICE, "*@spam.test")) is True
            assert run(config, lambda s: s.add_block(ALICE, "*@spam.test")) is False
            assert run(config, lambda s: s.blocked([ALICE])) == {ALICE: ("*@spam.test",)}
        assert proxy.failed == 1
    finally:
        proxy.close()


def test_a_missing_table_fails_its_own_calls_only(moto, tmp_path, monkeypatch):
    """serve makes no outbound table: a write there is refused, and reads of the other tables
    that follow are asked, not failed at once as in an outage."""
    for name, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    config = dynamo_config(moto, tmp_path, cache_ttl=0)
    run(config, lambda s: s.ensure_tables(["rules", "blocked", "state"]))
    run(config, lambda s: s.set_rule(Rule(BOB, forward=("x@elsewhere.test",))))

    async def body(s):
        with pytest.raises(StoreUnavailable):
            await s.put_outbound("m1", {"original_sender": ALICE})
        return await asyncio.gather(s.rules([BOB]), s.rules([CAROL]), s.blocked([CAROL]),
                                    return_exceptions=True)
    assert run(config, body) == [{BOB: Rule(BOB, forward=("x@elsewhere.test",))}, {}, {}]
