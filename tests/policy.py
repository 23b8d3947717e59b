"""Peers and helpers the policy filter tests share (test_rules, test_vacation, test_bounce).

One Dovecot (and, for the DynamoDB runs, one moto server: tests/backends.py) per test module;
a fresh store, relay sink and mailgate per test. `backend` runs a test on SQLite and on DynamoDB
in moto server mode. Tests reach the store the way mailgate does (mailgate.store.open_store on the gate's own
config), never through boto3 or sqlite3. Import the fixtures into a test module by name.
"""
from __future__ import annotations

import asyncio
import smtplib
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from backends import Backend, backend, cli, moto_server  # noqa: F401 (fixtures)
from conftest import USERS, base_config, merge, register
from mailgate.config import load
from mailgate.store import open_store
from peers import Dovecot, Mailgate, lmtp_send
from relaysink import RelaySink

ALICE, BOB, CAROL = USERS
SENDER = "sender@remote.test"
FRIEND = "friend@elsewhere.test"  # an address outside our domains
REPLY_BOUND = 15.0


GateFactory = Callable[..., Mailgate]


@pytest.fixture
def gates(module_root: Path, dove: Dovecot, relay: RelaySink, backend: Backend,
          request: pytest.FixtureRequest,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[GateFactory]:
    """`gates(filters=("rules",), overrides=None) -> Mailgate`, started; all gates of one test
    share one store (one SQLite file, or the moto tables) and send to the `relay` sink."""
    for name, value in backend.env.items():  # for this process's own store calls
        monkeypatch.setenv(name, value)
    started: list[Mailgate] = []
    test_dir = module_root / f"t-{uuid.uuid4().hex[:8]}"
    store = {"path": str(test_dir / "store.sqlite3"), **backend.store}

    def factory(filters=("rules",), overrides: dict | None = None) -> Mailgate:
        root = test_dir / f"mailgate-{len(started)}"
        config = merge(base_config(root, dove),
                       {"pipeline": {"filters": list(filters)},
                        "relay": {"smtp": relay.address}, "store": store})
        gate = Mailgate(root, merge(config, overrides or {}), env=backend.env)
        started.append(gate)
        register(request, root.name, gate)
        if backend.name == "dynamodb" and len(started) == 1:
            cli(gate, "store", "init")
        return gate.start()

    try:
        yield factory
    finally:
        for gate in started:
            gate.stop(timeout=10)


def store_call(gate: Mailgate, method: str, *args: Any) -> Any:
    """Call the gate's store (its own config, its own backend), as mailgate itself would."""
    async def run() -> Any:
        store = open_store(load(str(gate.config_path), environ={}))
        try:
            return await getattr(store, method)(*args)
        finally:
            await store.close()
    return asyncio.run(run())


# ---------------------------------------------------------------- messages and clients

def mark() -> str:
    return uuid.uuid4().hex[:16]


def message(mark: str, sender: str = SENDER, to: str = ALICE, head: str = "",
            subject: str | None = None) -> bytes:
    return (f"{head}From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject or 'policy ' + mark}\r\n"
            f"Message-ID: <{mark}@remote.test>\r\n\r\nbody {mark}\r\n").encode()


def lmtp(gate: Mailgate, rcpts: list[str], data: bytes,
         sender: str = SENDER) -> list[tuple[int, str]]:
    """One LMTP transaction; the per-recipient replies after DATA (all RCPTs must be taken)."""
    rcpt_replies, replies = lmtp_send(*gate.lmtp, sender, rcpts, data, timeout=REPLY_BOUND)
    assert all(code == 250 for code, _ in rcpt_replies.values()), rcpt_replies
    return replies


def smtp(gate: Mailgate, rcpts: list[str], data: bytes, sender: str = SENDER) -> tuple[int, bytes]:
    with smtplib.SMTP(*gate.smtp, local_hostname="client.test", timeout=REPLY_BOUND) as s:
        s.ehlo()
        s.mail(sender)
        for rcpt in rcpts:
            assert s.rcpt(rcpt)[0] == 250
        return s.data(data)


def status(reply: tuple[int, str | bytes]) -> tuple[int, str]:
    """(code, enhanced status) of a reply."""
    text = reply[1].decode() if isinstance(reply[1], bytes) else reply[1]
    return reply[0], text.split(" ", 1)[0]


def copies(dove: Dovecot, addr: str, mark: str) -> list[bytes]:
    """Messages with `mark` in addr's maildir."""
    return [m for m in dove.maildir_messages(addr) if mark.encode() in m]
